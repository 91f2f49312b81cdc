"""Coordinated checkpoints of a split run: kill the cloud, the edge or both, and the run ends with the same model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgepipe.launch import edge_command, run_edge, start_cloud, stop
from pipeline.checkpoint import count_lines
from pipeline.checkpoints import PAUSE_ENV, CheckpointStore
from tests.conftest import SMALL_TOML
from tests.run_files import equal_models, metrics_lines, run_summary

ROOT = Path(__file__).resolve().parent.parent

#: 6 epochs of 12 steps, stochastic int8 gradients both ways, the edge head frozen from step 4
#: on, a checkpoint every 3 steps; a lost cloud is waited for up to a minute.
CONFIG = SMALL_TOML.format(edge_head=1).replace("epochs = 1", "epochs = 6") + """
[link]
gradients = "int8-sr"
reconnect_seconds = 60

[skip]
policy = "manual"
stop_layers = [0]
stop_steps = [4]

[checkpoint]
every_steps = 3
"""
#: 72 step lines and 6 evaluation lines.
LINES = 78


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[Any], what: str, log: Path) -> None:
    """Poll ``condition`` until it holds; fail if ``process`` exits first or 90 s pass."""
    deadline = time.monotonic() + 90
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"exited ({process.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.002)  # poll interval only: the loop waits for the condition


class Clouds:
    """Cloud servers on loopback, each started with a --state-dir; all stopped at the end."""

    def __init__(self, config: Path, logs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.config, self.logs, self.monkeypatch = config, logs, monkeypatch
        self.started: list[subprocess.Popen[str]] = []

    def start(
        self, state_dir: Path, listen: str = "127.0.0.1:0", pause: Path | None = None
    ) -> tuple[subprocess.Popen[str], str]:
        """A cloud keeping its checkpoints in ``state_dir``; with ``pause`` its checkpoint writes stop there."""
        log = self.logs / f"cloud-{len(self.started)}.log"
        with self.monkeypatch.context() as env:
            if pause is None:
                env.delenv(PAUSE_ENV, raising=False)
            else:
                pause.mkdir()
                env.setenv(PAUSE_ENV, str(pause))
            cloud, address = start_cloud(self.config, stderr=log, cwd=ROOT,
                                         extra=["--listen", listen, "--state-dir", str(state_dir)])
        self.started.append(cloud)
        return cloud, address

    def stop_all(self) -> None:
        for cloud in self.started:
            stop(cloud)


class Edge:
    """An ``edgepipe-edge --cloud`` process training into one run directory."""

    def __init__(
        self, config: Path, cloud: str, run_dir: Path, logs: Path, *flags: str, pause: Path | None = None
    ) -> None:
        env = {key: value for key, value in os.environ.items() if key != PAUSE_ENV}
        if pause is not None:
            pause.mkdir()
            env[PAUSE_ENV] = str(pause)
        self.run_dir = run_dir
        self.log = logs / f"edge-{time.monotonic_ns()}.log"
        command = edge_command(config, cloud=cloud, run_dir=run_dir, progress=False, extra=flags)
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_for_lines(self, lines: int) -> None:
        _wait_for(lambda: count_lines(self.run_dir / "metrics.jsonl") >= lines, self.process,
                  f"{lines} metrics lines", self.log)

    def wait_for_output(self, text: str) -> None:
        _wait_for(lambda: text in self.log.read_text(), self.process, repr(text), self.log)

    def kill(self) -> None:
        self.process.kill()
        assert self.process.wait(timeout=60) == -signal.SIGKILL

    def finish(self) -> int:
        return self.process.wait(timeout=240)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def clouds(tmp_path: Path, config_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clouds]:
    started = Clouds(config_path, tmp_path, monkeypatch)
    yield started
    started.stop_all()


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted split run, as processes."""
    work = tmp_path_factory.mktemp("reference")
    cloud, address = start_cloud(config_path, stderr=work / "cloud.log", cwd=ROOT,
                                 extra=["--state-dir", str(work / "state")])
    try:
        command = edge_command(config_path, cloud=address, run_dir=work / "run", progress=False)
        assert run_edge(command, log=work / "edge.log", timeout=240, cwd=ROOT) == 0, (work / "edge.log").read_text()
    finally:
        stop(cloud)
    assert run_summary(work / "run")["freeze_events"] == [{"step": 4, "boundary": 1}]
    return work / "run"


def _same_run(run_dir: Path, reference: Path) -> None:
    assert equal_models(run_dir, reference)
    assert metrics_lines(run_dir) == metrics_lines(reference) and len(metrics_lines(run_dir)) == LINES
    summary = run_summary(run_dir)
    assert summary["status"] == "completed" and summary["freeze_events"] == run_summary(reference)["freeze_events"]


def test_the_edge_reconnects_to_a_restarted_cloud(
    config_path: Path, reference: Path, clouds: Clouds, tmp_path: Path
) -> None:
    state, run_dir = tmp_path / "state", tmp_path / "run"
    cloud, address = clouds.start(state)
    edge = Edge(config_path, address, run_dir, tmp_path)
    edge.wait_for_lines(20)
    cloud.kill()
    edge.wait_for_output(f"lost the cloud at {address}")
    # The next cloud stops in its first checkpoint write and is killed there.
    pause = tmp_path / "cloud-pause"
    cloud, _ = clouds.start(state, listen=address, pause=pause)
    _wait_for(lambda: any(pause.glob("paused-*")), edge.process, "the cloud's checkpoint write", edge.log)
    cloud.kill()
    clouds.start(state, listen=address)
    assert edge.finish() == 0, edge.output()
    assert edge.output().count("reconnected to") >= 2
    _same_run(run_dir, reference)


def test_a_killed_edge_resumes_against_the_running_cloud(
    config_path: Path, reference: Path, clouds: Clouds, tmp_path: Path
) -> None:
    _, address = clouds.start(tmp_path / "state")
    run_dir = tmp_path / "run"
    edge = Edge(config_path, address, run_dir, tmp_path)
    edge.wait_for_lines(30)
    edge.kill()
    again = Edge(config_path, address, run_dir, tmp_path, "--resume")
    assert again.finish() == 0, again.output()
    assert "its latest checkpoint" in again.output()
    _same_run(run_dir, reference)


def test_killed_edges_and_clouds_resume_from_what_both_committed(
    config_path: Path, reference: Path, clouds: Clouds, tmp_path: Path
) -> None:
    state, run_dir = tmp_path / "state", tmp_path / "run"
    store = CheckpointStore(run_dir / "checkpoints")
    cloud, address = clouds.start(state)
    # Killed in its first checkpoint write: the cloud holds step 2, the edge nothing; the run starts over.
    first = Edge(config_path, address, run_dir, tmp_path, pause=tmp_path / "pause-1")
    _wait_for(lambda: any((tmp_path / "pause-1").glob("paused-*-2")), first.process, "the edge's first save", first.log)
    first.kill()
    assert store.steps() == []
    second = Edge(config_path, address, run_dir, tmp_path, "--resume")
    second.wait_for_lines(25)
    second.kill()
    assert "from the start: it has no checkpoint yet" in second.output()
    committed = store.latest()
    # Both killed while the edge saves a step the cloud has already saved: that step is not committed.
    third = Edge(config_path, address, run_dir, tmp_path, "--resume", pause=tmp_path / "pause-3")
    _wait_for(lambda: any((tmp_path / "pause-3").glob("paused-*")), third.process, "the edge's save", third.log)
    third.kill()
    cloud.kill()
    assert store.latest() == committed
    _, address = clouds.start(state)
    last = Edge(config_path, address, run_dir, tmp_path, "--resume")
    assert last.finish() == 0, last.output()
    assert f"after step {committed}, its latest checkpoint" in last.output()
    _same_run(run_dir, reference)


def test_a_resume_the_cloud_cannot_serve_is_refused_in_one_line(
    config_path: Path, clouds: Clouds, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cloud, address = clouds.start(tmp_path / "state")
    edge = Edge(config_path, address, run_dir, tmp_path)
    edge.wait_for_lines(20)
    edge.kill()
    cloud.kill()
    run_id = json.loads((run_dir / "checkpoints" / "run.json").read_text())["run_id"]

    changed = tmp_path / "changed.toml"
    changed.write_text(CONFIG.replace('gradients = "int8-sr"', 'gradients = "int8"'), encoding="utf-8")
    refused = Edge(changed, address, run_dir, tmp_path, "--resume")
    assert refused.finish() == 2
    assert "link.gradients: saved 'int8-sr', now 'int8'" in refused.output()

    # A cloud that lost its state directory holds nothing of the run.
    _, address = clouds.start(tmp_path / "empty-state")
    lost = Edge(config_path, address, run_dir, tmp_path, "--resume")
    assert lost.finish() == 1
    assert f"no checkpoints of run {run_id}" in lost.output()
    summary = run_summary(run_dir)
    assert summary["status"] == "failed" and f"no checkpoints of run {run_id}" in summary["reason"]


def test_a_cloud_without_a_state_directory_trains_but_the_run_cannot_resume(config_path: Path, tmp_path: Path) -> None:
    cloud, address = start_cloud(config_path, stderr=tmp_path / "cloud.log", cwd=ROOT)
    try:
        command = edge_command(config_path, cloud=address, run_dir=tmp_path / "run", progress=False)
        assert run_edge(command, log=tmp_path / "edge.log", timeout=240, cwd=ROOT) == 0
    finally:
        stop(cloud)
    log = (tmp_path / "edge.log").read_text()
    assert log.count("this run cannot be resumed") == 1, log
    summary = run_summary(tmp_path / "run")
    assert summary["status"] == "completed" and summary["checkpoints"] == 0


def test_reconnect_seconds_zero_gives_up_when_the_cloud_is_lost(clouds: Clouds, tmp_path: Path) -> None:
    config = tmp_path / "no-reconnect.toml"
    config.write_text(CONFIG.replace("reconnect_seconds = 60", "reconnect_seconds = 0"), encoding="utf-8")
    cloud, address = clouds.start(tmp_path / "state")
    edge = Edge(config, address, tmp_path / "run", tmp_path)
    edge.wait_for_lines(10)
    cloud.kill()
    assert edge.finish() == 1
    assert "reconnecting" not in edge.output()
    summary = run_summary(tmp_path / "run")
    assert summary["status"] == "failed" and address in summary["reason"]
