"""How the edge's link checks the cloud and proves the edge: TLS, mutual TLS, the token, clear text to loopback only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pipeline.trust import (
    TrustError, channel_credentials, is_loopback, parse_address, token_call_credentials, token_channel,
)

__all__ = ["LinkSecurity"]


@dataclass(frozen=True)
class LinkSecurity:
    """How the edge checks the cloud and proves who it is; the default is clear text, to loopback only.

    TLS is on when ``ca``, ``cert`` or ``key`` is given. ``ca`` is the CA file that signed the
    cloud's certificate (None with TLS on: the system roots); ``cert`` and ``key`` are this
    edge's client certificate for mutual TLS; ``server_name`` is the name the cloud's
    certificate must hold when it differs from the host dialled (tunnels, tests). ``token`` is
    sent as ``authorization: Bearer`` on every call. ``insecure`` allows clear text to another
    machine, never with a token.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    token: str | None = None
    insecure: bool = False

    @property
    def tls(self) -> bool:
        """Whether the channel is TLS."""
        return self.ca is not None or self.cert is not None or self.key is not None

    def check(self, address: str) -> None:
        """Raise :class:`pipeline.trust.TrustError` when these settings must not reach ``address``; connects nowhere."""
        host, _ = parse_address(address)
        if self.insecure and self.tls:
            raise TrustError("--insecure turns TLS off: give either --insecure or --tls-ca/--tls-cert/--tls-key")
        if self.server_name is not None and not self.tls:
            raise TrustError("--tls-server-name only applies to TLS: add --tls-ca")
        if self.tls or is_loopback(host):
            return
        if self.token is not None:
            raise TrustError(f"refusing to send the edge token in clear text to {host}; reach it over TLS (--tls-ca)")
        if not self.insecure:
            raise TrustError(
                f"refusing to talk to {host} in clear text: reach it over TLS (--tls-ca FILE), "
                "or pass --insecure inside a trusted network or tunnel"
            )

    def channel(self, address: str, options: list[tuple[str, Any]]) -> tuple[grpc.Channel, grpc.Channel]:
        """The raw channel (connectivity, close) and the one to call on, which carries the token."""
        self.check(address)
        if not self.tls:
            raw = grpc.insecure_channel(address, options=options)
            if self.token is None:
                return raw, raw
            return raw, token_channel(raw, parse_address(address)[0], self.token)
        credentials = channel_credentials(self.ca, self.cert, self.key)
        if self.token is not None:
            credentials = grpc.composite_channel_credentials(credentials, token_call_credentials(self.token))
        if self.server_name is not None:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        raw = grpc.secure_channel(address, credentials, options=options)
        return raw, raw
