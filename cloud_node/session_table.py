"""The sessions a cloud holds: opened within the limit, found only by their owner, reaped when idle."""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

import grpc

from cloud_node.refusal import Refusal, short
from cloud_node.session import CloudSession

__all__ = ["SessionTable"]

log = logging.getLogger("edgepipe.cloud")

#: The reaper looks this often at most, and at least four times per idle bound.
_MAX_REAP_PERIOD = 30.0


class SessionTable:
    """Sessions by id, each owned by the identity that opened it.

    A thread closes sessions that saw no call for ``idle_seconds`` (their edge crashed or
    vanished); ``on_reap``, when set, is called with each reaped session's id.
    """

    def __init__(self, max_sessions: int, idle_seconds: float) -> None:
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self.on_reap: Callable[[str], None] | None = None
        self._sessions: dict[str, CloudSession] = {}
        self._opening = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._reaper = threading.Thread(target=self._reap_forever, name="edgepipe-reaper", daemon=True)
        self._reaper.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, owner: str, build: Callable[[str], CloudSession], *, run_id: str = "") -> CloudSession:
        """Build a session for ``owner`` with ``build(session_id)``, unless the cloud is full.

        A session of the same ``owner`` and ``run_id`` (its edge vanished, or starts the run
        over) is replaced: it is removed first and does not count against the limit.
        """
        with self._lock:
            replaced = [
                s for s in self._sessions.values() if run_id and s.owner == owner and s.run_id == run_id
            ]
            for session in replaced:
                del self._sessions[session.id]
                log.info("session %s of run %s replaced by a new Open of the run", session.id, run_id)
            # Sessions being built count too: the check and the claim are one step.
            if len(self._sessions) + self._opening >= self.max_sessions:
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the cloud already serves its maximum of {self.max_sessions} sessions; try again later",
                )
            self._opening += 1
        try:
            session = build(secrets.token_hex(16))
        finally:
            with self._lock:
                self._opening -= 1
        with self._lock:
            self._sessions[session.id] = session
        return session

    def holds(self, session: CloudSession) -> bool:
        """Whether ``session`` is still in the table (not closed, reaped or replaced)."""
        with self._lock:
            return self._sessions.get(session.id) is session

    def owned(self, owner: str) -> int:
        """How many sessions ``owner`` has open."""
        with self._lock:
            return sum(1 for session in self._sessions.values() if session.owner == owner)

    def get(self, session_id: str, caller: str) -> CloudSession:
        """The session ``session_id`` if ``caller`` owns it."""
        with self._lock:
            session = self._owned_by(self._sessions.get(session_id), session_id, caller)
            # Any call counts as use: only sessions nobody calls are reaped.
            session.last_used = time.monotonic()
        return session

    def close(self, session_id: str, caller: str) -> CloudSession:
        """Remove and return the session ``session_id`` if ``caller`` owns it."""
        with self._lock:
            session = self._owned_by(self._sessions.get(session_id), session_id, caller)
            del self._sessions[session_id]
        return session

    @staticmethod
    def _owned_by(session: CloudSession | None, session_id: str, caller: str) -> CloudSession:
        if session is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"no session {short(session_id)} on this cloud; call Open first")
        if session.owner != caller:
            # Nothing more: not whose it is, not its step.
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, "this session belongs to another edge")
        return session

    def reap(self) -> None:
        """Close the sessions idle for longer than ``idle_seconds`` and not in a call."""
        now = time.monotonic()
        with self._lock:
            idle = [
                session for session in self._sessions.values()
                if now - session.last_used > self.idle_seconds and not session.lock.locked()
            ]
            for session in idle:
                del self._sessions[session.id]
        for session in idle:
            log.info("session %s idle for %.0f s: closed", session.id, now - session.last_used)
            if self.on_reap is not None:
                self.on_reap(session.id)

    def stop(self) -> None:
        """End the reaper thread."""
        self._stopped.set()
        self._reaper.join()

    def _reap_forever(self) -> None:
        period = min(self.idle_seconds / 4, _MAX_REAP_PERIOD)
        while not self._stopped.wait(period):
            self.reap()
