"""Tests for pipeline.skip.boundary: freezing a prefix, optimizer groups, lr factors, apply_decision."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainSection
from pipeline.optim import build_optimizer, set_learning_rate
from pipeline.skip import Decision, apply_boundary, apply_decision, apply_lr_factors
from pipeline.stage import Stage

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


def test_apply_decision_sets_the_boundary_the_lr_factors_and_the_stage():
    model = _net()
    middle = model[1:7]  # global layers 1..6: the offset must reach the optimizer's layer numbers
    stage = Stage(middle, 1)
    optimizer = build_optimizer(middle, 1, _TRAIN)

    apply_decision(Decision(4, {4: 0.5, 6: 0.25}), stage, optimizer)

    assert stage.boundary == 4 and stage.frozen == 3
    assert _layers_of(optimizer) == [6]
    assert not any(p.requires_grad for p in [*model[1].parameters(), *model[3].parameters()])
    assert not model[3].training and model[6].training
    set_learning_rate(optimizer, 0.2)
    assert [(g["lr_factor"], g["lr"]) for g in optimizer.param_groups] == [(0.25, 0.05)]

    apply_decision(Decision(0), stage, optimizer)

    assert stage.boundary == 0 and stage.frozen == 0
    assert _layers_of(optimizer) == [1, 3, 6]
    assert all(g["lr_factor"] == 1.0 for g in optimizer.param_groups)
    assert all(p.requires_grad for p in middle.parameters())
