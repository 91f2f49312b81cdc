"""Cut a Sequential into edge head / cloud middle / edge tail, and profile its layers."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.table import Table
from torch import nn

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

    FLOPs count 2 x multiply-accumulates of every convolution and linear layer (elementwise
    ops are ignored). Without ``cuts`` every layer is placed on the cloud. The pass runs in
    eval mode without autograd, so no parameter, buffer or gradient changes, and every
    module's train/eval mode is restored afterwards.
    """
    if cuts is None:
        cuts = make_cuts(len(model), 0, 0)
    _check_matches(model, cuts)
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise PartitionError(f"input_shape must be positive integers per sample (no batch), got {input_shape!r}")

    layer_flops = 0

    def count(module: nn.Module, args: object, output: torch.Tensor) -> None:
        nonlocal layer_flops
        layer_flops += _flops(module, output)

    hooks = [
        module.register_forward_hook(count)
        for module in model.modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    ]
    modes = [(module, module.training) for module in model.modules()]
    first = next(model.parameters(), None)
    if first is not None and first.is_floating_point():
        x = torch.zeros((1, *shape), dtype=first.dtype, device=first.device)
    else:
        x = torch.zeros((1, *shape))
    names = layer_names(model)
    profiles: list[LayerProfile] = []
    try:
        # Eval mode: BatchNorm uses (and keeps) its running statistics, so batch size 1 works.
        model.eval()
        with torch.no_grad():
            for index, (name, layer) in enumerate(zip(names, model, strict=True)):
                layer_flops = 0
                try:
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
                        flops=layer_flops,
                        output_shape=out_shape,
                        output_bytes=math.prod(out_shape) * _FP32_BYTES,
                        placement="cloud" if cuts.middle_start <= index < cuts.middle_stop else "edge",
                    )
                )
    finally:
        for hook in hooks:
            hook.remove()
        # Per module, not model.train(mode): a model may mix modes (e.g. frozen BatchNorm in eval).
        for module, training in modes:
            module.training = training
    return profiles


def _flops(module: nn.Module, output: torch.Tensor) -> int:
    """Forward FLOPs (2 x MACs) of one call of a convolution or linear module, per sample."""
    per_sample_outputs = output[0].numel()
    if isinstance(module, nn.Linear):
        return 2 * per_sample_outputs * module.in_features
    kernel = math.prod(module.kernel_size)
    return 2 * per_sample_outputs * (module.in_channels // module.groups) * kernel


def cut_shapes(model: nn.Sequential, input_shape: Sequence[int], cuts: Cuts) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-sample shapes of the uplink tensor (the middle's input) and the downlink tensor (its output)."""
    profiles = profile(model, input_shape, cuts)
    uplink = tuple(input_shape) if cuts.middle_start == 0 else profiles[cuts.middle_start - 1].output_shape
    return uplink, profiles[cuts.middle_stop - 1].output_shape


def render_partition_table(
    profiles: list[LayerProfile], cuts: Cuts, *, input_shape: Sequence[int] | None = None
) -> Table:
    """The layer table with a marker row at each cut saying what crosses the link there.

    ``input_shape`` is only needed to size the uplink when ``edge_head == 0`` (raw inputs cross).
    """
    if len(profiles) != cuts.num_layers:
        raise PartitionError(
            f"the cuts were made for {cuts.num_layers} layers but there are {len(profiles)} profiles: "
            "profile and cut the same model"
        )
    table = Table(caption=_totals_caption(profiles))
    table.add_column("#", justify="right")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("params", justify="right")
    table.add_column("FLOPs", justify="right")
    table.add_column("output/sample", justify="right")
    table.add_column("placement")

    markers = {cuts.middle_start: _uplink_marker(profiles, cuts, input_shape)}
    markers[cuts.middle_stop] = _downlink_marker(profiles, cuts)
    for index, p in enumerate(profiles):
        if index in markers:
            _add_marker(table, markers[index])
        table.add_row(
            str(p.index),
            p.name,
            p.kind,
            f"{p.params:,}",
            _human_flops(p.flops),
            f"{_human_bytes(p.output_bytes)} {list(p.output_shape)}",
            p.placement,
            style="cyan" if p.placement == "edge" else None,
        )
    if cuts.num_layers in markers:
        _add_marker(table, markers[cuts.num_layers])
    return table


def _add_marker(table: Table, text: str) -> None:
    # Rich has no column spans; the name column is the one wide enough to read the marker in.
    table.add_section()
    table.add_row("", text, "", "", "", "", "", style="bold magenta", end_section=True)


def _uplink_marker(profiles: list[LayerProfile], cuts: Cuts, input_shape: Sequence[int] | None) -> str:
    if cuts.edge_head > 0:
        return f"── cut 1: uplink activation {_shape_and_size(profiles[cuts.edge_head - 1])} ──"
    if input_shape is None:
        return "── cut 1: uplink raw input (edge_head = 0: inputs leave the edge) ──"
    size = math.prod(input_shape) * _FP32_BYTES
    return f"── cut 1: uplink raw input {list(input_shape)} = {_human_bytes(size)}/sample (edge_head = 0) ──"


def _downlink_marker(profiles: list[LayerProfile], cuts: Cuts) -> str:
    if cuts.edge_tail == 0:
        return "── cut 2: edge_tail = 0: the loss is computed on the cloud, so labels cross the link ──"
    return f"── cut 2: downlink activation {_shape_and_size(profiles[cuts.middle_stop - 1])} ──"


def _shape_and_size(layer: LayerProfile) -> str:
    return f"{list(layer.output_shape)} = {_human_bytes(layer.output_bytes)}/sample"


def _totals_caption(profiles: list[LayerProfile]) -> str:
    parts = []
    for placement in ("edge", "cloud"):
        side = [p for p in profiles if p.placement == placement]
        params = sum(p.params for p in side)
        flops = sum(p.flops for p in side)
        parts.append(f"{placement}: {len(side)} layers, {params:,} params, {_human_flops(flops)} FLOPs/sample")
    return " · ".join(parts)


def _human_flops(count: int) -> str:
    """SI-scaled count with one decimal, e.g. 1234567 -> "1.2 M"."""
    return _human(count, 1000, ("", "K", "M", "G", "T"))


def _human_bytes(count: int) -> str:
    """Binary-scaled byte count with one decimal, e.g. 32768 -> "32.0 KiB"."""
    return _human(count, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))


def _human(count: int, base: int, units: tuple[str, ...]) -> str:
    value, level = float(count), 0
    while value >= base and level < len(units) - 1:
        value /= base
        level += 1
    if level == 0:
        return f"{count} {units[0]}".rstrip()
    return f"{value:.1f} {units[level]}"
