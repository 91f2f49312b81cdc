"""The edge over TLS, mutual TLS and with a token, against real gRPC servers on 127.0.0.1."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
import trustme

from cloud_node.servicer import CloudServicer
from edge_node.link import LinkError, LinkSecurity
from edge_node.worker import train
from edgepipe.edge_cli import TOKEN_ENV
from edgepipe.edge_cli import main as edge_main
from pipeline import trust
from pipeline.blueprint import Blueprint
from pipeline.config import Config
from pipeline.trust import TrustError
from protos import edgepipe_pb2_grpc as pb_grpc
from tests.conftest import SMALL_TOML, make_config

SERVER_NAME = "cloud.test"
#: Generous: a refused handshake ends the wait at once, this only bounds a broken test.
CONNECT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Pki:
    """The CA of the cloud and the edges, their certificates, and a stranger CA."""

    ca: Path
    cloud_cert: Path
    cloud_key: Path
    edge_cert: Path
    edge_key: Path
    stranger_ca: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    pki = Pki(*(directory / name for name in ("ca.crt", "cloud.crt", "cloud.key", "edge.crt", "edge.key",
                                              "stranger.crt")))
    ca.cert_pem.write_to_path(str(pki.ca))
    stranger.cert_pem.write_to_path(str(pki.stranger_ca))
    cloud = ca.issue_cert(SERVER_NAME)
    cloud.cert_chain_pems[0].write_to_path(str(pki.cloud_cert))
    cloud.private_key_pem.write_to_path(str(pki.cloud_key))
    edge = ca.issue_cert("camera-2.test", common_name="camera-2")
    edge.cert_chain_pems[0].write_to_path(str(pki.edge_cert))
    edge.private_key_pem.write_to_path(str(pki.edge_key))
    return pki


@pytest.fixture
def tls_cloud(pki: Pki) -> Iterator[Callable[[Config, Path | None], str]]:
    """Start real cloud servicers behind TLS (mutual TLS with ``client_ca``) on 127.0.0.1; their addresses."""
    servers = []

    def start(config: Config, client_ca: Path | None = None) -> str:
        servicer = CloudServicer(Blueprint(config))
        limit = servicer.message_limit
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
        )
        pb_grpc.add_CloudServicer_to_server(servicer, server)
        port = server.add_secure_port(
            "127.0.0.1:0", trust.server_credentials(pki.cloud_cert, pki.cloud_key, client_ca)
        )
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


@dataclass
class Doorman:
    """A loopback server whose Open records the caller's ``authorization`` headers and refuses it."""

    address: str
    seen: list[list[str]]


@pytest.fixture
def doorman(pki: Pki) -> Iterator[Callable[..., Doorman]]:
    servers = []

    def start(tls: bool, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED, details: str = "unknown edge",
              ) -> Doorman:
        seen: list[list[str]] = []

        def open_(request: bytes, context: grpc.ServicerContext) -> bytes:
            seen.append([value for key, value in context.invocation_metadata() if key == "authorization"])
            context.abort(code, details)

        handler = grpc.method_handlers_generic_handler(
            "edgepipe.v1.Cloud", {"Open": grpc.unary_unary_rpc_method_handler(open_)}
        )
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(handler,))
        if tls:
            port = server.add_secure_port("127.0.0.1:0", trust.server_credentials(pki.cloud_cert, pki.cloud_key))
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return Doorman(f"127.0.0.1:{port}", seen)

    yield start
    for server in servers:
        server.stop(None)


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(SMALL_TOML.format(edge_head=1), encoding="utf-8")
    return path


# -- TLS and mutual TLS, through edge_node.worker.train --------------------------------------


def test_an_edge_trains_over_tls_bit_identical_to_local(
    tls_cloud: Callable[..., str], pki: Pki, tmp_path: Path
) -> None:
    config = make_config()
    address = tls_cloud(config)
    security = LinkSecurity(ca=pki.ca, server_name=SERVER_NAME)
    summary = train(config, run_dir=tmp_path / "tls", cloud=address, max_steps=2, security=security,
                    connect_timeout=CONNECT_TIMEOUT)
    train(config, run_dir=tmp_path / "local", max_steps=2)
    assert summary["mode"] == "split" and summary["steps"] == 2
    assert summary["traffic"]["uplink_bytes"] > 0
    tls, local = _state(tmp_path / "tls"), _state(tmp_path / "local")
    assert tls.keys() == local.keys()
    assert all(torch.equal(tls[name], local[name]) for name in local)


@pytest.mark.parametrize(
    ("ca", "server_name", "reason"),
    [
        ("stranger_ca", SERVER_NAME, "CERTIFICATE_VERIFY_FAILED"),
        ("ca", None, "Hostname Verification"),
    ],
    ids=["wrong-ca", "wrong-name"],
)
def test_a_cloud_the_edge_cannot_verify_is_refused_at_once(
    tls_cloud: Callable[..., str], pki: Pki, tmp_path: Path, ca: str, server_name: str | None, reason: str
) -> None:
    config = make_config()
    address = tls_cloud(config)
    security = LinkSecurity(ca=getattr(pki, ca), server_name=server_name)
    started = time.monotonic()
    with pytest.raises(LinkError) as caught:
        train(config, run_dir=tmp_path / "run", cloud=address, max_steps=2, security=security,
              connect_timeout=CONNECT_TIMEOUT)
    message = str(caught.value)
    assert time.monotonic() - started < CONNECT_TIMEOUT / 2, "waited for --connect-timeout instead of failing"
    assert message.startswith(f"TLS with the cloud at {address} failed")
    assert reason in message and "--tls-ca" in message and "\n" not in message


def test_an_edge_trains_over_mutual_tls(tls_cloud: Callable[..., str], pki: Pki, tmp_path: Path) -> None:
    config = make_config()
    address = tls_cloud(config, pki.ca)
    security = LinkSecurity(ca=pki.ca, cert=pki.edge_cert, key=pki.edge_key, server_name=SERVER_NAME)
    summary = train(config, run_dir=tmp_path / "run", cloud=address, max_steps=2, security=security,
                    connect_timeout=CONNECT_TIMEOUT)
    assert summary["steps"] == 2


def test_mutual_tls_without_a_client_certificate_is_refused_at_once(
    tls_cloud: Callable[..., str], pki: Pki, tmp_path: Path
) -> None:
    config = make_config()
    address = tls_cloud(config, pki.ca)
    started = time.monotonic()
    with pytest.raises(LinkError, match="--tls-cert/--tls-key") as caught:
        train(config, run_dir=tmp_path / "run", cloud=address, max_steps=2,
              security=LinkSecurity(ca=pki.ca, server_name=SERVER_NAME), connect_timeout=CONNECT_TIMEOUT)
    assert time.monotonic() - started < CONNECT_TIMEOUT / 2
    assert "\n" not in str(caught.value)


# -- what the edge refuses before it connects ------------------------------------------------


@pytest.mark.parametrize(
    ("address", "security", "refusal"),
    [
        ("10.0.0.1:5", LinkSecurity(), "refusing to talk to 10.0.0.1 in clear text"),
        ("cloud.example:5", LinkSecurity(), "refusing to talk to cloud.example in clear text"),
        ("10.0.0.1:5", LinkSecurity(token="t", insecure=True), "refusing to send the edge token in clear text"),
        ("10.0.0.1:5", LinkSecurity(ca=Path("ca.crt"), insecure=True), "--insecure turns TLS off"),
        ("127.0.0.1:5", LinkSecurity(server_name=SERVER_NAME), "--tls-server-name only applies to TLS"),
    ],
)
def test_link_security_refusals(address: str, security: LinkSecurity, refusal: str) -> None:
    with pytest.raises(TrustError, match=refusal):
        security.check(address)


@pytest.mark.parametrize(
    ("address", "security"),
    [
        ("127.0.0.1:5", LinkSecurity()),
        ("[::1]:5", LinkSecurity(token="t")),
        ("localhost:5", LinkSecurity(token="t")),
        ("10.0.0.1:5", LinkSecurity(insecure=True)),
        ("cloud.example:5", LinkSecurity(ca=Path("ca.crt"), token="t")),
    ],
)
def test_link_security_allows(address: str, security: LinkSecurity) -> None:
    security.check(address)  # raises when refused; connects nowhere


@pytest.mark.parametrize(
    ("flags", "env_token", "refusal"),
    [
        ([], None, "refusing to talk to 10.0.0.1 in clear text"),
        (["--insecure"], "a-token", "refusing to send the edge token in clear text to 10.0.0.1"),
    ],
)
def test_the_edge_cli_refuses_clear_text_to_another_machine_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    flags: list[str], env_token: str | None, refusal: str,
) -> None:
    if env_token is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, env_token)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    code = edge_main(["--config", str(_config_file(tmp_path)), "--cloud", "10.0.0.1:5", "--run-dir", str(run_dir),
                      "--connect-timeout", str(CONNECT_TIMEOUT), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert refusal in err and err.count("\n") == 1
    assert time.monotonic() - started < CONNECT_TIMEOUT / 2
    assert not run_dir.exists(), "training started: the refusal came too late"


@pytest.mark.parametrize(("content", "problem"), [(None, "cannot read the token file"), (" \n", "is empty")])
def test_an_unusable_token_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, problem: str
) -> None:
    token_file = tmp_path / "edge.token"
    if content is not None:
        token_file.write_text(content, encoding="utf-8")
    run_dir = tmp_path / "run"
    code = edge_main(["--config", str(_config_file(tmp_path)), "--cloud", "127.0.0.1:5", "--run-dir", str(run_dir),
                      "--token-file", str(token_file), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert problem in err and str(token_file) in err and "--token-file" in err and err.count("\n") == 1
    assert not run_dir.exists()


def test_an_unreadable_ca_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.crt"
    code = edge_main(["--config", str(_config_file(tmp_path)), "--cloud", "127.0.0.1:5", "--run-dir",
                      str(tmp_path / "run"), "--tls-ca", str(missing), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot read the certificate file {missing} (--tls-ca)" in err and err.count("\n") == 1


# -- the token on the wire -------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["loopback", "tls"])
@pytest.mark.parametrize(
    ("file_token", "env_token", "sent"),
    [("  from-file\n", "from-env", "from-file"), (None, " from-env ", "from-env"), (None, None, None)],
    ids=["file-wins", "env", "none"],
)
def test_the_edge_sends_its_token_and_says_what_to_check_when_refused(
    doorman: Callable[..., Doorman], pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, tls: bool, file_token: str | None, env_token: str | None, sent: str | None,
) -> None:
    cloud = doorman(tls)
    flags = ["--tls-ca", str(pki.ca), "--tls-server-name", SERVER_NAME] if tls else []
    if file_token is not None:
        (tmp_path / "edge.token").write_text(file_token, encoding="utf-8")
        flags += ["--token-file", str(tmp_path / "edge.token")]
    if env_token is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, env_token)

    code = edge_main(["--config", str(_config_file(tmp_path)), "--cloud", cloud.address, "--run-dir",
                      str(tmp_path / "run"), "--connect-timeout", str(CONNECT_TIMEOUT), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 1
    assert cloud.seen == [[] if sent is None else [f"Bearer {sent}"]]
    assert "refused this edge (UNAUTHENTICATED: unknown edge)" in err
    assert "check --token-file / EDGEPIPE_TOKEN and the cloud's edges file" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "refused this edge (PERMISSION_DENIED: no); check --token-file"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "is full (no); try again later, or serve more edges at once"),
    ],
)
def test_a_refusal_says_what_to_do(
    doorman: Callable[..., Doorman], tmp_path: Path, code: grpc.StatusCode, expected: str
) -> None:
    cloud = doorman(False, code, "no")
    with pytest.raises(LinkError) as caught:
        train(make_config(), run_dir=tmp_path / "run", cloud=cloud.address, max_steps=1,
              connect_timeout=CONNECT_TIMEOUT)
    assert str(caught.value).startswith(f"the cloud at {cloud.address} {expected}")
    assert caught.value.code == code and "\n" not in str(caught.value)
