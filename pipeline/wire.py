"""The only place that turns tensors, statistics and decisions into protobuf messages and back."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from torch import nn

from pipeline import codecs
from pipeline.config import Config, ConfigError
from pipeline.partition import cut_shapes, make_cuts
from pipeline.skip import Decision, LayerStat, ParamStat
from protos import edgepipe_pb2 as pb

__all__ = [
    "CodecClock",
    "WireError",
    "decision_from_message",
    "decision_to_message",
    "decode_tensor",
    "encode_tensor",
    "frame_kind",
    "labels_from_frame",
    "message_limit",
    "raw_from_message",
    "raw_to_message",
    "stats_from_message",
    "stats_to_message",
]

#: Element types weights may travel as (codec "raw"); nothing else is accepted.
_RAW_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_RAW_NAMES = {dtype: name for name, dtype in _RAW_DTYPES.items()}


class WireError(ValueError):
    """A frame is malformed; the message says what was wrong (sent as INVALID_ARGUMENT)."""


@dataclass
class CodecClock:
    """Seconds spent encoding and decoding tensors, for the codec-cost columns of a run."""

    encode_seconds: float = 0.0
    decode_seconds: float = 0.0

    def take(self) -> tuple[float, float]:
        """Return the times so far and start again from zero."""
        times = (self.encode_seconds, self.decode_seconds)
        self.encode_seconds = self.decode_seconds = 0.0
        return times


def encode_tensor(
    tensor: torch.Tensor,
    codec: str,
    role: codecs.Role,
    *,
    clock: CodecClock | None = None,
    generator: torch.Generator | None = None,
) -> pb.Tensor:
    """Encode a float tensor for the link with ``codec``, on its device (only the encoded values reach the host)."""
    start = time.perf_counter()
    encoded = codecs.encode(tensor.detach(), codec, role, generator=generator)
    message = pb.Tensor(
        shape=encoded.shape,
        codec=encoded.codec,
        data=encoded.data,
        scale=encoded.scale,
        zero_point=encoded.zero_point,
        channel_axis=encoded.channel_axis,
    )
    if clock is not None:
        clock.encode_seconds += time.perf_counter() - start
    return message


def decode_tensor(
    message: pb.Tensor,
    *,
    sample_shape: tuple[int, ...],
    max_batch: int,
    what: str,
    clock: CodecClock | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Validate and decode a tensor that must be ``[n, *sample_shape]`` with ``1 <= n <= max_batch``.

    Everything is checked before anything is allocated; a problem raises :class:`WireError`
    naming ``what`` (for example "uplink activation"). The tensor is decoded into ``device``'s memory.
    """
    start = time.perf_counter()
    shape = tuple(message.shape)
    if len(shape) != len(sample_shape) + 1 or shape[1:] != tuple(sample_shape):
        raise WireError(f"{what} has shape {list(shape)}; expected [n, {', '.join(map(str, sample_shape))}]")
    if not 1 <= shape[0] <= max_batch:
        raise WireError(f"{what} carries {shape[0]} samples; a micro-batch holds 1 to {max_batch}")
    # With the upb backend every read of a bytes field copies it: read it exactly once.
    encoded = codecs.Encoded(
        codec=message.codec,
        shape=shape,
        data=message.data,
        scale=tuple(message.scale),
        zero_point=tuple(message.zero_point),
        channel_axis=message.channel_axis,
    )
    try:
        tensor = codecs.decode(encoded, device)
    except codecs.CodecError as exc:
        raise WireError(f"{what}: {exc}") from None
    # One NaN or inf would spread through every weight it reaches at the next optimizer step;
    # finite scales alone do not rule it out (fp32 and fp16 payloads, scale x 127 overflowing).
    if not bool(torch.isfinite(tensor).all()):
        raise WireError(f"{what} holds NaN or infinite values; every element must be finite")
    if clock is not None:
        clock.decode_seconds += time.perf_counter() - start
    return tensor


def labels_from_frame(frame: pb.StepFrame, *, batch: int, num_classes: int) -> torch.Tensor:
    """The labels that ride with an uplink activation when the loss is computed on the cloud."""
    labels = np.fromiter(frame.labels, dtype=np.int64, count=len(frame.labels))
    if len(labels) != batch:
        raise WireError(f"frame carries {len(labels)} labels for {batch} samples")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise WireError(f"labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}")
    return torch.from_numpy(labels)


def raw_to_message(tensor: torch.Tensor) -> pb.Tensor:
    """A tensor of weights, bit for bit (codec ``raw``), from its CPU copy."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype not in _RAW_NAMES:
        raise WireError(f"weights of type {tensor.dtype} cannot travel; allowed: {', '.join(_RAW_DTYPES)}")
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return pb.Tensor(shape=tensor.shape, codec="raw", dtype=_RAW_NAMES[tensor.dtype], data=data)


def raw_from_message(message: pb.Tensor, *, like: torch.Tensor, what: str) -> torch.Tensor:
    """Decode a ``raw`` tensor that must match ``like`` in shape and element type."""
    if message.codec != "raw":
        raise WireError(f"{what}: weights must use codec 'raw', got {message.codec!r}")
    if tuple(message.shape) != tuple(like.shape) or _RAW_DTYPES.get(message.dtype) != like.dtype:
        raise WireError(
            f"{what} is {message.dtype} {list(message.shape)}; the model has {like.dtype} {list(like.shape)}"
        )
    data = message.data
    expected = like.numel() * like.element_size()
    if len(data) != expected:
        raise WireError(f"{what} payload is {len(data)} bytes; {list(like.shape)} {message.dtype} needs {expected}")
    if not expected:
        return torch.empty_like(like)
    return torch.frombuffer(bytearray(data), dtype=like.dtype).view(like.shape)


def frame_kind(frame: Any) -> str:
    """The traffic kind of a frame: ``activation``, ``gradient`` or ``control``."""
    if isinstance(frame, pb.StepFrame):
        body = frame.WhichOneof("body")
        if body == "cached":  # stands for an activation the cloud holds
            return "activation"
        return body if body in ("activation", "gradient") else "control"
    if isinstance(frame, (pb.EvalFrame, pb.NamedTensor)):
        # Evaluation tensors and weights are forward data, not gradients.
        return "activation"
    return "control"


def stats_to_message(stats: list[LayerStat]) -> list[pb.LayerStat]:
    """Per-layer statistics, with each tensor's, for a step-end frame."""
    return [
        pb.LayerStat(
            index=s.index,
            has_conv=s.has_conv,
            weight_norm=s.weight_norm,
            epoch_update_norm=s.epoch_update_norm,
            params=[
                pb.LayerStat.Param(shape=p.shape, norm=p.norm, variance=p.variance, update_norm=p.update_norm)
                for p in s.params
            ],
        )
        for s in stats
    ]


def _finite(values: list[float]) -> bool:
    return all(math.isfinite(v) and v >= 0 for v in values)


def stats_from_message(messages: Any, *, num_layers: int) -> list[LayerStat]:
    """Validate and convert the statistics the edge reports."""
    stats = []
    for m in messages:
        if not 0 <= m.index < num_layers:
            raise WireError(f"statistics name layer {m.index}; the model has layers 0..{num_layers - 1}")
        values = [m.weight_norm]
        update = m.epoch_update_norm if m.HasField("epoch_update_norm") else None
        if update is not None:
            values.append(update)
        params = []
        for p in m.params:
            tensor_update = p.update_norm if p.HasField("update_norm") else None
            if (tensor_update is None) != (update is None) or any(d < 0 for d in p.shape):
                raise WireError(
                    f"statistics of layer {m.index}: a tensor's update norm must come exactly with the layer's, "
                    "and its shape must have no negative sizes"
                )
            values += [p.norm, p.variance, *([] if tensor_update is None else [tensor_update])]
            params.append(ParamStat(tuple(p.shape), p.norm, p.variance, tensor_update))
        if not _finite(values):
            raise WireError(f"statistics of layer {m.index} must be finite and non-negative")
        stats.append(LayerStat(m.index, m.has_conv, m.weight_norm, update, tuple(params)))
    return stats


def decision_to_message(decision: Decision) -> pb.Decision:
    """A skip decision for a step-done frame or the handshake reply."""
    return pb.Decision(
        boundary=decision.boundary,
        frozen_parameters=decision.frozen_parameters,
        lr_factors=[
            pb.LrFactor(parameter=k, factor=v, base=decision.lr_bases.get(k))
            for k, v in sorted(decision.lr_factors.items())
        ],
    )


def decision_from_message(message: pb.Decision) -> Decision:
    """The skip decision the cloud sent."""
    frozen = message.frozen_parameters if message.HasField("frozen_parameters") else None
    return Decision(
        message.boundary,
        {f.parameter: f.factor for f in message.lr_factors},
        frozen,
        {f.parameter: f.base for f in message.lr_factors if f.HasField("base")},
    )


#: Room for everything in a frame besides the tensor payload (shape, scales, labels, ids), and
#: for the handshake, whose configuration text the cloud bounds to 64 KiB.
_FRAME_OVERHEAD = 64 << 10
#: The limit exceeds the largest legal message by this fraction of it: a little room for
#: protobuf framing and future fields, far from the configured bound.
_HEADROOM_FRACTION = 4


def message_limit(config: Config, model: nn.Sequential) -> int:
    """The gRPC message size limit both ends set: what the configuration needs, plus headroom.

    The largest message is an fp32 micro-batch at a cut or the largest weight tensor; the limit
    is that plus a quarter, never more than ``link.max_message_mib``, so that a peer cannot make
    the other end receive (and allocate) more than a legal frame. A configuration that needs
    more than the bound is refused with what to change.
    """
    cuts = make_cuts(len(model), config.partition.edge_head, config.partition.edge_tail)
    uplink, downlink = cut_shapes(model, config.model.input_shape, cuts)
    per_sample = max(math.prod(uplink), math.prod(downlink)) * 4
    largest_weight = max((t.numel() * t.element_size() for t in model.state_dict().values()), default=0)
    batch = config.micro_batch_size
    # Beside the payload: labels (at most 10 bytes a varint), scales and zero points (8 bytes a channel).
    frame = per_sample * batch + 10 * batch + 8 * max(uplink[0], downlink[0])
    needed = max(frame, largest_weight) + _FRAME_OVERHEAD
    bound = config.link.max_message_mib << 20
    if needed > bound:
        raise ConfigError(
            f"link.max_message_mib: a message needs up to {needed / 2**20:.2f} MiB but the bound is "
            f"{config.link.max_message_mib} MiB; raise link.max_message_mib or partition.chunks"
        )
    return min(bound, needed + needed // _HEADROOM_FRACTION)
