"""The cloud's edges file and who a caller is: a token hash or a client-certificate subject per edge."""
from __future__ import annotations

import hmac
import re
import tomllib
from pathlib import Path
from typing import Any

import grpc
import tomli_w
from cryptography import x509
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline.trust.addresses import TrustError, peer_host, is_loopback
from pipeline.trust.tokens import token_hash

#: The identity of a loopback caller when the cloud runs without an edges file.
LOCAL_IDENTITY = "local"

# The first character is alphanumeric so that a name can never be "." or ".." where it ends up
# in a path or a log line.
_EDGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_NAME_RULE = "1..64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"


def is_edge_name(name: str) -> bool:
    """Whether ``name`` may name an edge (:data:`_NAME_RULE`): safe in a path and a log line."""
    return bool(_EDGE_NAME.fullmatch(name))

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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
    host = peer_host(context.peer())
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
