"""Benchmark one cloud under load: 1, 4, 16 and 32 edges training against it at once.

One ``edgepipe-cloud`` process (default flags but ``--max-sessions``) serves every level in
turn; the edges are threads of this process, each calling ``edge_node.worker.train`` with its own
run directory, all released together by a barrier.

    python scripts/bench_load.py                        # levels 1,4,16,32, JSON to runs/bench_load.json
    python scripts/bench_load.py --edges 1,8 --steps 10 --cloud-flags="--workers 64"
"""
from __future__ import annotations

import argparse
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from edge_node.worker import train
from edgepipe.launch import LaunchError, start_cloud, stop, tail
from edgepipe.process import configure_process
from edgepipe.split_run import publish, report_console, write_config
from pipeline.config import Config, load_config
from pipeline.runs import RunFileError, load_run

#: tests/conftest.py's make_config: tinycnn on synthetic 8x8 data, small enough that the cloud's
#: serving, not its compute, is what many edges load. Enough epochs that --steps ends each run.
BENCH_CONFIG: dict[str, dict[str, Any]] = {
    "model": {"name": "tinycnn", "input_shape": [1, 8, 8], "num_classes": 10, "seed": 0},
    "partition": {"edge_head": 1, "edge_tail": 1, "chunks": 4},
    "train": {"dataset": "synthetic", "batch_size": 32, "epochs": 1000, "lr": 0.05},
}
_MIB = 1 << 20


def _train_edge(config: Config, address: str, run_dir: Path, name: str, steps: int,
                start: threading.Barrier, errors: dict[str, str]) -> None:
    start.wait()
    try:
        train(config, run_dir=run_dir, cloud=address, max_steps=steps, edge_name=name, connect_timeout=60.0)
    except Exception as exc:  # a failed edge is a result of the benchmark, not its end
        errors[name] = f"{type(exc).__name__}: {exc}"


def _reset_peak_rss(pid: int) -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each level gets its own peak.
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def _status_kib(pid: int, field: str) -> int | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def _step_seconds(run_dir: Path) -> list[float]:
    try:
        return [r.step_seconds for r in load_run(run_dir).steps if r.step_seconds is not None]
    except RunFileError:
        return []


def run_level(edges: int, config: Config, address: str, cloud_pid: int, work: Path, steps: int) -> dict[str, Any]:
    """``edges`` edges at once against the cloud; what they achieved and the cloud's peak memory."""
    peak_is_per_level = _reset_peak_rss(cloud_pid)
    start = threading.Barrier(edges + 1)
    errors: dict[str, str] = {}
    run_dirs = [work / f"level{edges}" / f"edge{i}" for i in range(edges)]
    threads = [
        threading.Thread(target=_train_edge, args=(config, address, run_dir, f"edge-{i}", steps, start, errors),
                         name=f"bench-edge-{i}")
        for i, run_dir in enumerate(run_dirs)
    ]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    seconds = [s for run_dir in run_dirs for s in _step_seconds(run_dir)]
    peak = _status_kib(cloud_pid, "VmHWM")
    return {
        "edges": edges,
        "succeeded": edges - len(errors),
        "failed": len(errors),
        "errors": errors,
        "steps_done": len(seconds),
        "wall_seconds": wall,
        "aggregate_steps_per_second": len(seconds) / wall,
        "p50_step_seconds": statistics.median(seconds) if seconds else math.nan,
        "p99_step_seconds": _p99(seconds),
        "cloud_peak_rss_mib": None if peak is None else peak / 1024,
        "cloud_peak_rss_is_per_level": peak_is_per_level,
        "cloud_rss_after_mib": (_status_kib(cloud_pid, "VmRSS") or 0) / 1024,
    }


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def table(rows: list[dict[str, Any]], steps: int) -> Table:
    """One row per level."""
    result = Table(title=f"one edgepipe-cloud, N edges at once (threads), tinycnn, {steps} steps each")
    for header in ("edges", "succeeded", "steps/s (all edges)", "p50 step ms", "p99 step ms",
                   "cloud peak RSS MiB", "wall s"):
        result.add_column(header, justify="right")
    for r in rows:
        peak = r["cloud_peak_rss_mib"]
        result.add_row(
            str(r["edges"]), f"{r['succeeded']}/{r['edges']}", f"{r['aggregate_steps_per_second']:.1f}",
            f"{r['p50_step_seconds'] * 1e3:.1f}", f"{r['p99_step_seconds'] * 1e3:.1f}",
            "?" if peak is None else f"{peak:.0f}", f"{r['wall_seconds']:.1f}",
        )
    return result


def _levels(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts, e.g. 1,4,16,32; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"edge counts must be at least 1, got {text!r}")
    return list(dict.fromkeys(values))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(
        prog="bench_load.py",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Load one edgepipe-cloud process (started once, with --threads 1, --max-sessions set to the largest "
            "level and otherwise default flags plus --cloud-flags) with N edges training at once, for each N in "
            "--edges. The edges are threads of this benchmark process (one torch thread in all; lighter than "
            "processes on a small machine), each calling edge_node.worker.train with the tinycnn test config "
            "for --steps steps into its own run directory; a barrier starts them together. Measured per level: "
            "how many edges succeeded; aggregate steps/s = steps recorded in all metrics.jsonl files / wall "
            "time from the barrier to the last edge's end (open, evaluation and weight download included); "
            "p50 and p99 of every step's step_seconds (the edge's wall time of one whole step); the cloud "
            "process's peak resident memory (VmHWM of /proc/PID/status, reset before each level through "
            "/proc/PID/clear_refs). One unreported edge warms both processes up first. Prints a table and "
            "writes --out (JSON with the errors of failed edges)."
        ),
    )
    parser.add_argument("--edges", type=_levels, default=[1, 4, 16, 32], help="comma-separated edge counts")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per edge")
    parser.add_argument("--cloud-flags", default="", help="more edgepipe-cloud flags, as one shell-quoted string")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_load.json"), help="JSON results file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every level against one cloud; exit 1 when any edge failed."""
    args = parse_args(argv)
    configure_process(1)
    console = report_console()
    work = Path(tempfile.mkdtemp(prefix="bench_load-"))
    config_path = write_config(BENCH_CONFIG, work / "config.toml", "bench_load")
    config = load_config(config_path)
    cloud_flags = ["--max-sessions", str(max(args.edges)), *shlex.split(args.cloud_flags)]
    cloud_log = work / "cloud.log"
    try:
        cloud, address = start_cloud(config_path, stderr=cloud_log, extra=cloud_flags)
    except LaunchError as exc:
        console.print(f"bench_load: {exc}")
        shutil.rmtree(work, ignore_errors=True)
        return 1
    rows = []
    try:
        # First calls in both processes (imports, allocator, connection set-up) would land in
        # the first level: one unreported edge pays for them.
        run_level(1, config, address, cloud.pid, work / "warmup", min(args.steps, 3))
        for edges in args.edges:
            row = run_level(edges, config, address, cloud.pid, work, args.steps)
            console.print(f"  {edges} edges: {row['succeeded']} succeeded, "
                          f"{row['aggregate_steps_per_second']:.1f} steps/s", highlight=False)
            rows.append(row)
    finally:
        cloud_exit = stop(cloud)
        cloud_log_tail = tail(cloud_log, 10)
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    publish(console, [table(rows, args.steps)], args.out, "bench_load", argv, {
        "config": BENCH_CONFIG,
        "steps_per_edge": args.steps,
        "edges_as": "threads of the benchmark process calling edge_node.worker.train",
        "cloud_flags": cloud_flags,
        "cloud_exit_code": cloud_exit,
        "cloud_log_tail": cloud_log_tail,
        "levels": rows,
    })
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
