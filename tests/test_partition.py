"""Tests for pipeline.partition: cuts, split, per-layer profile, cut shapes and what crosses the link."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from pipeline.config import LinkSection
from pipeline.models import build_model, layer_names
from pipeline.partition import (
    Crossing,
    Cuts,
    PartitionError,
    cut_shapes,
    link_crossings,
    make_cuts,
    profile,
    split,
)


def _mobilenet(width: float = 0.25) -> nn.Sequential:
    return build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=width)


def test_make_cuts_gives_the_middle_range():
    cuts = make_cuts(21, 2, 1)
    assert cuts == Cuts(edge_head=2, edge_tail=1, num_layers=21)
    assert (cuts.middle_start, cuts.middle_stop) == (2, 20)
    assert make_cuts(1, 0, 0).middle_stop == 1


@pytest.mark.parametrize(
    "head,tail,match",
    [
        (-1, 1, r"partition\.edge_head = -1"),
        (1, -2, r"partition\.edge_tail = -2"),
        (3, 1, r"partition\.edge_head \(3\) \+ partition\.edge_tail \(1\)"),
        (4, 0, r"partition\.edge_head \(4\) \+ partition\.edge_tail \(0\)"),
    ],
)
def test_make_cuts_errors_name_the_key_and_the_allowed_range(head, tail, match):
    with pytest.raises(PartitionError, match=match) as info:
        make_cuts(4, head, tail)
    assert "edge_head + edge_tail <= 3" in str(info.value)


def test_split_shares_modules_keeps_names_and_composes_to_the_whole():
    model = _mobilenet()
    head, middle, tail = split(model, make_cuts(len(model), 2, 1))
    assert layer_names(head) == ["stem", "block1"]
    assert layer_names(tail) == ["fc"]
    assert len(middle) == len(model) - 3
    assert all(a is b for a, b in zip([*head, *middle, *tail], model, strict=True))
    # Same BatchNorm batch statistics either way (train mode), so the outputs match bit for bit.
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(tail(middle(head(x))), model(x))


def test_split_gives_empty_sides_that_pass_through():
    model = build_model("tinycnn", num_classes=3, input_shape=(1, 8, 8))
    head, middle, tail = split(model, make_cuts(len(model), 0, 0))
    assert len(head) == 0 and len(tail) == 0
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(tail(middle(head(x))), model(x))


def test_split_rejects_cuts_made_for_another_model():
    model = build_model("tinycnn", num_classes=3, input_shape=(1, 8, 8))
    with pytest.raises(PartitionError, match="make_cuts"):
        split(model, make_cuts(len(model) + 1, 1, 1))


def test_profile_flops_and_params_match_hand_counts():
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, padding=1),  # 2 * (4*8*8 outputs) * (3*3*3 per output)
            depthwise=nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # 2 * 256 * 9
            pool=nn.Sequential(nn.MaxPool2d(4), nn.Flatten()),  # no conv/linear: 0
            fc=nn.Linear(16, 5),  # 2 * 5 * 16
        )
    )
    profiles = profile(model, (3, 8, 8), make_cuts(4, 1, 1))
    assert [p.flops for p in profiles] == [2 * 256 * 27, 2 * 256 * 9, 0, 2 * 5 * 16]
    assert [p.params for p in profiles] == [3 * 4 * 9 + 4, 4 * 9, 0, 16 * 5 + 5]
    assert [p.output_shape for p in profiles] == [(4, 8, 8), (4, 8, 8), (16,), (5,)]
    assert [p.output_bytes for p in profiles] == [1024, 1024, 64, 20]
    assert [p.kind for p in profiles] == ["Conv2d", "Conv2d", "Sequential", "Linear"]
    assert [p.placement for p in profiles] == ["edge", "cloud", "cloud", "edge"]
    assert [p.name for p in profiles] == ["conv", "depthwise", "pool", "fc"]


class _Bilinear(nn.Module):
    """A layer with no nn.Linear or convolution inside: a bare matrix product the old hooks missed."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight)


def test_profile_counts_any_matrix_product_as_flop_counter_mode_does():
    # FlopCounterMode counts 2 x multiply-accumulates of every matmul and convolution, whatever
    # module runs it; the ReLU (elementwise) counts nothing.
    model = nn.Sequential(OrderedDict(flat=nn.Flatten(), product=_Bilinear(), fc=nn.Linear(3, 2)))
    profiles = profile(model, (2, 3), make_cuts(3, 1, 1))
    assert [p.flops for p in profiles] == [0, 2 * 6 * 3, 2 * 3 * 2]
    assert [p.params for p in profiles] == [0, 18, 8]


def test_profile_without_cuts_places_everything_on_the_cloud():
    model = build_model("tinycnn", num_classes=3, input_shape=(1, 8, 8))
    assert {p.placement for p in profile(model, (1, 8, 8))} == {"cloud"}


def test_profile_changes_no_parameter_buffer_gradient_or_mode():
    model = _mobilenet()
    model.block2.eval()  # a mixed-mode model, as after freezing: each module's mode must come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    profiles = profile(model, (3, 32, 32), make_cuts(len(model), 2, 1))
    assert len(profiles) == len(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert not model.stem[0]._forward_hooks  # nothing of the FLOP counting is left behind
    assert not nn.modules.module._global_forward_hooks
    assert not nn.modules.module._global_forward_pre_hooks


def test_profile_error_says_to_check_the_input_shape():
    model = build_model("tinycnn", num_classes=3, input_shape=(1, 8, 8))
    with pytest.raises(PartitionError, match=r"layer 0 \(block1\).*input_shape"):
        profile(model, (3, 8, 8))
    assert model.training


def test_cut_shapes_for_mobilenetv2_head2_tail1():
    model = _mobilenet(width=1.0)
    cuts = make_cuts(len(model), 2, 1)
    assert cut_shapes(model, (3, 32, 32), cuts) == ((16, 32, 32), (1280,))
    assert cut_shapes(model, (3, 32, 32), make_cuts(len(model), 0, 0)) == ((3, 32, 32), (10,))


def test_link_crossings_size_each_tensor_with_its_codec():
    model = _mobilenet(width=1.0)
    cuts = make_cuts(len(model), 2, 1)
    link = LinkSection(uplink="int8", downlink="bf16", gradients="int4")
    crossings = link_crossings(profile(model, (3, 32, 32), cuts), cuts, link, (3, 32, 32))
    head_out = 16 * 32 * 32
    assert crossings == [
        Crossing(1, "uplink", "activation", "int8", (16, 32, 32), head_out, 4 * head_out),
        Crossing(1, "downlink", "gradient", "int4", (16, 32, 32), head_out // 2, 4 * head_out),
        Crossing(2, "downlink", "activation", "bf16", (1280,), 2 * 1280, 4 * 1280),
        Crossing(2, "uplink", "gradient", "int4", (1280,), 640, 4 * 1280),
    ]


def test_link_crossings_without_head_or_tail():
    model = build_model("tinycnn", num_classes=3, input_shape=(1, 8, 8))
    cuts = make_cuts(len(model), 0, 0)
    crossings = link_crossings(profile(model, (1, 8, 8), cuts), cuts, LinkSection(uplink="fp16"), (1, 8, 8))
    # The raw input goes up; no head learns from a gradient and the loss stays on the cloud.
    assert crossings == [Crossing(1, "uplink", "activation", "fp16", (1, 8, 8), 128, 256)]


def test_link_crossings_need_the_profiles_of_the_cut_model():
    model = build_model("tinycnn", num_classes=3, input_shape=(1, 8, 8))
    profiles = profile(model, (1, 8, 8))
    with pytest.raises(PartitionError, match="profile and cut the same model"):
        link_crossings(profiles[:-1], make_cuts(len(model), 1, 1), LinkSection(), (1, 8, 8))
