"""The numbers the skip policies read (per-layer and per-step statistics) and what they decide."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Decision", "LayerStat", "StepStats"]


@dataclass(frozen=True)
class LayerStat:
    """Statistics of one layer that has Conv/Linear weights, taken at the end of a step.

    ``index`` is the global layer index; the "weights" are the ``.weight`` tensors of the
    layer's Conv/Linear modules, concatenated; ``weight_variance`` is unbiased (as CAC's);
    ``epoch_update_norm`` is ``||w_now - w_epoch_start||`` on an epoch's last step, else None.
    """

    index: int
    has_conv: bool
    weight_norm: float
    weight_variance: float
    epoch_update_norm: float | None


@dataclass(frozen=True)
class StepStats:
    """What the policies see after optimizer step ``step`` (0-based) of epoch ``epoch`` (0-based).

    ``epoch_end`` marks an epoch's last step, ``lr`` is that step's base rate, and ``layers``
    holds both sides' statistics sorted by index.
    """

    step: int
    epoch: int
    epoch_end: bool
    lr: float
    layers: tuple[LayerStat, ...]


@dataclass(frozen=True)
class Decision:
    """Freeze layers ``[0, boundary)``; ``lr_factors`` slows single layers (absent means 1.0)."""

    boundary: int
    lr_factors: Mapping[int, float] = field(default_factory=dict)
