"""Argument types the edgepipe commands share: each rejects a bad value with a one-line message."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

from pipeline.blueprint import Side
from pipeline.config import Config
from pipeline.devices import DEVICE_NAMES, DeviceError, check_device_name

__all__ = ["add_device_argument", "positive", "with_device"]

_Number = TypeVar("_Number", int, float)


def positive(kind: type[_Number]) -> Callable[[str], _Number]:
    """An argparse ``type`` accepting only finite numbers of ``kind`` above zero."""

    def parse(text: str) -> _Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _device_name(text: str) -> str:
    try:
        return check_device_name(text)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device_argument(parser: argparse.ArgumentParser, side: Side) -> None:
    """``--device``: where this node's stages compute, over ``[side] device`` of the configuration file."""
    parser.add_argument(
        "--device", type=_device_name, default=None, metavar="DEVICE",
        help=f"where this node's layers, optimizer state and received tensors live: {', '.join(DEVICE_NAMES)} "
        f"(auto: the best this machine has); overrides [{side}] device of the configuration (default cpu)",
    )


def with_device(config: Config, side: Side, device: str | None) -> Config:
    """``config`` with ``[side] device`` set to ``device`` when it is given: the flag wins over the file."""
    if device is None:
        return config
    # The name was checked when the flag was parsed; availability is checked when the node builds its blueprint.
    return config.model_copy(update={side: getattr(config, side).model_copy(update={"device": device})})
