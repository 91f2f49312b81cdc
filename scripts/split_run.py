"""Launch a cloud+edge pair as processes (as users do) on a config dict and read the run dir back."""
from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import sys
import statistics
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.config import parse_config
from edgepipe.launch import LaunchError, edge_command, run_edge, start_cloud, stop, tail
from pipeline.report import Run, load_run

__all__ = [
    "RunResult",
    "SplitRunError",
    "boundary_timeline",
    "demo_config",
    "publish",
    "report_console",
    "run_split",
    "run_variants",
    "write_report",
]

ROOT = Path(__file__).resolve().parent.parent
MIB = float(1 << 20)

#: A node failed to start, ran past its time or the edge exited non-zero; the message holds the
#: tail of its log.
SplitRunError = LaunchError


def demo_config() -> dict[str, Any]:
    """The demo's built-in configuration (``edgepipe.demo.DEMO_CONFIG``) as nested dicts."""
    from edgepipe.demo import DEMO_CONFIG

    return tomllib.loads(DEMO_CONFIG)


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
        config_path.write_text(parse_config(dict(config), f"{label} config").to_toml(), encoding="utf-8")
        run_dir = workdir / "run"
        edge_log = workdir / "edge.log"
        started = time.perf_counter()
        cloud, address = None, None
        if not local:
            cloud, address = start_cloud(config_path, stderr=workdir / "cloud.log", cwd=ROOT)
        try:
            code = run_edge(edge_command(config_path, cloud=address, run_dir=run_dir, progress=False),
                            log=edge_log, timeout=timeout, cwd=ROOT)
        finally:
            if cloud is not None:
                stop(cloud)
        wall = time.perf_counter() - started
        if code != 0:
            raise SplitRunError(f"{label}: the edge worker exited with {code}:\n{tail(edge_log)}")
        run = load_run(run_dir)
        if run.summary is None:
            raise SplitRunError(f"{label}: the edge wrote no summary.json:\n{tail(edge_log)}")
        if keep_dir is not None:
            target = Path(keep_dir) / label
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(workdir, target)
            run = load_run(target / "run")
        return RunResult(label=label, run=run, wall_seconds=wall)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def boundary_timeline(result: RunResult) -> str:
    """The freeze boundary over time, e.g. ``0→2@44→5@132`` (new boundary @ first step it applies to)."""
    parts = ["0"]
    for event in result.summary.get("freeze_events", []):
        parts.append(f"{event['boundary']}@{event['step']}")
    return "→".join(parts)


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
