"""The edge's checkpoints and --resume, on --local runs: killed anywhere, a run resumes to the same model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_node.link import LinkError
from edge_node.recovery import RunDirError
from edge_node.worker import train
from edgepipe.edge_cli import main as edge_main
from edgepipe.launch import edge_command
from pipeline.checkpoint import count_lines
from pipeline.checkpoints import PAUSE_ENV, CheckpointStore
from pipeline.config import Config, load_config
from tests.conftest import SMALL_TOML, make_config
from tests.run_files import equal_models, metrics_lines, run_summary

ROOT = Path(__file__).resolve().parent.parent

#: 8 epochs of 12 steps, a checkpoint every 3 steps, the edge head frozen from step 4 on.
CONFIG = SMALL_TOML.format(edge_head=1).replace("epochs = 1", "epochs = 8") + """
[skip]
policy = "manual"
stop_layers = [0]
stop_steps = [4]

[checkpoint]
every_steps = 3
"""
#: 96 step lines and 8 evaluation lines.
LINES = 104


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "checkpoints" / "run.json").read_text())["run_id"]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in this process with one torch thread like the edge processes."""
    run_dir = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(config_path), run_dir=run_dir)
    finally:
        torch.set_num_threads(threads)
    assert run_summary(run_dir)["freeze_events"] == [{"step": 4, "boundary": 1}]
    return run_dir


class Edge:
    """An ``edgepipe-edge --local`` process training into one run directory."""

    def __init__(self, config: Path, run_dir: Path, tmp_path: Path, *flags: str, pause: Path | None = None) -> None:
        env = {key: value for key, value in os.environ.items() if key != PAUSE_ENV}
        if pause is not None:
            pause.mkdir()
            env[PAUSE_ENV] = str(pause)
        self.run_dir = run_dir
        self.log = tmp_path / f"edge-{time.monotonic_ns()}.log"
        command = edge_command(config, cloud=None, run_dir=run_dir, progress=False, extra=flags)
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Poll ``condition`` until it holds; fail if the edge exits first or 60 s pass."""
        deadline = time.monotonic() + 60
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the edge exited ({self.process.returncode}) before {what}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.002)  # poll interval only: the loop waits for the condition

    def wait_for_lines(self, lines: int) -> None:
        self.wait_for(lambda: count_lines(self.run_dir / "metrics.jsonl") >= lines, f"{lines} metrics lines")

    def kill(self, signum: int = signal.SIGKILL) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=60)

    def finish(self) -> int:
        return self.process.wait(timeout=120)

    def output(self) -> str:
        return self.log.read_text()


def test_a_local_run_killed_anywhere_resumes_to_the_same_model(
    config_path: Path, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    store = CheckpointStore(run_dir / "checkpoints")

    # Killed while writing its first checkpoint (step 2): there is none, the run starts over.
    first = Edge(config_path, run_dir, tmp_path, pause=tmp_path / "pause-1")
    first.wait_for(lambda: any((tmp_path / "pause-1").glob(f"paused-{first.process.pid}-2")), "the first checkpoint")
    assert first.kill() == -signal.SIGKILL
    run_id = _run_id(run_dir)
    assert store.steps() == [] and count_lines(run_dir / "metrics.jsonl") == 3

    # Killed at some later step, with checkpoints behind it.
    second = Edge(config_path, run_dir, tmp_path, "--resume")
    second.wait_for_lines(40)
    assert second.kill() == -signal.SIGKILL
    assert "from the start: it has no checkpoint yet" in second.output()
    assert store.latest() is not None

    # Stopped by SIGTERM: the summary says so.
    third = Edge(config_path, run_dir, tmp_path, "--resume")
    third.wait_for_lines(70)
    assert third.kill(signal.SIGTERM) == 130
    interrupted = run_summary(run_dir)
    assert interrupted["status"] == "interrupted" and interrupted["run_id"] == run_id
    committed = store.latest()

    # Killed while writing a checkpoint after the one it resumed from: that one stays the latest.
    pause = tmp_path / "pause-2"
    fourth = Edge(config_path, run_dir, tmp_path, "--resume", pause=pause)
    fourth.wait_for(lambda: any(pause.glob(f"paused-{fourth.process.pid}-*")), "a checkpoint after the resume")
    assert fourth.kill() == -signal.SIGKILL
    paused_at = int(next(pause.glob("paused-*")).name.rsplit("-", 1)[1])
    assert paused_at > committed and store.latest() == committed
    assert f"after step {committed}, its latest checkpoint" in fourth.output()

    last = Edge(config_path, run_dir, tmp_path, "--resume")
    assert last.finish() == 0, last.output()
    assert equal_models(run_dir, reference)
    assert metrics_lines(run_dir) == metrics_lines(reference) and len(metrics_lines(run_dir)) == LINES
    summary = run_summary(run_dir)
    assert summary["status"] == "completed" and summary["run_id"] == run_id and "reason" not in summary
    assert summary["freeze_events"] == run_summary(reference)["freeze_events"]
    assert summary["steps"] == 96 and summary["checkpoints"] == run_summary(reference)["checkpoints"]


POLICIES = {
    "cac-auto": ({"policy": "cac-auto", "start_step": 1, "samples": 1, "start_thr": 0.9999, "slope_thr": 0.9999},
                 {"lr": 0.001, "weight_decay": 0.5}),
    "lars": ({"policy": "lars", "alpha": 2.0}, {}),
    "norm-ema": ({"policy": "norm-ema", "alpha": 0.9, "shift": 1}, {}),
    "schedule": ({"policy": "schedule", "schedule": "linear", "c1": 2}, {}),
}


def _interrupt_after(step: int) -> Callable[[Any], None]:
    def on_step(report: Any) -> None:
        if report.step == step:
            raise KeyboardInterrupt

    return on_step


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_resumes_its_decisions(policy: str, tmp_path: Path) -> None:
    skip, train_keys = POLICIES[policy]
    config = make_config(skip=skip, train={"epochs": 4, **train_keys}, checkpoint={"every_steps": 5})
    reference = train(config, run_dir=tmp_path / "reference")
    assert reference["freeze_events"], "the policy must freeze something for the test to mean anything"
    # Step 31 is past two epoch ends and a freeze; the checkpoint of step 29 is taken, 30 and 31 are redone.
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir=tmp_path / "run", on_step=_interrupt_after(31))
    assert run_summary(tmp_path / "run")["status"] == "interrupted"
    messages: list[str] = []
    resumed = train(config, run_dir=tmp_path / "run", resume=True, on_link=messages.append)
    assert messages == [f"resuming run {resumed['run_id']} after step 29, its latest checkpoint"]
    assert resumed["freeze_events"] == reference["freeze_events"]
    assert equal_models(tmp_path / "run", tmp_path / "reference")
    assert metrics_lines(tmp_path / "run") == metrics_lines(tmp_path / "reference")


def _interrupted_run(config: Config, run_dir: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir=run_dir, on_step=_interrupt_after(7))


def test_a_resume_with_another_configuration_or_length_is_refused(tmp_path: Path) -> None:
    config = make_config(checkpoint={"every_steps": 3})
    run_dir = tmp_path / "run"
    _interrupted_run(config, run_dir)
    before = (run_dir / "metrics.jsonl").read_bytes()
    refusals = [
        (dict(config=make_config(checkpoint={"every_steps": 3}, train={"lr": 0.1})), "train.lr: saved 0.05, now 0.1"),
        (dict(config=config, max_steps=5), "total_steps: saved 12, now 5"),
        (dict(config=config, cloud="127.0.0.1:1"), "holds a local run: resume it with --local"),
    ]
    for kwargs, named in refusals:
        with pytest.raises(RunDirError) as info:
            train(run_dir=run_dir, resume=True, **kwargs)
        assert named in str(info.value) and "\n" not in str(info.value)
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    # A changed reconnect budget is the edge's own business.
    train(make_config(checkpoint={"every_steps": 3}, link={"reconnect_seconds": 5}), run_dir=run_dir, resume=True)
    with pytest.raises(RunDirError, match="completed; nothing to resume"):
        train(config, run_dir=run_dir, resume=True)
    with pytest.raises(RunDirError, match="nothing to resume in"):
        train(config, run_dir=tmp_path / "empty", resume=True)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_new_run_into_a_run_directory_is_refused_and_overwrite_replaces_it(
    config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    flags = ["--config", str(config_path), "--local", "--run-dir", str(run_dir), "--no-progress", "--threads", "1",
             "--max-steps", "8"]
    assert edge_main(flags) == 0
    old_id, old_metrics = _run_id(run_dir), (run_dir / "metrics.jsonl").read_bytes()
    (run_dir / "trace.json").write_text("{}")
    capsys.readouterr()

    assert edge_main(flags) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{run_dir} holds another run (completed after 8 steps)" in line
    assert "--resume" in line and "--overwrite" in line
    assert (run_dir / "metrics.jsonl").read_bytes() == old_metrics and _run_id(run_dir) == old_id

    assert edge_main([*flags, "--overwrite", "--max-steps", "4"]) == 0
    assert not (run_dir / "trace.json").exists()
    assert _run_id(run_dir) != old_id and run_summary(run_dir)["run_id"] == _run_id(run_dir)
    assert [r["step"] for r in metrics_lines(run_dir) if "step" in r] == [0, 1, 2, 3]
    assert CheckpointStore(run_dir / "checkpoints").steps() == [2], "the old run's checkpoints must be gone"

    with pytest.raises(SystemExit):
        edge_main([*flags, "--overwrite", "--resume"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_failed_run_says_why_and_keeps_its_directory(tmp_path: Path) -> None:
    config = make_config(checkpoint={"every_steps": 3})
    run_dir = tmp_path / "run"
    with pytest.raises(LinkError):
        train(config, run_dir=run_dir, cloud="127.0.0.1:1", connect_timeout=0.5)
    failed = run_summary(run_dir)
    assert failed["status"] == "failed" and "cannot reach the cloud at 127.0.0.1:1" in failed["reason"]
    assert failed["steps"] == 0 and failed["run_id"] == _run_id(run_dir)
    with pytest.raises(RunDirError, match="holds another run"):
        train(config, run_dir=run_dir, cloud="127.0.0.1:1", connect_timeout=0.5)
