"""Launch a cloud+edge pair as processes (as users do) on a config dict and read the run dir back."""
from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.report import Run, load_run

__all__ = ["RunResult", "SplitRunError", "boundary_timeline", "demo_config", "dump_toml", "run_split"]

ROOT = Path(__file__).resolve().parent.parent
_PREFIX = "edgepipe-cloud listening on "
_START_TIMEOUT = 120.0
_STOP_TIMEOUT = 15.0
MIB = float(1 << 20)


class SplitRunError(RuntimeError):
    """A node failed to start or the edge exited non-zero; the message holds the tail of its log."""


def demo_config() -> dict[str, Any]:
    """The demo's built-in configuration (``pipeline.demo.DEMO_CONFIG``) as nested dicts."""
    from pipeline.demo import DEMO_CONFIG

    return tomllib.loads(DEMO_CONFIG)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(config: Mapping[str, Mapping[str, Any]]) -> str:
    """Write a config of ``{section: {key: scalar or list}}`` as TOML (None values are left out)."""
    lines: list[str] = []
    for section, keys in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


@dataclass
class RunResult:
    """One finished run: its directory read back, plus the wall time the benchmark saw."""

    label: str
    run: Run
    wall_seconds: float

    @property
    def summary(self) -> dict[str, Any]:
        assert self.run.summary is not None
        return self.run.summary

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.run.steps

    def median_step_seconds(self) -> float:
        return statistics.median(r["step_seconds"] for r in self.steps)

    def kind_bytes(self, kind: str, direction: str) -> int:
        return int(self.summary["traffic"]["by_kind"][kind][f"{direction}_bytes"])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, wait, kill on timeout; never leaves the process running."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_cloud(config_path: Path, log: Path) -> tuple[subprocess.Popen[str], str]:
    with log.open("w", encoding="utf-8") as err:
        cloud = subprocess.Popen(
            [sys.executable, "-m", "cloud_node", "--config", str(config_path), "--listen", "127.0.0.1:0",
             "--threads", "1"],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
        )
    timer = threading.Timer(_START_TIMEOUT, cloud.kill)
    timer.start()
    try:
        line = cloud.stdout.readline() if cloud.stdout else ""
    except BaseException:
        _stop(cloud)
        raise
    finally:
        timer.cancel()
    if not line.startswith(_PREFIX):
        _stop(cloud)
        raise SplitRunError(f"the cloud server did not start (exit code {cloud.returncode}):\n{_tail(log)}")
    return cloud, line.removeprefix(_PREFIX).strip()


def run_split(
    config: Mapping[str, Mapping[str, Any]],
    *,
    label: str = "run",
    local: bool = False,
    keep_dir: Path | None = None,
    timeout: float = 3600.0,
) -> RunResult:
    """Train ``config`` split over loopback gRPC (or ``--local``, one process) and read the run dir.

    The config TOML, run directory and node logs go to a temporary directory, removed afterwards
    unless ``keep_dir`` names where to keep them (``keep_dir/label``).
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"edgepipe-{label}-"))
    try:
        config_path = workdir / "config.toml"
        config_path.write_text(dump_toml(config), encoding="utf-8")
        run_dir = workdir / "run"
        edge_log = workdir / "edge.log"
        edge_cmd = [sys.executable, "-m", "edge_node", "--config", str(config_path), "--run-dir", str(run_dir),
                    "--threads", "1", "--no-progress"]
        started = time.perf_counter()
        if local:
            edge_cmd.append("--local")
            code = _run_edge(edge_cmd, edge_log, timeout)
        else:
            cloud, address = _start_cloud(config_path, workdir / "cloud.log")
            try:
                code = _run_edge([*edge_cmd, "--cloud", address], edge_log, timeout)
            finally:
                _stop(cloud)
        wall = time.perf_counter() - started
        if code != 0:
            raise SplitRunError(f"{label}: the edge worker exited with {code}:\n{_tail(edge_log)}")
        run = load_run(run_dir)
        if run.summary is None:
            raise SplitRunError(f"{label}: the edge wrote no summary.json:\n{_tail(edge_log)}")
        if keep_dir is not None:
            target = Path(keep_dir) / label
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(workdir, target)
            run = load_run(target / "run")
        return RunResult(label=label, run=run, wall_seconds=wall)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_edge(cmd: list[str], log: Path, timeout: float) -> int:
    with log.open("w", encoding="utf-8") as out:
        edge = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())
        try:
            return edge.wait(timeout=timeout)
        except BaseException:
            _stop(edge)
            raise


def boundary_timeline(result: RunResult) -> str:
    """The freeze boundary over time, e.g. ``0→2@44→5@132`` (new boundary @ first step it applies to)."""
    parts = ["0"]
    for event in result.summary.get("freeze_events", []):
        parts.append(f"{event['boundary']}@{event['step']}")
    return "→".join(parts)
