"""Tests for pipeline.skip.cac: the manual stops and cac-auto (weight variance) policies, per tensor."""

import pytest

from pipeline.skip import Decision, SkipPolicy
from pipeline.skip.cac import braking_start, freeze_step
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

# ---------------------------------------------------------------------------- CAC's timing


@pytest.mark.parametrize(("braking", "frozen_from"), [(0, 21), (1, 20), (2, 21), (4, 23)])
def test_freeze_step_is_cacs(braking, frozen_from):
    # Braking from step 20: N = 0 still trains step 20; N >= 1 freezes from 20 + N - 1.
    assert freeze_step(20, braking) == frozen_from
    assert braking_start(frozen_from, braking) == 20


# ---------------------------------------------------------------------------- manual ([skip] keys: layers)


def test_manual_freezes_from_each_stop_step_on():
    manual = policy(policy="manual", stop_layers=[1, 4], stop_steps=[3, 6])
    assert manual.name == "manual"
    decisions = run(manual, [step_stats(s) for s in range(8)])
    assert boundaries(decisions) == [0, 0, 0, 2, 2, 2, 5, 5, 5]
    # [skip] stop_layers freeze whole layers: layers 0..1 hold tensors 0..1, layers 0..4 tensors 0..5.
    assert changes(decisions) == {3: (2, 2), 6: (6, 5)}


def test_manual_stop_at_step_zero_is_the_initial_decision():
    manual = policy(policy="manual", stop_layers=[2, 3], stop_steps=[0, 2])
    assert boundaries(run(manual, [step_stats(s) for s in range(3)])) == [3, 3, 4, 4]


def test_manual_braking_slows_the_tensors_that_will_freeze():
    manual = policy(policy="manual", stop_layers=[2], stop_steps=[10], braking_distance=4)
    decisions = run(manual, [step_stats(s, lr=0.1 + s / 100) for s in range(11)])
    assert decisions[6] == Decision(0, {}, 0)
    tensors = (0, 1, 2, 3)  # layers 0..2
    assert decisions[7] == Decision(0, dict.fromkeys(tensors, 9 / 16), 0)
    # From the second braking step on the factors multiply the rate of the first (step 7: 0.17).
    for step, factor in ((8, 4 / 16), (9, 1 / 16)):
        assert decisions[step] == Decision(0, dict.fromkeys(tensors, factor), 0, dict.fromkeys(tensors, 0.17)), step
    assert decisions[10] == Decision(3, {}, 4)
    assert decisions[11] == Decision(3, {}, 4)


def test_manual_stops_closer_than_the_braking_distance_all_happen():
    # Documented improvement: CAC's own implementation loses the second stop, which falls inside
    # the first one's braking (and every stop after it).
    manual = policy(policy="manual", stop_layers=[0, 2], stop_steps=[5, 6], braking_distance=3)
    decisions = run(manual, [step_stats(s) for s in range(7)])
    assert decisions[2] == Decision(0, {}, 0)
    assert decisions[3] == Decision(0, {0: 4 / 9, 1: 4 / 9}, 0)
    assert decisions[4] == Decision(0, {0: 1 / 9, 1: 1 / 9, 2: 4 / 9, 3: 4 / 9}, 0, {0: 0.1, 1: 0.1})
    assert decisions[5] == Decision(1, {2: 1 / 9, 3: 1 / 9}, 2, {2: 0.1, 3: 0.1})
    assert decisions[6] == Decision(3, {}, 4)
    assert decisions[7] == Decision(3, {}, 4)


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
        # Kernel 0 stops at sample 3 (start_thr), kernel 2 at sample 10 (mountain), kernel 4 at 11
        # (slope). Decided after steps 49, 119, 129; without braking CAC trains one more step.
        (CAC_CONFIGURED, {}, {51: (1, 0), 121: (3, 2), 131: (5, 4)}),
        ({}, CAC_ENV, {51: (1, 0), 121: (3, 2), 131: (5, 4)}),
        ({}, {**CAC_ENV, "CAC_VAR_START_THR": "0.9"}, {}),
        ({}, {**CAC_ENV, "CAC_VAR_SLOPE_THR": "0.97"}, {51: (1, 0), 121: (3, 2), 151: (5, 4)}),
        # 6 peak updates are no longer "more than" the count: kernel 2 is a slope and stops at 0.97.
        ({}, {**CAC_ENV, "CAC_VAR_MT_COUNT_THR": "6"}, {51: (1, 0), 111: (3, 2), 131: (5, 4)}),
        # Braking 15: no samples while a target brakes, so kernel 2 sees 5 peak updates (a slope)
        # and kernel 4 misses its sample 10 (2.2): its peak is 2.15 and it stops at 2.1 (0.977).
        ({**CAC_CONFIGURED, "braking_distance": 15}, {}, {64: (1, 0), 124: (3, 2), 164: (5, 4)}),
        ({}, {**CAC_ENV, "CAC_BRAKING_DISTANCE": "15"}, {64: (1, 0), 124: (3, 2), 164: (5, 4)}),
    ],
)
def test_cac_auto_freezes_on_falling_weight_variance(skip, env, expected):
    cac_auto = _cac_policy(env, **skip)
    assert cac_auto.name == "cac-auto"
    assert changes(run(cac_auto, cac_stats())) == expected


def test_cac_auto_stops_freeze_tensors_and_leave_the_bias_after_them_training():
    decisions = run(_cac_policy(**CAC_CONFIGURED), cac_stats(130))
    # Kernel 0 stopped: its bias (tensor 1) trains on, so layer 0 is only partly frozen.
    assert decisions[51] == Decision(0, {}, 1)
    # Kernel 2 stopped: tensors 0..2; layer 0 is whole now and so is layer 1 (no parameters).
    assert decisions[121] == Decision(2, {}, 3)


def test_cac_auto_braking_factors_fall_quadratically_from_the_rate_braking_began_at():
    lrs = [0.1 + step / 1000 for step in range(150)]
    decisions = run(_cac_policy(**CAC_CONFIGURED, braking_distance=4), cac_stats(150, lrs))
    assert decisions[49] == Decision(0, {}, 0)
    # Decided after step 49: steps 50..52 brake, the later two from step 50's rate.
    assert [decisions[s] for s in (50, 51, 52, 53)] == [
        Decision(0, {0: 9 / 16}, 0),
        Decision(0, {0: 4 / 16}, 0, {0: lrs[50]}),
        Decision(0, {0: 1 / 16}, 0, {0: lrs[50]}),
        Decision(0, {}, 1),
    ]
    # Kernel 2's decision after step 119 brakes tensors 1 (kernel 0's bias) and 2.
    assert decisions[121] == Decision(0, {1: 4 / 16, 2: 4 / 16}, 1, {1: lrs[120], 2: lrs[120]})
    assert changes(decisions) == {53: (1, 0), 123: (3, 2), 133: (5, 4)}


def test_cac_auto_with_braking_distance_one_freezes_at_once():
    assert changes(run(_cac_policy(**CAC_CONFIGURED, braking_distance=1), cac_stats())) == {
        50: (1, 0), 120: (3, 2), 130: (5, 4)
    }
