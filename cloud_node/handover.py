"""A call's replies computed on a thread of their own: the call's thread sends one while the next is computed."""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

__all__ = ["Handover"]


class _Stopped(Exception):
    """Raised in the computing thread by ``emit`` once the receiving side has stopped listening."""


class Handover:
    """Runs ``work(emit)`` on a thread; iterating yields what it emits, in order, as it goes.

    gRPC's sync server sends a reply only when the handler yields it and waits for the send to
    complete before it asks for the next; with the work on its own thread, reading and computing
    the next frames overlap that send. At most ``limit`` replies wait unsent, so a peer that
    stops reading also stops the work. An exception of the work is raised by the iteration
    after the replies emitted before it. Leaving the ``with`` block (also by an exception or a
    closed generator) makes ``emit`` raise inside the work and joins the thread: afterwards
    nothing runs on the work's behalf.
    """

    def __init__(self, work: Callable[[Callable[[Any], None]], None], *, limit: int, name: str) -> None:
        self._work = work
        self._limit = limit
        self._items: deque[Any] = deque()
        self._changed = threading.Condition()
        self._finished = False
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Handover:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        # The work stops at its next emit, or when its wait on the (then cancelled) call ends.
        self._thread.join()

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._changed:
                while not self._items and not self._finished:
                    self._changed.wait()
                if not self._items:
                    if self._error is not None:
                        raise self._error
                    return
                item = self._items.popleft()
                self._changed.notify_all()
            yield item

    def _emit(self, item: Any) -> None:
        with self._changed:
            while len(self._items) >= self._limit and not self._stopped:
                self._changed.wait()
            if self._stopped:
                raise _Stopped
            self._items.append(item)
            self._changed.notify_all()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._work(self._emit)
        except _Stopped:
            pass  # nobody listens any more
        except BaseException as exc:  # handed to the iterating thread, which raises it
            error = exc
        with self._changed:
            self._finished, self._error = True, error
            self._changed.notify_all()
