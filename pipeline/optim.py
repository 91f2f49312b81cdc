"""The optimizer both sides build and the learning-rate schedule the edge drives."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.config import TrainSection

__all__ = ["TensorSGD", "build_optimizer", "learning_rate", "parameter_group", "set_learning_rate"]


def parameter_group(defaults: dict[str, Any], param: nn.Parameter | None, layer: int, tensor: int) -> dict[str, Any]:
    """The parameter group of one tensor (``param`` None: the empty placeholder, layer and tensor -1).

    ``"layer"`` is the tensor's layer in the whole model, ``"tensor"`` its position among the
    stage's tensors; ``"lr_factor"`` (1.0) and ``"lr_base"`` (None: the step's base rate) make
    its rate, so that a skip decision can drop single tensors and slow single tensors without
    touching the momentum of the others.
    """
    params = [] if param is None else [param]
    return {**defaults, "params": params, "layer": layer, "tensor": tensor, "lr_factor": 1.0, "lr_base": None}


class TensorSGD(torch.optim.SGD):
    """SGD with one parameter group per tensor, as :func:`build_optimizer` makes it.

    A saved state names the tensors that trained (a skip decision may have frozen single
    tensors of a layer): loading it first drops the groups of the others, freezing them, so that
    a checkpoint restores the frozen tensors, rate factors and bases together with the momentum.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Regroup to the saved tensors, then load the state (torch checks the rest)."""
        saved = [group["tensor"] for group in state_dict["param_groups"]]
        groups = {group["tensor"]: group for group in self.param_groups}
        missing = sorted(set(saved) - set(groups) - {-1})
        if missing:
            raise ValueError(f"the saved optimizer trains tensors {missing} that this one holds frozen")
        for tensor, group in groups.items():
            if tensor not in saved:
                for param in group["params"]:
                    param.requires_grad_(False)
                    param.grad = None
                    self.state.pop(param, None)
        placeholder = groups.get(-1) or parameter_group(self.defaults, None, -1, -1)
        self.param_groups[:] = [groups.get(tensor, placeholder) for tensor in saved]
        super().load_state_dict(state_dict)


def build_optimizer(layers: nn.Sequential, offset: int, train: TrainSection) -> TensorSGD:
    """SGD over ``layers`` (global indices from ``offset``) with one parameter group per tensor."""
    defaults = {"lr": train.lr, "momentum": train.momentum, "weight_decay": train.weight_decay}
    groups = []
    tensor = 0
    for position, layer in enumerate(layers):
        for param in layer.parameters():
            if param.requires_grad:
                groups.append(parameter_group(defaults, param, offset + position, tensor))
            tensor += 1
    if not groups:
        # torch refuses an empty optimizer; a side without parameters still steps in lock-step.
        groups.append(parameter_group(defaults, None, -1, -1))
    return TensorSGD(groups, **defaults)


def learning_rate(train: TrainSection, step: int, total_steps: int) -> float:
    """The base learning rate of optimizer step ``step`` (0-based) out of ``total_steps``."""
    if train.lr_schedule == "constant" or total_steps <= 1:
        return train.lr
    return 0.5 * train.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to its ``lr_factor`` times its ``lr_base``, or times ``lr`` when it has none."""
    for group in optimizer.param_groups:
        base = group.get("lr_base")
        group["lr"] = (lr if base is None else base) * group.get("lr_factor", 1.0)
