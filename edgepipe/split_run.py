"""The benchmarks' runner: train a config as cloud and edge processes on loopback, read the run back."""
from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgepipe.launch import LaunchError, cloud_command, edge_command, run_edge, start_cloud, stop, tail
from pipeline.config import parse_config
from pipeline.runs import Run, StepRecord, Summary, load_run

__all__ = [
    "Launch",
    "RunResult",
    "SplitRunError",
    "boundary_timeline",
    "demo_config",
    "launch",
    "publish",
    "report_console",
    "run_split",
    "run_variants",
    "write_config",
    "write_report",
]

#: A node failed to start, ran past its time or the edge exited non-zero; the message holds the
#: tail of its log.
SplitRunError = LaunchError


def demo_config() -> dict[str, Any]:
    """The demo's built-in configuration (``edgepipe.demo.DEMO_CONFIG``) as nested dicts."""
    from edgepipe.demo import DEMO_CONFIG

    return tomllib.loads(DEMO_CONFIG)


def write_config(config: Mapping[str, Mapping[str, Any]], path: Path, label: str, header: str = "") -> Path:
    """Validate ``config`` (errors name ``label``) and write it to ``path`` as TOML, after ``header``."""
    path.write_text(header + parse_config(dict(config), f"{label} config").to_toml(), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Launch:
    """One training launched as processes: the command lines, the logs and how it ended."""

    edge_command: list[str]
    #: None for a ``--local`` run, which starts no cloud server.
    cloud_command: list[str] | None
    cloud_exit_code: int | None
    edge_log: Path
    cloud_log: Path | None
    wall_seconds: float


def launch(
    config_path: Path,
    run_dir: Path,
    *,
    log_dir: Path,
    local: bool = False,
    threads: int = 1,
    max_steps: int | None = None,
    timeout: float = 3600.0,
) -> Launch:
    """Train ``config_path`` into ``run_dir``: a cloud server on a free loopback port (none when
    ``local``) and an edge worker, ``threads`` torch threads each, logs in ``log_dir``.

    The server is always stopped.  Raises :class:`SplitRunError` with the tail of the edge log
    when a node fails to start, runs past ``timeout`` seconds or the edge exits non-zero.
    """
    edge_log = log_dir / "edge.log"
    cloud_log = None if local else log_dir / "cloud.log"
    started = time.perf_counter()
    cloud = address = None
    if cloud_log is not None:
        cloud, address = start_cloud(config_path, threads=threads, stderr=cloud_log)
    command = edge_command(config_path, cloud=address, run_dir=run_dir, threads=threads, max_steps=max_steps,
                           progress=False)
    cloud_exit = None
    try:
        code = run_edge(command, log=edge_log, timeout=timeout)
    finally:
        if cloud is not None:
            cloud_exit = stop(cloud)
    if code != 0:
        raise SplitRunError(f"the edge worker exited with {code}:\n{tail(edge_log)}")
    return Launch(
        edge_command=command,
        cloud_command=None if local else cloud_command(config_path, threads=threads),
        cloud_exit_code=cloud_exit,
        edge_log=edge_log,
        cloud_log=cloud_log,
        wall_seconds=time.perf_counter() - started,
    )


@dataclass
class RunResult:
    """One finished run: its directory read back, plus the wall time the benchmark saw."""

    label: str
    run: Run
    wall_seconds: float

    @property
    def summary(self) -> Summary:
        """summary.json (:func:`run_split` only returns runs that wrote one)."""
        assert self.run.summary is not None
        return self.run.summary

    @property
    def steps(self) -> list[StepRecord]:
        """The step lines of metrics.jsonl."""
        return self.run.steps

    def median_step_seconds(self) -> float:
        """Median ``step_seconds`` of the steps."""
        return statistics.median(r.step_seconds for r in self.steps if r.step_seconds is not None)

    def kind_bytes(self, kind: str, direction: str) -> int:
        """Bytes of ``kind`` sent in ``direction`` over the whole run."""
        return self.summary.traffic.by_kind.of(kind).sent(direction)


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
        config_path = write_config(config, workdir / "config.toml", label)
        run_dir = workdir / "run"
        try:
            launched = launch(config_path, run_dir, log_dir=workdir, local=local, timeout=timeout)
        except SplitRunError as exc:
            raise SplitRunError(f"{label}: {exc}") from None
        run = load_run(run_dir)
        if run.summary is None:
            raise SplitRunError(f"{label}: the edge wrote no summary.json:\n{tail(launched.edge_log)}")
        if keep_dir is not None:
            target = Path(keep_dir) / label
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(workdir, target)
            run = load_run(target / "run")
        return RunResult(label=label, run=run, wall_seconds=launched.wall_seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_variants(
    base: Mapping[str, Mapping[str, Any]],
    variants: Sequence[tuple[str, str, Mapping[str, Mapping[str, Any]]]],
    *,
    console: Console,
    keep_dir: Path | None,
) -> Iterator[tuple[str, dict[str, Any], RunResult]]:
    """Train ``base`` once per variant ``(label, detail, sections)``, split over loopback.

    ``sections`` replace whole sections of ``base``; every config is validated before anything
    starts, so a typo fails fast with the config's own message.  Yields (label, config, result).
    """
    configs = []
    for label, detail, sections in variants:
        config = {**copy.deepcopy(dict(base)), **copy.deepcopy(dict(sections))}
        parse_config(config, f"bench config {label}")
        configs.append((label, detail, config))
    for label, detail, config in configs:
        console.print(f"[bold]{label}[/bold]{': ' + detail if detail else ''} ...", highlight=False)
        yield label, config, run_split(config, label=label, keep_dir=keep_dir)


def boundary_timeline(result: RunResult) -> str:
    """The freeze boundary over time, e.g. ``0→2@44→5@132`` (new boundary @ first step it applies to)."""
    return "→".join(["0", *(f"{e.boundary}@{e.step}" for e in result.summary.freeze_events)])


def report_console() -> Console:
    """A console for benchmark tables: the terminal's width, or ``COLUMNS`` (200) when piped."""
    return Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 200)))


def write_report(out: Path, benchmark: str, argv: list[str] | None, fields: dict[str, Any]) -> None:
    """Write a benchmark's JSON: what ran it, on what, and its ``fields``."""
    report = {
        "benchmark": benchmark,
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "platform": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        **fields,
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def publish(
    console: Console,
    tables: Sequence[Table | None],
    out: Path,
    benchmark: str,
    argv: list[str] | None,
    fields: dict[str, Any],
) -> None:
    """Print a benchmark's tables and write its JSON report."""
    for table in tables:
        if table is not None:
            console.print(table)
    write_report(out, benchmark, argv, fields)
    console.print(f"wrote {out}")
