"""edgepipe.launch: the cloud server and an edge worker as real processes, as the scripts start them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edgepipe.launch import LaunchError, edge_command, run_edge, start_cloud, stop
from tests.conftest import SMALL_TOML


def test_a_cloud_and_an_edge_train_and_stop(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(SMALL_TOML.format(edge_head=1), encoding="utf-8")
    cloud, address = start_cloud(config, stderr=tmp_path / "cloud.log", timeout=60)
    try:
        assert address.startswith("127.0.0.1:")
        command = edge_command(config, cloud=address, run_dir=tmp_path / "run", max_steps=2, progress=False)
        assert run_edge(command, log=tmp_path / "edge.log", timeout=120) == 0, (tmp_path / "edge.log").read_text()
    finally:
        code = stop(cloud)
    assert code == 0
    assert cloud.poll() == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["mode"] == "split" and summary["steps"] == 2


def test_a_cloud_that_does_not_start_raises_with_its_log(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[partition]\nchunkz = 4\n", encoding="utf-8")
    with pytest.raises(LaunchError, match="did not start") as info:
        start_cloud(config, stderr=tmp_path / "cloud.log", timeout=60)
    assert "chunkz" in str(info.value)


def test_an_edge_past_its_time_is_stopped(tmp_path: Path) -> None:
    log = tmp_path / "edge.log"
    # A worker that never finishes: it waits on an event nobody sets.
    stuck = [sys.executable, "-c", "print('working', flush=True); import threading; threading.Event().wait()"]
    with pytest.raises(LaunchError, match="ran past"):
        run_edge(stuck, log=log, timeout=3)
    assert "working" in log.read_text()


def test_edge_command_names_where_the_cloud_is() -> None:
    local = edge_command("c.toml", cloud=None, run_dir="r", threads=2, epochs=3, name="e1", extra=["--x"])
    assert local[1:3] == ["-m", "edgepipe.edge_cli"]
    assert local[3:] == ["--config", "c.toml", "--local", "--run-dir", "r", "--threads", "2", "--name", "e1",
                         "--epochs", "3", "--x"]
    split = edge_command("c.toml", cloud="127.0.0.1:5", run_dir="r", max_steps=4, progress=False)
    assert split[3:] == ["--config", "c.toml", "--cloud", "127.0.0.1:5", "--run-dir", "r", "--threads", "1",
                         "--no-progress", "--max-steps", "4"]
