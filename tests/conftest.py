"""Shared fixtures: configurations and real gRPC cloud servers on 127.0.0.1."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from cloud_node.servicer import serve
from pipeline.config import Config, parse_config


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
