"""Atomic save and safe load of tensors and state dicts."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

__all__ = ["load_state", "save_json", "save_state", "write_atomically"]


def write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Save a state dict (tensors, numbers, strings, nested dicts) atomically."""
    write_atomically(Path(path), lambda handle: torch.save(state, handle))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a state dict saved by :func:`save_state`; never unpickles arbitrary objects."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def save_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (indented, for people to read)."""
    blob = (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()
    write_atomically(Path(path), lambda handle: handle.write(blob))
