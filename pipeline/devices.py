"""Where a stage computes: device names, resolving them to torch devices, and host copies of state."""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch

__all__ = [
    "DEVICE_NAMES",
    "DeviceError",
    "available_devices",
    "best_device",
    "check_device_name",
    "resolve_device",
    "to_host",
]

#: The device names a configuration or ``--device`` accepts (``cuda:N`` for any N).
DEVICE_NAMES = ("cpu", "cuda", "cuda:N", "mps", "auto")
_NAME = re.compile(r"cpu|cuda(?::\d+)?|mps|auto")


class DeviceError(ValueError):
    """A device name is malformed or names a device this machine does not have; the message says which it has."""


def check_device_name(name: str) -> str:
    """``name`` if it is one of :data:`DEVICE_NAMES`, else :class:`DeviceError`; says nothing of availability."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DeviceError(f"device {name!r} is unknown; devices are {', '.join(DEVICE_NAMES)}")
    return name


def available_devices() -> list[str]:
    """This machine's devices by name: ``cpu``, then each CUDA device, then ``mps`` when present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def best_device() -> str:
    """What ``auto`` picks: the first CUDA device, else MPS, else the CPU."""
    have = available_devices()
    return have[1] if len(have) > 1 else "cpu"


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` stands for on this machine (``auto``: :func:`best_device`).

    A device this machine lacks (``cuda`` without CUDA, ``cuda:3`` on a two-GPU machine) is a
    :class:`DeviceError` naming it and the devices there are.
    """
    name = check_device_name(name)
    if name == "auto":
        return torch.device(best_device())
    have = available_devices()
    # An index always: torch.device("cuda") compares unequal to the cuda:0 a tensor reports.
    wanted = "cuda:0" if name == "cuda" else name
    if wanted not in have:
        cuda = [device for device in have if device.startswith("cuda")]
        if name == "mps":
            reason = "MPS (Apple GPU) is not usable here"
        elif not cuda:
            built = "" if torch.version.cuda else f" (torch {torch.__version__} is built without CUDA)"
            reason = f"no CUDA device is usable here{built}"
        else:
            reason = f"this machine has {len(cuda)} CUDA device(s)"
        raise DeviceError(f"device {name!r} is not available: {reason}; available devices: {', '.join(have)}")
    return torch.device(wanted)


def to_host(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) as a CPU tensor; CPU tensors stay as they are.

    What is saved or sent goes through here, so that files and weights never name a device.
    """
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, OrderedDict):
        return OrderedDict((key, to_host(item)) for key, item in value.items())
    if isinstance(value, dict):
        return {key: to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(item) for item in value)
    return value
