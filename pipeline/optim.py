"""The optimizer both sides build and the learning-rate schedule the edge drives."""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainSection

__all__ = ["build_optimizer", "learning_rate", "set_learning_rate"]


def build_optimizer(layers: nn.Sequential, offset: int, train: TrainSection) -> torch.optim.SGD:
    """SGD over ``layers`` with one parameter group per layer.

    Each group carries ``"layer"`` (the layer's index in the whole model: ``offset`` + position)
    and ``"lr_factor"`` (1.0), so that a freeze boundary can drop whole layers and a braking
    policy can slow single layers without touching the momentum of the others.
    """
    groups = []
    for position, layer in enumerate(layers):
        params = [p for p in layer.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "layer": offset + position, "lr_factor": 1.0})
    if not groups:
        # torch refuses an empty optimizer; a side without parameters still steps in lock-step.
        groups.append({"params": [], "layer": -1, "lr_factor": 1.0})
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def learning_rate(train: TrainSection, step: int, total_steps: int) -> float:
    """The base learning rate of optimizer step ``step`` (0-based) out of ``total_steps``."""
    if train.lr_schedule == "constant" or total_steps <= 1:
        return train.lr
    return 0.5 * train.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr`` times its ``lr_factor``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)
