"""Applying a skip decision: freezing the tensor prefix, optimizer-group surgery and lr factors."""
from __future__ import annotations

import math

import torch

from pipeline.optim import parameter_group
from pipeline.skip.decisions import Decision
from pipeline.stage import Stage

__all__ = ["apply_decision"]


def _check_rates(decision: Decision) -> None:
    for index, factor in decision.lr_factors.items():
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"lr factor {factor} for parameter tensor {index} is outside (0, 1]")
    for index, base in decision.lr_bases.items():
        if not (math.isfinite(base) and base > 0.0):
            raise ValueError(f"lr base {base} for parameter tensor {index} must be a positive finite number")


def apply_decision(decision: Decision, stage: Stage, optimizer: torch.optim.SGD) -> None:
    """Apply a skip decision to one stage and its optimizer; the one call every side makes after each decision.

    A frozen tensor (one of the first ``decision.frozen_parameters`` of the model, or of a
    layer below ``decision.boundary``) gets ``requires_grad = False``, no gradient, and leaves
    the optimizer with its state, so neither momentum nor weight decay moves it. A layer below
    the boundary runs in ``eval()`` mode (BatchNorm keeps its running statistics); every other
    layer in ``train()`` mode with autograd, its frozen tensors (a partly frozen layer) excepted
    from the gradient. A tensor that comes back gets a fresh group (no momentum); groups of
    tensors that stay keep their momentum, and every group gets its rate factor and base from
    the decision. Groups stay ordered by tensor; a side with nothing left to train holds the
    empty placeholder group (layer -1) as :func:`pipeline.optim.build_optimizer` makes it.
    Idempotent. Call :func:`pipeline.optim.set_learning_rate` before the next step.

    A stage that does not know where its tensors stand in the model (``stage.first_parameter``
    None: the edge tail) takes only the layer boundary: no policy freezes or slows a tensor at
    or past its cap, which ends before the edge tail (:func:`pipeline.skip.make_policy`).
    """
    _check_rates(decision)
    first = stage.first_parameter
    existing = {group["tensor"]: group for group in optimizer.param_groups}
    groups = []
    tensor = 0
    for position, layer in enumerate(stage.layers):
        index = stage.offset + position
        below = index < decision.boundary
        for param in layer.parameters():
            number = None if first is None else first + tensor
            frozen = below or (
                number is not None and decision.frozen_parameters is not None and number < decision.frozen_parameters
            )
            if below and number is not None and decision.frozen_parameters is not None \
                    and number >= decision.frozen_parameters:
                raise ValueError(
                    f"the decision freezes layer {index} (boundary {decision.boundary}) but only the first "
                    f"{decision.frozen_parameters} parameter tensors, not tensor {number}"
                )
            param.requires_grad_(not frozen)
            if frozen:
                param.grad = None
                optimizer.state.pop(param, None)
            else:
                group = existing.get(tensor) or parameter_group(optimizer.defaults, param, index, tensor)
                group["lr_factor"] = float(decision.lr_factors.get(number, 1.0)) if number is not None else 1.0
                group["lr_base"] = decision.lr_bases.get(number) if number is not None else None
                groups.append(group)
            tensor += 1
        layer.train(not below)
    if not groups:
        # torch wants at least one group; the placeholder keeps the side stepping in lock-step.
        groups.append(existing.get(-1) or parameter_group(optimizer.defaults, None, -1, -1))
    optimizer.param_groups[:] = groups
    stage.boundary = decision.boundary
