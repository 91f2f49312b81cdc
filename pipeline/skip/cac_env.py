"""Reading Fujitsu CAC Gradient-Skip's ``CAC_*`` environment variables, with errors naming them."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar

from torch import nn

__all__ = ["cac_manual_stops", "cac_parameter_layers", "cac_stop_numbers", "env_float", "env_int", "env_samples"]

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


def env_float(env: Mapping[str, str], name: str, default: float, *, positive: bool = True) -> float:
    """The finite number in ``env[name]`` (positive unless ``positive`` is False), or ``default`` when it is unset."""
    expected = "a positive finite number" if positive else "a finite number"
    return _env_number(
        env, name, default, float, lambda v: math.isfinite(v) and (v > 0 or not positive), expected
    )


def env_samples(env: Mapping[str, str], configured: int | None, braking: int) -> int:
    """The sampling interval of cac-auto: ``CAC_VAR_SAMPLES`` when positive, else the configured one,
    else CAC's default: the braking distance when there is one, 200 otherwise."""
    value = _env_number(env, "CAC_VAR_SAMPLES", 0, int, lambda v: True, "an integer")
    if value > 0:
        return value
    if configured is not None:
        return configured
    return braking if braking > 0 else 200


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


def cac_stop_numbers(env: Mapping[str, str], tensors: int) -> list[int] | None:
    """The parameter-tensor numbers in ``CAC_STOP_LAYER_NUM``, None when it is unset.

    Alone, they restrict cac-auto's targets; with ``CAC_STOP_LAYER_ITR`` they are manual stops.
    CAC numbers tensors of ``model.parameters()`` (``tensors`` of them), not layers.
    """
    numbers = _env_list(env, "CAC_STOP_LAYER_NUM")
    if not numbers:
        return None
    for number in numbers:
        if number >= tensors:
            held = f"0..{tensors - 1}" if tensors else "none"
            raise ValueError(
                f"environment variable CAC_STOP_LAYER_NUM names parameter {number}, but the model has "
                f"parameter tensors {held} (CAC numbers parameters, not layers)"
            )
    return numbers


def cac_manual_stops(env: Mapping[str, str], tensors: int) -> list[tuple[int, int]] | None:
    """The ``(tensor, step)`` stops that ``CAC_STOP_LAYER_NUM`` / ``CAC_STOP_LAYER_ITR`` ask for.

    None unless ``CAC_STOP_LAYER_ITR`` is set; then ``CAC_STOP_LAYER_NUM`` must be set too, as
    long. Number p stops tensors ``0..p`` of ``model.parameters()`` (``tensors`` of them).
    """
    steps = _env_list(env, "CAC_STOP_LAYER_ITR")
    if not steps:
        return None
    numbers = cac_stop_numbers(env, tensors)
    if numbers is None:
        raise ValueError(
            "environment variable CAC_STOP_LAYER_ITR is set but CAC_STOP_LAYER_NUM is not: "
            "set both for manual stops, or CAC_STOP_LAYER_NUM alone to choose cac-auto's targets"
        )
    if len(numbers) != len(steps):
        raise ValueError(
            f"environment variables CAC_STOP_LAYER_NUM ({len(numbers)} values) and "
            f"CAC_STOP_LAYER_ITR ({len(steps)} values) must have the same length"
        )
    return list(zip(numbers, steps))


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
