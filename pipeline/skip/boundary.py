"""Applying a skip decision: freezing the layer prefix, optimizer-group surgery and lr factors."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pipeline.skip.decisions import Decision
from pipeline.stage import Stage

__all__ = ["apply_boundary", "apply_decision", "apply_lr_factors"]


def _group(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], layer: int) -> dict[str, Any]:
    # The same hyper-parameters every group was built with; the lr is set by set_learning_rate.
    return {**optimizer.defaults, "params": params, "layer": layer, "lr_factor": 1.0}


def apply_boundary(
    boundary: int,
    layers: nn.Sequential,
    offset: int,
    optimizer: torch.optim.SGD,
    *,
    training: bool = True,
) -> None:
    """Apply the freeze boundary to one side's ``layers`` (global indices from ``offset``) and optimizer.

    A layer below ``boundary`` gets ``requires_grad = False``, ``eval()`` mode (BatchNorm keeps
    its running statistics), no gradient, and leaves the optimizer with its state, so neither
    momentum nor weight decay moves it. The other layers get ``requires_grad = True`` and
    ``train(training)``; one that comes back gets a fresh group (no momentum, lr factor 1).
    Groups of layers that stay keep their momentum. Groups stay ordered by layer; a side with
    nothing left to train holds the empty placeholder group (layer -1) as
    :func:`pipeline.optim.build_optimizer` makes it. Idempotent.

    Call it again after any ``train()``/``eval()`` on the model, and call
    :func:`pipeline.optim.set_learning_rate` before the next step.
    """
    existing = {group["layer"]: group for group in optimizer.param_groups}
    groups = []
    for position, layer in enumerate(layers):
        index = offset + position
        params = list(layer.parameters())
        frozen = index < boundary
        for p in params:
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None
                optimizer.state.pop(p, None)
        layer.train(training and not frozen)
        if params and not frozen:
            groups.append(existing.get(index) or _group(optimizer, params, index))
    if not groups:
        # torch wants at least one group; the placeholder keeps the side stepping in lock-step.
        groups.append(existing.get(-1) or _group(optimizer, [], -1))
    optimizer.param_groups[:] = groups


def apply_lr_factors(optimizer: torch.optim.Optimizer, factors: Mapping[int, float]) -> None:
    """Set each group's ``"lr_factor"`` from ``factors`` (by layer; absent means 1.0).

    :func:`pipeline.optim.set_learning_rate` multiplies the base rate by it.
    """
    for layer, factor in factors.items():
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"lr factor {factor} for layer {layer} is outside (0, 1]")
    for group in optimizer.param_groups:
        group["lr_factor"] = float(factors.get(group["layer"], 1.0))


def apply_decision(decision: Decision, stage: Stage, optimizer: torch.optim.SGD) -> None:
    """Apply a skip decision to one stage and its optimizer: the boundary, then the lr factors.

    The one call every side makes after each decision (edge head and tail, cloud middle, local model).
    """
    apply_boundary(decision.boundary, stage.layers, stage.offset, optimizer)
    apply_lr_factors(optimizer, decision.lr_factors)
    stage.boundary = decision.boundary
