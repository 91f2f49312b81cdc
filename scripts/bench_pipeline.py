"""Benchmark the split pipeline: step time of edge + cloud processes on loopback against ``--local``.

For each ``partition.chunks`` value this runs the demo configuration (overridden to skip policy
``none`` and fp32 on every link) twice, the way a user would:

* local: ``edgepipe-edge --config F --local --run-dir D --threads 1 --no-progress --max-steps N``
* split: ``edgepipe-cloud --config F --listen 127.0.0.1:0 --threads 1`` and then
  ``edgepipe-edge --config F --cloud ADDR --run-dir D --threads 1 --no-progress --max-steps N``

and reads the per-step ``step_seconds`` and link bytes from each run's ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgepipe.launch import tail
from edgepipe.split_run import SplitRunError, demo_config, launch, write_config
from pipeline.runs import load_run
from pipeline.traffic import MIB

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
    data = demo_config()
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
    return data


# ---------------------------------------------------------------------------------------------
# one measurement


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
    run_dir.mkdir(parents=True, exist_ok=True)
    launched = launch(config_path, run_dir, log_dir=run_dir, local=mode == "local", threads=args.threads,
                      max_steps=args.steps, timeout=args.run_timeout)
    records = load_run(run_dir).steps
    if len(records) != args.steps:
        raise SplitRunError(f"{run_dir}/metrics.jsonl holds {len(records)} steps, expected {args.steps}")
    measured = records[args.warmup:]
    seconds = [r.step_seconds for r in measured]
    uplink = [r.uplink_bytes for r in measured]
    downlink = [r.downlink_bytes for r in measured]
    link = [up + down for up, down in zip(uplink, downlink, strict=True)]
    result: dict[str, Any] = {
        "mode": mode,
        "chunks": chunks,
        "repeat": repeat,
        "run_dir": str(run_dir),
        "edge_command": launched.edge_command,
        "cloud_command": launched.cloud_command,
        "process_wall_seconds": launched.wall_seconds,
        "loadavg_at_start": load,
        "steps_recorded": len(records),
        "steps_measured": len(measured),
        "median_step_seconds": statistics.median(seconds),
        "mean_step_seconds": statistics.fmean(seconds),
        "min_step_seconds": min(seconds),
        "p10_step_seconds": _quantile(seconds, 0.1),
        "p90_step_seconds": _quantile(seconds, 0.9),
        "max_step_seconds": max(seconds),
        "warmup_step_seconds": [r.step_seconds for r in records[: args.warmup]],
        "link_bytes_per_step": statistics.median(link),
        "uplink_bytes_per_step": statistics.median(uplink),
        "downlink_bytes_per_step": statistics.median(downlink),
    }
    for key in ("edge_backward_seconds", "cloud_backward_seconds", "edge_encode_seconds", "edge_decode_seconds",
                "cloud_encode_seconds", "cloud_decode_seconds"):
        values = [getattr(r, key) for r in measured if getattr(r, key) is not None]
        if values:
            result[f"median_{key}"] = statistics.median(values)
    if launched.cloud_log is not None:
        result["cloud_exit_code"] = launched.cloud_exit_code
        cloud_log_tail = tail(launched.cloud_log, 5)
        if launched.cloud_exit_code not in (0, None) or "Traceback" in cloud_log_tail:
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
                "link_mib_per_step": statistics.median(r["link_bytes_per_step"] for r in mine) / MIB,
                "uplink_mib_per_step": statistics.median(r["uplink_bytes_per_step"] for r in mine) / MIB,
                "downlink_mib_per_step": statistics.median(r["downlink_bytes_per_step"] for r in mine) / MIB,
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
            "  local: edgepipe-edge --config F --local --run-dir D --threads T --no-progress --max-steps N\n"
            "  split: edgepipe-cloud --config F --listen 127.0.0.1:0 --threads T   (a fresh server)\n"
            "         edgepipe-edge --config F --cloud ADDR --run-dir D --threads T --no-progress --max-steps N\n"
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


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
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


def _console(stderr: bool) -> Console:
    # Rich assumes 80 columns when output is redirected, which would wrap every row.
    console = Console(stderr=stderr, highlight=False)
    return console if console.is_terminal else Console(stderr=stderr, width=150, highlight=False)


def _sweep(args: argparse.Namespace, paths: dict[int, Path], work: Path, console: Console,
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (repeat, chunks, mode) run, local and split alternating; the results and the failures."""
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    try:
        for repeat in range(args.repeats):
            order = ("local", "split") if repeat % 2 == 0 else ("split", "local")
            for chunks in args.chunks:
                for mode in order:
                    try:
                        result = measure(mode, chunks, repeat, paths[chunks], work, args)
                    except (SplitRunError, OSError, ValueError, KeyError) as exc:
                        console.print(f"[red]repeat {repeat} chunks {chunks} {mode}: FAILED: {exc}[/red]")
                        failures.append({"mode": mode, "chunks": chunks, "repeat": repeat, "error": str(exc)})
                        continue
                    runs.append(result)
                    console.print(_progress_line(result))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: reporting the runs done so far[/yellow]")
    return runs, failures


def _progress_line(result: dict[str, Any]) -> str:
    note = ""
    if result.get("cloud_log_tail"):
        note = f"  [yellow]cloud exit {result['cloud_exit_code']}: {result['cloud_log_tail']}[/yellow]"
    return (
        f"  repeat {result['repeat']} chunks {result['chunks']:>2} {result['mode']:<5}: median step "
        f"{result['median_step_seconds'] * 1e3:7.1f} ms  (p10 {result['p10_step_seconds'] * 1e3:.0f}, "
        f"p90 {result['p90_step_seconds'] * 1e3:.0f}, max {result['max_step_seconds'] * 1e3:.0f})  "
        f"link {result['link_bytes_per_step'] / MIB:.2f} MiB/step  "
        f"[{result['process_wall_seconds']:.1f} s]{note}"
    )


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    _check(p, args)
    console, out_console = _console(stderr=True), _console(stderr=False)

    work = Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    configs = {chunks: bench_config(chunks, args.batch_size, args.steps) for chunks in args.chunks}
    header = "# written by scripts/bench_pipeline.py: the demo configuration with benchmark overrides\n"
    paths = {
        chunks: write_config(config, work / f"config-chunks{chunks}.toml", f"benchmark (chunks={chunks})", header)
        for chunks, config in configs.items()
    }
    console.print(f"bench_pipeline: chunks {args.chunks}, batch {args.batch_size}, {args.steps} steps "
                  f"({args.warmup} warm-up), {args.repeats} repeat(s); work dir {work}")
    load_before = _loadavg()
    started = time.perf_counter()
    runs, failures = _sweep(args, paths, work, console)
    total = time.perf_counter() - started

    rows = summarize(runs, args.chunks, args.batch_size)
    if rows:
        show(rows, out_console, f"edgepipe step time, split (2 processes, loopback) vs local — batch "
                                f"{args.batch_size}, {args.steps - args.warmup} measured steps, "
                                f"{args.repeats} repeat(s), {args.threads} torch thread(s)/process")
    report = {
        "benchmark": "bench_pipeline",
        "what": "median per-step step_seconds from metrics.jsonl after warm-up; split = edgepipe-cloud + edgepipe-edge "
                "processes on loopback, local = edgepipe-edge --local",
        "machine": machine_info(args.threads),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "total_seconds": total,
        "settings": {key: getattr(args, key) for key in ("steps", "warmup", "chunks", "batch_size", "repeats", "threads")},
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
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
