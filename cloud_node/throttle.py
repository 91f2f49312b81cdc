"""Log lines that a client can provoke: at most one a second per kind, with a count of the rest."""
from __future__ import annotations

import logging
import threading
import time

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """A warning per kind of event at most every ``interval`` seconds; a flood costs one line a second.

    The line that ends a quiet interval says how many events of its kind were not logged.
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` unless a line of ``kind`` went out less than ``interval`` ago."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self._interval) < self._interval:
                self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
                return
            self._last[kind] = now
            unlogged = self._unlogged.pop(kind, 0)
        suffix = f" ({unlogged} more since the last such line)" if unlogged else ""
        self._logger.warning(message + suffix, *args)
