"""Measure each layer's forward and backward time on one device, and keep it as a JSON device profile."""
from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from pipeline.partition import LayerProfile, profile

__all__ = ["DeviceProfile", "LayerTiming", "ProfileError", "measured_sizes", "profile_layers"]

#: Below this, measuring a second micro-batch size says nothing the fit does not already know.
_SMALLEST_RATIO = 16

_Seconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class ProfileError(ValueError):
    """A device profile cannot be measured or read; the message names the file and the field."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LayerTiming(_Schema):
    """One top-level layer: its output per sample and its median times at each measured micro-batch size."""

    index: int = Field(ge=0)
    name: str
    params: int = Field(ge=0)
    output_shape: list[int]
    #: fp32 bytes of one sample's output (what crosses the link uncompressed at a cut after this layer).
    output_bytes: int = Field(ge=0)
    #: One entry per :attr:`DeviceProfile.batch_sizes`, in seconds.
    forward_seconds: list[_Seconds]
    backward_seconds: list[_Seconds]


class DeviceProfile(_Schema):
    """Per-layer times of one model on one device, the input of :func:`pipeline.planner.plan`.

    Time is modelled as linear in the micro-batch size ``n``: ``a + b * n`` fitted by least
    squares through the measured sizes (two: the largest micro-batch and one 16 times smaller),
    with ``a`` and ``b`` kept non-negative. ``a`` is the per-call cost (kernel launches, Python)
    that makes many small micro-batches slower than few large ones.
    """

    version: Literal[1] = 1
    model_name: str
    input_shape: list[int]
    num_layers: int = Field(ge=1)
    device: str
    torch_threads: int = Field(ge=1)
    torch_version: str
    repeats: int = Field(ge=1)
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    layers: list[LayerTiming]

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if self.batch_sizes != sorted(set(self.batch_sizes)):
            raise ValueError(f"batch_sizes must be distinct and increasing, got {self.batch_sizes}")
        if [layer.index for layer in self.layers] != list(range(self.num_layers)):
            raise ValueError(
                f"layers must hold indexes 0..{self.num_layers - 1} in order (num_layers = {self.num_layers})"
            )
        for layer in self.layers:
            for key in ("forward_seconds", "backward_seconds"):
                if len(getattr(layer, key)) != len(self.batch_sizes):
                    raise ValueError(
                        f"layers.{layer.index}.{key} has {len(getattr(layer, key))} entries; "
                        f"batch_sizes has {len(self.batch_sizes)}"
                    )
        return self

    def forward_seconds(self, index: int, n: int) -> float:
        """Predicted forward time of layer ``index`` on a micro-batch of ``n`` samples."""
        return _linear(self.batch_sizes, self.layers[index].forward_seconds, n)

    def backward_seconds(self, index: int, n: int) -> float:
        """Predicted backward time (gradients of the parameters and, but for layer 0, of the input)."""
        return _linear(self.batch_sizes, self.layers[index].backward_seconds, n)

    def check_model(self, name: str, input_shape: Sequence[int], layers: list[LayerProfile], label: str) -> None:
        """Refuse (naming it ``label``) a profile measured on another model than ``name`` with these layers."""
        where = f"{label} (measured on {self.device})"
        if self.model_name != name:
            raise ProfileError(f"{where} is of model {self.model_name!r}; the configuration's is {name!r}")
        if self.input_shape != list(input_shape):
            raise ProfileError(
                f"{where} has input_shape {self.input_shape}; the configuration's is {list(input_shape)}"
            )
        if self.num_layers != len(layers):
            raise ProfileError(f"{where} has {self.num_layers} layers; the configuration's model has {len(layers)}")
        for timing, layer in zip(self.layers, layers, strict=True):
            measured = (timing.name, timing.params, tuple(timing.output_shape))
            if measured != (layer.name, layer.params, layer.output_shape):
                raise ProfileError(
                    f"{where}: layer {layer.index} is {timing.name} with {timing.params} params and output "
                    f"{timing.output_shape}; the configuration's is {layer.name} with {layer.params} params "
                    f"and output {list(layer.output_shape)} (another width or num_classes?): profile this configuration"
                )

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON to ``path``."""
        Path(path).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        """Read a profile that :meth:`save` wrote; a malformed file is a :class:`ProfileError` naming the field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"cannot read device profile {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ProfileError(f"{path}: not a device profile (not UTF-8 text)") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ProfileError(f"{path}: not a valid device profile: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    # A whole-file check (model_validator) has no location; its message names the fields.
    where = ".".join(str(part) for part in error["loc"])
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return f"{where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')}{more}"


def _linear(sizes: Sequence[int], seconds: Sequence[float], n: int) -> float:
    if len(sizes) == 1:
        return seconds[0] * n / sizes[0]
    mean_n, mean_t = statistics.fmean(sizes), statistics.fmean(seconds)
    slope = sum((s - mean_n) * (t - mean_t) for s, t in zip(sizes, seconds, strict=True)) / sum(
        (s - mean_n) ** 2 for s in sizes
    )
    intercept = mean_t - slope * mean_n
    if slope < 0:  # timing noise on a layer too cheap to scale: treat it as a constant cost
        return mean_t
    if intercept < 0:  # a negative per-call cost is noise too: fit through the origin instead
        return n * sum(s * t for s, t in zip(sizes, seconds, strict=True)) / sum(s * s for s in sizes)
    return intercept + slope * n


def measured_sizes(micro_batch: int) -> list[int]:
    """The micro-batch sizes :func:`profile_layers` times: ``micro_batch`` and one 16 times smaller.

    At least 2 samples where possible: BatchNorm in training mode refuses a single sample per channel.
    """
    if micro_batch < 1:
        raise ProfileError(f"the micro-batch size must be at least 1, got {micro_batch}")
    return sorted({max(min(2, micro_batch), micro_batch // _SMALLEST_RATIO), micro_batch})


def profile_layers(
    model: nn.Sequential,
    input_shape: Sequence[int],
    micro_batch: int,
    *,
    model_name: str,
    device: str = "cpu",
    repeats: int = 5,
) -> DeviceProfile:
    """Time every top-level layer of ``model`` in training mode at the sizes of :func:`measured_sizes`.

    ``micro_batch`` is the largest micro-batch to plan for (``train.batch_size``: one chunk).
    Each layer runs on the previous layer's real output; each time is the median of ``repeats``
    runs after one warm-up. Backward is ``torch.autograd.grad`` of the layer's output with
    respect to its parameters and, for every layer but the first (whose input is data), its
    input. ``model`` itself is left untouched: a copy is timed on ``device``.
    """
    if repeats < 1:
        raise ProfileError(f"repeats must be at least 1, got {repeats}")
    target = _device(device)
    layers = profile(model, input_shape, None)
    sizes = measured_sizes(micro_batch)
    timed = copy.deepcopy(model).to(target).train()
    forward: list[list[float]] = [[] for _ in layers]
    backward: list[list[float]] = [[] for _ in layers]
    for n in sizes:
        x = torch.randn((n, *input_shape), device=target)
        for index, layer in enumerate(timed):
            seconds_forward, seconds_backward, x = _time_layer(layer, x, index > 0, target, repeats)
            forward[index].append(seconds_forward)
            backward[index].append(seconds_backward)
    return DeviceProfile(
        model_name=model_name,
        input_shape=list(input_shape),
        num_layers=len(layers),
        device=str(target),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        repeats=repeats,
        batch_sizes=sizes,
        layers=[
            LayerTiming(
                index=p.index,
                name=p.name,
                params=p.params,
                output_shape=list(p.output_shape),
                output_bytes=p.output_bytes,
                forward_seconds=forward[p.index],
                backward_seconds=backward[p.index],
            )
            for p in layers
        ],
    )


def _device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ProfileError(f"device {device!r} is not a torch device: {exc}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ProfileError(f"device {device!r}: CUDA is not available in this torch build or machine")
    if target.type not in ("cpu", "cuda"):
        raise ProfileError(f"device {device!r}: only cpu and cuda[:N] can be timed")
    return target


def _time_layer(
    layer: nn.Module, x: torch.Tensor, input_grad: bool, device: torch.device, repeats: int
) -> tuple[float, float, torch.Tensor]:
    """Median forward and backward seconds of ``layer`` on ``x``, and its output for the next layer."""
    params = [p for p in layer.parameters() if p.requires_grad]
    forward, backward = [], []
    for attempt in range(repeats + 1):
        # A fresh non-leaf copy each time: a layer may work in place on its input.
        leaf = x.detach().clone().requires_grad_(input_grad)
        source = leaf.clone() if input_grad else leaf
        start = _now(device)
        out = layer(source)
        middle = _now(device)
        wrt = ([source] if input_grad else []) + params
        backward_seconds = 0.0
        if wrt and out.requires_grad:
            seed = torch.ones_like(out)
            seeded = _now(device)
            torch.autograd.grad(out, wrt, seed, allow_unused=True)
            backward_seconds = _now(device) - seeded
        if attempt:  # the first run is a warm-up (allocator, kernel selection)
            forward.append(middle - start)
            backward.append(backward_seconds)
    return statistics.median(forward), statistics.median(backward), out.detach()


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
