"""Argument types the edgepipe commands share: each rejects a bad value with a one-line message."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

__all__ = ["positive"]

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
