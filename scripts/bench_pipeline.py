"""Benchmark the split pipeline: step time of edge + cloud processes on loopback against ``--local``.

For each ``partition.chunks`` value this runs the demo configuration (overridden to skip policy
``none`` and fp32 on every link) twice, the way a user would:

* local: ``python -m edge_node --config F --local --run-dir D --threads 1 --no-progress --max-steps N``
* split: ``python -m cloud_node --config F --listen 127.0.0.1:0 --threads 1`` and then
  ``python -m edge_node --config F --cloud ADDR --run-dir D --threads 1 --no-progress --max-steps N``

and reads the per-step ``step_seconds`` and link bytes from each run's ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipeline.config import parse_config  # noqa: E402
from edgepipe.demo import DEMO_CONFIG  # noqa: E402
from edgepipe.launch import LaunchError, cloud_command, edge_command, run_edge, start_cloud, stop, tail  # noqa: E402

_MIB = float(1 << 20)

#: Keys the benchmark sets on top of the demo configuration so that it measures the pipeline
#: itself (no layer ever frozen, no codec work) whatever the demo configuration says later.
BENCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "skip": {"policy": "none"},  # the whole [skip] table is replaced: other keys belong to other policies
    "link": {"uplink": "fp32", "downlink": "fp32", "gradients": "fp32"},
}


# ---------------------------------------------------------------------------------------------
# configuration


def bench_config(chunks: int, batch_size: int, steps: int) -> dict[str, dict[str, Any]]:
    """The demo configuration with the benchmark's overrides, for one chunks value."""
    data = tomllib.loads(DEMO_CONFIG)
    for section, values in BENCH_OVERRIDES.items():
        if section == "skip":
            data[section] = dict(values)
        else:
            data.setdefault(section, {}).update(values)
    data.setdefault("partition", {})["chunks"] = chunks
    train = data.setdefault("train", {})
    train["batch_size"] = batch_size
    # Enough epochs that --max-steps, not the epoch count, ends every run.
    train["epochs"] = max(int(train.get("epochs", 1)), steps)
    train.pop("max_steps", None)
    parse_config(data, f"benchmark config (chunks={chunks})")  # fail early, with the config's own message
    return data


# ---------------------------------------------------------------------------------------------
# processes


class RunFailed(LaunchError):
    """The edge worker exited non-zero or left no usable metrics."""


# ---------------------------------------------------------------------------------------------
# one measurement


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    steps = []
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if "step" in record and "step_seconds" in record:
                steps.append(record)
    return steps


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure(mode: str, chunks: int, repeat: int, config_path: Path, work: Path, args: argparse.Namespace,
            ) -> dict[str, Any]:
    """One run (local or split) of ``args.steps`` steps; the statistics of its measured steps."""
    run_dir = work / f"r{repeat}-c{chunks}-{mode}"
    load = _loadavg()
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    cloud_log, edge_log = run_dir / "cloud.log", run_dir / "edge.log"
    cloud = address = cloud_cmd = cloud_exit = None
    cloud_log_tail = ""
    if mode == "split":
        cloud, address = start_cloud(config_path, threads=args.threads, stderr=cloud_log, cwd=REPO)
        cloud_cmd = cloud_command(config_path, threads=args.threads)
    cmd = edge_command(config_path, cloud=address, run_dir=run_dir, threads=args.threads, max_steps=args.steps,
                       progress=False)
    try:
        code = run_edge(cmd, log=edge_log, timeout=args.run_timeout, cwd=REPO)
    finally:
        if cloud is not None:
            cloud_exit = stop(cloud)
            cloud_log_tail = tail(cloud_log, 5)
    if code != 0:
        raise RunFailed(f"the edge worker exited with code {code}:\n{tail(edge_log, 15)}")
    wall = time.perf_counter() - started
    records = read_steps(run_dir)
    if len(records) != args.steps:
        raise RunFailed(f"{run_dir}/metrics.jsonl holds {len(records)} steps, expected {args.steps}")
    measured = records[args.warmup:]
    seconds = [r["step_seconds"] for r in measured]
    link = [(r["uplink_bytes"] + r["downlink_bytes"]) for r in measured]
    uplink = [r["uplink_bytes"] for r in measured]
    downlink = [r["downlink_bytes"] for r in measured]
    result: dict[str, Any] = {
        "mode": mode,
        "chunks": chunks,
        "repeat": repeat,
        "run_dir": str(run_dir),
        "edge_command": cmd,
        "cloud_command": cloud_cmd,
        "process_wall_seconds": wall,
        "loadavg_at_start": load,
        "steps_recorded": len(records),
        "steps_measured": len(measured),
        "median_step_seconds": statistics.median(seconds),
        "mean_step_seconds": statistics.fmean(seconds),
        "min_step_seconds": min(seconds),
        "p10_step_seconds": _quantile(seconds, 0.1),
        "p90_step_seconds": _quantile(seconds, 0.9),
        "max_step_seconds": max(seconds),
        "warmup_step_seconds": [r["step_seconds"] for r in records[: args.warmup]],
        "link_bytes_per_step": statistics.median(link),
        "uplink_bytes_per_step": statistics.median(uplink),
        "downlink_bytes_per_step": statistics.median(downlink),
    }
    for key in ("edge_backward_seconds", "cloud_backward_seconds", "edge_encode_seconds", "edge_decode_seconds",
                "cloud_encode_seconds", "cloud_decode_seconds"):
        values = [r[key] for r in measured if key in r]
        if values:
            result[f"median_{key}"] = statistics.median(values)
    if mode == "split":
        result["cloud_exit_code"] = cloud_exit
        if cloud_exit not in (0, None) or "Traceback" in cloud_log_tail:
            result["cloud_log_tail"] = cloud_log_tail
    return result


# ---------------------------------------------------------------------------------------------
# summary and output


def summarize(runs: list[dict[str, Any]], chunk_values: list[int], batch_size: int) -> list[dict[str, Any]]:
    """One row per (chunks, mode): medians across repeats; ratios paired within each repeat."""
    by = {(r["mode"], r["chunks"], r["repeat"]): r for r in runs}
    repeats = sorted({r["repeat"] for r in runs})
    local_best = {}
    for rep in repeats:
        values = [by[("local", c, rep)]["median_step_seconds"] for c in chunk_values if ("local", c, rep) in by]
        if values:
            local_best[rep] = min(values)
    rows = []
    for chunks in chunk_values:
        for mode in ("local", "split"):
            mine = [by[(mode, chunks, rep)] for rep in repeats if (mode, chunks, rep) in by]
            if not mine:
                continue
            med = statistics.median(r["median_step_seconds"] for r in mine)
            ratios = [by[(mode, chunks, rep)]["median_step_seconds"] / by[("local", chunks, rep)]["median_step_seconds"]
                      for rep in repeats if (mode, chunks, rep) in by and ("local", chunks, rep) in by]
            vs_best = [by[(mode, chunks, rep)]["median_step_seconds"] / local_best[rep]
                       for rep in repeats if (mode, chunks, rep) in by and rep in local_best]
            rows.append({
                "chunks": chunks,
                "micro_batch": -(-batch_size // chunks),
                "mode": mode,
                "repeats": len(mine),
                "median_step_seconds": med,
                "step_seconds_per_repeat": [r["median_step_seconds"] for r in mine],
                "p10_step_seconds": statistics.median(r["p10_step_seconds"] for r in mine),
                "p90_step_seconds": statistics.median(r["p90_step_seconds"] for r in mine),
                "steps_per_second": 1.0 / med,
                "samples_per_second": batch_size / med,
                "ratio_to_local_same_chunks": statistics.median(ratios) if ratios else None,
                "ratio_to_best_local": statistics.median(vs_best) if vs_best else None,
                "link_mib_per_step": statistics.median(r["link_bytes_per_step"] for r in mine) / _MIB,
                "uplink_mib_per_step": statistics.median(r["uplink_bytes_per_step"] for r in mine) / _MIB,
                "downlink_mib_per_step": statistics.median(r["downlink_bytes_per_step"] for r in mine) / _MIB,
            })
    return rows


def show(rows: list[dict[str, Any]], console: Console, title: str) -> None:
    table = Table(title=title)
    table.add_column("chunks", justify="right")
    table.add_column("µbatch", justify="right")
    table.add_column("mode")
    for name in ("step ms (median)", "p10–p90 ms", "steps/s", "samples/s", "split/local", "vs best local",
                 "link MiB/step"):
        table.add_column(name, justify="right")
    for r in rows:
        ratio = r["ratio_to_local_same_chunks"]
        table.add_row(
            str(r["chunks"]),
            str(r["micro_batch"]),
            r["mode"],
            f"{r['median_step_seconds'] * 1e3:.1f}",
            f"{r['p10_step_seconds'] * 1e3:.0f}–{r['p90_step_seconds'] * 1e3:.0f}",
            f"{r['steps_per_second']:.2f}",
            f"{r['samples_per_second']:.0f}",
            "" if r["mode"] == "local" or ratio is None else f"{ratio:.2f}x",
            "" if r["ratio_to_best_local"] is None else f"{r['ratio_to_best_local']:.2f}x",
            f"{r['link_mib_per_step']:.2f}",
        )
    console.print(table)


def machine_info(threads: int) -> dict[str, Any]:
    import grpc
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "node_torch_threads": threads,
        "torch_default_threads": torch.get_num_threads(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    return info


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _chunk_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,2,4,8; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"chunks must be positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_pipeline.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure the training step time of the split edge/cloud pipeline against the one-process\n"
            "reference, for several partition.chunks values.\n\n"
            "Configuration: the `edgepipe demo` configuration (edgepipe.demo.DEMO_CONFIG) with\n"
            "[skip] policy = \"none\" and fp32 on uplink, downlink and gradients, so nothing is frozen and\n"
            "no codec work is done: the pipeline itself is measured. train.batch_size is --batch-size;\n"
            "partition.chunks takes each --chunks value. Config files go to a temporary directory.\n\n"
            "For every chunks value and every repeat, two runs of --steps optimizer steps each:\n"
            "  local: python -m edge_node --config F --local --run-dir D --threads T --no-progress --max-steps N\n"
            "  split: python -m cloud_node --config F --listen 127.0.0.1:0 --threads T   (a fresh server)\n"
            "         python -m edge_node --config F --cloud ADDR --run-dir D --threads T --no-progress --max-steps N\n"
            "Local and split alternate (their order flips every repeat); the cloud server is stopped\n"
            "(SIGTERM, then SIGKILL) after every split run.\n\n"
            "Measured: `step_seconds` of every step from the run's metrics.jsonl (the edge's wall time of\n"
            "one whole step: forward, link, backward, optimizer steps on both sides), first --warmup steps\n"
            "dropped. Per run the median is taken; across repeats the median of those. Reported per\n"
            "chunks value and mode: median step time, p10-p90 of the step times, steps/s, samples/s,\n"
            "split/local (split median over local median of the same chunks, paired within a repeat),\n"
            "vs best local (over the fastest local run of the repeat), and link MiB per step (uplink +\n"
            "downlink serialized gRPC bytes from metrics.jsonl). Start-up, data loading and evaluation\n"
            "are not in the step time. Results go to a table and to --out (JSON, with machine info and\n"
            "the exact configurations). On a small shared machine results are noisy: compare ratios\n"
            "within one invocation and use --repeats."
        ),
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="first steps of each run left out (default: %(default)s)")
    p.add_argument("--chunks", type=_chunk_list, default=[1, 2, 4, 8],
                   help="comma-separated partition.chunks values (default: 1,2,4,8)")
    p.add_argument("--batch-size", type=int, default=32, help="train.batch_size (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="times the whole sweep runs, local and split interleaved; medians across repeats "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="--threads given to each node: torch threads per process (default: %(default)s)")
    p.add_argument("--run-timeout", type=float, default=600.0,
                   help="seconds one edge run may take before it is killed (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench_pipeline.json"),
                   help="JSON result file (default: %(default)s, in the current directory)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory with configs, logs and run directories")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1),
                               ("--threads", args.threads, 1)):
        if value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    if args.warmup >= args.steps:
        p.error(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")
    too_many = [c for c in args.chunks if c > args.batch_size]
    if too_many:
        p.error(f"chunks {too_many} exceed --batch-size {args.batch_size}: every micro-batch needs a sample")

    # Rich assumes 80 columns when output is redirected, which would wrap every row.
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=True, width=150, highlight=False)
    out_console = Console(highlight=False)
    if not out_console.is_terminal:
        out_console = Console(width=150, highlight=False)

    work = Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    configs: dict[int, dict[str, Any]] = {}
    paths: dict[int, Path] = {}
    for chunks in args.chunks:
        configs[chunks] = bench_config(chunks, args.batch_size, args.steps)
        paths[chunks] = work / f"config-chunks{chunks}.toml"
        text = parse_config(configs[chunks], f"benchmark config (chunks={chunks})").to_toml()
        header = "# written by scripts/bench_pipeline.py: the demo configuration with benchmark overrides\n"
        paths[chunks].write_text(header + text, encoding="utf-8")

    console.print(f"bench_pipeline: chunks {args.chunks}, batch {args.batch_size}, {args.steps} steps "
                  f"({args.warmup} warm-up), {args.repeats} repeat(s); work dir {work}")
    load_before = _loadavg()
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for repeat in range(args.repeats):
            order = ("local", "split") if repeat % 2 == 0 else ("split", "local")
            for chunks in args.chunks:
                for mode in order:
                    try:
                        result = measure(mode, chunks, repeat, paths[chunks], work, args)
                    except (LaunchError, OSError, ValueError, KeyError) as exc:
                        console.print(f"[red]repeat {repeat} chunks {chunks} {mode}: FAILED: {exc}[/red]")
                        failures.append({"mode": mode, "chunks": chunks, "repeat": repeat, "error": str(exc)})
                        continue
                    runs.append(result)
                    note = ""
                    if result.get("cloud_log_tail"):
                        note = f"  [yellow]cloud exit {result['cloud_exit_code']}: {result['cloud_log_tail']}[/yellow]"
                    console.print(
                        f"  repeat {repeat} chunks {chunks:>2} {mode:<5}: median step "
                        f"{result['median_step_seconds'] * 1e3:7.1f} ms  (p10 {result['p10_step_seconds'] * 1e3:.0f}, "
                        f"p90 {result['p90_step_seconds'] * 1e3:.0f}, max {result['max_step_seconds'] * 1e3:.0f})  "
                        f"link {result['link_bytes_per_step'] / _MIB:.2f} MiB/step  "
                        f"[{result['process_wall_seconds']:.1f} s]{note}"
                    )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: reporting the runs done so far[/yellow]")
    total = time.perf_counter() - started

    rows = summarize(runs, args.chunks, args.batch_size)
    if rows:
        show(rows, out_console, f"edgepipe step time, split (2 processes, loopback) vs local — batch "
                                f"{args.batch_size}, {args.steps - args.warmup} measured steps, "
                                f"{args.repeats} repeat(s), {args.threads} torch thread(s)/process")
    report = {
        "benchmark": "bench_pipeline",
        "what": "median per-step step_seconds from metrics.jsonl after warm-up; split = cloud_node + edge_node "
                "processes on loopback, local = edge_node --local",
        "machine": machine_info(args.threads),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "total_seconds": total,
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "chunks": args.chunks,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "threads": args.threads,
        },
        "base_config": "edgepipe.demo.DEMO_CONFIG",
        "overrides": {**BENCH_OVERRIDES, "partition": {"chunks": "per run"},
                      "train": {"batch_size": args.batch_size, "epochs": "max(demo epochs, --steps)"}},
        "configs": {str(c): cfg for c, cfg in configs.items()},
        "summary": rows,
        "runs": runs,
        "failures": failures,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out} in {total:.0f} s" + (f"; kept {work}" if args.keep else ""))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
