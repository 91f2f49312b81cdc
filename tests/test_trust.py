"""pipeline.trust: addresses, TLS and mutual TLS, tokens and the edges file, over real gRPC on 127.0.0.1."""
from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import tomli_w
import trustme
from hypothesis import given
from hypothesis import strategies as st

from pipeline import trust
from pipeline.trust import EdgeRegistry, TrustError

SERVER_NAME = "cloud.test"
WHOAMI = "/trusttest.Probe/Whoami"
#: Generous: a refused handshake fails at once, this only bounds a broken test.
DEADLINE = 20.0
# Fixed, so that test ids are stable; new_token() has a test of its own.
TOKEN_1 = "token-one"
TOKEN_3 = "token-three"


@dataclass(frozen=True)
class Pem:
    """Certificate, key and CA files of one party, as paths."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Pki:
    """A cloud certificate and edge client certificates from a CA, and an edge one from a stranger CA."""

    cloud: Pem
    camera2: Pem
    stranger: Pem


def _write(directory: Path, stem: str, ca: trustme.CA, leaf: trustme.LeafCert) -> Pem:
    paths = Pem(directory / f"{stem}.crt", directory / f"{stem}.key", directory / f"{stem}-ca.crt")
    leaf.cert_chain_pems[0].write_to_path(str(paths.cert))
    leaf.private_key_pem.write_to_path(str(paths.key))
    ca.cert_pem.write_to_path(str(paths.ca))
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    return Pki(
        cloud=_write(directory, "cloud", ca, ca.issue_cert(SERVER_NAME)),
        camera2=_write(directory, "camera2", ca, ca.issue_cert("camera-2.test", common_name="camera-2")),
        stranger=_write(
            directory, "stranger", other, other.issue_cert("camera-2.test", common_name="camera-2")
        ),
    )


REGISTRY = trust.parse_edges(
    {
        "edge": [
            {"name": "camera-1", "token_sha256": trust.token_hash(TOKEN_1)},
            {"name": "camera-2", "cert_subject": "CN=camera-2"},
            {"name": "camera-3", "token_sha256": trust.token_hash(TOKEN_3)},
        ]
    }
)


def _whoami_handler(registry: EdgeRegistry | None) -> grpc.GenericRpcHandler:
    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        identity = trust.caller_identity(context, registry)
        if identity is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "who are you?")
        return identity.encode()

    method = grpc.unary_unary_rpc_method_handler(whoami)
    return grpc.method_handlers_generic_handler("trusttest.Probe", {"Whoami": method})


@contextmanager
def serving(credentials: grpc.ServerCredentials | None, registry: EdgeRegistry | None) -> Iterator[int]:
    """A server on 127.0.0.1 (a free port) whose Whoami answers caller_identity, or UNAUTHENTICATED."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((_whoami_handler(registry),))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def whoami(channel: grpc.Channel, **kwargs: Any) -> str:
    """Call Whoami; the identity the server saw."""
    return channel.unary_unary(WHOAMI)(b"", timeout=DEADLINE, **kwargs).decode()


def refusal(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status code of a call that must fail."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def tls_channel(port: int, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    """A secure channel to the test server, checking its certificate against SERVER_NAME."""
    return grpc.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
    )


# -- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:65535", ("::1", 65535)),
        ("[::]:1", ("::", 1)),
        ("localhost:50051", ("localhost", 50051)),
        ("cloud.example.org:443", ("cloud.example.org", 443)),
        ("edge_7-b:8", ("edge_7-b", 8)),
    ],
)
def test_parse_address_accepts(text: str, expected: tuple[str, int]) -> None:
    assert trust.parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", "127.0.0.1", "127.0.0.1:", ":50051", "host:65536", "host:-1", "host:+1", "host:5x",
        "host:\u0663", "host:123456", "::1:50051", "[::1]50051", "[::1]:", "[nothost]:1", "[]:1",
        "[127.0.0.1]:1", "host name:1", "a/b:1", "host:1:2", "host..x:1",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        trust.parse_address(text)
    message = str(caught.value)
    assert repr(text) in message and "HOST:PORT" in message and "\n" not in message


@given(st.integers(0, 65535), st.sampled_from(["127.0.0.1", "cloud.example", "::1", "fe80::1"]))
def test_parse_address_round_trips(port: int, host: str) -> None:
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert trust.parse_address(text) == (host, port)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.255.255.254", True), ("::1", True), ("localhost", True),
        ("LocalHost", True), ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False), ("0.0.0.0", False), ("::", False), ("128.0.0.1", False),
        ("::ffff:10.0.0.1", False), ("example.com", False), ("localhost.example.com", False),
        ("127.0.0.1.nip.io", False), ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert trust.is_loopback(host) is loopback


# -- TLS -------------------------------------------------------------------------------------


def test_tls_with_the_right_ca(pki: Pki) -> None:
    with serving(trust.server_credentials(pki.cloud.cert, pki.cloud.key, None), None) as port:
        with tls_channel(port, trust.channel_credentials(pki.cloud.ca)) as channel:
            assert whoami(channel) == trust.LOCAL_IDENTITY


def test_tls_with_a_wrong_ca_is_refused(pki: Pki) -> None:
    with serving(trust.server_credentials(pki.cloud.cert, pki.cloud.key, None), None) as port:
        with tls_channel(port, trust.channel_credentials(pki.stranger.ca)) as channel:
            assert refusal(lambda: whoami(channel)) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_a_tls_server(pki: Pki) -> None:
    with serving(trust.server_credentials(pki.cloud.cert, pki.cloud.key, None), None) as port:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert refusal(lambda: whoami(channel)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_identifies_the_client_certificate(pki: Pki) -> None:
    server = trust.server_credentials(pki.cloud.cert, pki.cloud.key, pki.camera2.ca)
    client = trust.channel_credentials(pki.cloud.ca, pki.camera2.cert, pki.camera2.key)
    with serving(server, REGISTRY) as port, tls_channel(port, client) as channel:
        assert whoami(channel) == "camera-2"


def test_mutual_tls_refuses_a_missing_client_certificate(pki: Pki) -> None:
    server = trust.server_credentials(pki.cloud.cert, pki.cloud.key, pki.camera2.ca)
    client = trust.channel_credentials(pki.cloud.ca)
    with serving(server, REGISTRY) as port, tls_channel(port, client) as channel:
        assert refusal(lambda: whoami(channel)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(pki: Pki) -> None:
    server = trust.server_credentials(pki.cloud.cert, pki.cloud.key, pki.camera2.ca)
    client = trust.channel_credentials(pki.cloud.ca, pki.stranger.cert, pki.stranger.key)
    with serving(server, REGISTRY) as port, tls_channel(port, client) as channel:
        assert refusal(lambda: whoami(channel)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_not_in_the_registry_is_not_an_identity(pki: Pki) -> None:
    registry = trust.parse_edges({"edge": [{"name": "camera-9", "cert_subject": "CN=camera-9"}]})
    server = trust.server_credentials(pki.cloud.cert, pki.cloud.key, pki.camera2.ca)
    client = trust.channel_credentials(pki.cloud.ca, pki.camera2.cert, pki.camera2.key)
    with serving(server, registry) as port, tls_channel(port, client) as channel:
        assert refusal(lambda: whoami(channel)) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("call", "flag"),
    [
        (lambda p, missing: trust.server_credentials(missing, p.cloud.key, None), "--tls-cert"),
        (lambda p, missing: trust.server_credentials(p.cloud.cert, missing, None), "--tls-key"),
        (lambda p, missing: trust.server_credentials(p.cloud.cert, p.cloud.key, missing), "--tls-client-ca"),
        (lambda p, missing: trust.channel_credentials(missing), "--tls-ca"),
        (lambda p, missing: trust.channel_credentials(p.cloud.ca, missing, p.camera2.key), "--tls-cert"),
        (lambda p, missing: trust.channel_credentials(p.cloud.ca, p.camera2.cert, missing), "--tls-key"),
    ],
)
def test_missing_credential_files_name_the_file_and_flag(
    pki: Pki, tmp_path: Path, call: Callable[[Pki, Path], Any], flag: str
) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TrustError, match=f"cannot read .*{re.escape(str(missing))} \\({flag}\\)"):
        call(pki, missing)


@pytest.mark.parametrize(
    ("cert", "key", "needs"), [(True, False, "add --tls-key"), (False, True, "add --tls-cert")]
)
def test_a_client_certificate_needs_its_key(pki: Pki, cert: bool, key: bool, needs: str) -> None:
    with pytest.raises(TrustError, match=needs):
        trust.channel_credentials(
            pki.cloud.ca, pki.camera2.cert if cert else None, pki.camera2.key if key else None
        )


def test_unusable_credential_files_are_named(pki: Pki, tmp_path: Path) -> None:
    garbage, empty = tmp_path / "garbage.pem", tmp_path / "empty.pem"
    garbage.write_text("not a certificate\n")
    empty.write_text("\n")
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: trust.server_credentials(garbage, pki.cloud.key), f"{garbage} (--tls-cert) holds no"),
        (lambda: trust.server_credentials(pki.cloud.cert, garbage), f"{garbage} (--tls-key) holds no"),
        (lambda: trust.channel_credentials(empty), f"{empty} (--tls-ca) is empty"),
        (
            lambda: trust.server_credentials(pki.cloud.cert, pki.camera2.key),
            f"key {pki.camera2.key} (--tls-key) does not belong to the certificate {pki.cloud.cert}",
        ),
    ]
    for call, expected in cases:
        with pytest.raises(TrustError) as caught:
            call()
        assert expected in str(caught.value) and "\n" not in str(caught.value)


# -- tokens ----------------------------------------------------------------------------------


def test_new_tokens_are_long_random_and_hash_to_hex() -> None:
    tokens = {trust.new_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(len(token) >= 43 for token in tokens)  # 32 bytes in URL-safe base64
    digest = trust.token_hash("abc")
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_token_over_tls_call_credentials(pki: Pki) -> None:
    server = trust.server_credentials(pki.cloud.cert, pki.cloud.key, None)
    client = grpc.composite_channel_credentials(
        trust.channel_credentials(pki.cloud.ca), trust.token_call_credentials(TOKEN_3)
    )
    with serving(server, REGISTRY) as port, tls_channel(port, client) as channel:
        assert whoami(channel) == "camera-3"


@pytest.mark.parametrize(
    ("token", "expected"),
    [(TOKEN_1, "camera-1"), (TOKEN_3, "camera-3"), ("wrong" + TOKEN_1, None), (None, None)],
)
def test_token_over_insecure_loopback(token: str | None, expected: str | None) -> None:
    with serving(None, REGISTRY) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        channel = trust.token_channel(plain, "127.0.0.1", token) if token is not None else plain
        if expected is None:
            assert refusal(lambda: whoami(channel)) == grpc.StatusCode.UNAUTHENTICATED
        else:
            assert whoami(channel) == expected


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", f"Basic {TOKEN_1}")],
        [("authorization", "Bearer ")],
        [("authorization", f"Bearer {TOKEN_1}"), ("authorization", f"Bearer {TOKEN_3}")],
    ],
)
def test_malformed_or_repeated_authorization_is_refused(metadata: list[tuple[str, str]]) -> None:
    with serving(None, REGISTRY) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert whoami(channel, metadata=[("authorization", f"Bearer {TOKEN_1}")]) == "camera-1"
        assert refusal(lambda: whoami(channel, metadata=metadata)) == grpc.StatusCode.UNAUTHENTICATED


def test_token_channel_sends_the_token_on_streams_too() -> None:
    seen: list[str | None] = []

    def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        seen.append(trust.caller_identity(context, REGISTRY))
        yield from requests

    handler = grpc.method_handlers_generic_handler(
        "trusttest.Probe", {"Echo": grpc.stream_stream_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            channel = trust.token_channel(plain, "localhost", TOKEN_1)
            echo_call = channel.stream_stream("/trusttest.Probe/Echo")
            replies = list(echo_call(iter([b"a", b"b"]), timeout=DEADLINE))
    finally:
        server.stop(None)
    assert replies == [b"a", b"b"] and seen == ["camera-1"]


def test_token_channel_refuses_clear_text_to_another_machine() -> None:
    with grpc.insecure_channel("192.0.2.1:1") as channel:
        with pytest.raises(TrustError, match="clear text to cloud.example"):
            trust.token_channel(channel, "cloud.example", TOKEN_1)
        for bad in ("", "has space", "caf\u00e9"):
            with pytest.raises(TrustError, match="edge token"):
                trust.token_channel(channel, "127.0.0.1", bad)
            with pytest.raises(TrustError, match="edge token"):
                trust.token_call_credentials(bad)


def test_registry_compares_every_token_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[str] = []
    real = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token in (TOKEN_1, TOKEN_3, "wrong"):
        compared.clear()
        REGISTRY.identify(token, None)
        assert compared == [trust.token_hash(TOKEN_1), trust.token_hash(TOKEN_3)]


@pytest.mark.parametrize(
    ("token", "subject", "expected"),
    [
        (TOKEN_1, None, "camera-1"),
        (None, "CN=camera-2,OU=Testing,O=trustme", "camera-2"),
        (None, "CN=camera-2", "camera-2"),
        (None, "O=trustme", None),
        (None, "not a subject", None),
        (None, None, None),
        ("", None, None),
        ("wrong", "CN=camera-2", None),  # a bad token is refused even with a good certificate
        (TOKEN_1, "CN=camera-2", None),  # token and certificate name different edges
        (TOKEN_1, "CN=camera-9", "camera-1"),  # a verified certificate the registry does not list
    ],
)
def test_identify(token: str | None, subject: str | None, expected: str | None) -> None:
    assert REGISTRY.identify(token, subject) == expected


def test_a_certificate_matching_two_entries_is_refused() -> None:
    registry = trust.parse_edges(
        {"edge": [{"name": "a", "cert_subject": "CN=x"}, {"name": "b", "cert_subject": "O=acme"}]}
    )
    assert registry.identify(None, "CN=x,O=other") == "a"
    assert registry.identify(None, "CN=x,O=acme") is None


# -- caller_identity without real sockets: peers this machine cannot make ----------------------


@dataclass
class FakeContext:
    """The three ServicerContext methods caller_identity reads."""

    peer_text: str
    auth: dict[str, list[bytes]]
    metadata: tuple[tuple[str, str], ...] = ()

    def peer(self) -> str:
        return self.peer_text

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


INSECURE = {"transport_security_type": [b"insecure"]}
SSL = {"transport_security_type": [b"ssl"]}


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:127.0.0.1:5555", "local"), ("ipv4:127.9.9.9:1", "local"), ("ipv6:%5B::1%5D:5555", "local"),
        ("ipv6:[::1]:5555", "local"), ("ipv6:%5B::ffff:127.0.0.1%5D:5555", "local"),
        ("ipv4:10.1.2.3:5555", None), ("ipv6:%5B2001:db8::1%5D:5555", None), ("unix:/tmp/s", None),
        ("", None),
    ],
)
def test_without_a_registry_only_loopback_is_let_in(peer: str, expected: str | None) -> None:
    assert trust.caller_identity(FakeContext(peer, INSECURE), None) == expected


def test_a_clear_text_token_from_another_machine_is_refused() -> None:
    header = (("authorization", f"Bearer {TOKEN_1}"),)
    assert trust.caller_identity(FakeContext("ipv4:10.1.2.3:5555", INSECURE, header), REGISTRY) is None
    assert trust.caller_identity(FakeContext("ipv4:10.1.2.3:5555", SSL, header), REGISTRY) == "camera-1"
    assert trust.caller_identity(FakeContext("ipv6:%5B::1%5D:5", INSECURE, header), REGISTRY) == "camera-1"


def test_a_certificate_subject_counts_only_under_tls() -> None:
    subject = {"x509_subject": [b"CN=camera-2,O=trustme"]}
    assert trust.caller_identity(FakeContext("ipv4:10.1.2.3:5", SSL | subject), REGISTRY) == "camera-2"
    assert trust.caller_identity(FakeContext("ipv4:10.1.2.3:5", INSECURE | subject), REGISTRY) is None


# -- the edges file --------------------------------------------------------------------------

HASH = "ab" * 32


def edges(*entries: dict[str, Any]) -> str:
    """An edges file with these [[edge]] entries."""
    return tomli_w.dumps({"edge": list(entries)})


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("", "no [[edge]] entries"),
        (edges({"name": "a"}), "[[edge]] #1 ('a'): give exactly one of token_sha256 and cert_subject"),
        (edges({"name": "a", "token_sha256": HASH, "cert_subject": "CN=a"}), "#1 ('a'): give exactly one"),
        (edges({"name": "a", "token_sha256": HASH.upper()}), "#1 ('a'): token_sha256: must be 64"),
        (edges({"name": "a", "token_sha256": HASH[:-1]}), "token_sha256: must be 64 lowercase hex"),
        (edges({"name": "", "token_sha256": HASH}), "#1 (''): name: must be 1..64 characters"),
        (edges({"name": "x" * 65, "token_sha256": HASH}), "name: must be 1..64 characters"),
        (edges({"name": "a b", "token_sha256": HASH}), "name: must be 1..64"),
        (edges({"name": "../x", "token_sha256": HASH}), "name: must be 1..64"),
        (edges({"name": "ok\n", "token_sha256": HASH}), "name: must be 1..64"),
        (edges({"name": 5, "token_sha256": HASH}), "[[edge]] #1: name: Input should be a valid string"),
        (edges({"name": "a", "cert_subject": "camera-2"}), "cert_subject: 'camera-2' is not a certificate"),
        (edges({"name": "a", "token": HASH}), "#1 ('a'): token: unknown key; allowed: name, token_sha256"),
        (f"[[edges]]\nname = 'a'\ntoken_sha256 = '{HASH}'\n", "edges: unknown key"),
        (
            edges({"name": "a", "token_sha256": HASH}, {"name": "a", "cert_subject": "CN=a"}),
            "edge name(s) a appear more than once",
        ),
        (
            edges({"name": "a", "token_sha256": HASH}, {"name": "b", "token_sha256": HASH}),
            "edges a and b have the same token_sha256",
        ),
        (
            edges({"name": "a", "cert_subject": "CN=x,O=y"}, {"name": "b", "cert_subject": "O=y,CN=x"}),
            "edges a and b have the same cert_subject",
        ),
        ("[[edge]\n", "not valid TOML"),
    ],
)
def test_edges_file_errors_name_the_file_and_entry(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "edges.toml"
    path.write_text(toml)
    with pytest.raises(TrustError) as caught:
        trust.load_edges(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_unreadable_edges_file(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match=re.escape(f"cannot read the edges file {tmp_path / 'none.toml'}: ")):
        trust.load_edges(tmp_path / "none.toml")
    (tmp_path / "latin1.toml").write_bytes(b"name = '\xe9'\n")
    with pytest.raises(TrustError, match="not UTF-8"):
        trust.load_edges(tmp_path / "latin1.toml")


def test_edges_line_is_a_loadable_entry_without_the_token(tmp_path: Path) -> None:
    token = trust.new_token()
    snippet = trust.edges_line("camera-7", token)
    assert token not in snippet and trust.token_hash(token) in snippet
    path = tmp_path / "edges.toml"
    path.write_text('[[edge]]\nname = "camera-2"\ncert_subject = "CN=camera-2"\n\n' + snippet)
    registry = trust.load_edges(path)
    assert registry.names == ("camera-2", "camera-7")
    assert registry.identify(token, None) == "camera-7"
    with pytest.raises(TrustError, match="bad edge name 'camera 7'"):
        trust.edges_line("camera 7", token)
