"""Shared fixtures: configurations and real gRPC cloud servers on 127.0.0.1."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from concurrent import futures

import grpc

from cloud_node.servicer import CloudServicer, serve
from protos import edgepipe_pb2_grpc as pb_grpc
from pipeline.blueprint import Blueprint
from pipeline.config import Config, parse_config


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
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_CloudServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for server in servers:
        server.stop(None)
