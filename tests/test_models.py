"""Tests for pipeline.models: determinism, shapes, layer names, user factories, errors, the default learns."""

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from edge_node.worker import train
from pipeline.config import Config
from pipeline.models import MODEL_NAMES, ModelError, build_model, layer_names

# (name, width, input_shape): small enough that forward + backward takes well under a second.
ZOO = [
    ("tinycnn", 1.0, (3, 16, 16)),
    ("tinycnn", 1.0, (1, 8, 8)),
    ("mobilenetv2", 0.25, (1, 32, 32)),
    ("resnet18", 0.125, (3, 32, 32)),
]


@pytest.fixture
def user_models_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Independent of how pytest put tests/ on sys.path (rootdir vs package layout).
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,width,shape", ZOO)
def test_same_seed_gives_bit_identical_weights_and_other_seed_differs(name, width, shape):
    first = build_model(name, num_classes=10, input_shape=shape, width=width, seed=3)
    second = build_model(name, num_classes=10, input_shape=shape, width=width, seed=3)
    other = build_model(name, num_classes=10, input_shape=shape, width=width, seed=4)
    assert _same_state(_state(first), _state(second))
    assert not _same_state(_state(first), _state(other))


def test_weights_are_identical_in_another_process():
    code = (
        "import hashlib, torch\n"
        "from pipeline.models import build_model\n"
        "m = build_model('mobilenetv2', num_classes=10, input_shape=(3, 32, 32), width=0.25, seed=7)\n"
        "h = hashlib.sha256()\n"
        "[h.update(v.numpy().tobytes()) for v in m.state_dict().values()]\n"
        "print(h.hexdigest())\n"
    )
    # Consume the global RNG first so a seeding bug would show up as a different digest.
    code_after_rng_use = "import torch; torch.rand(1000)\n" + code
    digests = {
        subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, check=True).stdout
        for c in (code, code_after_rng_use)
    }
    here = hashlib.sha256()
    model = build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=0.25, seed=7)
    for value in model.state_dict().values():
        here.update(value.numpy().tobytes())
    assert digests == {here.hexdigest() + "\n"}


def test_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build_model("resnet18", num_classes=10, input_shape=(3, 32, 32), width=0.125)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name,width,shape", ZOO)
def test_forward_backward_gives_logits_and_gradients(name, width, shape):
    model = build_model(name, num_classes=7, input_shape=shape, width=width)
    x = torch.randn(4, *shape)
    logits = model(x)
    assert logits.shape == (4, 7)
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name,width,shape", ZOO[:1] + ZOO[2:])
def test_no_layer_modifies_its_input(name, width, shape):
    # The pipeline keeps each layer's input for backward and sends it over the link.
    model = build_model(name, num_classes=10, input_shape=shape, width=width)
    x = torch.randn(2, *shape)
    for index, layer in enumerate(model):
        before = x.clone()
        out = layer(x)
        assert torch.equal(x, before), f"layer {index} modified its input in place"
        x = out


def test_tinycnn_logits_of_a_sample_do_not_depend_on_its_batch():
    # Per-sample normalisation only: micro-batching cannot change tinycnn's results.
    model = build_model("tinycnn", num_classes=10, input_shape=(3, 16, 16))
    x = torch.randn(6, 3, 16, 16)
    assert torch.allclose(model(x)[:2], model(x[:2]), rtol=0, atol=1e-6)


def test_tinycnn_has_no_batchnorm_and_mobilenetv2_has():
    tiny = build_model("tinycnn", num_classes=10, input_shape=(1, 8, 8))
    mobile = build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=0.25)
    assert len(tiny) >= 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tiny.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in mobile.modules())


def test_mobilenetv2_layer_names_and_channels():
    model = build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=1.0)
    assert layer_names(model) == ["stem", *(f"block{i}" for i in range(1, 18)), "head_conv", "pool", "fc"]
    assert model.head_conv[0].out_channels == 1280
    assert sum(p.numel() for p in model.parameters()) == 2_236_682  # the well-known CIFAR MobileNetV2 size
    wide = build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=1.5)
    assert wide.head_conv[0].out_channels == 1920
    digits = build_model("mobilenetv2", num_classes=10, input_shape=(1, 32, 32), width=0.25)
    assert digits.stem[0].in_channels == 1


def test_mobilenetv2_width_rounds_channels_to_multiples_of_8():
    model = build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=0.3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)


def test_resnet18_layer_names():
    model = build_model("resnet18", num_classes=10, input_shape=(3, 32, 32), width=0.125)
    stages = [f"layer{s}_{b}" for s in range(1, 5) for b in range(2)]
    assert layer_names(model) == ["stem", *stages, "pool", "fc"]
    assert model.stem[0].out_channels == 8


def test_user_factory_gets_only_the_arguments_it_accepts_and_is_seeded(user_models_on_path):
    first = build_model("user_models:small", num_classes=5, input_shape=(2, 8, 8), width=0.5, seed=1)
    second = build_model("user_models:small", num_classes=5, input_shape=(2, 8, 8), seed=1)
    assert layer_names(first) == ["features", "fc"]
    assert first(torch.randn(3, 2, 8, 8)).shape == (3, 5)
    assert _same_state(_state(first), _state(second))


def test_user_factory_returning_non_sequential_is_named(user_models_on_path):
    with pytest.raises(ModelError, match=r"user_models:not_sequential.*Linear.*nn\.Sequential"):
        build_model("user_models:not_sequential", num_classes=2, input_shape=(1, 8, 8))


@pytest.fixture
def bad_factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of factories that do not fit how edgepipe calls them; returns its name."""
    (tmp_path / "bad_factories.py").write_text(
        "def needs_depth(num_classes, depth):\n"
        "    raise AssertionError('never called')\n"
        "\n"
        "def positional_only(input_shape, /):\n"
        "    raise AssertionError('never called')\n"
        "\n"
        "def raises_type_error(num_classes):\n"
        "    raise TypeError('unsupported operand\\nsecond line')\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_factories"


@pytest.mark.parametrize(
    "factory,words",
    [
        ("needs_depth", ["'depth'", "needs_depth(num_classes=2)", "num_classes, input_shape, width", "default"]),
        ("positional_only", ["'input_shape'", "positional_only()"]),
        ("raises_type_error", ["failed when called as", "(num_classes=2)", "TypeError: unsupported operand"]),
    ],
)
def test_user_factory_with_the_wrong_signature_is_one_line_naming_it_and_the_call(bad_factories, factory, words):
    spec = f"{bad_factories}:{factory}"
    with pytest.raises(ModelError) as info:
        build_model(spec, num_classes=2, input_shape=(1, 8, 8))
    message = str(info.value)
    assert f"'{spec}'" in message and "\n" not in message
    for word in words:
        assert word in message


def test_user_factory_import_failure_names_the_module():
    with pytest.raises(ModelError, match=r"no_such_pkg_xyz\.models"):
        build_model("no_such_pkg_xyz.models:build", num_classes=2, input_shape=(1, 8, 8))


def test_user_factory_missing_attribute_is_named(user_models_on_path):
    with pytest.raises(ModelError, match="'nope'"):
        build_model("user_models:nope", num_classes=2, input_shape=(1, 8, 8))


def test_unknown_name_lists_the_zoo_and_the_factory_form():
    with pytest.raises(ModelError) as info:
        build_model("vgg16", num_classes=10, input_shape=(3, 32, 32))
    message = str(info.value)
    assert "vgg16" in message and "package.module:factory" in message
    assert all(name in message for name in MODEL_NAMES)


def test_mobilenetv2_residual_blocks_add_their_input():
    # Width 1.0: at small widths the rounding to 8 channels can make block1 residual too.
    model = build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=1.0).eval()
    with_residual = [name for name, block in model.named_children() if getattr(block, "use_residual", False)]
    # Every repeat after the first of a stage keeps stride 1 and the channel count.
    assert with_residual == [f"block{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]
    last_bn = model.block3.conv[-1]
    nn.init.zeros_(last_bn.weight)
    nn.init.zeros_(last_bn.bias)
    x = torch.randn(2, model.block3.conv[0][0].in_channels, 16, 16)
    assert torch.equal(model.block3(x), x)


def test_the_default_configuration_learns_digits(tmp_path):
    # tinycnn, digits, lr 0.05, 3 epochs of batch 64, in one process: about 3 s on one core.
    summary = train(Config(), run_dir=tmp_path / "run")
    assert summary["final_val_accuracy"] >= 0.8


def test_threads_building_at_once_get_the_weights_of_one_build():
    # Edges or sessions served by one process build their models on threads of their own.
    reference = build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=0.25, seed=0).state_dict()
    states: list[dict[str, torch.Tensor]] = []
    threads = [threading.Thread(target=lambda: states.append(
        build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=0.25, seed=0).state_dict())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(states) == 4
    assert all(torch.equal(state[k], reference[k]) for state in states for k in reference)
