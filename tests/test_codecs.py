"""Tests for pipeline.codecs: round-trip bounds, wire format, stochastic rounding and decode validation."""

from __future__ import annotations

import dataclasses
import math
import struct
import warnings

import numpy as np
import pytest
import torch

from pipeline.codecs import (
    MIN_CHANNEL_ELEMENTS,
    CodecError,
    Encoded,
    codec_names,
    decode,
    encode,
    payload_bytes,
)

QUANTIZED = ("int8", "int4", "int8-sr")
# name -> shape; 4d and 2d have >= 64 elements per channel (per-channel), 1d and tiny do not.
SHAPES = {"4d": (4, 8, 8, 8), "2d": (128, 12), "1d": (301,), "tiny": (1, 3)}
ROLE_CODECS = [(role, codec) for role in ("activation", "gradient") for codec in codec_names(role)]


def sample(shape: tuple[int, ...], seed: int = 0, relu: bool = False) -> torch.Tensor:
    """Normal data whose channels (axis 1) differ in magnitude up to 1000x: per-channel scales matter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if len(shape) >= 2:
        magnitude = 10.0 ** (torch.arange(shape[1], dtype=torch.float32) % 4 - 2)
        x = x * magnitude.view(1, -1, *([1] * (len(shape) - 2)))
    return x.clamp(min=0) if relu else x


def step_per_element(enc: Encoded) -> torch.Tensor:
    """Each element's quantization step, broadcast from the per-channel or per-tensor scales."""
    scale = torch.tensor(enc.scale, dtype=torch.float32)
    if len(enc.scale) == 1:
        return scale.expand(enc.shape)
    view = [1] * len(enc.shape)
    view[enc.channel_axis] = -1
    return scale.view(view).expand(enc.shape)


def float32_round_trip(values: tuple[float, ...]) -> tuple[float, ...]:
    """What a protobuf ``repeated float`` field gives back."""
    return struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values))


def test_codec_names_per_role() -> None:
    assert codec_names("activation") == ("fp32", "fp16", "bf16", "int8", "int4")
    assert codec_names("gradient") == ("fp32", "fp16", "bf16", "int8", "int4", "int8-sr")


@pytest.mark.parametrize("case", SHAPES)
@pytest.mark.parametrize(("role", "codec"), ROLE_CODECS)
def test_round_trip_within_codec_bound(role: str, codec: str, case: str) -> None:
    shape = SHAPES[case]
    x = sample(shape, relu=role == "activation" and case == "4d")
    enc = encode(x, codec, role, generator=torch.Generator().manual_seed(1))
    assert enc.codec == codec and enc.shape == shape
    assert len(enc.data) == payload_bytes(codec, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's non-writable-buffer warning
        out = decode(enc)
    assert out.dtype == torch.float32 and out.shape == x.shape and out.is_contiguous()
    err = (out - x).abs()
    if codec == "fp32":
        assert torch.equal(out.view(torch.int32), x.view(torch.int32))
    elif codec == "bf16":
        assert torch.equal(out, x.to(torch.bfloat16).float())
        assert bool((err <= x.abs() * 2.0**-8).all())
    elif codec == "fp16":
        # Relative half-ulp of fp16, plus half the smallest subnormal step after scaling.
        assert bool((err <= x.abs() * 2.0**-11 + enc.scale[0] * 2.0**-25).all())
    else:
        step = step_per_element(enc)
        bound = step if codec == "int8-sr" else step / 2 * (1 + 1e-4)
        assert bool((err <= bound).all()), float((err / step).max())
        assert (enc.zero_point != ()) == (role == "activation")
        # The grid spans the data: a step is at most max|x| / 127 (int8) or / 7 (int4).
        assert float(step.max()) <= float(x.abs().max()) / (7 if codec == "int4" else 127) * (1 + 1e-6)


@pytest.mark.parametrize(("role", "codec"), ROLE_CODECS)
def test_decode_is_a_fresh_writable_tensor(role: str, codec: str) -> None:
    x = sample((4, 8, 8, 8))
    enc = encode(x, codec, role)
    first = decode(enc)
    first.mul_(0.0).add_(7.0)  # in place, must not touch the payload or warn
    assert torch.equal(decode(enc), decode(enc))
    assert not torch.equal(decode(enc), first)


def test_payload_sizes_are_exact() -> None:
    for shape, n in (((4, 8, 8, 8), 2048), ((301,), 301), ((1, 3), 3), ((), 1)):
        assert payload_bytes("fp32", shape) == 4 * n
        assert payload_bytes("fp16", shape) == payload_bytes("bf16", shape) == 2 * n
        assert payload_bytes("int8", shape) == payload_bytes("int8-sr", shape) == n
        assert payload_bytes("int4", shape) == math.ceil(n / 2)


def test_per_channel_rule_follows_elements_per_channel() -> None:
    enough = MIN_CHANNEL_ELEMENTS
    assert len(encode(torch.randn(enough, 5), "int8", "activation").scale) == 5
    assert len(encode(torch.randn(enough - 1, 5), "int8", "activation").scale) == 1
    assert len(encode(torch.randn(2, 6, 4, 8), "int4", "gradient").scale) == 6
    assert len(encode(torch.randn(1000), "int8", "gradient").scale) == 1
    assert encode(torch.randn(8, 16, 8, 8), "int8", "activation").channel_axis == 1


@pytest.mark.parametrize("codec", ("int8", "int4"))
def test_activation_zero_decodes_exactly_to_zero(codec: str) -> None:
    x = sample((4, 8, 8, 8), relu=True)  # about half the elements are exactly 0
    x[:, 3] = 0.0  # and one all-zero channel
    x[0, 5] = -x[0, 5].abs()  # a channel with negatives as well
    enc = encode(x, codec, "activation")
    out = decode(enc)
    assert bool((out[x == 0] == 0).all())
    assert enc.scale[3] == 1.0  # a zero-span channel gets scale 1, not 0
    assert torch.equal(out[:, 3], torch.zeros_like(out[:, 3]))


@pytest.mark.parametrize("codec", QUANTIZED)
def test_constant_and_zero_tensors_decode_exactly(codec: str) -> None:
    zeros = torch.zeros(4, 8, 8, 8)
    enc = encode(zeros, codec, "gradient")
    assert enc.scale == (1.0,) * 8
    assert torch.equal(decode(enc), zeros)
    tiny = torch.full((10,), 1e-42)  # subnormal: a naive max/127 scale would underflow to 0
    enc = encode(tiny, codec, "gradient")
    assert enc.scale[0] > 0 and float((decode(enc) - tiny).abs().max()) <= enc.scale[0]


def test_int_wire_format() -> None:
    x = torch.tensor([7.0, -7.0, 1.0, 0.0, -1.0])  # max|x| = 7 -> int4 gradient scale 1
    enc = encode(x, "int4", "gradient")
    assert enc.scale == (1.0,) and enc.zero_point == ()
    assert enc.data == bytes([0x97, 0x01, 0x0F])  # signed nibbles, first element low
    enc = encode(x * (127 / 7), "int8", "gradient")
    assert np.frombuffer(enc.data, np.int8).tolist() == [127, -127, 18, 0, -18]


def test_decode_honours_any_channel_axis_and_zero_point() -> None:
    # Affine per-channel along axis 0: element q of row r decodes as (q - zero_point[r]) * scale[r].
    data = np.array([0, 1, -128, 10, 11, 12], np.int8).tobytes()
    enc = Encoded("int8", (2, 3), data, scale=(0.5, 2.0), zero_point=(1.0, 10.0), channel_axis=0)
    assert decode(enc).tolist() == [[-0.5, 0.0, -64.5], [0.0, 2.0, 4.0]]


def test_fp16_scales_small_gradients_instead_of_underflowing() -> None:
    g = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 1e-8
    assert float(g.half().float().ne(0).float().mean()) < 0.5  # plain fp16 loses most of them
    enc = encode(g, "fp16", "gradient")
    assert math.log2(enc.scale[0]).is_integer()
    assert bool(((decode(enc) - g).abs() <= g.abs() * 2.0**-11).all())


def test_fp16_does_not_overflow_large_values() -> None:
    x = torch.tensor([1e6, -3e7, 5.0, 0.0])
    assert torch.isinf(x.half()).any()
    out = decode(encode(x, "fp16", "activation"))
    assert torch.isfinite(out).all()
    assert bool(((out - x).abs() <= x.abs() * 2.0**-11).all())


def test_stochastic_rounding_is_unbiased_and_round_to_nearest_is_not() -> None:
    # max|x| = 127 makes the step exactly 1, so every other element sits 0.3 above a grid point.
    x = torch.cat([torch.tensor([127.0]), torch.arange(-50, 50, dtype=torch.float32) + 0.3])
    draws = 2000
    gen = torch.Generator().manual_seed(3)
    total = torch.zeros_like(x)
    for _ in range(draws):
        out = decode(encode(x, "int8-sr", "gradient", generator=gen))
        assert bool(((out - x).abs() < 1.0).all())
        total += out
    mean_err = (total / draws - x)[1:]
    stderr = math.sqrt(0.3 * 0.7 / draws)
    assert float(mean_err.abs().max()) < 5 * stderr
    assert abs(float(mean_err.mean())) < 5 * stderr / math.sqrt(mean_err.numel())
    nearest_err = (decode(encode(x, "int8", "gradient")) - x)[1:]
    assert float(nearest_err.mean()) == pytest.approx(-0.3, abs=1e-4)


def test_stochastic_rounding_follows_the_generator() -> None:
    x = sample((128, 12))
    a, b, c = (
        encode(x, "int8-sr", "gradient", generator=torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)
    )
    assert a == b and a.data != c.data


@pytest.mark.parametrize(("role", "codec"), [rc for rc in ROLE_CODECS if rc[1] != "fp32"])
def test_float32_round_trip_of_parameters_changes_nothing(role: str, codec: str) -> None:
    x = sample((4, 8, 8, 8), seed=4) * 3.7
    enc = encode(x, codec, role)
    wire = dataclasses.replace(
        enc, scale=float32_round_trip(enc.scale), zero_point=float32_round_trip(enc.zero_point)
    )
    assert wire == enc
    assert torch.equal(decode(wire), decode(enc))


def test_encode_accepts_views_and_autograd_tensors() -> None:
    plain = sample((12, 128)).t()  # non-contiguous
    x = plain.clone().requires_grad_()
    assert torch.equal(decode(encode(x, "fp32", "activation")), plain)
    expected = decode(encode(plain.contiguous(), "int8", "activation"))
    assert torch.equal(decode(encode(x, "int8", "activation")), expected)


def test_encode_rejects_what_it_cannot_carry() -> None:
    allowed = "fp32, fp16, bf16, int8, int4"
    with pytest.raises(CodecError, match=rf"'int8-sr' is not allowed for activations: {allowed}$"):
        encode(torch.ones(4), "int8-sr", "activation")
    with pytest.raises(CodecError, match=r"'int3' is unknown.*int8-sr"):
        encode(torch.ones(4), "int3", "gradient")
    with pytest.raises(CodecError, match=r"role 'weights' is unknown; roles are activation, gradient"):
        encode(torch.ones(4), "fp32", "weights")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match=r"floating-point.*torch.int64"):
        encode(torch.ones(4, dtype=torch.int64), "fp32", "activation")
    with pytest.raises(CodecError, match=r"shape \[0, 3\]"):
        encode(torch.ones(0, 3), "int8", "activation")
    for codec in ("fp16", "int8", "int4"):
        for bad in (math.nan, math.inf, -math.inf):
            x = torch.ones(4, 8, 8, 8)
            x[1, 2, 3, 4] = bad
            with pytest.raises(CodecError, match=rf"{codec} cannot encode non-finite values"):
                encode(x, codec, "activation")
    with pytest.raises(CodecError, match="int8-sr cannot encode non-finite"):
        encode(torch.tensor([1.0, math.nan]), "int8-sr", "gradient")
    # The raw codecs carry non-finite values (a diverging loss is visible on the other side).
    x = torch.tensor([math.nan, math.inf, -1.0])
    assert torch.equal(decode(encode(x, "fp32", "gradient")).isnan(), x.isnan())


GOOD = encode(sample((4, 8, 8, 8)), "int8", "activation")


def scale_3(value: object) -> dict[str, object]:
    """A change to GOOD that sets scale[3] to ``value``."""
    return {"scale": GOOD.scale[:3] + (value,) + GOOD.scale[4:]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"codec": "int3"}, r"codec 'int3' is unknown; known codecs: fp32, fp16, bf16, int8, int4, int8-sr"),
        ({"data": bytes(100)}, r"^int8 payload is 100 bytes, shape \[4, 8, 8, 8\] needs 2048$"),
        ({"data": "x" * 2048}, r"payload must be bytes, got str"),
        ({"shape": (4, 0, 8, 8)}, r"shape \[4, 0, 8, 8\] has dimension 0; dimensions must be positive"),
        ({"shape": (4, -8, 8, 8)}, r"dimension -8"),
        ({"shape": (4, 8.0, 8, 8)}, r"must hold ints only"),
        ({"shape": (2**16, 2**16, 2)}, r"has 8589934592 elements; at most 2147483648"),
        ({"shape": (1,) * 17}, r"17 dimensions; at most 16"),
        (scale_3(math.nan), r"^scale\[3\] is nan; scales must be finite and positive$"),
        (scale_3(math.inf), r"scale\[3\] is inf"),
        (scale_3(0.0), r"scale\[3\] is 0.0"),
        (scale_3(-0.5), r"scale\[3\] is -0.5"),
        (scale_3(1e-50), r"scale\[3\] is 1e-50 \(0.0 as float32\)"),
        (scale_3(1e39), r"scale\[3\] is 1e\+39 \(inf as float32\)"),
        (scale_3("1.0"), r"scale must be a flat sequence of numbers"),
        ({"scale": GOOD.scale[:5]}, r"int8 has 5 scales; shape \[4, 8, 8, 8\] needs 1 \(per-tensor\) or 8"),
        ({"scale": (), "zero_point": ()}, r"int8 needs 1 scale \(per-tensor\) or one per channel; got none"),
        ({"channel_axis": 4}, r"channel_axis 4 is out of range for shape \[4, 8, 8, 8\]; .* in \[0, 4\)"),
        ({"channel_axis": 0}, r"int8 has 8 scales; .* or 4 \(one per channel along axis 0\)"),
        (
            {"zero_point": (200.0,) + GOOD.zero_point[1:]},
            r"zero_point\[0\] is 200.0; int8 zero points must be integers in \[-128, 127\]",
        ),
        ({"zero_point": GOOD.zero_point[:2] + (1.5,) + GOOD.zero_point[3:]}, r"zero_point\[2\] is 1.5"),
        ({"zero_point": GOOD.zero_point[:2] + (math.nan,) + GOOD.zero_point[3:]}, r"zero_point\[2\] is nan"),
        ({"zero_point": GOOD.zero_point[:7]}, r"int8 has 7 zero points; it needs none \(symmetric\) or 8"),
    ],
)
def test_decode_rejects_malformed_int8(change: dict[str, object], message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode(dataclasses.replace(GOOD, **change))


def test_decode_rejects_malformed_other_codecs() -> None:
    x = torch.randn(3, 70)
    int4 = encode(x, "int4", "activation")
    with pytest.raises(CodecError, match=r"zero_point\[0\] is 8.0; int4 zero points must be integers in \[-8, 7"):
        decode(dataclasses.replace(int4, zero_point=(8.0,) + int4.zero_point[1:]))
    with pytest.raises(CodecError, match=r"int4 payload is 106 bytes, shape \[3, 70\] needs 105"):
        decode(dataclasses.replace(int4, data=int4.data + b"\0"))
    sr = encode(x, "int8-sr", "gradient")
    with pytest.raises(CodecError, match=r"int8-sr is symmetric and takes no zero point"):
        decode(dataclasses.replace(sr, zero_point=(0.0,) * len(sr.scale)))
    fp16 = encode(x, "fp16", "gradient")
    with pytest.raises(CodecError, match=r"fp16 needs exactly 1 scale; got 0"):
        decode(dataclasses.replace(fp16, scale=()))
    with pytest.raises(CodecError, match=r"scale\[0\] is -1.0"):
        decode(dataclasses.replace(fp16, scale=(-1.0,)))
    with pytest.raises(CodecError, match=r"fp32 takes no scale or zero point; got 1 scales"):
        decode(dataclasses.replace(encode(x, "fp32", "gradient"), scale=(1.0,)))
    with pytest.raises(CodecError, match=r"codec 'int3' is unknown"):
        payload_bytes("int3", (4,))


def test_decode_checks_before_allocating() -> None:
    # 2**31 float32 elements would be 8 GiB: the size check must come first.
    huge = Encoded("fp32", (2**16, 2**15), bytes(16))
    with pytest.raises(CodecError, match=r"^fp32 payload is 16 bytes, shape \[65536, 32768\] needs 8589934592"):
        decode(huge)
