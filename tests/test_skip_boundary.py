"""Tests for pipeline.skip.boundary: freezing a tensor prefix, optimizer groups, lr factors and bases."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainSection
from pipeline.optim import build_optimizer, set_learning_rate
from pipeline.skip import Decision, apply_decision, layer_boundary
from pipeline.stage import Stage

_TRAIN = TrainSection(lr=0.1, momentum=0.9, weight_decay=0.01)
#: The layer of each tensor of _net().parameters(): conv 0 (w, b), BN 1 (w, b), conv 3 (w, b), linear 6 (w, b).
PARAM_LAYERS = [0, 0, 1, 1, 3, 3, 6, 6]


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


def _tensors_of(optimizer) -> list[int]:
    return [group["tensor"] for group in optimizer.param_groups]


def _trained_net():
    model = _net()
    optimizer = build_optimizer(model, 0, _TRAIN)
    model.train()
    for seed in range(3):
        _train_step(model, optimizer, seed)
    return model, Stage(model, 0), optimizer


def test_build_optimizer_makes_one_group_per_tensor():
    model, _, optimizer = _trained_net()
    assert _tensors_of(optimizer) == list(range(8))
    assert [g["layer"] for g in optimizer.param_groups] == PARAM_LAYERS
    assert all(g["lr_factor"] == 1.0 and g["lr_base"] is None for g in optimizer.param_groups)


def test_freezing_whole_layers_keeps_the_others_momentum():
    model, stage, optimizer = _trained_net()
    buffers = {p: optimizer.state[p]["momentum_buffer"] for p in model.parameters()}
    frozen_params = [p.detach().clone() for p in [*model[0].parameters(), *model[1].parameters()]]
    bn_stats = {name: b.clone() for name, b in model[1].named_buffers()}

    apply_decision(Decision(3, {}, 4), stage, optimizer)

    assert _tensors_of(optimizer) == [4, 5, 6, 7] and stage.boundary == 3
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


def test_a_partly_frozen_layer_trains_its_other_tensors_with_autograd():
    model, stage, optimizer = _trained_net()
    bias_buffer = optimizer.state[model[0].bias]["momentum_buffer"]
    # CAC's stop of tensor 0: the first convolution's kernel; its bias and the BatchNorm after it train on.
    apply_decision(Decision(0, {}, 1), stage, optimizer)

    assert stage.boundary == 0 and _tensors_of(optimizer) == list(range(1, 8))
    kernel = model[0].weight
    assert not kernel.requires_grad and kernel not in optimizer.state
    assert model[0].training and model[0].bias.requires_grad
    assert optimizer.state[model[0].bias]["momentum_buffer"] is bias_buffer
    kernel_before, bias_before = kernel.detach().clone(), model[0].bias.detach().clone()
    bn_before = model[1].running_mean.clone()
    _train_step(model, optimizer, 20)
    assert kernel.grad is None and torch.equal(kernel, kernel_before)
    assert not torch.equal(model[0].bias, bias_before)
    assert not torch.equal(model[1].running_mean, bn_before), "the partly frozen side still runs in train mode"


def test_apply_decision_is_idempotent():
    model, stage, optimizer = _trained_net()
    apply_decision(Decision(3, {5: 0.5}, 5), stage, optimizer)
    groups = list(optimizer.param_groups)
    state = {p: dict(s) for p, s in optimizer.state.items()}
    apply_decision(Decision(3, {5: 0.5}, 5), stage, optimizer)
    assert all(a is b for a, b in zip(optimizer.param_groups, groups, strict=True))
    assert {p: dict(s) for p, s in optimizer.state.items()} == state


def test_moving_the_boundary_back_re_adds_fresh_groups_in_order():
    model, stage, optimizer = _trained_net()
    apply_decision(Decision(3, {}, 4), stage, optimizer)
    _train_step(model, optimizer, 5)
    kept = optimizer.state[model[3].weight]["momentum_buffer"]

    apply_decision(Decision(0, {}, 0), stage, optimizer)

    assert _tensors_of(optimizer) == list(range(8))
    for group in optimizer.param_groups[:4]:
        assert group["lr_factor"] == 1.0
        for key in ("lr", "momentum", "weight_decay", "dampening", "nesterov"):
            assert group[key] == optimizer.defaults[key], key
    assert all(p.requires_grad and p not in optimizer.state for p in model[0].parameters())
    assert optimizer.state[model[3].weight]["momentum_buffer"] is kept
    assert model[1].training
    before = model[0].weight.detach().clone()
    _train_step(model, optimizer, 6)
    assert not torch.equal(model[0].weight, before)


def test_a_side_with_nothing_to_train_keeps_the_placeholder_group():
    model = _net()
    middle = model[3:5]  # layers 3 (conv) and 4 (pool): tensors 4 and 5
    stage = Stage(middle, 3, first_parameter=4)
    optimizer = build_optimizer(middle, 3, _TRAIN)
    apply_decision(Decision(5, {}, 6), stage, optimizer)
    assert _tensors_of(optimizer) == [-1] and optimizer.param_groups[0]["params"] == []
    optimizer.step()  # still steps in lock-step, moving nothing
    apply_decision(Decision(3, {}, 4), stage, optimizer)
    assert [g["layer"] for g in optimizer.param_groups] == [3, 3]

    no_params = model[4:6]
    optimizer = build_optimizer(no_params, 4, _TRAIN)
    placeholder = optimizer.param_groups[0]
    apply_decision(Decision(0, {}, 0), Stage(no_params, 4, first_parameter=6), optimizer)
    apply_decision(Decision(6, {}, 6), Stage(no_params, 4, first_parameter=6), optimizer)
    assert optimizer.param_groups == [placeholder]


def test_lr_factors_and_bases_set_the_group_rates_by_global_tensor_index():
    model = _net()
    middle = model[1:7]  # global layers 1..6, tensors 2..7: the offsets must reach the decision's numbers
    stage = Stage(middle, 1, first_parameter=2)
    optimizer = build_optimizer(middle, 1, _TRAIN)

    apply_decision(Decision(0, {4: 0.25, 5: 0.5, 99: 0.5}, 2, {5: 0.4}), stage, optimizer)
    set_learning_rate(optimizer, 0.2)
    rates = {g["tensor"]: g["lr"] for g in optimizer.param_groups}
    # Tensor 4 is the stage's third (position 2); tensor 5 brakes from base 0.4, not the step's 0.2.
    assert rates == {0: 0.2, 1: 0.2, 2: 0.05, 3: 0.2, 4: 0.2, 5: 0.2}
    assert [g["lr_base"] for g in optimizer.param_groups] == [None, None, None, 0.4, None, None]

    apply_decision(Decision(0, {}, 2), stage, optimizer)
    set_learning_rate(optimizer, 0.2)
    assert all(g["lr"] == 0.2 and g["lr_base"] is None for g in optimizer.param_groups)
    with pytest.raises(ValueError, match="outside"):
        apply_decision(Decision(0, {3: 0.0}, 0), stage, optimizer)
    with pytest.raises(ValueError, match="positive finite"):
        apply_decision(Decision(0, {3: 0.5}, 0, {3: float("inf")}), stage, optimizer)


def test_apply_decision_sets_the_stage_of_a_slice():
    model = _net()
    middle = model[1:7]
    stage = Stage(middle, 1, first_parameter=2)
    optimizer = build_optimizer(middle, 1, _TRAIN)

    apply_decision(Decision(4, {6: 0.25}, 6), stage, optimizer)

    assert stage.boundary == 4 and stage.frozen == 3
    assert [g["layer"] for g in optimizer.param_groups] == [6, 6]
    assert not any(p.requires_grad for p in [*model[1].parameters(), *model[3].parameters()])
    assert not model[3].training and model[6].training
    set_learning_rate(optimizer, 0.2)
    assert [(g["lr_factor"], g["lr"]) for g in optimizer.param_groups] == [(0.25, 0.05), (1.0, 0.2)]


def test_a_decision_must_freeze_every_tensor_of_the_layers_below_its_boundary():
    model, stage, optimizer = _trained_net()
    with pytest.raises(ValueError, match=r"freezes layer 1 \(boundary 3\) but only the first 2"):
        apply_decision(Decision(3, {}, 2), stage, optimizer)


def test_a_stage_that_does_not_know_its_first_tensor_takes_only_the_layer_boundary():
    # The edge tail: no policy freezes or slows it, and it is built without the model's tensor map.
    model = _net()
    tail = model[4:7]
    stage = Stage(tail, 4)
    optimizer = build_optimizer(tail, 4, _TRAIN)
    apply_decision(Decision(4, {5: 0.5}, 6), stage, optimizer)
    set_learning_rate(optimizer, 0.2)
    assert all(p.requires_grad for p in tail.parameters()) and all(g["lr"] == 0.2 for g in optimizer.param_groups)
    apply_decision(Decision(7, {}, 8), stage, optimizer)
    assert [g["tensor"] for g in optimizer.param_groups] == [-1], "the layers below the boundary, whole"


def test_loading_a_saved_optimizer_restores_frozen_tensors_rates_and_momentum():
    # A checkpoint's decision names the layer boundary; the optimizer's saved groups name the tensors.
    model, stage, optimizer = _trained_net()
    apply_decision(Decision(0, {2: 0.25}, 1, {2: 0.3}), stage, optimizer)
    _train_step(model, optimizer, 7)
    saved = copy.deepcopy(optimizer.state_dict())  # as a checkpoint holds it: not the live buffers

    fresh_model = _net()
    fresh_model.load_state_dict(model.state_dict())
    fresh_stage, fresh = Stage(fresh_model, 0), build_optimizer(fresh_model, 0, _TRAIN)
    apply_decision(Decision(0), fresh_stage, fresh)
    fresh.load_state_dict(saved)

    assert _tensors_of(fresh) == list(range(1, 8)) and not fresh_model[0].weight.requires_grad
    set_learning_rate(fresh, 0.2)
    set_learning_rate(optimizer, 0.2)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert fresh.param_groups[1]["lr"] == 0.3 * 0.25
    for seed in (8, 9):
        _train_step(model, optimizer, seed)
        _train_step(fresh_model, fresh, seed)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()))
    other_model = _net()
    other = build_optimizer(other_model, 0, _TRAIN)
    apply_decision(Decision(0, {}, 2), Stage(other_model, 0), other)
    with pytest.raises(ValueError, match=r"trains tensors \[1\] that this one holds frozen"):
        other.load_state_dict(saved)


@pytest.mark.parametrize(
    ("frozen", "expected"),
    [(0, 0), (1, 0), (2, 1), (3, 1), (4, 3), (5, 3), (6, 6), (8, 6)],
)
def test_the_layer_boundary_of_a_tensor_prefix(frozen, expected):
    # Layer 2 (ReLU) follows the frozen BatchNorm; layers 4 and 5 (pool, flatten) the frozen conv 3.
    # A prefix reaching past the cap (here 6: the linear layer) stops at it.
    assert layer_boundary(frozen, PARAM_LAYERS, 6) == expected
