"""Refusing a call: a status code and a short reason, never the client's text at length."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

__all__ = ["DETAIL_CHARS", "Refusal", "answering", "short"]

#: Longest status detail sent. gRPC carries details in a header that the peer refuses beyond
#: its metadata limit (8 KiB by default), and nothing a client needs to read is longer.
DETAIL_CHARS = 300
#: How much of a client's own string (a session id, a codec name) a message may quote.
_QUOTED_CHARS = 40


def short(value: Any) -> str:
    """``repr`` of a client-supplied value, cut to a few dozen characters."""
    text = repr(value[: _QUOTED_CHARS + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= _QUOTED_CHARS else text[:_QUOTED_CHARS] + "..."


class Refusal(Exception):
    """A call the cloud will not serve; carries the gRPC status and a bounded reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        if len(message) > DETAIL_CHARS:
            message = message[: DETAIL_CHARS - 3] + "..."
        super().__init__(message)
        self.code = code
        self.message = message


@contextmanager
def answering(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn a :class:`Refusal` raised inside the block into the call's status."""
    try:
        yield
    except Refusal as refusal:
        context.abort(refusal.code, refusal.message)
