"""Model zoo: flat ``nn.Sequential`` CNNs whose top-level children are the partitionable layers."""

from __future__ import annotations

import importlib
import inspect
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from pipeline.config import ModelSection


class ModelError(ValueError):
    """A model cannot be built; the message says what to fix."""


MODEL_NAMES: tuple[str, ...] = ("tinycnn", "mobilenetv2", "resnet18")


def build_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    width: float = 1.0,
    seed: int = 0,
) -> nn.Sequential:
    """Build the model ``name`` with deterministic initial weights.

    ``name`` is one of :data:`MODEL_NAMES` or ``"package.module:factory"``; a factory is
    called with whichever of ``num_classes``, ``input_shape`` and ``width`` it accepts and
    must return an ``nn.Sequential``. Weights are drawn under a forked RNG seeded with
    ``seed``, so equal arguments give bit-identical weights in any process and the
    caller's global RNG state is left untouched. The arguments are the ``[model]`` section's,
    which the configuration schema has already checked.
    """
    offered = {"num_classes": num_classes, "input_shape": tuple(input_shape), "width": width}
    if name in _BUILDERS:
        with _seeded(seed):
            return _BUILDERS[name](**offered)
    if ":" in name:
        return build_from_factory(_load_factory(name), name, seed=seed, offered=offered)
    raise ModelError(
        f"unknown model name {name!r}: use one of {', '.join(MODEL_NAMES)} "
        "or a user model as 'package.module:factory'"
    )


def build_configured(section: ModelSection) -> nn.Sequential:
    """The model a configuration's ``[model]`` section describes."""
    return build_model(
        section.name,
        num_classes=section.num_classes,
        input_shape=section.input_shape,
        width=section.width,
        seed=section.seed,
    )


def build_from_factory(
    factory: Callable[..., object], label: str, *, seed: int, offered: Mapping[str, object] | None = None
) -> nn.Sequential:
    """Call a user's model ``factory`` (named ``label`` in errors) under a forked RNG seeded with ``seed``.

    It gets the entries of ``offered`` its signature accepts (none when ``offered`` is None) and
    must return a non-empty ``nn.Sequential``; anything else, including an exception it raises,
    is a one-line :class:`ModelError` that names the factory and how it was called.
    """
    kwargs = _accepted_kwargs(factory, label, dict(offered or {}))
    with _seeded(seed):
        try:
            model = factory(**kwargs)
        except Exception as exc:  # any failure inside user code is the user's to fix
            raise ModelError(
                f"model factory {label!r} failed when called as {_call(label, kwargs)}: {_one_line(exc)}"
            ) from exc
    if not isinstance(model, nn.Sequential):
        raise ModelError(
            f"model factory {label!r} returned {type(model).__name__}, not torch.nn.Sequential: "
            "return the layers as a flat nn.Sequential so they can be split between edge and cloud"
        )
    if len(model) == 0:
        raise ModelError(f"model factory {label!r} returned an empty nn.Sequential: give it at least one layer")
    return model


def layer_names(model: nn.Sequential) -> list[str]:
    """Names of the top-level children of ``model``, in order (one per partitionable layer)."""
    # _modules, not named_children(): the latter skips a module instance used twice,
    # which would shift every later index relative to len(model) and model[i].
    return list(model._modules)


#: Building seeds torch's one global generator: two threads building at once (edges or sessions
#: served by one process) would draw from each other's seed.
_BUILDING = threading.Lock()


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # devices=[]: the models are built on the CPU; forking CUDA RNGs would only add cost and warnings.
    with _BUILDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------- user factories


def _load_factory(spec: str) -> Callable[..., object]:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ModelError(f"user model {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is the user's to fix
        raise ModelError(
            f"cannot import module {module_name!r} for model {spec!r}: {_one_line(exc)}; "
            "check that it is installed or on PYTHONPATH"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"module {module_name!r} has no callable {attr!r} to build model {spec!r}")
    return factory


def _accepted_kwargs(factory: Callable[..., object], label: str, offered: dict[str, object]) -> dict[str, object]:
    """The subset of ``offered`` that ``factory``'s signature accepts; refuses one that needs more."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no introspectable signature: offer everything, the call will tell
        return offered
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        kwargs = offered
    else:
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        kwargs = {k: v for k, v in offered.items() if k in names}
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        fix = (
            f"edgepipe passes only the keyword arguments {', '.join(offered)} it names, so give any other "
            "parameter a default"
            if offered
            else "edgepipe calls it with no arguments, so give every parameter a default"
        )
        raise ModelError(f"model factory {label!r} cannot be called as {_call(label, kwargs)}: {exc}; {fix}") from None
    return kwargs


def _call(label: str, kwargs: Mapping[str, object]) -> str:
    return f"{label}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def _one_line(exc: BaseException) -> str:
    """``exc`` as ``Type: first line of its message``, for one-line errors about user code."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# ---------------------------------------------------------------------------- tinycnn


#: tinycnn averages its last feature map over this many cells per side.
_TINYCNN_GRID = 4


def _tinycnn(*, num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Sequential:
    # No BatchNorm on purpose: this is the plain case where split training must match exactly.
    # GroupNorm normalises each sample on its own (no batch statistics, no buffers), so
    # micro-batching cannot change it; without it the default run learns only at some seeds.
    c_in, height, wid = input_shape
    if height < 2 or wid < 2:
        raise ModelError(f"tinycnn max-pools by 2 and needs input height and width >= 2, got {list(input_shape)}")
    c1 = max(1, round(8 * width))
    c2 = max(1, round(16 * width))
    return nn.Sequential(
        OrderedDict(
            block1=nn.Sequential(nn.Conv2d(c_in, c1, 3, padding=1), _group_norm(c1), nn.ReLU(inplace=True)),
            block2=nn.Sequential(
                nn.Conv2d(c1, c2, 3, padding=1), _group_norm(c2), nn.ReLU(inplace=True), nn.MaxPool2d(2)
            ),
            # A 4x4 grid, not a global average: two 3x3 convolutions see 6x6 pixels, and averaging
            # them over the whole image keeps how much stroke there is but not where, which is
            # what tells digits apart (with a global average the defaults stay at chance).
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(_TINYCNN_GRID), nn.Flatten()),
            fc=nn.Linear(c2 * _TINYCNN_GRID**2, num_classes),
        )
    )


def _group_norm(channels: int) -> nn.GroupNorm:
    # Four groups where the channels divide into them (narrow widths get fewer).
    return nn.GroupNorm(math.gcd(4, channels), channels)


# ---------------------------------------------------------------------------- mobilenetv2 (CIFAR)

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat).
_MOBILENETV2_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 1 here (2 on ImageNet): the CIFAR variant keeps 32x32 longer
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor`` without going more than 10 % below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        # In place on the BatchNorm output, never on the layer's input.
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(c_in, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block; the residual add is out of place so ``x`` is never modified."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


def _mobilenetv2(*, num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Sequential:
    c_in = _make_divisible(32 * width)
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=_conv_bn_relu6(input_shape[0], c_in, 3))
    index = 1
    for t, c, n, s in _MOBILENETV2_CONFIG:
        c_out = _make_divisible(c * width)
        for i in range(n):
            layers[f"block{index}"] = InvertedResidual(c_in, c_out, s if i == 0 else 1, t)
            c_in = c_out
            index += 1
    last = _make_divisible(1280 * max(1.0, width))
    layers["head_conv"] = _conv_bn_relu6(c_in, last, 1)
    layers["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    # No dropout before fc: it would draw random masks and break split-vs-local exactness.
    layers["fc"] = nn.Linear(last, num_classes)
    model = nn.Sequential(layers)
    _init_like_torchvision(model)
    return model


# ---------------------------------------------------------------------------- resnet18 (CIFAR)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-bn with a (projected when needed) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block without modifying ``x`` (the shortcut may be ``x`` itself)."""
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet18(*, num_classes: int, input_shape: tuple[int, int, int], width: float) -> nn.Sequential:
    base = max(8, round(64 * width))
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(
            nn.Conv2d(input_shape[0], base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True)
        )
    )
    c_in = base
    for stage, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), start=1):
        c_out = base * mult
        layers[f"layer{stage}_0"] = BasicBlock(c_in, c_out, stride)
        layers[f"layer{stage}_1"] = BasicBlock(c_out, c_out, 1)
        c_in = c_out
    layers["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    layers["fc"] = nn.Linear(c_in, num_classes)
    model = nn.Sequential(layers)
    _init_like_torchvision(model)
    return model


def _init_like_torchvision(model: nn.Module) -> None:
    """The initialisation torchvision uses for these architectures, which their published results assume."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


_BUILDERS: dict[str, Callable[..., nn.Sequential]] = {
    "tinycnn": _tinycnn,
    "mobilenetv2": _mobilenetv2,
    "resnet18": _resnet18,
}
