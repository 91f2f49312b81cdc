"""Edge tokens: made, hashed, and sent on every call (call credentials over TLS, an interceptor on loopback)."""
from __future__ import annotations

import hashlib
import re
import secrets
from collections import namedtuple
from typing import Any

import grpc

from pipeline.trust.addresses import TrustError, is_loopback

#: Random bytes in a new token: 256 bits, so a plain SHA-256 of it is safe to store (nothing to
#: brute-force, unlike a password).
TOKEN_BYTES = 32

# What gRPC accepts in a plain (non -bin) metadata value, less the space that separates the scheme.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


def new_token() -> str:
    """A fresh edge token (URL-safe text from 32 random bytes)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    """The hex SHA-256 of a token: what the edges file stores instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_token(token: str) -> None:
    if not _TOKEN_CHARS.fullmatch(token):
        raise TrustError("the edge token is empty or holds spaces or non-ASCII characters; copy it exactly")


def token_call_credentials(token: str) -> grpc.CallCredentials:
    """Call credentials that send ``authorization: Bearer <token>``; gRPC sends them over TLS only."""
    _check_token(token)
    return grpc.access_token_call_credentials(token)


class _CallDetails(
    namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """Call details with extra metadata; grpc.ClientCallDetails has no constructor of its own."""


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to the metadata of every call, unary or streaming."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _intercept(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return continuation(
            _CallDetails(
                details.method, details.timeout, metadata, details.credentials,
                details.wait_for_ready, details.compression,
            ),
            request,
        )

    # The four kinds differ only in whether `request` is one message or an iterator.
    intercept_unary_unary = _intercept
    intercept_unary_stream = _intercept
    intercept_stream_unary = _intercept
    intercept_stream_stream = _intercept


def token_channel(channel: grpc.Channel, host: str, token: str) -> grpc.Channel:
    """Make every call on an insecure channel to a loopback ``host`` carry the token.

    gRPC drops call credentials on insecure channels, so the token travels as call metadata
    instead; any host but loopback is refused, since the token would cross the network in clear.
    """
    if not is_loopback(host):
        raise TrustError(
            f"refusing to send the edge token in clear text to {host}; reach it over TLS (--tls-ca)"
        )
    _check_token(token)
    return grpc.intercept_channel(channel, _BearerInterceptor(token))
