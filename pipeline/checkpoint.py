"""Atomic file writes (tensors, state dicts, JSON, JSON lines) and safe loads of tensors."""
from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from pipeline.devices import to_host

__all__ = [
    "count_lines",
    "fsync_directory",
    "load_state",
    "save_json",
    "save_state",
    "truncate_lines",
    "write_atomically",
]


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk, so that a rename or unlink in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path, write: Callable[[BinaryIO], Any], *, before_rename: Callable[[], None] | None = None
) -> None:
    """Call ``write`` on a file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never half of one: the temporary file
    is fsynced before the rename and the directory after it. ``before_rename`` runs between
    the two (tests use it to stop a writer there). A file replaced keeps its permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            # mkstemp makes the file private (0600); a rewritten metrics.jsonl must stay readable.
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Save a state dict (tensors, numbers, strings, nested dicts) atomically, its tensors as CPU copies."""
    state = to_host(state)  # device-neutral: the file loads on any machine
    write_atomically(Path(path), lambda handle: torch.save(state, handle))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a state dict saved by :func:`save_state`; never unpickles arbitrary objects."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def save_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically (indented, for people to read)."""
    blob = (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()
    write_atomically(Path(path), lambda handle: handle.write(blob))


def count_lines(path: str | Path) -> int:
    """The number of complete (newline-terminated) lines of a file; 0 when it does not exist.

    A partial last line, as a crash in the middle of a write leaves, is not counted.
    """
    try:
        with Path(path).open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def truncate_lines(path: str | Path, keep: int) -> None:
    """Cut a JSON-lines file back to its first ``keep`` complete lines, atomically.

    Used on ``metrics.jsonl`` when a run resumes from a checkpoint: the lines written after
    it, and a partial last line from a crash, go. A missing file counts as empty.
    """
    path = Path(path)
    if keep < 0:
        raise ValueError(f"cannot keep {keep} lines of {path}: keep must be 0 or more")
    have = count_lines(path)
    if have < keep:
        raise ValueError(
            f"{path} has {have} complete lines, fewer than the {keep} to keep: "
            "it does not belong to the checkpoint being resumed"
        )
    if not path.exists():
        return
    with path.open("rb") as source:
        head = [source.readline() for _ in range(keep)]
    write_atomically(path, lambda handle: handle.writelines(head))
