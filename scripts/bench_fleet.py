"""Benchmark split-federated training: one cloud, N edges on shards of the data, SplitFed v1 and v2.

For each model, mode and edge count a fresh ``edgepipe-cloud`` process (default flags, one torch
thread) serves a ``[federation]`` of N edges; the edges are threads of this process, each calling
``edge_node.worker.train`` on shard K/N of the digits, all released together. A single edge
trained on all of the data (``--local``, the same epochs) is the accuracy baseline.

    python scripts/bench_fleet.py --quick                      # tinycnn, 1 and 4 edges, both modes
    python scripts/bench_fleet.py --models tinycnn             # 1, 4, 16, 32 edges
    python scripts/bench_fleet.py --models demo --edges 1,4 --modes splitfed-v1
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from edge_node.federation import simulate
from edge_node.worker import train
from edgepipe.launch import LaunchError, start_cloud, stop, tail
from edgepipe.process import configure_process
from edgepipe.split_run import demo_config, publish, report_console, write_config
from pipeline.checkpoint import load_state
from pipeline.config import Config, load_config, parse_config
from pipeline.data import Shard
from pipeline.federation import round_ends
from pipeline.traffic import KINDS, SYNC

_MIB = 1 << 20
_MODES = ("splitfed-v1", "splitfed-v2")
#: tinycnn on the digits at 8x8: the cloud's serving, not its compute, is what many edges load.
_TINYCNN: dict[str, dict[str, Any]] = {
    "model": {"name": "tinycnn", "input_shape": [1, 8, 8], "num_classes": 10, "seed": 0},
    "partition": {"edge_head": 1, "edge_tail": 1, "chunks": 2},
    "train": {"dataset": "digits", "lr": 0.05},
}


def model_config(model: str, *, batch_size: int, epochs: int) -> dict[str, dict[str, Any]]:
    """The configuration of ``model`` ("tinycnn" or "demo", the demo's MobileNetV2) without a federation."""
    base = demo_config() if model == "demo" else json.loads(json.dumps(_TINYCNN))
    base["train"] = {**base["train"], "batch_size": batch_size, "epochs": epochs}
    return base


def _federated(base: dict[str, dict[str, Any]], mode: str, edges: int, sync_every: int) -> dict[str, dict[str, Any]]:
    return {**base, "federation": {"mode": mode, "edges": edges, "sync_every": sync_every}}


def _train_edge(config: Config, address: str, run_dir: Path, k: int, edges: int,
                start: threading.Barrier, errors: dict[str, str]) -> None:
    start.wait()
    try:
        train(config, run_dir=run_dir, cloud=address, edge_name=f"edge-{k}", shard=Shard(k, edges),
              connect_timeout=60.0)
    except Exception as exc:  # a failed edge is a result of the benchmark, not its end
        errors[f"edge-{k}"] = f"{type(exc).__name__}: {exc}"


def _status_kib(pid: int, field: str) -> int | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith(f"{field}:")), None)


def _step_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if "step" in r]


def _same_models(run_dirs: list[Path]) -> bool:
    models = [load_state(d / "model.pt") for d in run_dirs if (d / "model.pt").is_file()]
    if len(models) != len(run_dirs):
        return False
    return all(all(torch.equal(m[k], models[0][k]) for k in models[0]) for m in models[1:])


def run_row(model: str, mode: str, edges: int, base: dict[str, dict[str, Any]], sync_every: int,
            work: Path) -> dict[str, Any]:
    """One federation of ``edges`` edges against a fresh cloud; what it achieved and the cloud's peak memory."""
    row_dir = work / f"{model}-{mode}-{edges}"
    row_dir.mkdir(parents=True)
    config_path = write_config(_federated(base, mode, edges, sync_every), row_dir / "config.toml", "bench_fleet")
    config = load_config(config_path)
    cloud_log = row_dir / "cloud.log"
    cloud, address = start_cloud(config_path, stderr=cloud_log)
    errors: dict[str, str] = {}
    run_dirs = [row_dir / f"edge-{k}" for k in range(1, edges + 1)]
    try:
        start = threading.Barrier(edges + 1)
        threads = [threading.Thread(target=_train_edge, args=(config, address, d, k, edges, start, errors),
                                    name=f"bench-edge-{k}") for k, d in enumerate(run_dirs, start=1)]
        for thread in threads:
            thread.start()
        start.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        peak = _status_kib(cloud.pid, "VmHWM")
    finally:
        cloud_exit = stop(cloud)
    lines = [_step_lines(d) for d in run_dirs]
    steps = max((len(edge_lines) for edge_lines in lines), default=0)
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs if (d / "summary.json").is_file()]
    accuracy = [s["final_val_accuracy"] for s in summaries if s.get("status") == "completed"]
    total = summaries[0]["steps"] if summaries else 0
    samples = sum(len(edge_lines) for edge_lines in lines) * config.train.batch_size
    spe = _steps_per_epoch(lines[0]) if lines and lines[0] else 1
    rounds = sum(round_ends(s, sync_every=sync_every, steps_per_epoch=spe, total_steps=total) for s in range(total))
    kinds = {kind: 0 for kind in (*KINDS, SYNC)}
    for edge_lines in lines:
        for line in edge_lines:
            for kind, counts in line["by_kind"].items():
                kinds[kind] += counts["uplink_bytes"] + counts["downlink_bytes"]
    seconds = [line["step_seconds"] for edge_lines in lines for line in edge_lines]
    return {
        "model": model, "mode": mode, "edges": edges, "succeeded": edges - len(errors), "errors": errors,
        "equals_reference": None if errors else _equals_reference(config, mode, edges, run_dirs, row_dir),
        "steps_per_edge": steps, "rounds": rounds, "wall_seconds": wall,
        "aggregate_samples_per_second": samples / wall,
        "median_step_ms": 1e3 * statistics.median(seconds) if seconds else None,
        "bytes_per_edge_per_round": {k: v / max(rounds, 1) / edges for k, v in kinds.items()},
        "cloud_peak_rss_mib": None if peak is None else peak / 1024,
        "final_val_accuracy": statistics.fmean(accuracy) if accuracy else None,
        "every_model_equal": _same_models(run_dirs),
        "cloud_exit_code": cloud_exit, "cloud_log_tail": tail(cloud_log, 5) if errors else "",
    }


def _equals_reference(config: Config, mode: str, edges: int, run_dirs: list[Path], row_dir: Path) -> bool | None:
    """Whether every edge's model equals the one-process reference's (None: codecs other than fp32, which it
    does not reproduce)."""
    link = config.link
    if {link.uplink, link.downlink, link.gradients} != {"fp32"}:
        return None
    replay = run_dirs[0] / "federation.json" if mode == "splitfed-v2" else None
    simulate(config, edges=edges, run_dir=row_dir / "reference", replay=replay)
    reference = load_state(row_dir / "reference" / "model.pt")
    models = [load_state(d / "model.pt") for d in run_dirs]
    return all(all(torch.equal(m[k], reference[k]) for k in reference) for m in models)


def _steps_per_epoch(lines: list[dict[str, Any]]) -> int:
    epochs = [line["epoch"] for line in lines]
    return max(1, epochs.count(epochs[0]))


def baseline(model: str, base: dict[str, dict[str, Any]], work: Path) -> float:
    """Final accuracy of a single edge trained on all the data for the same epochs (in one process)."""
    config = parse_config(base, "bench_fleet baseline config")
    return train(config, run_dir=work / f"{model}-baseline", cloud=None)["final_val_accuracy"]


def table(rows: list[dict[str, Any]], baselines: dict[str, float], epochs: int, sync_every: int) -> Table:
    """One row per model, mode and edge count."""
    result = Table(title=f"one edgepipe-cloud, N edges on shards of the digits ({epochs} epochs, "
                         f"sync every {sync_every} steps and at epoch ends)")
    for header in ("model", "mode", "edges", "ok", "steps/edge", "samples/s (all)", "step ms (p50)",
                   "KiB/edge/round act", "grad", "ctrl", "sync", "cloud RSS MiB", "acc", "1 edge, all data",
                   "models equal", "= reference"):
        result.add_column(header, justify="right")
    for r in rows:
        b = r["bytes_per_edge_per_round"]
        peak = r["cloud_peak_rss_mib"]
        acc = r["final_val_accuracy"]
        result.add_row(
            r["model"], r["mode"].removeprefix("splitfed-"), str(r["edges"]), f"{r['succeeded']}/{r['edges']}",
            str(r["steps_per_edge"]), f"{r['aggregate_samples_per_second']:.0f}",
            "-" if r["median_step_ms"] is None else f"{r['median_step_ms']:.1f}",
            *(f"{b[k] / 1024:.1f}" for k in (*KINDS, SYNC)),
            "?" if peak is None else f"{peak:.0f}", "-" if acc is None else f"{acc:.3f}",
            f"{baselines[r['model']]:.3f}", "yes" if r["every_model_equal"] else "NO",
            {True: "yes", False: "NO", None: "n/a"}[r["equals_reference"]],
        )
    return result


def _list(kind: type, allowed: tuple[Any, ...] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        bad = [v for v in values if (allowed is not None and v not in allowed) or (kind is int and v < 1)]
        if not values or bad:
            hint = f"; allowed: {', '.join(map(str, allowed))}" if allowed else "; counts are at least 1"
            raise argparse.ArgumentTypeError(f"bad value(s) {bad or text!r}{hint}")
        return list(dict.fromkeys(values))

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(
        prog="bench_fleet.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Train split-federated groups: for every model in --models, mode in --modes and N in --edges, a fresh "
            "edgepipe-cloud process (default flags, --threads 1) and N edges (threads of this process, one torch "
            "thread in all) on shards K/N of the digits, released together. Measured per row: edges that "
            "succeeded; aggregate samples/s = samples trained by all edges / wall time from the release to the "
            "last edge's end (open, evaluations, syncs and weight download included); the median step_seconds "
            "of all steps (a round's last step includes its sync, waiting for the slowest edge); bytes per edge "
            "per round by kind, from the step lines of metrics.jsonl (evaluation and handshake left out); the "
            "cloud process's peak RSS (VmHWM); the edges' final accuracy against one edge trained on all the "
            "data in one process; whether every edge's model.pt is the same, and (fp32 codecs) whether it equals "
            "the one-process reference (edgepipe-edge --local --edges N). Prints a table, writes --out."
        ),
    )
    parser.add_argument("--models", type=_list(str, ("tinycnn", "demo")), default=["tinycnn", "demo"],
                        help="comma-separated: tinycnn, demo (the demo's MobileNetV2)")
    parser.add_argument("--modes", type=_list(str, _MODES), default=list(_MODES), help="comma-separated modes")
    parser.add_argument("--edges", type=_list(int), default=[1, 4, 16, 32], help="comma-separated edge counts")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every edge and of the baseline")
    parser.add_argument("--batch-size", type=int, default=16, help="train.batch_size (32 shards of the digits "
                        "hold 44 samples each)")
    parser.add_argument("--sync-every", type=int, default=2, help="federation.sync_every")
    parser.add_argument("--quick", action="store_true", help="tinycnn, 1 and 4 edges, 2 epochs")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fleet.json"), help="JSON results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.edges, args.epochs = ["tinycnn"], [1, 4], 2
    for flag in ("epochs", "batch_size", "sync_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the grid; exit 1 when any edge failed or the edges of a row ended with different models."""
    args = parse_args(argv)
    configure_process(1)
    console = report_console()
    work = Path(tempfile.mkdtemp(prefix="bench_fleet-"))
    rows: list[dict[str, Any]] = []
    baselines: dict[str, float] = {}
    try:
        for model in args.models:
            base = model_config(model, batch_size=args.batch_size, epochs=args.epochs)
            baselines[model] = baseline(model, base, work)
            for mode in args.modes:
                for edges in args.edges:
                    try:
                        row = run_row(model, mode, edges, base, args.sync_every, work)
                    except LaunchError as exc:
                        console.print(f"bench_fleet: {exc}")
                        return 1
                    console.print(f"  {model} {mode} {edges} edges: {row['succeeded']} succeeded, "
                                  f"{row['aggregate_samples_per_second']:.0f} samples/s, "
                                  f"accuracy {row['final_val_accuracy']}", highlight=False)
                    rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    publish(console, [table(rows, baselines, args.epochs, args.sync_every)], args.out, "bench_fleet", argv, {
        "epochs": args.epochs, "batch_size": args.batch_size, "sync_every": args.sync_every,
        "edges_as": "threads of the benchmark process calling edge_node.worker.train with --shard K/N",
        "baselines": baselines, "rows": rows,
    })
    failed = any(r["succeeded"] < r["edges"] or not r["every_model_equal"] or r["equals_reference"] is False
                 for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
