"""The numbers the skip policies read (per-parameter and per-layer statistics) and what they decide."""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Decision", "LayerStat", "ParamStat", "StepStats", "layer_boundary", "parameters_before"]


@dataclass(frozen=True)
class ParamStat:
    """Statistics of one parameter tensor, taken at the end of a step, in float32.

    ``variance`` is unbiased (as CAC's; 0 for a single element); ``update_norm`` is
    ``||p_now - p_epoch_start||`` on an epoch's last step, else None.
    """

    shape: tuple[int, ...]
    norm: float
    variance: float
    update_norm: float | None

    @property
    def is_weight(self) -> bool:
        """Whether the tensor is a weight matrix or kernel (two or more dimensions), not a bias or a scale."""
        return len(self.shape) >= 2

    @property
    def is_conv(self) -> bool:
        """Whether the tensor is a convolution kernel (three or more dimensions)."""
        return len(self.shape) >= 3


@dataclass(frozen=True)
class LayerStat:
    """Statistics of one layer with parameters: its tensors' and the aggregates the per-layer policies read.

    ``index`` is the global layer index and ``params`` its tensors in ``layer.parameters()``
    order. The aggregates come from :meth:`of`: the layer's "weights" are its tensors with two
    or more dimensions (Conv and Linear weights), ``weight_norm`` is the norm of all of them
    together, ``epoch_update_norm`` that of their epoch update (None except on an epoch's last
    step), ``has_conv`` whether one is a convolution kernel.
    """

    index: int
    has_conv: bool
    weight_norm: float
    epoch_update_norm: float | None
    params: tuple[ParamStat, ...] = ()

    @property
    def has_weights(self) -> bool:
        """Whether the layer has a tensor of two or more dimensions (only those make its aggregates)."""
        return any(p.is_weight for p in self.params)

    @classmethod
    def of(cls, index: int, params: Sequence[ParamStat]) -> LayerStat:
        """The statistics of layer ``index`` from its tensors' (the one place the aggregates are made)."""
        weights = [p for p in params if p.is_weight]
        norm = math.sqrt(sum(p.norm**2 for p in weights))
        updates = [p.update_norm for p in weights if p.update_norm is not None]
        ended = any(p.update_norm is not None for p in params)
        update = math.sqrt(sum(u**2 for u in updates)) if ended else None
        return cls(index, any(p.is_conv for p in weights), norm, update, tuple(params))


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

    def parameters(self, param_layers: Sequence[int]) -> Iterator[tuple[int, ParamStat]]:
        """``(index, stat)`` of every reported parameter tensor, ``index`` its place in ``model.parameters()``.

        ``param_layers`` is the layer of each tensor; a layer must report all of its tensors.
        """
        for layer in self.layers:
            first = parameters_before(param_layers, layer.index)
            held = parameters_before(param_layers, layer.index + 1) - first
            if len(layer.params) != held:
                raise ValueError(
                    f"statistics of layer {layer.index} name {len(layer.params)} parameter tensors; it has {held}"
                )
            yield from enumerate(layer.params, start=first)


@dataclass(frozen=True)
class Decision:
    """What the next step trains: the frozen prefix and the learning-rate factors of the braking tensors.

    ``frozen_parameters`` n freezes the first n tensors of ``model.parameters()``; None (a
    decision saved by a layer-level checkpoint) means those of the layers below ``boundary``.
    ``boundary`` is the number of leading layers frozen whole: they run in eval mode without
    autograd. ``lr_factors`` maps a tensor's index to the factor of its rate (absent means 1.0);
    ``lr_bases`` maps a braking tensor to the base rate its factor multiplies instead of the
    step's (CAC brakes from the rate of the step the braking began at).
    """

    boundary: int
    lr_factors: Mapping[int, float] = field(default_factory=dict)
    frozen_parameters: int | None = None
    lr_bases: Mapping[int, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The decision as a checkpoint's JSON keeps it (:meth:`from_json` reads it back)."""
        return {
            "boundary": self.boundary,
            "frozen_parameters": self.frozen_parameters,
            "lr_factors": [[tensor, factor] for tensor, factor in sorted(self.lr_factors.items())],
            "lr_bases": [[tensor, base] for tensor, base in sorted(self.lr_bases.items())],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Decision:
        """A decision saved by :meth:`to_json`."""
        frozen = data.get("frozen_parameters")
        return cls(
            int(data["boundary"]),
            {int(tensor): float(factor) for tensor, factor in data["lr_factors"]},
            None if frozen is None else int(frozen),
            {int(tensor): float(base) for tensor, base in data.get("lr_bases", [])},
        )


def parameters_before(param_layers: Sequence[int], layer: int) -> int:
    """How many tensors of ``model.parameters()`` belong to the layers below ``layer``.

    ``param_layers`` (the layer of each tensor) never decreases, as ``model.parameters()`` follows the layers.
    """
    return bisect.bisect_left(param_layers, layer)


def layer_boundary(frozen_parameters: int, param_layers: Sequence[int], limit: int) -> int:
    """The layer boundary of a frozen prefix of ``frozen_parameters`` tensors, at most ``limit``.

    The number of leading layers whose tensors are all frozen: up to the layer of the first
    tensor that still trains. A layer without parameters after a frozen tensor counts as frozen
    (an edge head ending in a pooling layer is frozen whole), none when nothing is frozen.
    """
    if frozen_parameters <= 0:
        return 0
    if frozen_parameters >= len(param_layers):
        return limit
    return min(param_layers[frozen_parameters], limit)
