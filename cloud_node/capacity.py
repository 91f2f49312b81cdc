"""How many threads a cloud runs and how many streams each edge may hold, sized from --max-sessions."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from cloud_node.refusal import Refusal

__all__ = [
    "DEFAULT_MAX_SESSIONS",
    "IDENTITY_SLACK",
    "STREAMS_PER_SESSION",
    "UNARY_RESERVE",
    "Capacity",
    "StreamGate",
]

DEFAULT_MAX_SESSIONS = 32
#: A session holds at most one step stream and one evaluation stream at a time.
STREAMS_PER_SESSION = 2
#: Streams an edge may hold beyond two per session it has open: a step that starts while the
#: previous call still unwinds, the Weights call, a stream whose first frame is on its way.
IDENTITY_SLACK = 2
#: Threads no stream may take, so that Open, Close and health checks are answered whatever
#: the streams do (gRPC's sync server runs every call, streams included, on a thread of its own).
UNARY_RESERVE = 8


@dataclass(frozen=True)
class Capacity:
    """Sessions, threads and stream slots of one cloud."""

    max_sessions: int
    workers: int

    @classmethod
    def plan(cls, max_sessions: int = DEFAULT_MAX_SESSIONS, workers: int | None = None) -> Capacity:
        """The capacity for ``max_sessions``; ``workers`` None sizes the thread pool to fit.

        Raises ValueError when ``workers`` cannot hold two streams per session plus the reserve.
        """
        if max_sessions < 1:
            raise ValueError(f"--max-sessions must be at least 1, got {max_sessions}")
        needed = STREAMS_PER_SESSION * max_sessions + IDENTITY_SLACK + UNARY_RESERVE
        if workers is None:
            # Room for the slack of several edges at once besides the sessions' own streams.
            return cls(max_sessions, needed + max(2 * IDENTITY_SLACK, max_sessions // 2))
        if workers < needed:
            raise ValueError(
                f"--workers {workers} is too few for --max-sessions {max_sessions}: every session may hold "
                f"{STREAMS_PER_SESSION} streams and {UNARY_RESERVE} threads stay free for other calls, "
                f"so give at least {needed} (or leave --workers out)"
            )
        return cls(max_sessions, workers)

    @property
    def stream_slots(self) -> int:
        """Streams the whole cloud holds at once."""
        return self.workers - UNARY_RESERVE

    @property
    def max_calls(self) -> int:
        """Calls gRPC accepts at once, running or queued for a thread; more are RESOURCE_EXHAUSTED."""
        return 2 * self.workers


class StreamGate:
    """Counts open streams, in all and per edge, and refuses one more than allowed.

    An edge may hold two streams per session it has open plus a little slack, so stalled
    streams of one edge never take the threads that another edge's sessions need.
    """

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._lock = threading.Lock()
        self._total = 0
        self._held: dict[str, int] = {}

    @contextmanager
    def slot(self, identity: str, sessions: int) -> Iterator[None]:
        """Hold one stream slot for ``identity``, which has ``sessions`` sessions open."""
        allowed = STREAMS_PER_SESSION * sessions + IDENTITY_SLACK
        with self._lock:
            held = self._held.get(identity, 0)
            if held >= allowed:
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this edge already holds {held} streams ({STREAMS_PER_SESSION} per open session "
                    f"plus {IDENTITY_SLACK}); finish or cancel one first",
                )
            if self._total >= self._slots:
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the cloud holds as many streams as it serves at once; try again later",
                )
            self._total += 1
            self._held[identity] = held + 1
        try:
            yield
        finally:
            with self._lock:
                self._total -= 1
                self._held[identity] -= 1
                if not self._held[identity]:
                    del self._held[identity]
