"""Who may talk to the cloud: TLS credentials, edge tokens and identities."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import tomllib
from collections import namedtuple
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
import tomli_w
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

__all__ = [
    "LOCAL_IDENTITY",
    "TOKEN_BYTES",
    "EdgeEntry",
    "EdgeRegistry",
    "TrustError",
    "caller_identity",
    "channel_credentials",
    "edges_line",
    "is_loopback",
    "load_edges",
    "new_token",
    "parse_address",
    "parse_edges",
    "server_credentials",
    "token_call_credentials",
    "token_channel",
    "token_hash",
]

#: The identity of a loopback caller when the cloud runs without an edges file.
LOCAL_IDENTITY = "local"

#: Random bytes in a new token: 256 bits, so a plain SHA-256 of it is safe to store (nothing to
#: brute-force, unlike a password).
TOKEN_BYTES = 32

_ADDRESS_EXAMPLE = "expected HOST:PORT with a port 0..65535, e.g. 127.0.0.1:50051 or [::1]:50051"
_HOSTNAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
# The first character is alphanumeric so that a name can never be "." or ".." where it ends up
# in a path or a log line.
_EDGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_RULE = "1..64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# What gRPC accepts in a plain (non -bin) metadata value, less the space that separates the scheme.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


class TrustError(ValueError):
    """An address, credential file, token or edges file is unusable; the message says what to fix."""


# -- addresses -------------------------------------------------------------------------------


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


def _peer_host(peer: str) -> str | None:
    # grpc writes peers as "ipv4:127.0.0.1:5555" or "ipv6:%5B::1%5D:5555" (brackets URL-encoded).
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = unquote(rest).rpartition(":")[0]
    return host.removeprefix("[").removesuffix("]") or None


# -- TLS -------------------------------------------------------------------------------------


def _read(path: Path, flag: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read the {what} {path} ({flag}): {exc.strerror}") from None
    if not data.strip():
        raise TrustError(f"the {what} {path} ({flag}) is empty")
    return data


def _certificates(path: Path, flag: str) -> tuple[bytes, list[x509.Certificate]]:
    data = _read(path, flag, "certificate file")
    try:
        return data, x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TrustError(
            f"{path} ({flag}) holds no PEM certificate; give a file with -----BEGIN CERTIFICATE-----"
        ) from None


def _key_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    cert_pem, chain = _certificates(cert, "--tls-cert")
    key_pem = _read(key, "--tls-key", "private key")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TrustError(f"the private key {key} (--tls-key) is encrypted; give it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TrustError(f"{key} (--tls-key) holds no PEM private key") from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(der, spki) != private.public_key().public_bytes(der, spki):
        raise TrustError(
            f"the private key {key} (--tls-key) does not belong to the certificate {cert} (--tls-cert)"
        )
    return key_pem, cert_pem


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS for the cloud; with ``client_ca``, mutual TLS: edges must show a certificate it signed."""
    key_pem, cert_pem = _key_pair(cert, key)
    ca_pem = _certificates(client_ca, "--tls-client-ca")[0] if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for the edge: trust ``ca`` (None: the system roots); ``cert`` and ``key`` for mutual TLS."""
    if cert is not None and key is None:
        raise TrustError(f"the certificate {cert} (--tls-cert) needs its private key: add --tls-key")
    if key is not None and cert is None:
        raise TrustError(f"the private key {key} (--tls-key) needs its certificate: add --tls-cert")
    ca_pem = _certificates(ca, "--tls-ca")[0] if ca is not None else None
    key_pem, cert_pem = _key_pair(cert, key) if cert is not None and key is not None else (None, None)
    return grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)


# -- tokens ----------------------------------------------------------------------------------


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


# -- the edges file --------------------------------------------------------------------------


def _subject_attributes(subject: str) -> frozenset[tuple[str, Any]]:
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError:
        name = x509.Name([])
    attributes = frozenset((attribute.oid.dotted_string, attribute.value) for attribute in name)
    if not attributes:
        raise ValueError(f"{subject!r} is not a certificate subject; write it like CN=camera-2,O=Acme")
    return attributes


class EdgeEntry(BaseModel):
    """One ``[[edge]]``: a name and how the edge proves it, a token's hash or a certificate subject."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str
    token_sha256: str | None = None
    cert_subject: str | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _EDGE_NAME.fullmatch(value):
            raise ValueError(f"must be {_NAME_RULE}")
        return value

    @field_validator("token_sha256")
    @classmethod
    def _valid_hash(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_HEX.fullmatch(value):
            raise ValueError("must be 64 lowercase hex digits: the SHA-256 that edgepipe token new prints")
        return value

    @field_validator("cert_subject")
    @classmethod
    def _valid_subject(cls, value: str | None) -> str | None:
        if value is not None:
            _subject_attributes(value)
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> EdgeEntry:
        if (self.token_sha256 is None) == (self.cert_subject is None):
            raise ValueError("give exactly one of token_sha256 and cert_subject")
        return self


def _repeated(values: list[tuple[Any, str]]) -> list[str]:
    seen: dict[Any, str] = {}
    clashes = []
    for key, name in values:
        if key in seen:
            clashes.append(f"{seen[key]} and {name}")
        seen.setdefault(key, name)
    return clashes


class EdgeRegistry(BaseModel):
    """The edges file: the edges that may use the cloud and how each one is recognised.

    A certificate matches an entry when its subject holds every attribute the entry's
    ``cert_subject`` names; one that matches several entries is refused as ambiguous.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    edge: list[EdgeEntry] = []
    _tokens: list[tuple[str, str]] = PrivateAttr(default_factory=list)
    _subjects: list[tuple[frozenset[tuple[str, Any]], str]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _distinct(self) -> EdgeRegistry:
        if not self.edge:
            raise ValueError("no [[edge]] entries; add one (edgepipe token new NAME prints it)")
        names = [entry.name for entry in self.edge]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"edge name(s) {', '.join(repeated)} appear more than once; make names unique")
        hashes = [(e.token_sha256, e.name) for e in self.edge if e.token_sha256]
        subjects = [(_subject_attributes(e.cert_subject), e.name) for e in self.edge if e.cert_subject]
        for what, keys in (("token_sha256", hashes), ("cert_subject", subjects)):
            clashes = _repeated(keys)
            if clashes:
                raise ValueError(f"edges {', '.join(clashes)} have the same {what}; each edge needs its own")
        return self

    def model_post_init(self, context: Any) -> None:
        """Keep the hashes and parsed subjects that identify() compares."""
        self._tokens = [(e.token_sha256, e.name) for e in self.edge if e.token_sha256 is not None]
        self._subjects = [(_subject_attributes(e.cert_subject), e.name) for e in self.edge if e.cert_subject]

    @property
    def names(self) -> tuple[str, ...]:
        """The edge names, in file order."""
        return tuple(entry.name for entry in self.edge)

    def _by_token(self, token: str) -> str | None:
        presented = token_hash(token)
        found = None
        # Compare with every entry and never stop early, so the time taken tells nothing about
        # which entry, if any, matched; hashes are unique, so at most one does.
        for digest, name in self._tokens:
            if hmac.compare_digest(digest, presented):
                found = name
        return found

    def _by_subject(self, subject: str) -> str | None:
        try:
            presented = _subject_attributes(subject)
        except ValueError:
            return None
        matches = [name for attributes, name in self._subjects if attributes <= presented]
        return matches[0] if len(matches) == 1 else None

    def identify(self, token: str | None, cert_subject: str | None) -> str | None:
        """The edge that a bearer token and/or a verified client-certificate subject name, else None.

        A token that matches no entry is refused even next to a good certificate, and so are a
        token and a certificate that name different edges.
        """
        by_token = self._by_token(token) if token is not None else None
        if token is not None and by_token is None:
            return None
        by_subject = self._by_subject(cert_subject) if cert_subject is not None else None
        if by_token is not None and by_subject is not None and by_token != by_subject:
            return None
        return by_token or by_subject


def _describe(error: dict[str, Any], data: Any) -> str:
    loc = list(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    where = ""
    if len(loc) >= 2 and loc[0] == "edge" and isinstance(loc[1], int):
        entry = data["edge"][loc[1]]
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"[[edge]] #{loc[1] + 1}" + (f" ({name!r})" if isinstance(name, str) else "")
        loc = loc[2:]
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(EdgeEntry.model_fields) if where else "[[edge]] tables"
        message = f"unknown key; allowed: {allowed}"
    key = ".".join(str(part) for part in loc)
    return ": ".join(part for part in (where, key, message) if part)


def parse_edges(data: dict[str, Any], source: str = "edges file") -> EdgeRegistry:
    """Validate an edges file given as dicts (as read from TOML)."""
    try:
        return EdgeRegistry.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(error, data) for error in exc.errors())
        raise TrustError(f"{source}: {problems}") from None


def load_edges(path: str | Path) -> EdgeRegistry:
    """Read and validate a TOML edges file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise TrustError(f"cannot read the edges file {path}: {reason}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TrustError(f"{path}: not valid TOML: {exc}") from None
    return parse_edges(data, str(path))


def edges_line(name: str, token: str) -> str:
    """The ``[[edge]]`` entry to add to the edges file for a new token; it holds the hash, not the token."""
    try:
        entry = EdgeEntry(name=name, token_sha256=token_hash(token))
    except ValidationError:
        raise TrustError(f"bad edge name {name!r}: use {_NAME_RULE}") from None
    return tomli_w.dumps({"edge": [entry.model_dump(exclude_none=True)]})


# -- the server side of a call ---------------------------------------------------------------


def _cert_subject(auth: dict[str, list[bytes]]) -> str | None:
    # gRPC puts the verified client certificate's RFC 2253 subject under "x509_subject".
    values = auth.get("x509_subject") or []
    try:
        return values[0].decode("utf-8") if len(values) == 1 else None
    except UnicodeDecodeError:
        return None


def caller_identity(context: grpc.ServicerContext, registry: EdgeRegistry | None) -> str | None:
    """Who made this call: an edge name, LOCAL_IDENTITY, or None when the caller is not let in.

    Without a registry only loopback peers are let in, as LOCAL_IDENTITY. With one, the caller
    shows an ``authorization: Bearer <token>`` header and/or a client certificate (mutual TLS);
    a token is refused when it came in clear text from another machine.
    """
    host = _peer_host(context.peer())
    loopback = host is not None and is_loopback(host)
    if registry is None:
        return LOCAL_IDENTITY if loopback else None
    headers = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
    token = None
    if headers:
        scheme, _, token = headers[0].partition(" ")
        # A malformed or repeated credential is refused rather than ignored.
        if len(headers) > 1 or scheme.lower() != "bearer" or not token:
            return None
    auth = context.auth_context()
    secure = b"ssl" in auth.get("transport_security_type", [])
    if token is not None and not (secure or loopback):
        return None
    return registry.identify(token, _cert_subject(auth) if secure else None)
