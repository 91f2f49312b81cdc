"""Link codecs: tensors to little-endian bytes plus scales, validation of what arrives, and back."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = [
    "MAX_NDIM",
    "MAX_NUMEL",
    "MIN_CHANNEL_ELEMENTS",
    "CodecError",
    "Encoded",
    "Role",
    "codec_names",
    "decode",
    "encode",
    "payload_bytes",
]

Role = Literal["activation", "gradient"]

_ACTIVATION_CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
_GRADIENT_CODECS = _ACTIVATION_CODECS + ("int8-sr",)
_ROLES = ("activation", "gradient")

#: Largest element count an encoded tensor may declare; decode refuses more before allocating.
MAX_NUMEL = 2**31
#: Most dimensions an encoded tensor may declare (CNN tensors have at most 5).
MAX_NDIM = 16
#: Per-channel quantization parameters cost 4 bytes (symmetric) or 8 bytes (affine) per channel
#: on the wire; below this many elements per channel they stop paying for themselves (an int4
#: channel of 64 elements is 32 bytes of payload), so such tensors get one per-tensor scale.
MIN_CHANNEL_ELEMENTS = 64

# Integer grid of each quantizing codec: affine uses [lo, hi], symmetric [-hi, hi] so 0 is centred.
_GRID = {"int8": (-128, 127), "int8-sr": (-128, 127), "int4": (-8, 7)}
_BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int8-sr": 1}
# fp16 codes scale max|x| into [2**14, 2**15): one binade of headroom below fp16's max (65504)
# and as much room as possible above its subnormals for the small values of a gradient.
_FP16_TOP_EXPONENT = 15
# Keeps 2**k and 2**-k normal float32 numbers, so scaling by them is exact.
_FP16_MAX_SHIFT = 126
_TINY = torch.finfo(torch.float32).tiny

# Every payload below is native byte order: torch only runs on little-endian hosts, which is the
# wire order.


class CodecError(ValueError):
    """A tensor cannot be encoded or an encoded tensor is malformed; the message names the problem."""


@dataclass(frozen=True)
class Encoded:
    """One tensor as it crosses the link: raw little-endian payload plus what is needed to decode it.

    Quantized codecs decode element ``q`` of channel ``c`` as ``(q - zero_point[c]) * scale[c]``
    (``zero_point`` empty means 0); int4 packs two signed 4-bit values per byte, the first in the
    low nibble. fp16 decodes as ``half * scale[0]``.
    """

    codec: str
    shape: tuple[int, ...]
    data: bytes
    scale: tuple[float, ...] = ()
    zero_point: tuple[float, ...] = ()
    channel_axis: int = 1


def codec_names(role: Role) -> tuple[str, ...]:
    """The codecs allowed for ``role``: int8-sr (stochastic rounding) is for gradients only."""
    if role == "activation":
        return _ACTIVATION_CODECS
    if role == "gradient":
        return _GRADIENT_CODECS
    raise CodecError(f"role {role!r} is unknown; roles are {', '.join(_ROLES)}")


def payload_bytes(codec: str, shape: tuple[int, ...]) -> int:
    """Exact ``len(Encoded.data)`` for ``codec`` and ``shape`` (int4 packs two elements per byte)."""
    _check_codec(codec)
    return _payload_bytes(codec, _numel(_check_shape(shape)))


def encode(
    tensor: torch.Tensor, codec: str, role: Role, *, generator: torch.Generator | None = None
) -> Encoded:
    """Encode a floating-point tensor for the link.

    ``role`` decides the int8/int4 flavour: activations are affine (zero decodes exactly to 0),
    gradients symmetric. Tensors with ``ndim >= 2`` and at least :data:`MIN_CHANNEL_ELEMENTS`
    elements per channel (axis 1) get one scale per channel, others one per tensor. ``generator``
    drives int8-sr's stochastic rounding and is ignored by the other codecs. fp32 and bf16 carry
    nan/inf through; the codecs that compute a scale refuse them. The tensor is encoded on its own
    device and only the encoded values are copied to the host (int8 as int8; int4 as one nibble a
    byte, packed on the host); int8-sr's uniform draws come from ``generator`` wherever it lives
    and are copied to the tensor's device.
    """
    names = codec_names(role)
    if codec not in names:
        problem = "is not allowed for" if codec in _GRADIENT_CODECS else "is unknown; codecs for"
        raise CodecError(f"codec {codec!r} {problem} {role}s: {', '.join(names)}")
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        got = f"a {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise CodecError(f"only floating-point tensors can be encoded; got {got}")
    shape = tuple(tensor.shape)
    numel = tensor.numel()
    if not 1 <= numel <= MAX_NUMEL or len(shape) > MAX_NDIM:
        raise CodecError(
            f"cannot encode shape {list(shape)}: a tensor needs 1 to {MAX_NUMEL} elements "
            f"and at most {MAX_NDIM} dimensions"
        )
    x = tensor.detach().to(dtype=torch.float32).contiguous()
    if codec == "fp32":
        return Encoded(codec, shape, x.cpu().numpy().tobytes())
    if codec == "bf16":
        # numpy has no bfloat16: ship the bit patterns as int16.
        return Encoded(codec, shape, x.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    if codec == "fp16":
        return _encode_fp16(x, shape)
    return _encode_int(x, shape, codec, affine=role == "activation", generator=generator)


def decode(encoded: Encoded, device: torch.device | str = "cpu") -> torch.Tensor:
    """Validate ``encoded`` completely, then decode it to a new float32, contiguous, writable tensor on ``device``.

    Only the encoded values are copied to the device (int8 as int8; int4 as one nibble a byte,
    unpacked on the host); the rest of the decoding runs there.
    """
    shape, numel, scale, zero_point = _validate(encoded)
    codec = encoded.codec
    if codec == "fp32":
        # The one copy that makes the tensor writable (frombuffer on bytes would be read-only).
        return _writable(encoded.data, torch.float32).to(device).view(shape)
    if codec == "bf16":
        return _writable(encoded.data, torch.bfloat16).to(device).float().view(shape)
    if codec == "fp16":
        out = _writable(encoded.data, torch.float16).to(device).float()
        if scale[0] != 1.0:
            out.mul_(float(scale[0]))
        return out.view(shape)
    if codec == "int4":
        values = _unpack_int4(encoded.data)[:numel]
    else:
        values = _writable(encoded.data, torch.int8)
    out = values.to(device, dtype=torch.float32)
    view, _, param_shape = _grouped(out, shape, encoded.channel_axis if scale.size > 1 else None)
    if zero_point.size:
        view.sub_(torch.from_numpy(zero_point).to(device).view(param_shape))
    view.mul_(torch.from_numpy(scale).to(device).view(param_shape))
    return out.view(shape)


def _encode_fp16(x: torch.Tensor, shape: tuple[int, ...]) -> Encoded:
    lo, hi = x.amin(), x.amax()
    amax = max(-lo.item(), hi.item())
    if not math.isfinite(amax):
        raise CodecError("fp16 cannot encode non-finite values; the tensor contains nan or inf")
    shift = 0 if amax == 0.0 else min(_FP16_TOP_EXPONENT - math.frexp(amax)[1], _FP16_MAX_SHIFT)
    scaled = x * 2.0**shift if shift else x
    return Encoded("fp16", shape, scaled.to(torch.float16).cpu().numpy().tobytes(), scale=(2.0**-shift,))


def _encode_int(
    x: torch.Tensor, shape: tuple[int, ...], codec: str, *, affine: bool, generator: torch.Generator | None
) -> Encoded:
    per_channel = len(shape) >= 2 and x.numel() // shape[1] >= MIN_CHANNEL_ELEMENTS
    view, dims, param_shape = _grouped(x, shape, 1 if per_channel else None)
    lo, hi = view.amin(dim=dims), view.amax(dim=dims)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise CodecError(f"{codec} cannot encode non-finite values; the tensor contains nan or inf")
    qmin, qmax = _GRID[codec]
    # Parameters in float64 (on the host: not every device has it), then rounded once to float32:
    # the wire carries float32, and encode must quantize with exactly the values decode will see.
    lo, hi = lo.cpu().double(), hi.cpu().double()
    if affine:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # the range must hold 0 for zero to be exact
        span, steps, qlow = hi - lo, qmax - qmin, qmin
    else:
        span, steps, qlow = torch.maximum(-lo, hi), qmax, -qmax
    # A scale that underflows float32 is raised to the smallest normal float32 so it stays positive;
    # a zero-span channel decodes exactly with any scale, and 1.0 keeps it well away from 0.
    scale = torch.where(span == 0, 1.0, (span / steps).float().clamp(min=_TINY))
    q = view / scale.to(x.device).view(param_shape)
    zero_point = ()
    if affine:
        zp = (qmin - lo / scale.double()).round().clamp(qmin, qmax).float()
        q.add_(zp.to(x.device).view(param_shape))
        zero_point = tuple(zp.tolist())
    if codec == "int8-sr":
        # floor(y + U[0, 1)) rounds up with probability frac(y): unbiased, error below one step.
        # Drawn where the generator lives (the CPU for the nodes' generators): the same numbers on
        # every device, and a generator state that a checkpoint restores on any machine.
        at = x.device if generator is None else generator.device
        q.add_(torch.rand(q.shape, generator=generator, dtype=torch.float32, device=at).to(x.device)).floor_()
    else:
        q.round_()
    q.clamp_(qlow, qmax)
    q = q.to(torch.int8).cpu()
    data = _pack_int4(q) if codec == "int4" else q.numpy().tobytes()
    # channel_axis keeps its default 1: it is the channel axis when per-channel, ignored otherwise.
    return Encoded(codec, shape, data, tuple(scale.tolist()), zero_point)


def _grouped(
    x: torch.Tensor, shape: tuple[int, ...], axis: int | None
) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """View contiguous ``x`` as (outer, channels[, inner]): the view, its reduction dims, the params' shape.

    ``axis=None`` means one group (per-tensor). The inner dimension is dropped when it is 1, as
    reductions and broadcasts over a trailing size-1 dimension are several times slower.
    """
    if axis is None:
        outer, channels, inner = 1, 1, x.numel()
    else:
        outer, channels, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    if inner == 1:
        return x.view(outer, channels), (0,), (channels,)
    return x.view(outer, channels, inner), (0, 2), (channels, 1)


def _pack_int4(q: torch.Tensor) -> bytes:
    """Pack int8 values in [-8, 7] two per byte, first element in the low nibble."""
    n = q.numel()
    pairs = torch.empty(n + n % 2, dtype=torch.int8)
    pairs[:n] = q.view(-1)
    pairs[n:] = 0  # the pad nibble of an odd count
    # Each little-endian int16 holds one pair: low nibble of byte 0 -> bits 0-3, of byte 1 -> 4-7.
    words = pairs.numpy().view(np.int16)
    low = words & 0x0F
    words >>= 4
    words &= 0xF0
    low |= words
    return low.astype(np.uint8).tobytes()


def _unpack_int4(data: bytes) -> torch.Tensor:
    """The signed nibbles of ``data`` as int8, low nibble first (2 * len(data) values)."""
    words = np.frombuffer(data, dtype=np.uint8).astype(np.int16)
    # Byte b -> int16 whose low byte is b's low nibble and high byte b's high nibble.
    words |= words << 4
    words &= 0x0F0F
    nibbles = words.view(np.int8)
    nibbles ^= 8  # sign-extend 4 bits: (v ^ 8) - 8
    nibbles -= 8
    return torch.from_numpy(nibbles)


def _writable(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """``data`` as a 1-D tensor over a private copy, so it is writable and torch does not warn."""
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _payload_bytes(codec: str, numel: int) -> int:
    return (numel + 1) // 2 if codec == "int4" else numel * _BYTES_PER_ELEMENT[codec]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _check_codec(codec: str) -> None:
    if codec not in _GRADIENT_CODECS:
        raise CodecError(f"codec {codec!r} is unknown; known codecs: {', '.join(_GRADIENT_CODECS)}")


def _check_shape(shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints with at most MAX_NUMEL elements, else CodecError."""
    try:
        dims = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        raise CodecError(f"shape {shape!r} is not a sequence of ints") from None
    if len(dims) > MAX_NDIM:
        raise CodecError(f"shape has {len(dims)} dimensions; at most {MAX_NDIM} are allowed")
    try:
        if any(isinstance(d, bool) for d in dims):
            raise TypeError
        dims = tuple(operator.index(d) for d in dims)
    except TypeError:
        raise CodecError(f"shape {list(dims)!r} must hold ints only") from None
    bad = [d for d in dims if d < 1]
    if bad:
        raise CodecError(f"shape {list(dims)} has dimension {bad[0]}; dimensions must be positive")
    numel = _numel(dims)
    if numel > MAX_NUMEL:
        raise CodecError(f"shape {list(dims)} has {numel} elements; at most {MAX_NUMEL} are allowed")
    return dims


def _validate(encoded: Encoded) -> tuple[tuple[int, ...], int, np.ndarray, np.ndarray]:
    """Check everything about ``encoded``; return shape, numel, and scales and zero points as float32."""
    codec = encoded.codec
    _check_codec(codec)
    shape = _check_shape(encoded.shape)
    numel = _numel(shape)
    data = encoded.data
    if not isinstance(data, (bytes, bytearray)):
        raise CodecError(f"{codec} payload must be bytes, got {type(data).__name__}")
    need = _payload_bytes(codec, numel)
    if len(data) != need:
        raise CodecError(f"{codec} payload is {len(data)} bytes, shape {list(shape)} needs {need}")
    scale, zero_point = tuple(encoded.scale), tuple(encoded.zero_point)
    if codec in ("fp32", "bf16"):
        if scale or zero_point:
            raise CodecError(
                f"{codec} takes no scale or zero point; "
                f"got {len(scale)} scales, {len(zero_point)} zero points"
            )
        return shape, numel, np.empty(0, np.float32), np.empty(0, np.float32)
    if codec == "fp16" and len(scale) != 1:
        raise CodecError(f"fp16 needs exactly 1 scale; got {len(scale)}")
    if not scale:
        raise CodecError(f"{codec} needs 1 scale (per-tensor) or one per channel; got none")
    if len(scale) > 1:
        axis = encoded.channel_axis
        if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < len(shape):
            raise CodecError(
                f"channel_axis {axis!r} is out of range for shape {list(shape)}; "
                f"it must be in [0, {len(shape)})"
            )
        if len(scale) != shape[axis]:
            raise CodecError(
                f"{codec} has {len(scale)} scales; shape {list(shape)} needs 1 (per-tensor) "
                f"or {shape[axis]} (one per channel along axis {axis})"
            )
    scales32 = _float32_values(scale, "scale")
    bad = np.flatnonzero(~(np.isfinite(scales32) & (scales32 > 0)))
    if bad.size:
        raise CodecError(f"scale[{bad[0]}] is {_describe(scale[bad[0]])}; scales must be finite and positive")
    points = np.empty(0, np.float32)
    if zero_point:
        if codec in ("fp16", "int8-sr"):
            raise CodecError(f"{codec} is symmetric and takes no zero point; got {len(zero_point)}")
        if len(zero_point) != len(scale):
            raise CodecError(
                f"{codec} has {len(zero_point)} zero points; "
                f"it needs none (symmetric) or {len(scale)} (one per scale)"
            )
        qmin, qmax = _GRID[codec]
        points = _float32_values(zero_point, "zero_point")
        ok = np.isfinite(points) & (points == np.round(points)) & (points >= qmin) & (points <= qmax)
        bad = np.flatnonzero(~ok)
        if bad.size:
            raise CodecError(
                f"zero_point[{bad[0]}] is {_describe(zero_point[bad[0]])}; "
                f"{codec} zero points must be integers in [{qmin}, {qmax}]"
            )
    return shape, numel, scales32, points


def _float32_values(values: tuple[float, ...], what: str) -> np.ndarray:
    """``values`` as float32, the precision they have on the wire (overflow becomes inf)."""
    try:
        wide = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        wide = None
    if wide is None or wide.ndim != 1 or any(isinstance(v, (str, bytes)) for v in values):
        raise CodecError(f"{what} must be a flat sequence of numbers")
    with np.errstate(over="ignore"):
        return wide.astype(np.float32)


def _describe(value: float) -> str:
    """A parameter value, plus what it becomes as float32 when that differs (e.g. 1e-50 -> 0.0)."""
    value = float(value)
    with np.errstate(over="ignore"):
        as32 = float(np.float32(value))
    if math.isnan(value) or as32 == value:
        return repr(value)
    return f"{value!r} ({as32!r} as float32)"
