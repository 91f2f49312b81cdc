"""The cloud's half of each run's checkpoints, kept in ``--state-dir`` by identity and run id."""
from __future__ import annotations

import logging
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from cloud_node.refusal import Refusal, short
from pipeline.checkpoints import CheckpointError, CheckpointStore, generator_state, restore_generator
from pipeline.config import Config
from pipeline.handshake import describe_differences
from pipeline.skip import Decision

if TYPE_CHECKING:
    from cloud_node.session import CloudSession

__all__ = ["NO_STATE_DIR", "CloudCheckpoints", "SavedStep", "check_run_id", "restore_session"]

log = logging.getLogger("edgepipe.cloud")

NO_STATE_DIR = "this cloud keeps no checkpoints: start it with --state-dir"
#: What uuid4().hex makes; nothing else becomes a directory name.
_RUN_ID = re.compile(r"[0-9a-f]{32}")
#: pipeline.trust's rule for edge names (and "local"), checked again where a name becomes a path.
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Errors of a checkpoint that does not fit the session it is loaded into.
_MISFIT = (CheckpointError, KeyError, TypeError, ValueError, RuntimeError)
#: Named differences between a checkpoint's configuration and the cloud's: the detail stays short.
_DIFFERENCES = 4


def check_run_id(run_id: str, *, resume: bool) -> None:
    """Refuse (INVALID_ARGUMENT) a run id other than 32 lowercase hex digits.

    A fresh run may come without one (an edge older than checkpoints): it then cannot checkpoint.
    """
    if (run_id or resume) and not _RUN_ID.fullmatch(run_id):
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"run id {short(run_id)} is not 32 lowercase hex digits (uuid4().hex)"
        )


@dataclass(frozen=True)
class SavedStep:
    """One loaded checkpoint of the cloud's half: its tensors and JSON meta."""

    step: int
    tensors: dict[str, Any]
    meta: dict[str, Any]

    @property
    def decision(self) -> Decision:
        """The decision saved for the step after it."""
        return Decision.from_json(self.meta["decision"])


class CloudCheckpoints:
    """Every run's checkpoints under ``directory`` (None: this cloud keeps none), newest ``keep`` per run.

    A run's checkpoints are ``directory/<identity>/<run_id>/``: a run belongs to the identity that
    made it, and another identity's request for it finds nothing. Saving, resuming and starting a
    run over hold the run's lock, and only a session that ``is_live`` says is still in the
    session table saves, so a session replaced by a resume can never write after it.
    """

    def __init__(
        self, directory: Path | None, config: Config, fingerprint: str, *,
        is_live: Callable[[CloudSession], bool], lock_seconds: float,
    ) -> None:
        self.directory = None if directory is None else Path(directory)
        self.keep = config.checkpoint.keep
        self.agreed = config.agreed()
        self.fingerprint = fingerprint
        self.is_live = is_live
        self.lock_seconds = lock_seconds
        # Each run's lock and how many calls want it; a run nobody wants has no entry.
        self._locks: dict[tuple[str, str], tuple[threading.Lock, int]] = {}
        self._guard = threading.Lock()
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise OSError(f"cannot use the state directory {self.directory}: {exc.strerror}") from None

    def _path(self, identity: str, run_id: str) -> Path:
        if self.directory is None:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, NO_STATE_DIR)
        if not _IDENTITY.fullmatch(identity) or not _RUN_ID.fullmatch(run_id):
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "this session's run cannot keep checkpoints")
        return self.directory / identity / run_id

    @contextmanager
    def holding(self, identity: str, run_id: str) -> Iterator[None]:
        """Hold run ``run_id`` of ``identity`` against every other save, resume or restart of it.

        UNAVAILABLE (the edge retries) when another call holds it for longer than the idle bound.
        """
        key = (identity, run_id)
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            if not lock.acquire(timeout=self.lock_seconds):
                raise Refusal(grpc.StatusCode.UNAVAILABLE, f"run {run_id} is busy saving a checkpoint; try again")
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def run_file(self, session: CloudSession, name: str) -> Path | None:
        """The file ``name`` next to the checkpoints of ``session``'s run; None when the run keeps none here."""
        return self._path(session.owner, session.run_id) / name if self.keeps(session) else None

    def _store(self, identity: str, run_id: str) -> CheckpointStore:
        path = self._path(identity, run_id)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        return CheckpointStore(path, keep=self.keep)

    def keeps(self, session: CloudSession) -> bool:
        """Whether ``session``'s run can checkpoint here: a state directory and a run id. Without
        them a step asked to checkpoint just trains, and its done frame says it was not saved."""
        return self.directory is not None and bool(session.run_id)

    def check(self, session: CloudSession) -> None:
        """Refuse (FAILED_PRECONDITION) to checkpoint ``session``'s run: before its optimizer steps."""
        if self.directory is None:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, NO_STATE_DIR)
        if not session.run_id:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this session was opened without a run id, so its run cannot checkpoint "
                "(is the edge older than this cloud?)",
            )

    def save(self, session: CloudSession, step: int) -> None:
        """Save ``session``'s half of ``step`` (just committed) and prune; ABORTED when it cannot."""
        tensors, meta = self._state(session, step)
        with self.holding(session.owner, session.run_id):
            if not self.is_live(session):
                raise Refusal(grpc.StatusCode.ABORTED, f"session {session.id} was replaced by a newer Open of its run")
            try:
                store = self._store(session.owner, session.run_id)
                store.save(step, tensors, meta)
                store.prune()
            except (CheckpointError, OSError) as exc:
                log.error("cannot save step %d of run %s: %s", step, session.run_id, exc)
                # The owner learns the cause, not the cloud's paths.
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "see the cloud's log"
                raise Refusal(
                    grpc.StatusCode.ABORTED, f"the cloud could not save its half of step {step} ({reason})"
                ) from None

    def load(self, identity: str, run_id: str, step: int) -> SavedStep:
        """The cloud's half of ``step`` of the run; FAILED_PRECONDITION naming the steps held when it is not here.

        Call it holding the run. Another identity's run of the same id is not looked at.
        """
        path = self._path(identity, run_id)
        held = CheckpointStore(path, keep=self.keep).steps() if path.is_dir() else []
        if not held:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"no checkpoints of run {run_id} on this cloud")
        if step not in held:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run_id} has no checkpoint of step {step} on this cloud; "
                f"it holds steps {', '.join(map(str, held))}",
            )
        try:
            tensors, meta = CheckpointStore(path, keep=self.keep).load(step)
        except CheckpointError as exc:
            log.error("cannot load step %d of run %s: %s", step, run_id, exc)
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the cloud's checkpoint of step {step} of run {run_id} is unreadable (see the cloud's log)",
            ) from None
        return SavedStep(step, tensors, meta)

    def discard_after(self, identity: str, run_id: str, step: int) -> None:
        """Drop the run's checkpoints newer than ``step``: the edge never committed them. Call it holding the run."""
        CheckpointStore(self._path(identity, run_id), keep=self.keep).discard_after(step)

    def forget(self, identity: str, run_id: str) -> None:
        """Delete every checkpoint of the run: its edge starts it over. Call it holding the run."""
        if self.directory is None or not run_id:
            return
        path = self._path(identity, run_id)
        if path.is_dir():
            shutil.rmtree(path)
            log.info("run %s of %s starts over: its checkpoints were deleted", run_id, identity)

    def _state(self, session: CloudSession, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the cloud saves of ``session`` after ``step``: tensors and JSON meta."""
        trainer = session.trainer
        tensors = {
            "middle": trainer.stage.layers.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "statistics": trainer.statistics.state_dict(),
            "rounding": generator_state(session.rounding),
        }
        meta = {
            "run_id": session.run_id,
            "step": step,
            "next_step": step + 1,
            "total_steps": session.total_steps,
            "steps_per_epoch": session.steps_per_epoch,
            "fingerprint": self.fingerprint,
            "config": self.agreed,
            "decision": session.decision.to_json(),
            "policy": session.policy.state_dict(),
        }
        return tensors, meta

    def check_saved_run(self, saved: SavedStep, *, total_steps: int, steps_per_epoch: int) -> None:
        """Refuse (FAILED_PRECONDITION) a checkpoint of another configuration or run length, naming what differs."""
        meta, run = saved.meta, f"run {saved.meta.get('run_id')}"
        if meta.get("fingerprint") != self.fingerprint:
            stored = meta.get("config")
            differences = (
                describe_differences(stored, self.agreed, limit=_DIFFERENCES)
                if isinstance(stored, dict) else "the checkpoint names no configuration"
            )
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the cloud saved {run} under another configuration (edge: as saved, cloud: now): {differences}",
            )
        length = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch}
        for name, value in length.items():
            if meta.get(name) != value:
                raise Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{run} has {name} {meta.get(name)}, but the edge resumes it with {value}",
                )


def restore_session(session: CloudSession, saved: SavedStep) -> None:
    """Put a freshly built ``session`` in the state ``saved`` holds; FAILED_PRECONDITION when it does not fit.

    The saved decision goes first, so that the optimizer has the saved parameter groups (the
    boundary regroups by layer) before its state is loaded.
    """
    try:
        decision = saved.decision
        session.trainer.apply(decision)
        session.trainer.stage.layers.load_state_dict(saved.tensors["middle"])
        session.trainer.optimizer.load_state_dict(saved.tensors["optimizer"])
        session.trainer.statistics.load_state_dict(saved.tensors["statistics"])
        restore_generator(session.rounding, saved.tensors["rounding"])
        session.policy.load_state_dict(saved.meta["policy"])
    except _MISFIT as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("checkpoint of step %d of run %s does not fit: %s", saved.step, session.run_id, first)
        raise Refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the cloud's checkpoint of step {saved.step} of run {session.run_id} does not fit this cloud: {first}",
        ) from None
    session.decision = decision
    session.next_step = saved.step + 1
