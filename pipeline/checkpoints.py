"""Each side's checkpoints: atomic, tensors and JSON only, the last ``keep`` kept."""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import fsync_directory, write_atomically
from pipeline.devices import to_host

__all__ = [
    "PAUSE_ENV",
    "CheckpointError",
    "CheckpointStore",
    "committed_step",
    "generator_state",
    "restore_generator",
]

#: Test hook: set to a directory, a checkpoint write stops just before its final rename,
#: creates ``DIR/paused-<pid>-<step>`` and waits until ``DIR/resume`` exists.
PAUSE_ENV = "EDGEPIPE_CHECKPOINT_PAUSE"
_PAUSE_POLL_SECONDS = 0.01

_FORMAT = 1
#: The other side may not have committed this side's newest checkpoint yet, so the one
#: before it must survive a prune.
_MIN_KEEP = 2
_RECORD = re.compile(r"step-(\d+)\.json")
_TENSORS = re.compile(r"step-(\d+)\.pt")
_TEMPORARY = re.compile(r"\.step-\d+\.(?:pt|json)\..+")
_LOCK = ".lock"
_LEAVES = (bool, int, float, str, type(None))
_CONTAINERS = (list, tuple)
_MAPPINGS = (dict, OrderedDict)  # OrderedDict: what state_dict() returns
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError)


class CheckpointError(ValueError):
    """A checkpoint cannot be saved or loaded; the message names the file or the value."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_tensors(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back, naming where it is."""
    kind = type(value)
    if kind in _TENSOR_TYPES or kind in _LEAVES:
        return
    if kind in _CONTAINERS:
        for index, item in enumerate(value):
            _check_tensors(item, f"{where}[{index}]")
        return
    if kind in _MAPPINGS:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise CheckpointError(
                    f"{where} has the key {key!r} ({type(key).__name__}): keys must be strings or integers"
                )
            _check_tensors(item, f"{where}[{key!r}]")
        return
    raise CheckpointError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}: checkpoints hold only tensors, numbers, "
        "strings, None and lists or dicts of them (convert it, e.g. with torch.as_tensor)"
    )


def _check_meta(meta: Any) -> None:
    if type(meta) is not dict:
        raise CheckpointError(f"checkpoint meta must be a dict of JSON values, not {type(meta).__name__}")
    try:
        again = json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint meta is not JSON: {_first_line(exc)}") from None
    if again != meta:
        raise CheckpointError(
            "checkpoint meta changes through JSON (tuples become lists, integer keys strings): "
            "use lists and string keys"
        )


def _check_step(step: Any) -> None:
    if type(step) is not int or step < 0:
        raise CheckpointError(f"checkpoint step must be an integer >= 0, not {step!r}")


def _pause_if_asked(step: int) -> None:
    """The test hook of :data:`PAUSE_ENV`: announce the pause, then wait to be resumed."""
    directory = os.environ.get(PAUSE_ENV)
    if not directory:
        return
    pause = Path(directory)
    (pause / f"paused-{os.getpid()}-{step}").touch()
    while not (pause / "resume").exists():
        time.sleep(_PAUSE_POLL_SECONDS)


class CheckpointStore:
    """One side's checkpoints in one directory, written by one process at a time.

    Step ``N`` is ``step-0000000N.pt`` (the tensors, ``torch.save`` of a dict) and
    ``step-0000000N.json`` (its size, SHA-256 and the caller's meta). The JSON is renamed into
    place last, so a checkpoint exists exactly when its JSON does; a crash at any moment leaves
    the previous checkpoints loadable and, at worst, leftovers that :meth:`steps` removes.
    """

    def __init__(self, directory: Path, *, keep: int = 2) -> None:
        if type(keep) is not int or keep < _MIN_KEEP:
            raise CheckpointError(
                f"keep must be an integer >= {_MIN_KEEP}, not {keep!r}: the other side may not "
                "have committed the newest checkpoint yet, so the one before it must stay"
            )
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def _record_path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}.json"

    def _tensors_path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}.pt"

    @contextmanager
    def _locked(self, *, wait: bool) -> Iterator[bool]:
        """Hold the directory's write lock; yields False when ``wait`` is off and a writer holds it.

        The kernel drops the lock when its holder dies, even by SIGKILL, so a free lock
        means no write is under way and every leftover is from a writer that is gone.
        """
        fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                held = False
            yield held
        finally:
            os.close(fd)  # releases the lock

    def _complete(self) -> list[int]:
        return sorted(int(m[1]) for name in os.listdir(self.directory) if (m := _RECORD.fullmatch(name)))

    def _clean_leftovers(self) -> None:
        """Remove temporaries and tensors files without their JSON (call with the lock held)."""
        names = os.listdir(self.directory)
        records = {int(m[1]) for name in names if (m := _RECORD.fullmatch(name))}
        leftovers = [
            name for name in names
            if _TEMPORARY.fullmatch(name) or ((m := _TENSORS.fullmatch(name)) and int(m[1]) not in records)
        ]
        for name in leftovers:
            (self.directory / name).unlink(missing_ok=True)
        if leftovers:
            fsync_directory(self.directory)

    def _remove(self, steps: Iterable[int]) -> None:
        # The JSON goes first: a crash in between leaves an orphan tensors file, not a
        # checkpoint whose tensors are missing.
        for step in steps:
            self._record_path(step).unlink(missing_ok=True)
            self._tensors_path(step).unlink(missing_ok=True)
        fsync_directory(self.directory)

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first; removes leftovers of crashed writes."""
        with self._locked(wait=False) as idle:
            if idle:
                self._clean_leftovers()
            return self._complete()

    def latest(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Save step ``step``'s tensors and JSON ``meta``; returns the path of its JSON record.

        ``tensors`` is a dict of tensors, numbers, strings, None, and lists or dicts of them
        (a state dict, an optimizer's state dict); anything else is refused before a byte is
        written. ``step`` must be newer than every checkpoint already here. Tensors are saved as
        CPU copies, so that a checkpoint of any device loads on any machine.
        """
        _check_step(step)
        if type(tensors) not in _MAPPINGS:
            raise CheckpointError(f"checkpoint tensors must be a dict, not {type(tensors).__name__}")
        _check_tensors(tensors, "tensors")
        tensors = to_host(tensors)
        _check_meta(meta)
        with self._locked(wait=True):
            self._clean_leftovers()
            steps = self._complete()
            if steps and step <= steps[-1]:
                raise CheckpointError(
                    f"checkpoint step {step} is not newer than step {steps[-1]} in {self.directory}: "
                    f"when resuming from step {step}, call discard_after({step}) first"
                )
            tensors_path = self._tensors_path(step)
            write_atomically(tensors_path, lambda handle: torch.save(tensors, handle))
            blob = tensors_path.read_bytes()
            record = {
                "format": _FORMAT,
                "step": step,
                "tensors": tensors_path.name,
                "tensors_bytes": len(blob),
                "tensors_sha256": hashlib.sha256(blob).hexdigest(),
                "meta": meta,
            }
            text = (json.dumps(record, indent=2, allow_nan=False) + "\n").encode()
            record_path = self._record_path(step)
            write_atomically(record_path, lambda handle: handle.write(text), before_rename=partial(_pause_if_asked, step))
        return record_path

    def _read_record(self, step: int) -> dict[str, Any]:
        path = self._record_path(step)
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise CheckpointError(
                f"{path}: no checkpoint of step {step} here (complete steps: {self._complete() or 'none'})"
            ) from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
        except ValueError:
            raise CheckpointError(f"{path}: corrupt (not JSON); delete it and resume from an earlier step") from None
        expected = {"format": _FORMAT, "step": step, "tensors": self._tensors_path(step).name}
        if (
            not isinstance(record, dict)
            or any(record.get(key) != value for key, value in expected.items())
            or not isinstance(record.get("meta"), dict)
        ):
            raise CheckpointError(f"{path}: not the checkpoint record of step {step}; delete it")
        return record

    def load(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The tensors (on the CPU) and meta saved at ``step``, checked against the recorded SHA-256."""
        _check_step(step)
        record = self._read_record(step)
        path = self._tensors_path(step)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing, though {self._record_path(step).name} records it") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
        if len(blob) != record.get("tensors_bytes") or hashlib.sha256(blob).hexdigest() != record.get("tensors_sha256"):
            raise CheckpointError(
                f"{path}: corrupt (its size or SHA-256 differs from what {self._record_path(step).name} "
                "records); delete both and resume from an earlier step"
            )
        try:
            tensors = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except _LOAD_ERRORS as exc:
            raise CheckpointError(f"{path}: cannot load: {_first_line(exc)}") from None
        return tensors, record["meta"]

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep`` checkpoints; returns the steps deleted.

        The checkpoint just written is the newest (:meth:`save` refuses older steps) and
        ``keep >= 2``, so it and the one before it always stay.
        """
        with self._locked(wait=True):
            doomed = self._complete()[: -self.keep]
            self._remove(doomed)
        return doomed

    def discard_after(self, step: int) -> list[int]:
        """Delete the checkpoints newer than ``step`` (the other side never committed them); returns their steps."""
        _check_step(step)
        with self._locked(wait=True):
            doomed = [s for s in self._complete() if s > step]
            self._remove(doomed)
            self._clean_leftovers()
        return doomed


def committed_step(*sides: Iterable[int]) -> int | None:
    """The newest step that every side has a complete checkpoint of, or None."""
    common = set.intersection(*(set(steps) for steps in sides)) if sides else set()
    return max(common, default=None)


def generator_state(generator: torch.Generator) -> torch.Tensor:
    """A generator's state as a uint8 tensor, to save in a checkpoint.

    ``torch.default_generator`` is the global CPU generator (``torch.get_rng_state``).
    """
    return generator.get_state()


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    """Put ``generator`` back in the ``state`` :func:`generator_state` returned: it then draws the same numbers."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        raise CheckpointError(
            f"a generator state is the 1-d uint8 tensor generator_state returns, not {type(state).__name__}"
            + (f" of {state.dtype} with shape {tuple(state.shape)}" if isinstance(state, torch.Tensor) else "")
        )
    try:
        generator.set_state(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"cannot restore the generator: {_first_line(exc)} (save and restore generators of the same device type)"
        ) from None
