"""Cut a Sequential into edge head / cloud middle / edge tail, profile its layers, size what crosses the cuts."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.codecs import payload_bytes
from pipeline.config import LinkSection
from pipeline.models import layer_names

_FP32_BYTES = 4


class PartitionError(ValueError):
    """A model cannot be cut or profiled as asked; the message says what to fix."""


@dataclass(frozen=True)
class Cuts:
    """Where a model of ``num_layers`` layers is cut: the first ``edge_head`` and the last
    ``edge_tail`` layers run on the edge, the layers in between on the cloud."""

    edge_head: int
    edge_tail: int
    num_layers: int

    def __post_init__(self) -> None:
        _check_cuts(self.num_layers, self.edge_head, self.edge_tail)

    @property
    def middle_start(self) -> int:
        """Index of the first cloud layer."""
        return self.edge_head

    @property
    def middle_stop(self) -> int:
        """One past the index of the last cloud layer."""
        return self.num_layers - self.edge_tail


def make_cuts(num_layers: int, edge_head: int, edge_tail: int) -> Cuts:
    """Validated cuts for a model of ``num_layers`` layers; the cloud always gets at least one layer."""
    return Cuts(edge_head=edge_head, edge_tail=edge_tail, num_layers=num_layers)


def _check_cuts(num_layers: int, edge_head: int, edge_tail: int) -> None:
    for key, value in (("edge_head", edge_head), ("edge_tail", edge_tail)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise PartitionError(f"partition.{key} must be an integer, got {value!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise PartitionError(f"a model needs at least one layer to partition, got num_layers={num_layers!r}")
    allowed = (
        f"allowed: edge_head >= 0, edge_tail >= 0 and edge_head + edge_tail <= {num_layers - 1} "
        f"for this {num_layers}-layer model (the cloud needs at least one layer)"
    )
    if edge_head < 0:
        raise PartitionError(f"partition.edge_head = {edge_head} is negative; {allowed}")
    if edge_tail < 0:
        raise PartitionError(f"partition.edge_tail = {edge_tail} is negative; {allowed}")
    if edge_head + edge_tail >= num_layers:
        raise PartitionError(
            f"partition.edge_head ({edge_head}) + partition.edge_tail ({edge_tail}) = {edge_head + edge_tail} "
            f"leaves no layer for the cloud; {allowed}"
        )


def split(model: nn.Sequential, cuts: Cuts) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """Slice ``model`` into (edge head, cloud middle, edge tail).

    The parts share ``model``'s modules (no copies) and keep their names; a side with no
    layers gets an empty ``nn.Sequential``, which passes its input through unchanged.
    """
    _check_matches(model, cuts)
    items = list(model._modules.items())

    # nn.Sequential(...) rather than model[a:b]: slicing rebuilds type(model), which breaks
    # for Sequential subclasses whose __init__ takes other arguments.
    def part(start: int, stop: int) -> nn.Sequential:
        return nn.Sequential(OrderedDict(items[start:stop]))

    return part(0, cuts.middle_start), part(cuts.middle_start, cuts.middle_stop), part(cuts.middle_stop, len(items))


def _check_matches(model: nn.Sequential, cuts: Cuts) -> None:
    if len(model) != cuts.num_layers:
        raise PartitionError(
            f"the cuts were made for {cuts.num_layers} layers but the model has {len(model)}: "
            "make the cuts with make_cuts(len(model), edge_head, edge_tail)"
        )


@dataclass(frozen=True)
class LayerProfile:
    """One top-level layer: its size, forward cost and output, per sample."""

    index: int
    name: str
    kind: str
    params: int
    flops: int
    output_shape: tuple[int, ...]
    output_bytes: int
    placement: str


def profile(model: nn.Sequential, input_shape: Sequence[int], cuts: Cuts | None = None) -> list[LayerProfile]:
    """Profile each top-level layer of ``model`` with one forward pass of a single sample.

    FLOPs are what :class:`torch.utils.flop_counter.FlopCounterMode` counts: 2 x multiply-
    accumulates of every convolution and matrix product (``nn.Linear`` or a bare ``@``);
    elementwise ops, pooling and normalization count 0. Without ``cuts`` every layer is placed
    on the cloud. The pass runs in eval mode without autograd, so no parameter, buffer or
    gradient changes, and every module's train/eval mode is restored afterwards.
    """
    if cuts is None:
        cuts = make_cuts(len(model), 0, 0)
    _check_matches(model, cuts)
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise PartitionError(f"input_shape must be positive integers per sample (no batch), got {input_shape!r}")
    modes = [(module, module.training) for module in model.modules()]
    x = _sample_input(model, shape)
    names = layer_names(model)
    profiles: list[LayerProfile] = []
    try:
        # Eval mode: BatchNorm uses (and keeps) its running statistics, so batch size 1 works.
        model.eval()
        with torch.no_grad():
            for index, (name, layer) in enumerate(zip(names, model, strict=True)):
                counter = FlopCounterMode(display=False)
                try:
                    with counter:
                        x = layer(x)
                except Exception as exc:
                    raise PartitionError(
                        f"layer {index} ({name}) failed on an input of shape {list(x.shape[1:])}: {exc}; "
                        "check that input_shape matches the model"
                    ) from exc
                if not isinstance(x, torch.Tensor):
                    raise PartitionError(
                        f"layer {index} ({name}) returned {type(x).__name__}; every layer must return "
                        "a single tensor, since that is what crosses the link at a cut"
                    )
                out_shape = tuple(x.shape[1:])
                profiles.append(
                    LayerProfile(
                        index=index,
                        name=name,
                        kind=type(layer).__name__,
                        params=sum(p.numel() for p in layer.parameters()),
                        flops=counter.get_total_flops(),
                        output_shape=out_shape,
                        output_bytes=math.prod(out_shape) * _FP32_BYTES,
                        placement="cloud" if cuts.middle_start <= index < cuts.middle_stop else "edge",
                    )
                )
    finally:
        # Per module, not model.train(mode): a model may mix modes (e.g. frozen BatchNorm in eval).
        for module, training in modes:
            module.training = training
    return profiles


def _sample_input(model: nn.Sequential, shape: tuple[int, ...]) -> torch.Tensor:
    """One zero sample of ``shape``, in the dtype and on the device of the model's parameters."""
    first = next(model.parameters(), None)
    if first is not None and first.is_floating_point():
        return torch.zeros((1, *shape), dtype=first.dtype, device=first.device)
    return torch.zeros((1, *shape))


def cut_shapes(model: nn.Sequential, input_shape: Sequence[int], cuts: Cuts) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-sample shapes of the uplink tensor (the middle's input) and the downlink tensor (its output)."""
    return _cut_shapes(profile(model, input_shape, cuts), cuts, input_shape)


def _cut_shapes(
    profiles: list[LayerProfile], cuts: Cuts, input_shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(profiles) != cuts.num_layers:
        raise PartitionError(
            f"the cuts were made for {cuts.num_layers} layers but there are {len(profiles)} profiles: "
            "profile and cut the same model"
        )
    uplink = tuple(input_shape) if cuts.middle_start == 0 else profiles[cuts.middle_start - 1].output_shape
    return uplink, profiles[cuts.middle_stop - 1].output_shape


@dataclass(frozen=True)
class Crossing:
    """One tensor that crosses the link at a cut, sized per sample with the configured codec."""

    #: 1: between the edge head and the cloud; 2: between the cloud and the edge tail.
    cut: int
    direction: str
    kind: str
    codec: str
    shape: tuple[int, ...]
    #: Payload bytes per sample with ``codec``; ``fp32_bytes`` is the same tensor as fp32.
    nbytes: int
    fp32_bytes: int


def link_crossings(
    profiles: list[LayerProfile], cuts: Cuts, link: LinkSection, input_shape: Sequence[int]
) -> list[Crossing]:
    """What crosses the link at each cut, per sample, with the codecs of ``link``.

    Cut 1 carries the head's output (the raw input when ``edge_head = 0``) up and, while the
    head trains, its gradient down.  Cut 2 carries the middle's output down and, while the
    middle trains, its gradient up; with ``edge_tail = 0`` the loss is computed on the cloud
    and no tensor crosses there (the labels go up instead).  Payload bytes only: per-channel
    quantization scales and frame headers are not counted.
    """
    uplink_shape, downlink_shape = _cut_shapes(profiles, cuts, input_shape)
    tensors = [(1, "uplink", "activation", link.uplink, uplink_shape)]
    if cuts.edge_head > 0:
        tensors.append((1, "downlink", "gradient", link.gradients, uplink_shape))
    if cuts.edge_tail > 0:
        tensors.append((2, "downlink", "activation", link.downlink, downlink_shape))
        tensors.append((2, "uplink", "gradient", link.gradients, downlink_shape))
    return [
        Crossing(
            cut=cut,
            direction=direction,
            kind=kind,
            codec=codec,
            shape=shape,
            nbytes=payload_bytes(codec, shape),
            fp32_bytes=math.prod(shape) * _FP32_BYTES,
        )
        for cut, direction, kind, codec, shape in tensors
    ]
