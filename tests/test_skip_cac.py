"""Tests for pipeline.skip.cac: the manual stops and cac-auto (weight variance) policies."""

import pytest

from pipeline.skip import Decision, SkipPolicy
from tests.skip_scenarios import (
    CAC_CONFIGURED,
    CAC_ENV,
    boundaries,
    cac_stats,
    changes,
    policy,
    run,
    step_stats,
)

# ---------------------------------------------------------------------------- manual


def test_manual_freezes_from_each_stop_step_on():
    manual = policy(policy="manual", stop_layers=[1, 4], stop_steps=[3, 6])
    assert manual.name == "manual"
    assert boundaries(run(manual, [step_stats(s) for s in range(8)])) == [0, 0, 0, 2, 2, 2, 5, 5, 5]


def test_manual_stop_at_step_zero_is_the_initial_decision():
    manual = policy(policy="manual", stop_layers=[2, 3], stop_steps=[0, 2])
    assert boundaries(run(manual, [step_stats(s) for s in range(3)])) == [3, 3, 4, 4]


def test_manual_braking_slows_the_layers_that_will_freeze():
    manual = policy(policy="manual", stop_layers=[2], stop_steps=[10], braking_distance=4)
    decisions = run(manual, [step_stats(s) for s in range(11)])
    assert decisions[6] == Decision(0, {})
    for step, factor in ((7, 9 / 16), (8, 4 / 16), (9, 1 / 16)):
        assert decisions[step] == Decision(0, dict.fromkeys((0, 1, 2), factor)), step
    assert decisions[10] == Decision(3, {})
    assert decisions[11] == Decision(3, {})


def test_manual_stops_closer_than_the_braking_distance_all_happen():
    # CAC's own implementation loses the second stop: it falls inside the first one's braking.
    manual = policy(policy="manual", stop_layers=[0, 2], stop_steps=[5, 6], braking_distance=3)
    decisions = run(manual, [step_stats(s) for s in range(7)])
    assert decisions[2] == Decision(0, {})
    assert decisions[3] == Decision(0, {0: 4 / 9})
    assert decisions[4] == Decision(0, {0: 1 / 9, 1: 4 / 9, 2: 4 / 9})
    assert decisions[5] == Decision(1, {1: 1 / 9, 2: 1 / 9})
    assert decisions[6] == Decision(3, {})
    assert decisions[7] == Decision(3, {})


def test_manual_stop_layer_must_exist():
    message = r"^skip\.stop_layers names layer 9, but the model has layers 0\.\.7$"
    with pytest.raises(ValueError, match=message):
        policy(policy="manual", stop_layers=[9], stop_steps=[0])
    assert policy(policy="manual", stop_layers=[7], stop_steps=[0]).name == "manual"


# ---------------------------------------------------------------------------- cac-auto


def _cac_policy(env=None, **skip) -> SkipPolicy:
    return policy(policy="cac-auto", num_layers=7, env=env, **skip)


@pytest.mark.parametrize(
    ("skip", "env", "expected"),
    [
        # Layer 0 stops at sample 3 (start_thr), layer 2 at sample 10 (mountain), layer 4 at 11 (slope).
        (CAC_CONFIGURED, {}, {50: 1, 120: 3, 130: 5}),
        ({}, CAC_ENV, {50: 1, 120: 3, 130: 5}),
        ({}, {**CAC_ENV, "CAC_VAR_START_THR": "0.9"}, {}),
        ({}, {**CAC_ENV, "CAC_VAR_SLOPE_THR": "0.97"}, {50: 1, 120: 3, 150: 5}),
        # 6 peak updates are no longer "more than" the count: layer 2 is a slope and stops at 0.97.
        ({}, {**CAC_ENV, "CAC_VAR_MT_COUNT_THR": "6"}, {50: 1, 110: 3, 130: 5}),
        # Braking 15: no samples while a target brakes, so layer 2 sees 5 peak updates (a slope)
        # and layer 4 misses its sample 10 (2.2): its peak is 2.15 and it stops at 2.1 (0.977).
        ({**CAC_CONFIGURED, "braking_distance": 15}, {}, {64: 1, 124: 3, 164: 5}),
        ({}, {**CAC_ENV, "CAC_BRAKING_DISTANCE": "15"}, {64: 1, 124: 3, 164: 5}),
    ],
)
def test_cac_auto_freezes_on_falling_weight_variance(skip, env, expected):
    cac_auto = _cac_policy(env, **skip)
    assert cac_auto.name == "cac-auto"
    assert changes(run(cac_auto, cac_stats())) == expected


def test_cac_auto_braking_factors_fall_quadratically():
    decisions = run(_cac_policy(**CAC_CONFIGURED, braking_distance=4), cac_stats(150))
    assert decisions[49] == Decision(0, {})
    assert [decisions[s] for s in (50, 51, 52, 53)] == [
        Decision(0, {0: 9 / 16}),
        Decision(0, {0: 4 / 16}),
        Decision(0, {0: 1 / 16}),
        Decision(1, {}),
    ]
    # Layer 2's decision after step 119 brakes layers 1 and 2 (1 has no weights, the factor is harmless).
    assert decisions[121] == Decision(1, {1: 4 / 16, 2: 4 / 16})
    assert changes(decisions) == {53: 1, 123: 3, 133: 5}
