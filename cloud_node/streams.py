"""Reading and writing a call with an idle bound: a peer that stops sending or reading is cut off."""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from cloud_node.refusal import Refusal
from cloud_node.throttle import ThrottledLog

__all__ = ["CallGone", "CallStream", "IdleWatch", "decoded"]

_M = TypeVar("_M", bound=Message)


class CallGone(Exception):
    """The call ended under the handler: the peer cancelled it, its connection died, or it idled."""

    def __init__(self, idle: bool) -> None:
        super().__init__("idle" if idle else "cancelled")
        self.idle = idle


class IdleWatch:
    """One thread that cancels every call whose peer was waited for longer than its bound.

    A handler arms the watch before it blocks on the peer (for the next request, or for the
    peer to take a reply) and disarms it after; the gRPC request iterator has no timeout of its
    own, and a cancelled call wakes whatever waits on it. ``on_cut``, when set, is called after
    each call the watch cancelled.
    """

    def __init__(self) -> None:
        self.on_cut: Callable[[], None] | None = None
        self._changed = threading.Condition()
        self._armed: dict[object, tuple[float, grpc.ServicerContext]] = {}
        self._fired: set[object] = set()
        self._wake_at = math.inf
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="edgepipe-idle-watch", daemon=True)
        self._thread.start()

    def arm(self, key: object, context: grpc.ServicerContext, seconds: float) -> None:
        """Cancel ``context`` unless :meth:`disarm` is called for ``key`` within ``seconds``."""
        deadline = time.monotonic() + seconds
        with self._changed:
            self._armed[key] = (deadline, context)
            # The thread sleeps until the earliest deadline it knows; wake it only to move that.
            if deadline < self._wake_at:
                self._changed.notify()

    def disarm(self, key: object) -> bool:
        """Stop watching ``key``; True when its call was already cancelled for idling."""
        with self._changed:
            self._armed.pop(key, None)
            fired = key in self._fired
            self._fired.discard(key)
            return fired

    @contextmanager
    def waiting(self, context: grpc.ServicerContext, seconds: float) -> Iterator[None]:
        """Cancel ``context`` if the block takes longer than ``seconds`` (wrap a wait on the peer)."""
        key = object()
        self.arm(key, context, seconds)
        try:
            yield
        finally:
            self.disarm(key)

    def stop(self) -> None:
        """End the thread; armed calls are left to the server's own shutdown."""
        with self._changed:
            self._stopped = True
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._stopped:
                    return
                now = time.monotonic()
                expired = [key for key, (deadline, _) in self._armed.items() if deadline <= now]
                if not expired:
                    self._wake_at = min((deadline for deadline, _ in self._armed.values()), default=math.inf)
                    self._changed.wait(timeout=None if self._wake_at == math.inf else self._wake_at - now)
                    self._wake_at = -math.inf
                    continue
                self._fired.update(expired)
                contexts = [self._armed.pop(key)[1] for key in expired]
            # Outside the lock: cancelling wakes the handler, which disarms at once.
            for context in contexts:
                context.cancel()
                if self.on_cut is not None:
                    self.on_cut()


class CallStream:
    """A call's requests, each waited for at most ``idle_seconds``; replies sent under the same bound."""

    def __init__(
        self, requests: Iterator[Any], context: grpc.ServicerContext, watch: IdleWatch, idle_seconds: float
    ) -> None:
        self._requests = requests
        self._context = context
        self._watch = watch
        self._idle = idle_seconds

    def next(self) -> Any:
        """The next request, or None when the peer closed its side.

        Raises :class:`CallGone` when the call was cancelled (by the peer, a dead connection,
        the server stopping, or the idle bound).
        """
        self._watch.arm(self, self._context, self._idle)
        try:
            return next(self._requests, None)
        except grpc.RpcError:
            raise CallGone(idle=self._watch.disarm(self)) from None
        finally:
            self._watch.disarm(self)

    def first(self, what: str) -> Any:
        """The one request of a unary call; a call that ends without one is refused."""
        request = self.next()
        if request is None:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"a {what} call needs a request message")
        return request

    def sending(self) -> AbstractContextManager[None]:
        """Wrap a ``yield`` of a reply: gRPC blocks there until the peer takes it."""
        return self._watch.waiting(self._context, self._idle)


def decoded(raw: Iterator[bytes], kind: type[_M], log: ThrottledLog) -> Iterator[_M]:
    """Parse each raw request as ``kind``; one that does not parse ends the call as INVALID_ARGUMENT.

    gRPC's own deserializer turns a parse failure into INTERNAL, logs a traceback for each and
    can leave the call unfinished for ever (then the server never completes its stop).
    """
    name = kind.DESCRIPTOR.name
    for data in raw:
        try:
            message = kind.FromString(data)
        except DecodeError:
            log.warning("malformed", "a malformed %s message (%d bytes) was refused", name, len(data))
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name} message ({len(data)} bytes)") from None
        yield message
