"""Reading Fujitsu CAC Gradient-Skip's ``CAC_*`` environment variables, with errors naming them."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from torch import nn

__all__ = ["cac_manual_stops", "cac_parameter_layers", "env_float", "env_int"]

_Number = TypeVar("_Number", int, float)


def _env_raw(env: Mapping[str, str], name: str) -> str | None:
    # An exported but empty (or blank) variable counts as unset.
    raw = env.get(name, "").strip()
    return raw or None


def _env_number(
    env: Mapping[str, str], name: str, default: _Number, convert: Callable[[str], _Number],
    valid: Callable[[_Number], bool], expected: str,
) -> _Number:
    raw = _env_raw(env, name)
    if raw is None:
        return default
    try:
        value = convert(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected {expected}") from None
    if not valid(value):
        raise ValueError(f"environment variable {name}={raw!r}: expected {expected}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """The integer in ``env[name]`` (at least ``minimum``), or ``default`` when it is unset."""
    return _env_number(env, name, default, int, lambda v: v >= minimum, f"an integer >= {minimum}")


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    """The positive finite number in ``env[name]``, or ``default`` when it is unset."""
    return _env_number(
        env, name, default, float, lambda v: math.isfinite(v) and v > 0, "a positive finite number"
    )


def _env_list(env: Mapping[str, str], name: str) -> list[int]:
    raw = _env_raw(env, name)
    if raw is None:
        return []
    try:
        values = [int(item) for item in raw.split(",")]
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r}: expected comma-separated integers like 10,20"
        ) from None
    if any(v < 0 for v in values):
        raise ValueError(f"environment variable {name}={raw!r}: values must be >= 0")
    return values


def cac_manual_stops(env: Mapping[str, str], param_layers: Sequence[int]) -> list[tuple[int, int]] | None:
    """The ``(layer, step)`` stops that ``CAC_STOP_LAYER_NUM`` / ``CAC_STOP_LAYER_ITR`` ask for.

    None when both are unset. CAC numbers parameter tensors: number p names the layer
    ``param_layers[p]``.
    """
    numbers = _env_list(env, "CAC_STOP_LAYER_NUM")
    steps = _env_list(env, "CAC_STOP_LAYER_ITR")
    if not numbers and not steps:
        return None
    if not numbers or not steps:
        have, lack = ("CAC_STOP_LAYER_NUM", "CAC_STOP_LAYER_ITR")[:: 1 if numbers else -1]
        raise ValueError(
            f"environment variable {have} is set but {lack} is not: set both for manual stops, or neither"
        )
    if len(numbers) != len(steps):
        raise ValueError(
            f"environment variables CAC_STOP_LAYER_NUM ({len(numbers)} values) and "
            f"CAC_STOP_LAYER_ITR ({len(steps)} values) must have the same length"
        )
    for number in numbers:
        if number >= len(param_layers):
            held = f"0..{len(param_layers) - 1}" if param_layers else "none"
            raise ValueError(
                f"environment variable CAC_STOP_LAYER_NUM names parameter {number}, but the model has "
                f"parameter tensors {held} (CAC numbers parameters, not layers)"
            )
    return [(param_layers[number], step) for number, step in zip(numbers, steps)]


def cac_parameter_layers(model: nn.Sequential) -> list[int]:
    """The layer holding each tensor of ``model.parameters()``, in that order.

    CAC's environment variables number parameter tensors; this maps them to layers.
    """
    positions = {name: index for index, name in enumerate(model._modules)}
    layers = []
    for name, _ in model.named_parameters():
        child = name.split(".", 1)[0]
        if "." not in name or child not in positions:
            raise ValueError(
                f"parameter {name!r} belongs to no layer: "
                "register parameters inside the layers of the Sequential"
            )
        layers.append(positions[child])
    return layers
