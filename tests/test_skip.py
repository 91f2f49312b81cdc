"""Tests for pipeline.skip: every freeze policy, the CAC environment, statistics and applying a boundary."""

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import SkipSection, TrainSection
from pipeline.optim import build_optimizer, set_learning_rate
from pipeline.skip import (
    Decision,
    LayerStat,
    LayerStatistics,
    SkipPolicy,
    StepStats,
    apply_boundary,
    apply_lr_factors,
    cac_parameter_layers,
    make_policy,
)

# ---------------------------------------------------------------------------- helpers


def _policy(*, num_layers=8, edge_tail=1, epochs=4, param_layers=(), env=None, **skip) -> SkipPolicy:
    return make_policy(
        SkipSection(**skip),
        num_layers=num_layers,
        edge_tail=edge_tail,
        epochs=epochs,
        param_layers=param_layers,
        env={} if env is None else env,
    )


def _stats(step, layers=(), *, epoch=0, epoch_end=False) -> StepStats:
    return StepStats(step, epoch, epoch_end, 0.1, tuple(layers))


def _run(policy: SkipPolicy, stats_list) -> list[Decision]:
    """Decisions indexed by the step they are for: [initial(), decision for step 1, ...]."""
    return [policy.initial()] + [policy.decide(stats) for stats in stats_list]


def _boundaries(decisions: list[Decision]) -> list[int]:
    return [d.boundary for d in decisions]


def _changes(decisions: list[Decision]) -> dict[int, int]:
    """{step: new boundary} for every step where the boundary differs from the step before."""
    return {
        step: d.boundary
        for step, d in enumerate(decisions)
        if step > 0 and d.boundary != decisions[step - 1].boundary
    }


def _epoch_stats(epochs_updates, *, steps_per_epoch=3, norms=None):
    """StepStats for whole epochs.

    ``epochs_updates[e]`` maps layer -> (has_conv, its update norm at the end of epoch e).
    """
    stats = []
    for epoch, updates in enumerate(epochs_updates):
        for k in range(steps_per_epoch):
            end = k == steps_per_epoch - 1
            layers = [
                LayerStat(index, conv, (norms or {}).get(index, 1.0), 1.0, update if end else None)
                for index, (conv, update) in sorted(updates.items())
            ]
            stats.append(_stats(epoch * steps_per_epoch + k, layers, epoch=epoch, epoch_end=end))
    return stats


# ---------------------------------------------------------------------------- none and the cap


def test_none_never_freezes():
    policy = _policy(policy="none")
    assert policy.name == "none"
    assert _boundaries(_run(policy, [_stats(s) for s in range(3)])) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("edge_tail", "max_boundary", "expected"),
    [(1, None, 7), (0, None, 7), (3, None, 5), (1, 2, 2), (1, 0, 0)],
)
def test_every_boundary_is_capped(edge_tail, max_boundary, expected):
    extra = {} if max_boundary is None else {"max_boundary": max_boundary}
    policy = _policy(policy="manual", stop_layers=[7], stop_steps=[0], edge_tail=edge_tail, **extra)
    assert policy.initial().boundary == expected


# ---------------------------------------------------------------------------- manual


def test_manual_freezes_from_each_stop_step_on():
    policy = _policy(policy="manual", stop_layers=[1, 4], stop_steps=[3, 6])
    assert policy.name == "manual"
    assert _boundaries(_run(policy, [_stats(s) for s in range(8)])) == [0, 0, 0, 2, 2, 2, 5, 5, 5]


def test_manual_stop_at_step_zero_is_the_initial_decision():
    policy = _policy(policy="manual", stop_layers=[2, 3], stop_steps=[0, 2])
    assert _boundaries(_run(policy, [_stats(s) for s in range(3)])) == [3, 3, 4, 4]


def test_manual_braking_slows_the_layers_that_will_freeze():
    policy = _policy(policy="manual", stop_layers=[2], stop_steps=[10], braking_distance=4)
    decisions = _run(policy, [_stats(s) for s in range(11)])
    assert decisions[6] == Decision(0, {})
    for step, factor in ((7, 9 / 16), (8, 4 / 16), (9, 1 / 16)):
        assert decisions[step] == Decision(0, dict.fromkeys((0, 1, 2), factor)), step
    assert decisions[10] == Decision(3, {})
    assert decisions[11] == Decision(3, {})


def test_manual_stops_closer_than_the_braking_distance_all_happen():
    # CAC's own implementation loses the second stop: it falls inside the first one's braking.
    policy = _policy(policy="manual", stop_layers=[0, 2], stop_steps=[5, 6], braking_distance=3)
    decisions = _run(policy, [_stats(s) for s in range(7)])
    assert decisions[2] == Decision(0, {})
    assert decisions[3] == Decision(0, {0: 4 / 9})
    assert decisions[4] == Decision(0, {0: 1 / 9, 1: 4 / 9, 2: 4 / 9})
    assert decisions[5] == Decision(1, {1: 1 / 9, 2: 1 / 9})
    assert decisions[6] == Decision(3, {})
    assert decisions[7] == Decision(3, {})


def test_manual_stop_layer_must_exist():
    with pytest.raises(ValueError, match="stop_layers names layer 9"):
        _policy(policy="manual", stop_layers=[9], stop_steps=[0])


# ---------------------------------------------------------------------------- CAC environment (manual)


def _cac_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),  # layer 0: parameters 0 (weight), 1 (bias)
        nn.BatchNorm2d(2),  # layer 1: parameters 2, 3
        nn.ReLU(),  # layer 2
        nn.Conv2d(2, 2, 3, bias=False),  # layer 3: parameter 4
        nn.Flatten(),  # layer 4
        nn.Linear(8, 3),  # layer 5: parameters 5, 6
    )


def test_cac_parameter_layers_follow_model_parameters():
    model = _cac_model()
    layers = cac_parameter_layers(model)
    assert layers == [0, 0, 1, 1, 3, 5, 5]
    assert len(layers) == len(list(model.parameters()))


def test_cac_stop_variables_override_the_policy_and_name_parameters():
    env = {"CAC_STOP_LAYER_NUM": "1, 4", "CAC_STOP_LAYER_ITR": "0,5", "CAC_BRAKING_DISTANCE": "2"}
    param_layers = cac_parameter_layers(_cac_model())
    policy = _policy(policy="lars", num_layers=6, param_layers=param_layers, env=env)
    assert policy.name == "manual"
    decisions = _run(policy, [_stats(s) for s in range(6)])
    # Parameter 1 is layer 0's bias: layer 0 stops at step 0. Parameter 4 is layer 3's weight.
    assert _boundaries(decisions) == [1, 1, 1, 1, 1, 4, 4]
    assert decisions[4] == Decision(1, {1: 0.25, 2: 0.25, 3: 0.25})


def test_one_cac_stop_variable_without_the_other_is_an_error():
    with pytest.raises(ValueError, match="CAC_STOP_LAYER_ITR"):
        _policy(policy="none", env={"CAC_STOP_LAYER_NUM": "1"}, param_layers=[0, 0])


@pytest.mark.parametrize(
    ("policy", "env", "variable"),
    [
        ("none", {"CAC_STOP_LAYER_NUM": "1,x", "CAC_STOP_LAYER_ITR": "0,1"}, "CAC_STOP_LAYER_NUM"),
        ("none", {"CAC_STOP_LAYER_NUM": "7", "CAC_STOP_LAYER_ITR": "0"}, "CAC_STOP_LAYER_NUM"),
        ("none", {"CAC_STOP_LAYER_NUM": "1", "CAC_STOP_LAYER_ITR": "-3"}, "CAC_STOP_LAYER_ITR"),
        ("none", {"CAC_STOP_LAYER_NUM": "1,2", "CAC_STOP_LAYER_ITR": "0"}, "same length"),
        ("manual", {"CAC_BRAKING_DISTANCE": "-1"}, "CAC_BRAKING_DISTANCE"),
        ("cac-auto", {"CAC_VAR_SAMPLES": "0"}, "CAC_VAR_SAMPLES"),
        ("cac-auto", {"CAC_VAR_START_ITR": "soon"}, "CAC_VAR_START_ITR"),
        ("cac-auto", {"CAC_VAR_MT_THR": "high"}, "CAC_VAR_MT_THR"),
        ("cac-auto", {"CAC_VAR_START_THR": "-1"}, "CAC_VAR_START_THR"),
    ],
)
def test_bad_cac_variables_are_named(policy, env, variable):
    with pytest.raises(ValueError, match=variable):
        _policy(policy=policy, num_layers=6, param_layers=cac_parameter_layers(_cac_model()), env=env)


# ---------------------------------------------------------------------------- cac-auto

_START, _SAMPLES = 20, 10
_UNREAD = 1e9  # a variance the policy must never read: as a peak it would stop the next target at once
# Variance of each layer at sample k (taken after step 19 + 10 k); the last value repeats.
_VARIANCES = {
    # First target: 1.06 / 1.1 = 0.964 is above start_thr; 1.04 / 1.1 = 0.945 is below (sample 3).
    0: [1.0, 1.1, 1.06, 1.04],
    # A mountain: first read at sample 3, peak updated 6 times (> 5) up to sample 8; then
    # 1.455 / 1.5 = 0.97 (a slope would stop here, a mountain not) and 1.43 / 1.5 = 0.953 < 0.96.
    2: [_UNREAD] * 3 + [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.455, 1.43],
    # A slope: first read at once when layer 2 stops (sample 10: 2.2 is the peak), then
    # 2.15 / 2.2 = 0.977 is below slope_thr and above mt_thr; 2.1 / 2.2 = 0.955 later.
    4: [_UNREAD] * 9 + [2.0, 2.2, 2.15, 2.15, 2.1],
    6: [_UNREAD],  # the cap: never a target
}


def _cac_stats(steps=200):
    stats = []
    for step in range(steps):
        done = step + 1
        sampled = done >= _START and done % _SAMPLES == 0
        k = (done - _START) // _SAMPLES
        layers = [
            LayerStat(index, True, 1.0, seq[min(k, len(seq) - 1)] if sampled else _UNREAD, None)
            for index, seq in _VARIANCES.items()
        ]
        stats.append(_stats(step, layers))
    return stats


def _cac_policy(env=None, **skip) -> SkipPolicy:
    return _policy(policy="cac-auto", num_layers=7, env=env, **skip)


_CONFIGURED = {"start_step": _START, "samples": _SAMPLES}
_ENV = {"CAC_VAR_START_ITR": str(_START), "CAC_VAR_SAMPLES": str(_SAMPLES)}


@pytest.mark.parametrize(
    ("skip", "env", "changes"),
    [
        # Layer 0 stops at sample 3 (start_thr), layer 2 at sample 10 (mountain), layer 4 at 11 (slope).
        (_CONFIGURED, {}, {50: 1, 120: 3, 130: 5}),
        ({}, _ENV, {50: 1, 120: 3, 130: 5}),
        ({}, {**_ENV, "CAC_VAR_START_THR": "0.9"}, {}),
        ({}, {**_ENV, "CAC_VAR_SLOPE_THR": "0.97"}, {50: 1, 120: 3, 150: 5}),
        # 6 peak updates are no longer "more than" the count: layer 2 is a slope and stops at 0.97.
        ({}, {**_ENV, "CAC_VAR_MT_COUNT_THR": "6"}, {50: 1, 110: 3, 130: 5}),
        # Braking 15: no samples while a target brakes, so layer 2 sees 5 peak updates (a slope)
        # and layer 4 misses its sample 10 (2.2): its peak is 2.15 and it stops at 2.1 (0.977).
        ({**_CONFIGURED, "braking_distance": 15}, {}, {64: 1, 124: 3, 164: 5}),
        ({}, {**_ENV, "CAC_BRAKING_DISTANCE": "15"}, {64: 1, 124: 3, 164: 5}),
    ],
)
def test_cac_auto_freezes_on_falling_weight_variance(skip, env, changes):
    policy = _cac_policy(env, **skip)
    assert policy.name == "cac-auto"
    assert _changes(_run(policy, _cac_stats())) == changes


def test_cac_auto_braking_factors_fall_quadratically():
    decisions = _run(_cac_policy(**_CONFIGURED, braking_distance=4), _cac_stats(150))
    assert decisions[49] == Decision(0, {})
    assert [decisions[s] for s in (50, 51, 52, 53)] == [
        Decision(0, {0: 9 / 16}),
        Decision(0, {0: 4 / 16}),
        Decision(0, {0: 1 / 16}),
        Decision(1, {}),
    ]
    # Layer 2's decision after step 119 brakes layers 1 and 2 (1 has no weights, the factor is harmless).
    assert decisions[121] == Decision(1, {1: 4 / 16, 2: 4 / 16})
    assert _changes(decisions) == {53: 1, 123: 3, 133: 5}


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
    decisions = _run(_policy(policy="lars"), _epoch_stats(epochs, norms=norms))
    # The boundary only changes at epoch ends, i.e. for steps 3, 6, 9; the linear layer 6 never counts.
    assert _boundaries(decisions) == [0, 0, 0, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3]


def test_lars_alpha_and_cap():
    epoch = [{0: (True, 1.0), 2: (True, 1.0), 4: (True, 0.4)}]  # nw 1, 1, 2.5
    assert _run(_policy(policy="lars", alpha=4.0), _epoch_stats(epoch, norms={0: 3.0}))[-1].boundary == 0
    assert _run(_policy(policy="lars", num_layers=5), _epoch_stats(epoch))[-1].boundary == 4


def test_lars_full_every_k_epochs_trains_everything_then_recomputes():
    epochs = [
        {0: (True, 0.4), 2: (True, 1.0)},  # -> 1
        {0: (True, 0.0), 2: (True, 1.0)},  # epoch 2 is a full epoch -> 0
        {0: (True, 1.0), 2: (True, 0.2)},  # recomputed from this epoch alone: layer 0 no, layer 2 yes -> 3
        {0: (True, 0.0), 2: (True, 0.0)},  # epoch 4 is a full epoch -> 0
    ]
    decisions = _run(_policy(policy="lars", full_every=2), _epoch_stats(epochs, steps_per_epoch=2))
    assert _boundaries(decisions) == [0, 0, 1, 1, 0, 0, 3, 3, 0]


# ---------------------------------------------------------------------------- norm-ema


def _norm_ema_epochs(transition_norms):
    """Epochs where layer ``t`` has the given update norm and every other layer a tiny one."""
    return [
        {index: (True, norm if index == t else 1e-9) for index in (0, 2, 4, 6)}
        for t, norm in transition_norms
    ]


def test_norm_ema_moves_the_boundary_when_the_update_norm_falls():
    norms = [(0, 1.0), (0, 0.2), (0, 0.05), (2, 0.02), (2, 0.02), (2, 0.001)]
    stats = _epoch_stats(_norm_ema_epochs(norms), steps_per_epoch=1)
    decisions = _run(_policy(policy="norm-ema", ema=0.5), stats)
    # avg 1 -> 0.6: 0.2 < 0.3 * 1.0 but not < 0.3 * 0.6, so the average is updated before comparing.
    # avg 0.325: 0.05 < 0.0975 -> shift by round(0.1 * 8) = 1 layer. Layer 2's average starts
    # afresh at 0.02 (the old 0.325 would have shifted at once), then 0.0105: 0.001 < 0.00315 ->
    # shift past layer 2.
    assert _boundaries(decisions) == [0, 0, 0, 1, 1, 1, 3]


def test_norm_ema_shift_and_cap():
    norms = _norm_ema_epochs([(0, 1.0), (0, 0.01)])
    assert _run(_policy(policy="norm-ema", ema=0.5, shift=3), _epoch_stats(norms))[-1].boundary == 3
    assert _run(_policy(policy="norm-ema", ema=0.5, shift=30), _epoch_stats(norms))[-1].boundary == 7


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
    policy = _policy(policy="schedule", num_layers=10, edge_tail=2, epochs=4, **skip)
    epochs = [{0: (True, 1.0)}] * 4
    decisions = _run(policy, _epoch_stats(epochs, steps_per_epoch=2))
    # Steps 2e and 2e+1 belong to epoch e (e epochs completed); the decision after the run is E = 4.
    assert _boundaries(decisions) == [per_epoch[step // 2] for step in range(9)]


def test_schedule_c2_must_come_before_the_last_epoch():
    with pytest.raises(ValueError, match="c2"):
        _policy(policy="schedule", c2=4, epochs=4)


# ---------------------------------------------------------------------------- state round trip


def _scenarios():
    lars_epochs = [{0: (True, 0.4), 2: (True, 1.0)}, {0: (True, 0.0), 2: (True, 0.3)}] * 3
    norm_epochs = _norm_ema_epochs([(0, 1.0), (0, 0.2), (0, 0.05), (2, 0.02), (2, 0.02), (2, 0.001)])
    manual = {"policy": "manual", "stop_layers": [1, 3], "stop_steps": [2, 6], "braking_distance": 3}
    cac = {"policy": "cac-auto", "num_layers": 7, **_CONFIGURED, "braking_distance": 15}
    # (skip keys, statistics, how many steps the original sees before the state is saved)
    return {
        "none": ({"policy": "none"}, [_stats(s) for s in range(6)], 3),
        "manual": (manual, [_stats(s) for s in range(8)], 3),
        "cac-auto": (cac, _cac_stats(), 55),  # saved while layer 0 brakes and layer 2 has a peak
        "lars": ({"policy": "lars", "full_every": 3}, _epoch_stats(lars_epochs, steps_per_epoch=2), 5),
        "norm-ema": ({"policy": "norm-ema", "ema": 0.5}, _epoch_stats(norm_epochs, steps_per_epoch=1), 4),
        "schedule": ({"policy": "schedule"}, _epoch_stats([{0: (True, 1.0)}] * 4), 5),
    }


@pytest.mark.parametrize("name", list(_scenarios()))
def test_a_restored_policy_decides_like_the_original(name):
    skip, stats, split = _scenarios()[name]
    original = _policy(**skip)
    for s in stats[:split]:
        original.decide(s)
    state = json.loads(json.dumps(original.state_dict()))
    restored = _policy(**skip)
    restored.load_state_dict(state)
    rest = [(original.decide(s), restored.decide(s)) for s in stats[split:]]
    assert [a for a, _ in rest] == [b for _, b in rest]
    if name != "none":
        assert len({a.boundary for a, _ in rest}) > 1, "the scenario must still change the boundary"


def test_state_of_another_policy_is_refused():
    with pytest.raises(ValueError, match="'lars'"):
        _policy(policy="norm-ema").load_state_dict(_policy(policy="lars").state_dict())


# ---------------------------------------------------------------------------- apply_boundary

_TRAIN = TrainSection(lr=0.1, momentum=0.9, weight_decay=0.01)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 0
        nn.BatchNorm2d(4),  # 1
        nn.ReLU(),  # 2
        nn.Conv2d(4, 4, 3, padding=1),  # 3
        nn.AdaptiveAvgPool2d(1),  # 4
        nn.Flatten(),  # 5
        nn.Linear(4, 3),  # 6
    )


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 6, 6, generator=generator)
    y = torch.randint(0, 3, (8,), generator=generator)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _layers_of(optimizer) -> list[int]:
    return [group["layer"] for group in optimizer.param_groups]


def _trained_net():
    model = _net()
    optimizer = build_optimizer(model, 0, _TRAIN)
    model.train()
    for seed in range(3):
        _train_step(model, optimizer, seed)
    return model, optimizer


def test_apply_boundary_freezes_the_prefix_and_keeps_the_others_momentum():
    model, optimizer = _trained_net()
    buffers = {p: optimizer.state[p]["momentum_buffer"] for p in model.parameters()}
    frozen_params = [p.detach().clone() for p in [*model[0].parameters(), *model[1].parameters()]]
    bn_stats = {name: b.clone() for name, b in model[1].named_buffers()}

    apply_boundary(3, model, 0, optimizer)

    assert _layers_of(optimizer) == [3, 6]
    for p in [*model[0].parameters(), *model[1].parameters()]:
        assert not p.requires_grad and p.grad is None and p not in optimizer.state
    assert not model[0].training and not model[1].training and model[3].training
    for p in [*model[3].parameters(), *model[6].parameters()]:
        assert p.requires_grad
        assert optimizer.state[p]["momentum_buffer"] is buffers[p]

    # The next step continues layer 3's momentum: w' = w - lr * (m * buf + g + wd * w).
    weight = model[3].weight
    before, buffer = weight.detach().clone(), buffers[weight].clone()
    _train_step(model, optimizer, 10)
    expected = before - 0.1 * (0.9 * buffer + weight.grad + 0.01 * before)
    torch.testing.assert_close(weight.detach(), expected)

    for seed in range(11, 14):
        _train_step(model, optimizer, seed)
    for p, old in zip([*model[0].parameters(), *model[1].parameters()], frozen_params):
        assert torch.equal(p, old)
    for name, b in model[1].named_buffers():
        assert torch.equal(b, bn_stats[name]), name


def test_apply_boundary_is_idempotent():
    model, optimizer = _trained_net()
    apply_boundary(3, model, 0, optimizer)
    groups = list(optimizer.param_groups)
    state = {p: dict(s) for p, s in optimizer.state.items()}
    apply_boundary(3, model, 0, optimizer)
    assert all(a is b for a, b in zip(optimizer.param_groups, groups, strict=True))
    assert {p: dict(s) for p, s in optimizer.state.items()} == state


def test_moving_the_boundary_back_re_adds_fresh_groups_in_order():
    model, optimizer = _trained_net()
    apply_boundary(3, model, 0, optimizer)
    _train_step(model, optimizer, 5)
    kept = optimizer.state[model[3].weight]["momentum_buffer"]

    apply_boundary(0, model, 0, optimizer)

    assert _layers_of(optimizer) == [0, 1, 3, 6]
    for group in optimizer.param_groups[:2]:
        assert group["lr_factor"] == 1.0
        for key in ("lr", "momentum", "weight_decay", "dampening", "nesterov"):
            assert group[key] == optimizer.defaults[key], key
    assert all(p.requires_grad and p not in optimizer.state for p in model[0].parameters())
    assert optimizer.state[model[3].weight]["momentum_buffer"] is kept
    assert model[1].training
    before = model[0].weight.detach().clone()
    _train_step(model, optimizer, 6)
    assert not torch.equal(model[0].weight, before)

    apply_boundary(0, model, 0, optimizer, training=False)
    assert not any(m.training for m in model)


def test_a_side_with_nothing_to_train_keeps_the_placeholder_group():
    model = _net()
    middle = model[3:5]  # layers 3 (conv) and 4 (pool)
    optimizer = build_optimizer(middle, 3, _TRAIN)
    apply_boundary(5, middle, 3, optimizer)
    assert _layers_of(optimizer) == [-1] and optimizer.param_groups[0]["params"] == []
    optimizer.step()  # still steps in lock-step, moving nothing
    apply_boundary(3, middle, 3, optimizer)
    assert _layers_of(optimizer) == [3]

    no_params = model[4:6]
    optimizer = build_optimizer(no_params, 4, _TRAIN)
    placeholder = optimizer.param_groups[0]
    apply_boundary(0, no_params, 4, optimizer)
    apply_boundary(6, no_params, 4, optimizer)
    assert optimizer.param_groups == [placeholder]


def test_lr_factors_scale_the_group_rates():
    model, optimizer = _trained_net()
    apply_lr_factors(optimizer, {3: 0.25, 99: 0.5})
    set_learning_rate(optimizer, 0.2)
    assert {g["layer"]: g["lr"] for g in optimizer.param_groups} == {0: 0.2, 1: 0.2, 3: 0.05, 6: 0.2}
    apply_lr_factors(optimizer, {})
    set_learning_rate(optimizer, 0.2)
    assert all(g["lr"] == 0.2 for g in optimizer.param_groups)
    with pytest.raises(ValueError, match="outside"):
        apply_lr_factors(optimizer, {3: 0.0})


# ---------------------------------------------------------------------------- LayerStatistics


def _stats_layers() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.BatchNorm2d(2),  # no Conv/Linear: no statistics
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2)),
        nn.ReLU(),
        nn.Linear(2, 3),
    )


def test_layer_statistics_match_a_hand_computation():
    layers = _stats_layers()
    collector = LayerStatistics(layers, offset=5)
    got = collector.collect(epoch_end=False)
    assert [(s.index, s.has_conv, s.epoch_update_norm) for s in got] == [(6, True, None), (8, False, None)]
    for stat, weights in zip(got, ([layers[1][0].weight, layers[1][3].weight], [layers[3].weight])):
        values = [v for w in weights for v in w.detach().reshape(-1).tolist()]  # biases and BN excluded
        assert stat.weight_norm == pytest.approx(math.sqrt(sum(v * v for v in values)), rel=1e-6)
        assert stat.weight_variance == pytest.approx(statistics.variance(values), rel=1e-5)


def test_layer_statistics_epoch_update_norm_and_checkpoint():
    layers = _stats_layers()
    collector = LayerStatistics(layers, offset=5)
    with torch.no_grad():
        layers[1][0].weight[0, 0, 0, 0] += 0.5
        layers[3].weight.add_(0.1)
    updates = [s.epoch_update_norm for s in collector.collect(epoch_end=True)]
    assert updates == pytest.approx([0.5, math.sqrt(6 * 0.01)], rel=1e-5)
    # The snapshot was retaken at the epoch end.
    assert [s.epoch_update_norm for s in collector.collect(epoch_end=True)] == [0.0, 0.0]

    with torch.no_grad():
        layers[3].weight.add_(-0.2)
    restored = LayerStatistics(layers, offset=5)  # its own snapshot already holds the new weights
    restored.load_state_dict({k: v.clone() for k, v in collector.state_dict().items()})
    expected = [s.epoch_update_norm for s in collector.collect(epoch_end=True)]
    assert [s.epoch_update_norm for s in restored.collect(epoch_end=True)] == expected
    assert expected == pytest.approx([0.0, math.sqrt(6 * 0.04)], rel=1e-5)
    with pytest.raises(ValueError, match="partition"):
        LayerStatistics(layers, offset=4).load_state_dict(collector.state_dict())


def test_a_single_weight_has_variance_zero():
    (stat,) = LayerStatistics(nn.Sequential(nn.Linear(1, 1)), offset=0).collect(epoch_end=False)
    assert stat.weight_variance == 0.0
