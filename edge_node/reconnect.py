"""Getting a lost cloud back: the reopen retried with backoff and jitter for up to ``link.reconnect_seconds``."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

from edge_node.link import LinkError

__all__ = ["Reconnect"]

_T = TypeVar("_T")

#: The waits between attempts grow from about this (full jitter: a random share of it) ...
_FIRST_WAIT_SECONDS = 0.5
#: ... doubling up to this, so a cloud back after a long outage is found within seconds.
_LONGEST_WAIT_SECONDS = 8.0
#: One attempt waits at most this long for the channel to connect before the next wait.
_ATTEMPT_SECONDS = 10.0


class Reconnect:
    """One run's reconnects to the cloud at ``address``: what is worth retrying, the time budget, the reports.

    The budget of ``seconds`` starts when the cloud is lost, and starts afresh only once
    training got past the step where it was lost before: a cloud that accepts the reopen but
    fails every step does not hold the edge for ever. ``on_link`` hears of every wait.
    """

    def __init__(self, address: str, seconds: float, on_link: Callable[[str], None] | None) -> None:
        self.address = address
        self.seconds = seconds
        self._on_link = on_link
        self._deadline = 0.0
        self._lost_at = -1

    def worth(self, exc: LinkError) -> bool:
        """Whether losing the link this way is worth a reconnect (not a refusal, and reconnects are on)."""
        return exc.transient and self.seconds > 0

    def lost(self, exc: LinkError, step: int) -> None:
        """Note that the cloud was lost while running ``step``, and report it."""
        if step > self._lost_at:
            self._deadline = time.monotonic() + self.seconds
            self._lost_at = step
        self._waiting(exc)

    def report(self, message: str) -> None:
        """Pass a message about the link to the callback, if there is one."""
        if self._on_link is not None:
            self._on_link(message)

    def retry(self, attempt: Callable[[float], _T]) -> _T:
        """Call ``attempt(seconds it may wait to connect)`` until it returns.

        Transient failures are retried after a jittered, growing wait while the budget lasts;
        a refusal, or the last failure once the budget is spent, is raised.
        """
        jittered = tenacity.wait_random_exponential(multiplier=_FIRST_WAIT_SECONDS, max=_LONGEST_WAIT_SECONDS)
        retrying = tenacity.Retrying(
            stop=lambda state: self._left() <= 0,
            wait=lambda state: min(jittered(state), self._left()),
            retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, LinkError) and exc.transient),
            before_sleep=lambda state: self._waiting(state.outcome.exception()),
            reraise=True,
        )
        try:
            return retrying(lambda: attempt(min(self._left(), _ATTEMPT_SECONDS)))
        except LinkError as exc:
            if not exc.transient:
                raise
            raise LinkError(
                f"lost the cloud at {self.address} and could not get it back within {self.seconds:g} s "
                f"(link.reconnect_seconds): {exc}", exc.code,
            ) from None

    def _left(self) -> float:
        return max(self._deadline - time.monotonic(), 0.0)

    def _waiting(self, exc: BaseException | None) -> None:
        reason = exc.reason if isinstance(exc, LinkError) else str(exc)
        self.report(f"lost the cloud at {self.address} ({reason}); reconnecting, {self._left():.0f} s left")
