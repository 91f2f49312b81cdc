"""Benchmark the pipeline over an emulated WAN: step time against its bottleneck bound and the planner.

Every cell trains the demo configuration (``edgepipe.demo.DEMO_CONFIG``: MobileNetV2 0.25 on
digits, edge head 2 + tail 1) with ``[skip] policy = "none"`` as a real ``edgepipe-cloud`` process
and a real ``edgepipe-edge`` process on 127.0.0.1, the edge talking to the cloud through
:class:`edgepipe.link_emulator.LinkEmulator` (or directly for ``direct``), and compares the
measured step time with the bottleneck bound, the planner's prediction and (``--before DIR``) the
same cell run with the code checked out in DIR.

    python scripts/bench_wan.py --quick                       # 4 cells, a smoke test
    python scripts/bench_wan.py --reduced --before /tmp/edgepipe-before
    python scripts/bench_wan.py --chunks 8 --mbps 20,direct --codecs int8/fp32
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from rich.table import Table

from edgepipe.launch import LaunchError, edge_command, node_env, run_edge, start_cloud, stop, tail
from edgepipe.link_emulator import LinkEmulator, LinkSettings
from edgepipe.split_run import demo_config, publish, report_console, write_report
from pipeline.config import Config, parse_config
from pipeline.planner import Candidate, LinkSpec, predict
from pipeline.profiler import DeviceProfile, profile_layers
from pipeline.runs import load_run
from pipeline.trust import parse_address

#: The codec settings of the grid: (uplink activations, gradients both ways).
CODECS: tuple[tuple[str, str], ...] = (("fp32", "fp32"), ("int8", "fp32"), ("int8", "int8"))
CHUNKS = (1, 2, 4, 8)
#: Link rates (Mbit/s, both directions); None is ``direct`` (no emulator, plain loopback).
MBPS: tuple[float | None, ...] = (5.0, 20.0, 100.0, None)
#: The planner's stand-in for ``direct``: a link that costs nothing.
DIRECT_LINK = LinkSpec(1e6, 1e6, 0.0)
#: Validation share of digits: the evaluation after the last step crosses the link too, and at
#: 5 Mbit/s the demo's 20 % would cost more than the steps; it does not enter any step time.
VAL_FRACTION = 0.05

#: Targets of the issue, reported and never enforced.
TARGET_BOUND_RATIO = 1.3  # measured / bound at 20 Mbit/s, chunks 8
TARGET_SPEEDUP = 1.5  # today vs --before at 20 Mbit/s, chunks 8
TARGET_PREDICTION_ERROR = 0.20  # |predicted - measured| / measured
TARGET_PICK_GAP = 0.10  # the planner's pick's measured time over the best measured, minus 1
TARGET_CELL = (20.0, 8)


@dataclass(frozen=True)
class Cell:
    """One point of the grid: the link rate (None: direct), the chunk count and the codecs."""

    mbps: float | None
    chunks: int
    uplink: str
    gradients: str

    @property
    def link(self) -> str:
        return "direct" if self.mbps is None else f"{self.mbps:g} Mbit/s"

    @property
    def codecs(self) -> str:
        return f"{self.uplink}/{self.gradients}"

    @property
    def name(self) -> str:
        link = "direct" if self.mbps is None else f"{self.mbps:g}M"
        return f"{link}-c{self.chunks}-{self.uplink}-{self.gradients}"

    def key(self) -> dict[str, Any]:
        return {"mbps": self.mbps, "chunks": self.chunks, "uplink": self.uplink, "gradients": self.gradients}


#: --quick: every path once (emulated and direct, each codec setting, 1 and 8 chunks, two rates).
QUICK = (Cell(20.0, 1, "fp32", "fp32"), Cell(20.0, 8, "int8", "fp32"), Cell(100.0, 8, "int8", "int8"),
         Cell(None, 8, "int8", "fp32"))


def reduced_grid() -> list[Cell]:
    """--reduced: 20 Mbit/s at every chunk count, 5 and 100 Mbit/s and direct at 8 chunks, every codec."""
    cells = [Cell(20.0, c, up, grad) for c in CHUNKS for up, grad in CODECS]
    return cells + [Cell(m, 8, up, grad) for m in (5.0, 100.0, None) for up, grad in CODECS]


# ---------------------------------------------------------------------------------------------
# configuration and prediction


def cell_config(cell: Cell) -> dict[str, dict[str, Any]]:
    """The demo configuration with no freezing, the cell's codecs and chunks (nested dicts)."""
    data = demo_config()
    data["skip"] = {"policy": "none"}  # the whole table: the demo's other keys belong to lars
    data["link"].update(uplink=cell.uplink, gradients=cell.gradients)
    data["partition"]["chunks"] = cell.chunks
    data["train"]["val_fraction"] = VAL_FRACTION
    return data


def write_cell_config(data: dict[str, dict[str, Any]], path: Path, label: str) -> Config:
    """Validate ``data`` and write it as given (only the keys the demo sets), so older code reads it too."""
    config = parse_config(copy.deepcopy(data), f"{label} config")
    path.write_text("# written by scripts/bench_wan.py: the demo configuration with benchmark overrides\n"
                    + tomli_w.dumps(data), encoding="utf-8")
    return config


def link_spec(cell: Cell, delay_ms: float) -> LinkSpec:
    """The planner's view of the cell's link: its rate both ways and the round trip."""
    return DIRECT_LINK if cell.mbps is None else LinkSpec(cell.mbps, cell.mbps, 2 * delay_ms)


def measure_profile(config: Config, threads: int, repeats: int) -> DeviceProfile:
    """Per-layer forward/backward times of the configuration's model on this machine (one profile for
    both sides: edge and cloud run on the same CPUs here)."""
    import torch

    from pipeline.models import build_configured

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return profile_layers(build_configured(config.model), config.model.input_shape, config.train.batch_size,
                              model_name=config.model.name, repeats=repeats)
    finally:
        torch.set_num_threads(previous)


def bound(candidate: Candidate, cell: Cell, up_bytes: float, down_bytes: float) -> tuple[float, str, dict[str, float]]:
    """max(edge compute, cloud compute, uplink bytes·8/rate, downlink bytes·8/rate) of one step.

    Compute is the planner's busy seconds from the device profile (forward + backward of each
    side's layers over every micro-batch); the link terms use the run's own bytes per step.
    """
    terms = {"edge": candidate.busy_seconds["edge"], "cloud": candidate.busy_seconds["cloud"],
             "uplink": 0.0 if cell.mbps is None else up_bytes * 8 / (cell.mbps * 1e6),
             "downlink": 0.0 if cell.mbps is None else down_bytes * 8 / (cell.mbps * 1e6)}
    which = max(terms, key=lambda k: terms[k])
    return terms[which], which, terms


# ---------------------------------------------------------------------------------------------
# one run: cloud process, emulator, edge process


#: The packages a node imports: what the snapshot of today's code copies.
PACKAGES = ("edgepipe", "pipeline", "edge_node", "cloud_node", "protos")


def snapshot(source: Path, target: Path) -> str:
    """Copy the node packages of ``source`` to ``target`` (the tree others keep editing stays out of the
    runs); return a SHA-256 over the copied files' paths and contents, to tell code versions apart."""
    import hashlib

    digest = hashlib.sha256()
    for package in PACKAGES:
        shutil.copytree(source / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(target)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


_IMPORT_CHECK = ("import json, edgepipe, edgepipe.cloud_cli, edgepipe.edge_cli, pipeline, edge_node, cloud_node; "
                 "print(json.dumps({m.__name__: m.__file__ for m in (edgepipe, edgepipe.cloud_cli, edgepipe.edge_cli, "
                 "pipeline, edge_node, cloud_node)}))")


def check_imports(code_dir: Path) -> dict[str, str]:
    """Where a node started from ``code_dir`` (same interpreter, environment and cwd) imports each package
    from; raises when any of them comes from elsewhere."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], cwd=code_dir, env=node_env(code_dir),
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise LaunchError(f"cannot import the nodes' packages from {code_dir}:\n{done.stderr.strip()}")
    files: dict[str, str] = json.loads(done.stdout)
    root = os.path.realpath(code_dir)
    strays = {m: f for m, f in files.items() if not os.path.realpath(f).startswith(root + os.sep)}
    if strays:
        raise LaunchError(f"nodes started in {code_dir} would import code from elsewhere: {strays}")
    return files


def run_nodes(code_dir: Path, config_path: Path, work: Path, settings: LinkSettings | None,
              args: argparse.Namespace) -> tuple[Path, dict[str, Any] | None, float]:
    """Train ``args.steps`` steps with the code of ``code_dir``: a cloud process, the emulator (when
    ``settings``) and an edge process. Returns the run directory, the emulator's report and the wall time."""
    work.mkdir(parents=True, exist_ok=True)
    run_dir, edge_log = work / "run", work / "edge.log"
    started = time.perf_counter()
    cloud, address = start_cloud(config_path, threads=args.threads, stderr=work / "cloud.log",
                                 timeout=args.run_timeout, cwd=code_dir, code_dir=code_dir)
    emulator = None
    report = None
    try:
        target = address
        if settings is not None:
            emulator = LinkEmulator(("127.0.0.1", 0), parse_address(address), settings)
            host, port = emulator.start()
            target = f"{host}:{port}"
        command = edge_command(config_path, cloud=target, run_dir=run_dir, threads=args.threads,
                               max_steps=args.steps, progress=False)
        code = run_edge(command, log=edge_log, timeout=args.run_timeout, cwd=code_dir, code_dir=code_dir)
    finally:
        if emulator is not None:
            report = emulator.stop()
        stop(cloud)
    if code != 0:
        raise LaunchError(f"the edge worker exited with {code}:\n{tail(edge_log)}")
    return run_dir, report, time.perf_counter() - started


def measure_run(run_dir: Path, report: dict[str, Any] | None, warmup: int, steps: int) -> dict[str, Any]:
    """Step times and bytes of a finished run (metrics.jsonl training lines), and wire vs ledger bytes."""
    run = load_run(run_dir)
    if run.summary is None:
        raise LaunchError(f"{run_dir}: the edge wrote no summary.json")
    if len(run.steps) != steps:
        raise LaunchError(f"{run_dir}/metrics.jsonl holds {len(run.steps)} steps, expected {steps}")
    measured = run.steps[warmup:]
    seconds = [r.step_seconds for r in measured if r.step_seconds is not None]
    traffic = run.summary.traffic
    result: dict[str, Any] = {
        "step_seconds": [r.step_seconds for r in run.steps],
        "median_step_seconds": statistics.median(seconds),
        "uplink_bytes_per_step": statistics.median(r.uplink_bytes for r in measured),
        "downlink_bytes_per_step": statistics.median(r.downlink_bytes for r in measured),
        "ledger_uplink_bytes": traffic.uplink_bytes,
        "ledger_downlink_bytes": traffic.downlink_bytes,
    }
    for key in ("edge_backward_seconds", "cloud_backward_seconds", "edge_encode_seconds", "edge_decode_seconds",
                "cloud_encode_seconds", "cloud_decode_seconds"):
        values = [getattr(r, key) for r in measured if getattr(r, key) is not None]
        result[f"median_{key}"] = statistics.median(values) if values else None
    if report is not None:
        result["wire_uplink_bytes"] = report["up"]["bytes"]
        result["wire_downlink_bytes"] = report["down"]["bytes"]
        result["wire_over_ledger_up"] = report["up"]["bytes"] / traffic.uplink_bytes
        result["wire_over_ledger_down"] = report["down"]["bytes"] / traffic.downlink_bytes
        result["emulator"] = report
    return result


# ---------------------------------------------------------------------------------------------
# the sweep


def sweep(cells: list[Cell], codes: dict[str, Path], work: Path, args: argparse.Namespace, profile: DeviceProfile,
          console: Any, partial: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every cell with every code version (``today`` and ``before``, their order flipping per cell)."""
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    try:
        for index, cell in enumerate(cells):
            data = cell_config(cell)
            config = write_cell_config(data, work / f"{cell.name}.toml", cell.name)
            candidate = predict(config, profile, profile, link_spec(cell, args.delay_ms))
            settings = None if cell.mbps is None else LinkSettings(cell.mbps, cell.mbps, args.delay_ms)
            row: dict[str, Any] = {**cell.key(), "link": cell.link, "config": data, "predicted": _candidate(candidate)}
            versions = list(codes.items())
            for version, code_dir in versions if index % 2 == 0 else versions[::-1]:
                try:
                    run_dir, report, wall = run_nodes(code_dir, work / f"{cell.name}.toml", work / version / cell.name,
                                                      settings, args)
                    measured = measure_run(run_dir, report, args.warmup, args.steps)
                except (LaunchError, OSError, ValueError) as exc:
                    console.print(f"[red]{cell.name} {version}: FAILED: {exc}[/red]")
                    failures.append({**cell.key(), "version": version, "error": str(exc)})
                    continue
                measured["process_wall_seconds"] = wall
                row[version] = measured
                console.print(f"  {cell.link:>12} chunks {cell.chunks} {cell.codecs:<9} {version:<6} "
                              f"median step {measured['median_step_seconds'] * 1e3:7.1f} ms  "
                              f"(predicted {candidate.step_seconds * 1e3:.1f})  [{wall:.0f} s]", highlight=False)
            if "today" in row:
                _derive(row, candidate, cell)
            rows.append(row)
            partial.update(rows=rows, failures=failures)
            write_report(args.out, "bench_wan", args.argv, {**partial, "complete": False})
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: reporting the cells done so far[/yellow]")
    return rows, failures


def _candidate(c: Candidate) -> dict[str, Any]:
    return {"step_seconds": c.step_seconds, "uplink_bytes": c.uplink_bytes, "downlink_bytes": c.downlink_bytes,
            "busy_seconds": c.busy_seconds, "bottleneck": c.bottleneck}


def _derive(row: dict[str, Any], candidate: Candidate, cell: Cell) -> None:
    """The bound, measured/bound, prediction error and speed-up of one cell."""
    today = row["today"]
    seconds, which, terms = bound(candidate, cell, today["uplink_bytes_per_step"], today["downlink_bytes_per_step"])
    measured = today["median_step_seconds"]
    row["bound_seconds"], row["bound_resource"], row["bound_terms"] = seconds, which, terms
    row["measured_over_bound"] = measured / seconds
    row["prediction_error"] = (candidate.step_seconds - measured) / measured
    if "before" in row:
        row["speedup_vs_before"] = row["before"]["median_step_seconds"] / measured


def planner_picks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per link: the cell the planner predicts fastest (predict over the grid's cells at that link, i.e.
    plan restricted to the grid's chunks and codecs with the demo's cut) against the fastest measured."""
    picks = []
    for link in dict.fromkeys(r["link"] for r in rows):
        mine = [r for r in rows if r["link"] == link and "today" in r]
        if len(mine) < 2:
            continue
        ranked = sorted(mine, key=lambda r: r["predicted"]["step_seconds"])
        pick, runner_up = ranked[0], ranked[1]
        best = min(mine, key=lambda r: r["today"]["median_step_seconds"])
        gap = pick["today"]["median_step_seconds"] / best["today"]["median_step_seconds"] - 1
        picks.append({"link": link, "cells": len(mine), "pick": _short(pick), "best": _short(best),
                      "pick_predicted_seconds": pick["predicted"]["step_seconds"],
                      "pick_measured_seconds": pick["today"]["median_step_seconds"],
                      "best_predicted_seconds": best["predicted"]["step_seconds"],
                      "best_measured_seconds": best["today"]["median_step_seconds"],
                      # How much slower the planner thinks its second choice is: ~0 is a tie.
                      "runner_up_margin": runner_up["predicted"]["step_seconds"] / pick["predicted"]["step_seconds"] - 1,
                      "gap": gap, "met": gap <= TARGET_PICK_GAP})
    return picks


def _short(row: dict[str, Any]) -> str:
    return f"chunks {row['chunks']} {row['uplink']}/{row['gradients']}"


def targets(rows: list[dict[str, Any]], picks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets with the figures that meet or miss them."""
    out = []
    mbps, chunks = TARGET_CELL
    for row in rows:
        if (row["mbps"], row["chunks"]) != (mbps, chunks) or "today" not in row:
            continue
        where = f"{row['link']} chunks {chunks} {row['uplink']}/{row['gradients']}"
        ratio = row["measured_over_bound"]
        out.append({"target": f"{where}: measured ≤ {TARGET_BOUND_RATIO}× bound", "value": f"{ratio:.2f}×",
                    "met": ratio <= TARGET_BOUND_RATIO})
        if "speedup_vs_before" in row:
            speedup = row["speedup_vs_before"]
            out.append({"target": f"{where}: ≥ {TARGET_SPEEDUP}× faster than before", "value": f"{speedup:.2f}×",
                        "met": speedup >= TARGET_SPEEDUP})
    errors = [r for r in rows if "prediction_error" in r]
    if errors:
        within = [r for r in errors if abs(r["prediction_error"]) <= TARGET_PREDICTION_ERROR]
        worst = max(errors, key=lambda r: abs(r["prediction_error"]))
        out.append({"target": f"planner prediction within {TARGET_PREDICTION_ERROR:.0%} of measured",
                    "value": f"{len(within)}/{len(errors)} cells; worst {worst['prediction_error']:+.0%} "
                             f"({worst['link']} chunks {worst['chunks']} {worst['uplink']}/{worst['gradients']})",
                    "met": len(within) == len(errors)})
    for pick in picks:
        out.append({"target": f"{pick['link']}: planner's pick within {TARGET_PICK_GAP:.0%} of the best measured",
                    "value": f"{pick['pick']} vs best {pick['best']}: {pick['gap']:+.1%}", "met": pick["met"]})
    return out


# ---------------------------------------------------------------------------------------------
# tables


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def _kib(nbytes: float | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 1024:.0f}"


def cells_table(rows: list[dict[str, Any]], title: str, before: bool) -> Table:
    t = Table(title=title, caption=(
        "step = median step_seconds after warm-up; bound = max(edge compute, cloud compute, uplink bytes·8/rate, "
        "downlink bytes·8/rate), compute from the device profile measured here, bytes from the run's metrics.jsonl; "
        "pred = pipeline.planner.predict (link rate, RTT = 2 × delay); wire/ledger = emulator bytes over the "
        "edge ledger's totals for the whole run, up / down"))
    headers = ["link", "chunks", "up/grad", "step ms", "bound ms", "(by)", "step/bound", "pred ms", "pred err",
               "up KiB/step", "down KiB/step", "wire/ledger"]
    if before:
        headers += ["before ms", "speed-up"]
    for header in headers:
        t.add_column(header, justify="left" if header in ("link", "up/grad", "(by)") else "right")
    for r in rows:
        today = r.get("today")
        wire = "–"
        if today is not None and "wire_over_ledger_up" in today:
            wire = f"{today['wire_over_ledger_up']:.3f} / {today['wire_over_ledger_down']:.3f}"
        cells = [
            r["link"], str(r["chunks"]), f"{r['uplink']}/{r['gradients']}",
            _ms(today and today["median_step_seconds"]), _ms(r.get("bound_seconds")), r.get("bound_resource", "–"),
            "–" if "measured_over_bound" not in r else f"{r['measured_over_bound']:.2f}×",
            _ms(r["predicted"]["step_seconds"]),
            "–" if "prediction_error" not in r else f"{r['prediction_error']:+.0%}",
            _kib(today and today["uplink_bytes_per_step"]), _kib(today and today["downlink_bytes_per_step"]), wire,
        ]
        if before:
            cells += [_ms(r["before"]["median_step_seconds"]) if "before" in r else "–",
                      f"{r['speedup_vs_before']:.2f}×" if "speedup_vs_before" in r else "–"]
        t.add_row(*cells)
    return t


def picks_table(picks: list[dict[str, Any]]) -> Table:
    t = Table(title="the planner's pick per link (predict over the grid's cells) vs the best measured",
              caption="runner-up = how much slower the planner predicts its second choice (about 0: a tie); "
                      "gap = the pick's measured step over the best measured, minus 1")
    for header in ("link", "cells", "planner's pick", "pred ms", "measured ms", "runner-up", "best measured",
                   "pred ms ", "measured ms ", "gap"):
        t.add_column(header, justify="left" if header in ("link", "planner's pick", "best measured") else "right")
    for p in picks:
        t.add_row(p["link"], str(p["cells"]), p["pick"], _ms(p["pick_predicted_seconds"]),
                  _ms(p["pick_measured_seconds"]), f"{p['runner_up_margin']:+.1%}", p["best"],
                  _ms(p["best_predicted_seconds"]), _ms(p["best_measured_seconds"]), f"{p['gap']:+.1%}")
    return t


def targets_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="targets (reported, not enforced)")
    for header in ("target", "measured", "met"):
        t.add_column(header)
    for r in rows:
        t.add_row(r["target"], r["value"], "[green]yes[/green]" if r["met"] else "[red]no[/red]")
    return t


# ---------------------------------------------------------------------------------------------
# command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,2,4,8; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def _mbps_list(text: str) -> list[float | None]:
    values: list[float | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "direct":
            values.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected Mbit/s numbers or 'direct', got {part!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"a rate must be above 0 Mbit/s, got {part!r}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("give at least one rate")
    return list(dict.fromkeys(values))


def _codec_list(text: str) -> list[tuple[str, str]]:
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        up, _, grad = part.partition("/")
        if (up, grad) not in CODECS:
            raise argparse.ArgumentTypeError(f"{part!r}: expected one of {', '.join(f'{u}/{g}' for u, g in CODECS)}")
        values.append((up, grad))
    return list(dict.fromkeys(values))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_wan.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure the training step time of the split pipeline over an emulated WAN link and compare it\n"
            "with the bottleneck bound, the planner's prediction and (--before) an older checkout.\n\n"
            "Configuration: the `edgepipe demo` configuration (MobileNetV2 0.25 on digits, batch 32, edge\n"
            "head 2 + tail 1) with [skip] policy = \"none\", link.uplink/link.gradients set per cell\n"
            "(fp32/fp32, int8/fp32, int8/int8; downlink fp32), partition.chunks per cell, and\n"
            f"train.val_fraction = {VAL_FRACTION} (the final evaluation crosses the link; it is not in any step time).\n\n"
            "Today's code is a copy of the packages (edgepipe, pipeline, edge_node, cloud_node, protos) of\n"
            "this checkout taken at start (--no-snapshot: the working tree itself); its SHA-256 is reported.\n\n"
            "Each cell is one run: `edgepipe-cloud --config F --listen 127.0.0.1:0 --threads T`, a\n"
            "LinkEmulator in this process from a free loopback port to the cloud (RATE Mbit/s each way,\n"
            "--delay-ms one way, no jitter or loss; none for `direct`), then\n"
            "`edgepipe-edge --config F --cloud EMULATOR --run-dir D --threads T --no-progress --max-steps N`.\n\n"
            "Measured per cell: the median `step_seconds` of metrics.jsonl's training lines after --warmup\n"
            "steps; uplink/downlink bytes per step (median, same lines); the bound max(edge compute, cloud\n"
            "compute, uplink bytes*8/rate, downlink bytes*8/rate), where compute is the planner's busy time\n"
            "per step from ONE device profile (pipeline.profiler.profile_layers, T threads) measured at start\n"
            "on this machine and used for both sides; measured/bound; pipeline.planner.predict with the same\n"
            "config and link (rate both ways, RTT = 2 x delay; `direct`: a free link) and its error; the\n"
            "emulator's wire bytes over the edge ledger's whole-run totals per direction (HTTP/2 framing\n"
            "makes it slightly above 1). Per link, the planner's pick (the cell it predicts fastest) is\n"
            "compared with the fastest measured cell.\n\n"
            "--before DIR runs every cell a second time with the code checked out in DIR (its processes\n"
            "start with DIR first on PYTHONPATH and DIR as cwd; checked at start by importing the packages\n"
            "the same way) and reports before/today per cell. Today and before alternate order per cell.\n"
            "Results: tables on stdout, JSON to --out (rewritten after every cell while running)."
        ),
    )
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (--max-steps; default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out (default %(default)s)")
    p.add_argument("--chunks", type=_int_list, default=list(CHUNKS), help="partition.chunks values (default 1,2,4,8)")
    p.add_argument("--mbps", type=_mbps_list, default=list(MBPS),
                   help="link rates in Mbit/s each way, 'direct' for no emulator (default 5,20,100,direct)")
    p.add_argument("--codecs", type=_codec_list, default=list(CODECS),
                   help="UPLINK/GRADIENTS settings (default fp32/fp32,int8/fp32,int8/int8)")
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way link delay, ms (default %(default)g)")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true",
                      help="4 cells instead of the grid (a smoke test): " + ", ".join(c.name for c in QUICK))
    grid.add_argument("--reduced", action="store_true",
                      help="20 Mbit/s at every --chunks value plus 5, 100 Mbit/s and direct at chunks 8, "
                           "every codec setting (instead of --chunks x --mbps x --codecs)")
    p.add_argument("--before", type=Path, metavar="DIR",
                   help="also run every cell with the code in DIR (e.g. a `git worktree add --detach DIR REV`)")
    p.add_argument("--no-snapshot", action="store_true",
                   help="run today's nodes from the working tree itself, not from a copy of its packages "
                        "taken at start (the default, so edits made meanwhile stay out of the runs)")
    p.add_argument("--threads", type=int, default=1, help="--threads of each node and of the profile (default 1)")
    p.add_argument("--profile-repeats", type=int, default=9, help="timed runs per layer in the profile (default 9)")
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds one run may take (default %(default)g)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_wan.json"), help="JSON result file (default %(default)s)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep configs, node logs and run directories in DIR")
    return p


def _cells(args: argparse.Namespace) -> list[Cell]:
    if args.quick:
        return list(QUICK)
    if args.reduced:
        return [c for c in reduced_grid() if (c.uplink, c.gradients) in args.codecs]
    return [Cell(m, c, up, grad) for m in args.mbps for c in args.chunks for up, grad in args.codecs]


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    args.argv = argv
    if args.steps < 1 or not 0 <= args.warmup < args.steps:
        p.error(f"need --steps ≥ 1 and 0 ≤ --warmup < --steps, got {args.steps} and {args.warmup}")
    if not (math.isfinite(args.delay_ms) and args.delay_ms >= 0):
        p.error(f"--delay-ms must be 0 or more, got {args.delay_ms}")
    for flag, value in (("--threads", args.threads), ("--profile-repeats", args.profile_repeats)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.before is not None and not (args.before / "edgepipe").is_dir():
        p.error(f"--before {args.before}: no edgepipe package there")
    console = report_console()
    cells = _cells(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_wan-"))
    work.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    codes = {"today": root}
    digests: dict[str, str | None] = {"today": None, "before": None}
    if not args.no_snapshot:
        codes["today"] = work / "code-today"
        shutil.rmtree(codes["today"], ignore_errors=True)
        digests["today"] = snapshot(root, codes["today"])
    if args.before is not None:
        codes["before"] = args.before.resolve()
    try:
        imports = {version: check_imports(code) for version, code in codes.items()}
    except LaunchError as exc:
        console.print(f"[red]bench_wan: {exc}[/red]")
        return 2
    for version, files in imports.items():
        console.print(f"{version}: nodes import from {codes[version]} ({files['edge_node']})", highlight=False)

    base = parse_config(cell_config(cells[0]), "benchmark config")
    started = time.perf_counter()
    profile = measure_profile(base, args.threads, args.profile_repeats)
    profile.save(work / "profile.json")
    console.print(f"profiled {profile.model_name} on {profile.device} with {profile.torch_threads} thread(s) in "
                  f"{time.perf_counter() - started:.0f} s; {len(cells)} cells x {len(codes)} version(s), "
                  f"{args.steps} steps ({args.warmup} warm-up) each; work dir {work}", highlight=False)
    fields: dict[str, Any] = {
        "what": "median step_seconds (metrics.jsonl) of a cloud and an edge process through LinkEmulator, against "
                "the bottleneck bound (compute from one device profile measured here, bytes from the run), "
                "pipeline.planner.predict and, with --before, an older checkout",
        "settings": {"steps": args.steps, "warmup": args.warmup, "delay_ms": args.delay_ms, "threads": args.threads,
                     "val_fraction": VAL_FRACTION, "cells": [c.key() for c in cells]},
        "code": {version: {"dir": str(code), "copied_from": str(root) if digests[version] else None,
                           "sha256": digests[version], "imports": imports[version]}
                 for version, code in codes.items()},
        "bound_compute_source": "device profile (pipeline.profiler.profile_layers, this machine, both sides)",
        "profile": json.loads(profile.model_dump_json()),
        "loadavg_before": list(os.getloadavg()),
    }
    rows, failures = sweep(cells, codes, work, args, profile, console, fields)
    picks = planner_picks(rows)
    checks = targets(rows, picks)
    fields.update(rows=rows, failures=failures, planner_picks=picks, targets=checks, complete=True,
                  total_seconds=time.perf_counter() - started, loadavg_after=list(os.getloadavg()))
    title = (f"demo model over an emulated link ({args.delay_ms:g} ms one way), {args.steps - args.warmup} measured "
             f"steps per cell, {args.threads} torch thread(s) per node")
    publish(console, [cells_table(rows, title, "before" in codes), picks_table(picks) if picks else None,
                      targets_table(checks) if checks else None], args.out, "bench_wan", argv, fields)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
