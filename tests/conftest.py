"""Shared fixtures: configurations, real gRPC cloud servers on 127.0.0.1, certificates and edge tokens."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import trustme

from cloud_node.server import start_server
from cloud_node.servicer import CloudServicer, serve
from pipeline import trust
from pipeline.blueprint import Blueprint
from pipeline.config import Config, parse_config
from tests.run_dirs import trained_run

#: The name in the test cloud's certificate; clients dial 127.0.0.1 and check this name instead.
CLOUD_NAME = "cloud.test"


#: The same small configuration as a TOML file, for command-line tests (``{edge_head}`` to fill).
SMALL_TOML = """
[model]
name = "tinycnn"
input_shape = [1, 8, 8]
num_classes = 10
seed = 0

[partition]
edge_head = {edge_head}
edge_tail = 1
chunks = 4

[train]
dataset = "synthetic"
batch_size = 32
epochs = 1
lr = 0.05
"""


def make_config(**sections: dict[str, Any]) -> Config:
    """A small, fast configuration (tinycnn on synthetic 8x8 data) with sections overridden."""
    data: dict[str, dict[str, Any]] = {
        "model": {"name": "tinycnn", "input_shape": [1, 8, 8], "num_classes": 10, "seed": 0},
        "partition": {"edge_head": 1, "edge_tail": 1, "chunks": 4},
        "train": {"dataset": "synthetic", "batch_size": 32, "epochs": 1, "lr": 0.05},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, "test config")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Edge and cloud share this process in tests: one torch thread each keeps them comparable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cloud() -> Iterator[Callable[[Config], str]]:
    """Start real cloud servers on 127.0.0.1 with a free port; returns their addresses."""
    servers = []

    def start(config: Config) -> str:
        server, port, _ = serve(config, "127.0.0.1:0")
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


@pytest.fixture
def cloud_server() -> Iterator[Callable[..., tuple[str, CloudServicer]]]:
    """Like ``cloud``, with serve()'s keywords (credentials, edges, max_sessions, ...); address and servicer."""
    servers = []

    def start(config: Config, **options: Any) -> tuple[str, CloudServicer]:
        server, port, servicer = serve(config, "127.0.0.1:0", **options)
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for server in servers:
        server.stop(None)


@dataclass(frozen=True)
class CloudPki:
    """A CA with the cloud's certificate and an edge's client certificate (CN=camera-2), and a stranger CA
    with a client certificate of the same name."""

    ca: Path
    cloud_cert: Path
    cloud_key: Path
    edge_cert: Path
    edge_key: Path
    stranger_ca: Path
    stranger_cert: Path
    stranger_key: Path

    def server_credentials(self, mutual: bool = False) -> Any:
        """TLS for the cloud; ``mutual``: edges must show a certificate of ``ca``."""
        return trust.server_credentials(self.cloud_cert, self.cloud_key, self.ca if mutual else None)


@pytest.fixture(scope="session")
def cloud_pki(tmp_path_factory: pytest.TempPathFactory) -> CloudPki:
    directory = tmp_path_factory.mktemp("cloud-pki")
    ca, stranger = trustme.CA(), trustme.CA()
    paths = CloudPki(*(directory / name for name in (
        "ca.crt", "cloud.crt", "cloud.key", "edge.crt", "edge.key", "stranger-ca.crt", "stranger.crt", "stranger.key",
    )))
    ca.cert_pem.write_to_path(str(paths.ca))
    stranger.cert_pem.write_to_path(str(paths.stranger_ca))
    for issuer, name, cert_path, key_path in (
        (ca, CLOUD_NAME, paths.cloud_cert, paths.cloud_key),
        (ca, "camera-2.test", paths.edge_cert, paths.edge_key),
        (stranger, "camera-2.test", paths.stranger_cert, paths.stranger_key),
    ):
        issued = issuer.issue_cert(name, common_name=name.removesuffix(".test"))
        issued.cert_chain_pems[0].write_to_path(str(cert_path))
        issued.private_key_pem.write_to_path(str(key_path))
    return paths


@dataclass(frozen=True)
class EdgeTokens:
    """Fresh tokens of the edges ``alice``, ``bob`` and ``mallory``, and the edges file that admits them
    (and ``camera-2`` by its certificate)."""

    tokens: dict[str, str]
    registry: trust.EdgeRegistry


@pytest.fixture(scope="session")
def edge_tokens() -> EdgeTokens:
    tokens = {name: trust.new_token() for name in ("alice", "bob", "mallory")}
    entries = [{"name": name, "token_sha256": trust.token_hash(token)} for name, token in tokens.items()]
    entries.append({"name": "camera-2", "cert_subject": "CN=camera-2"})
    return EdgeTokens(tokens, trust.parse_edges({"edge": entries}))


class RecordingServicer(CloudServicer):
    """The real servicer, keeping every step frame it receives and noting each it sends."""

    def __init__(self, config: Config) -> None:
        super().__init__(Blueprint(config))
        self.received: list = []
        self.sent: list[tuple[int, str]] = []

    def Step(self, request_iterator, context):
        def tap():
            for frame in request_iterator:
                self.received.append(frame)
                yield frame

        for frame in super().Step(tap(), context):
            self.sent.append((frame.step, frame.WhichOneof("body")))
            yield frame


@pytest.fixture
def recording_cloud() -> Iterator[Callable[[Config], tuple[str, RecordingServicer]]]:
    """Like ``cloud``, but the servicer records the step frames."""
    servers = []

    def start(config: Config) -> tuple[str, RecordingServicer]:
        servicer = RecordingServicer(config)
        server, port = start_server(servicer, "127.0.0.1:0")
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for server in servers:
        server.stop(None)


@pytest.fixture(scope="session")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished split run (tests.run_dirs), trained once per test session; copy it to change it."""
    return trained_run(tmp_path_factory, "split")


@pytest.fixture(scope="session")
def local_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished --local run of the same configuration."""
    return trained_run(tmp_path_factory, "local")
