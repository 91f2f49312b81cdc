"""Addresses: HOST:PORT parsing and what counts as this machine (loopback), never resolving names."""
from __future__ import annotations

import ipaddress
import re
from urllib.parse import unquote

_ADDRESS_EXAMPLE = "expected HOST:PORT with a port 0..65535, e.g. 127.0.0.1:50051 or [::1]:50051"

_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")

_PORT = re.compile(r"[0-9]{1,5}")


class TrustError(ValueError):
    """An address, credential file, token or edges file is unusable; the message says what to fix."""


def _bad_address(text: str, why: str) -> TrustError:
    return TrustError(f"bad address {text!r}: {why + '; ' if why else ''}{_ADDRESS_EXAMPLE}")


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[ADDR]:PORT``) into the host, without brackets, and the port."""
    host, colon, port = text.rpartition(":")
    if not colon or not _PORT.fullmatch(port) or int(port) > 65535:
        raise _bad_address(text, "")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _bad_address(text, f"{host} is not an IPv6 address") from None
        return host[1:-1], int(port)
    if ":" in host:
        raise _bad_address(text, "write an IPv6 host in brackets")
    if not _HOSTNAME.fullmatch(host):
        raise _bad_address(text, f"{host!r} is not a host name or IP address")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as parse_address returns it) is this machine: 127.0.0.0/8, ::1 or localhost.

    Names are never resolved: any DNS name but ``localhost`` may point anywhere.
    """
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # A dual-stack server listening on [::] sees IPv4 clients as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def peer_host(peer: str) -> str | None:
    """The host of a gRPC peer (``context.peer()``), or None for a peer that is no IP address."""
    # grpc writes peers as "ipv4:127.0.0.1:5555" or "ipv6:%5B::1%5D:5555" (brackets URL-encoded).
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = unquote(rest).rpartition(":")[0]
    return host.removeprefix("[").removesuffix("]") or None
