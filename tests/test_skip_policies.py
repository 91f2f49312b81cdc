"""Tests for pipeline.skip.policies and make_policy: none, the cap, lars, norm-ema, schedule, saved state."""

import json

import pytest

from pipeline.skip import Decision, LayerStat, ParamStat
from tests.skip_scenarios import (
    BIAS,
    CAC_CONFIGURED,
    KERNEL,
    boundaries,
    cac_stats,
    epoch_stats,
    norm_ema_epochs,
    policy,
    run,
    step_stats,
)

# ---------------------------------------------------------------------------- none and the cap


def test_none_never_freezes():
    none = policy(policy="none")
    assert none.name == "none"
    assert boundaries(run(none, [step_stats(s) for s in range(3)])) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("edge_tail", "max_boundary", "expected"),
    [(1, None, 7), (0, None, 7), (3, None, 5), (1, 2, 2), (1, 0, 0)],
)
def test_every_boundary_is_capped(edge_tail, max_boundary, expected):
    extra = {} if max_boundary is None else {"max_boundary": max_boundary}
    manual = policy(policy="manual", stop_layers=[7], stop_steps=[0], edge_tail=edge_tail, **extra)
    assert manual.initial().boundary == expected


@pytest.mark.parametrize(("num_layers", "epochs"), [(0, 4), (8, 0)])
def test_make_policy_needs_layers_and_epochs(num_layers, epochs):
    with pytest.raises(ValueError, match="must be positive"):
        policy(policy="none", num_layers=num_layers, epochs=epochs)


# ---------------------------------------------------------------------------- lars


def test_lars_skips_up_to_the_deepest_conv_layer_with_large_nw():
    norms = {0: 3.0, 2: 1.0, 4: 2.0, 6: 100.0}
    epochs = [
        {0: (True, 1.0), 2: (True, 1.0), 4: (True, 2.0), 6: (False, 1.0)},  # nw 3, 1, 1 (>2: layer 0)
        {0: (True, 0.0), 2: (True, 0.4), 4: (True, 1.5), 6: (False, 1.0)},  # nw inf, 2.5, 1.33
        {0: (True, 0.0), 2: (True, 0.0), 4: (True, 1.0), 6: (False, 1.0)},  # nw 2 is not above alpha
        # Artificial (frozen layers report no update): nothing above alpha, yet the boundary stays.
        {0: (True, 2.0), 2: (True, 1.0), 4: (True, 1.0), 6: (False, 1.0)},
    ]
    decisions = run(policy(policy="lars"), epoch_stats(epochs, norms=norms))
    # The boundary only changes at epoch ends, i.e. for steps 3, 6, 9; the linear layer 6 never counts.
    assert boundaries(decisions) == [0, 0, 0, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3]


def test_per_layer_policies_decide_whole_layers():
    epoch = [{0: (True, 0.1), 2: (True, 0.1), 4: (True, 1.0)}]  # nw 10, 10, 1: layers 0..2 skip
    decisions = run(policy(policy="lars"), epoch_stats(epoch))
    # Every tensor of layers 0..2 (0..3 of model.parameters()) is frozen, and the layer boundary is 3.
    assert decisions[-1] == Decision(3, {}, 4)
    assert policy(policy="schedule", c1=8).decide(step_stats(0, epoch=3, epoch_end=True)) == Decision(7, {}, 8)


def _block(index: int, kernels: list[tuple[float, float]]) -> LayerStat:
    # A layer holding several convolutions (a MobileNetV2 block): (norm, epoch update norm) per kernel.
    return LayerStat.of(index, [t for norm, update in kernels
                                for t in (ParamStat(KERNEL, norm, 1.0, update), ParamStat(BIAS, 0.1, 0.0, 0.0))])


@pytest.mark.parametrize(("granularity", "expected"), [("layer", 0), ("conv", 1)])
def test_lars_conv_granularity_computes_nw_per_convolution_kernel(granularity, expected):
    # Layer 0's first kernel has nw 10, its second nw 1: over the whole layer
    # ||w|| / ||dw|| = sqrt(1 + 100) / sqrt(0.01 + 100) = 1.005 is below alpha 2, per kernel 10 is above.
    stats = step_stats(0, [_block(0, [(1.0, 0.1), (10.0, 10.0)]), _block(2, [(1.0, 1.0)])], epoch_end=True)
    lars = policy(policy="lars", param_layers=(0, 0, 0, 0, 2, 2), granularity=granularity)
    assert lars.decide(stats).boundary == expected


def test_granularity_is_a_lars_key():
    with pytest.raises(ValueError, match="granularity"):
        policy(policy="norm-ema", granularity="conv")


def test_lars_alpha_and_cap():
    epoch = [{0: (True, 1.0), 2: (True, 1.0), 4: (True, 0.4)}]  # nw 1, 1, 2.5
    assert run(policy(policy="lars", alpha=4.0), epoch_stats(epoch, norms={0: 3.0}))[-1].boundary == 0
    assert run(policy(policy="lars", num_layers=5), epoch_stats(epoch))[-1].boundary == 4


def test_lars_full_every_k_epochs_trains_everything_then_recomputes():
    epochs = [
        {0: (True, 0.4), 2: (True, 1.0)},  # -> 1
        {0: (True, 0.0), 2: (True, 1.0)},  # epoch 2 is a full epoch -> 0
        {0: (True, 1.0), 2: (True, 0.2)},  # recomputed from this epoch alone: layer 0 no, layer 2 yes -> 3
        {0: (True, 0.0), 2: (True, 0.0)},  # epoch 4 is a full epoch -> 0
    ]
    decisions = run(policy(policy="lars", full_every=2), epoch_stats(epochs, steps_per_epoch=2))
    assert boundaries(decisions) == [0, 0, 1, 1, 0, 0, 3, 3, 0]


# ---------------------------------------------------------------------------- norm-ema


def test_norm_ema_moves_the_boundary_when_the_update_norm_falls():
    norms = [(0, 1.0), (0, 0.2), (0, 0.05), (2, 0.02), (2, 0.02), (2, 0.001)]
    stats = epoch_stats(norm_ema_epochs(norms), steps_per_epoch=1)
    decisions = run(policy(policy="norm-ema", ema=0.5), stats)
    # avg 1 -> 0.6: 0.2 < 0.3 * 1.0 but not < 0.3 * 0.6, so the average is updated before comparing.
    # avg 0.325: 0.05 < 0.0975 -> shift by round(0.1 * 8) = 1 layer. Layer 2's average starts
    # afresh at 0.02 (the old 0.325 would have shifted at once), then 0.0105: 0.001 < 0.00315 ->
    # shift past layer 2.
    assert boundaries(decisions) == [0, 0, 0, 1, 1, 1, 3]


def test_norm_ema_skips_layers_without_weights():
    # A lone BatchNorm layer reports an update norm (its scale and shift), but has no weights: the
    # transition layer is the first layer with weights, as without it.
    lone_norm = LayerStat.of(0, [ParamStat(BIAS, 1.0, 0.0, 0.0), ParamStat(BIAS, 1.0, 0.0, 0.0)])
    plain = epoch_stats(norm_ema_epochs([(2, 1.0), (2, 0.01)]), steps_per_epoch=1)
    with_norm = [step_stats(s.step, (lone_norm, *s.layers[1:]), epoch=s.epoch, epoch_end=True) for s in plain]
    assert boundaries(run(policy(policy="norm-ema", ema=0.5), with_norm)) == [0, 0, 3]


def test_norm_ema_shift_and_cap():
    norms = norm_ema_epochs([(0, 1.0), (0, 0.01)])
    assert run(policy(policy="norm-ema", ema=0.5, shift=3), epoch_stats(norms))[-1].boundary == 3
    assert run(policy(policy="norm-ema", ema=0.5, shift=30), epoch_stats(norms))[-1].boundary == 7


# ---------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("skip", "per_epoch"),
    [
        ({"schedule": "linear"}, [0, 2, 4, 6, 8]),
        ({"schedule": "quadratic"}, [0, 0, 2, 4, 8]),
        ({"schedule": "exponential"}, [0, 1, 3, 5, 8]),  # 8 * (2**u - 1): 1.51, 3.31, 5.45
        ({"schedule": "linear", "c2": 2}, [0, 0, 0, 4, 8]),
        ({"schedule": "quadratic", "c1": 3}, [0, 0, 0, 1, 3]),
        ({"schedule": "linear", "c1": 20}, [0, 5, 8, 8, 8]),  # capped at 10 - 2
    ],
)
def test_schedule_boundary_per_epoch(skip, per_epoch):
    schedule = policy(policy="schedule", num_layers=10, edge_tail=2, epochs=4, **skip)
    epochs = [{0: (True, 1.0)}] * 4
    decisions = run(schedule, epoch_stats(epochs, steps_per_epoch=2))
    # Steps 2e and 2e+1 belong to epoch e (e epochs completed); the decision after the run is E = 4.
    assert boundaries(decisions) == [per_epoch[step // 2] for step in range(9)]


def test_schedule_c2_must_come_before_the_last_epoch():
    with pytest.raises(ValueError, match=r"^skip\.c2 \(4\) .*smaller than train\.epochs \(4\)$"):
        policy(policy="schedule", c2=4, epochs=4)
    assert policy(policy="schedule", c2=3, epochs=4).name == "schedule"


# ---------------------------------------------------------------------------- state round trip


def _scenarios():
    lars_epochs = [{0: (True, 0.4), 2: (True, 1.0)}, {0: (True, 0.0), 2: (True, 0.3)}] * 3
    norm_epochs = norm_ema_epochs([(0, 1.0), (0, 0.2), (0, 0.05), (2, 0.02), (2, 0.02), (2, 0.001)])
    manual = {"policy": "manual", "stop_layers": [1, 3], "stop_steps": [2, 6], "braking_distance": 3}
    cac = {"policy": "cac-auto", "num_layers": 7, **CAC_CONFIGURED, "braking_distance": 15}
    # (skip keys, statistics, how many steps the original sees before the state is saved)
    return {
        "none": ({"policy": "none"}, [step_stats(s) for s in range(6)], 3),
        "manual": (manual, [step_stats(s) for s in range(8)], 3),
        "cac-auto": (cac, cac_stats(), 55),  # saved while layer 0 brakes and layer 2 has a peak
        "lars": ({"policy": "lars", "full_every": 3}, epoch_stats(lars_epochs, steps_per_epoch=2), 5),
        "norm-ema": ({"policy": "norm-ema", "ema": 0.5}, epoch_stats(norm_epochs, steps_per_epoch=1), 4),
        "schedule": ({"policy": "schedule"}, epoch_stats([{0: (True, 1.0)}] * 4), 5),
    }


@pytest.mark.parametrize("name", list(_scenarios()))
def test_a_restored_policy_decides_like_the_original(name):
    skip, stats, split = _scenarios()[name]
    original = policy(**skip)
    for s in stats[:split]:
        original.decide(s)
    state = json.loads(json.dumps(original.state_dict()))
    restored = policy(**skip)
    restored.load_state_dict(state)
    rest = [(original.decide(s), restored.decide(s)) for s in stats[split:]]
    assert [a for a, _ in rest] == [b for _, b in rest]
    if name != "none":
        assert len({a.boundary for a, _ in rest}) > 1, "the scenario must still change the boundary"


def test_state_of_another_policy_is_refused():
    with pytest.raises(ValueError, match="'lars'"):
        policy(policy="norm-ema").load_state_dict(policy(policy="lars").state_dict())


def test_incomplete_state_is_refused():
    state = policy(policy="norm-ema").state_dict()
    del state["average"]
    with pytest.raises(ValueError, match="lacks average"):
        policy(policy="norm-ema").load_state_dict(state)
