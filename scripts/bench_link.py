"""Benchmark the link codecs: train the demo config split over loopback gRPC with each uplink/gradient codec.

Every run is the demo's built-in configuration (``edgepipe.demo.DEMO_CONFIG``) with
``[skip] policy = "none"`` and only ``link.uplink`` / ``link.gradients`` changed, launched as a user
would (cloud server process + edge worker process). Ratios are against the all-fp32 run of the
same invocation (uplink fp32, gradients fp32, the demo's downlink).

    python scripts/bench_link.py                                   # every variant, JSON to bench_link.json
    python scripts/bench_link.py --variants fp32/fp32,int4/fp32 --epochs 2
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from edgepipe.split_run import RunResult, demo_config, publish, report_console, run_variants
from pipeline.codecs import codec_names
from pipeline.traffic import MIB

#: (uplink activations, gradients both ways); the first is the baseline.
VARIANTS: tuple[tuple[str, str], ...] = (
    ("fp32", "fp32"),
    ("fp16", "fp32"),
    ("bf16", "fp32"),
    ("int8", "fp32"),
    ("int4", "fp32"),
    ("int8", "int8"),
    ("int8", "int8-sr"),
)
BASELINE = ("fp32", "fp32")

#: Targets from the issue (reported, not enforced): uplink activation bytes ratio vs fp32 and
#: accuracy loss in points.
TARGETS = {"int8": (0.26, 0.5), "int4": (0.14, 2.0)}

_CODEC_KEYS = ("edge_encode_seconds", "edge_decode_seconds", "cloud_encode_seconds", "cloud_decode_seconds")


def label(variant: tuple[str, str]) -> str:
    return f"{variant[0]}/{variant[1]}"


def measure(result: RunResult) -> dict[str, Any]:
    """Absolute numbers of one run."""
    s = result.summary
    steps = s.steps
    traffic = s.traffic
    codec_seconds = {key: getattr(s, key) for key in _CODEC_KEYS}
    return {
        "final_val_accuracy": s.final_val_accuracy,
        "val_accuracy_per_epoch": [e.val_accuracy for e in result.run.evals],
        "steps": steps,
        "uplink_bytes": traffic.uplink_bytes,
        "downlink_bytes": traffic.downlink_bytes,
        "uplink_activation_bytes": result.kind_bytes("activation", "uplink"),
        "uplink_gradient_bytes": result.kind_bytes("gradient", "uplink"),
        "downlink_activation_bytes": result.kind_bytes("activation", "downlink"),
        "downlink_gradient_bytes": result.kind_bytes("gradient", "downlink"),
        "by_kind": traffic.by_kind.model_dump(),
        "median_step_seconds": result.median_step_seconds(),
        "wall_seconds": result.wall_seconds,
        # Sums over the training steps (the worker's summary totals), and per step.
        **codec_seconds,
        **{f"{key}_per_step": (value / steps if steps and value is not None else None)
           for key, value in codec_seconds.items()},
        "losses_finite": all(r.loss is not None and math.isfinite(r.loss) for r in result.steps),
        "final_loss": result.steps[-1].loss if result.steps else None,
    }


def compare(rows: list[dict[str, Any]]) -> None:
    """Add ratios and deltas against the baseline row and the issue's target checks."""
    base = next((r for r in rows if (r["uplink"], r["gradients"]) == BASELINE), None)
    for row in rows:
        m = row["metrics"]
        if base is None:
            row["vs_fp32"] = None
        else:
            b = base["metrics"]
            row["vs_fp32"] = {
                "accuracy_delta_points": 100 * (m["final_val_accuracy"] - b["final_val_accuracy"]),
                "uplink_bytes_ratio": m["uplink_bytes"] / b["uplink_bytes"],
                "uplink_activation_bytes_ratio": m["uplink_activation_bytes"] / b["uplink_activation_bytes"],
                "downlink_bytes_ratio": m["downlink_bytes"] / b["downlink_bytes"],
                "median_step_ratio": m["median_step_seconds"] / b["median_step_seconds"],
            }
        target = TARGETS.get(row["uplink"]) if row["gradients"] == "fp32" else None
        if target is None or row["vs_fp32"] is None:
            row["targets"] = None
            continue
        ratio, points = target
        v = row["vs_fp32"]
        row["targets"] = {
            "uplink_activation_ratio_max": ratio,
            "accuracy_loss_points_max": points,
            "uplink_activation_ratio_met": v["uplink_activation_bytes_ratio"] <= ratio,
            "uplink_total_ratio_met": v["uplink_bytes_ratio"] <= ratio,
            "accuracy_met": v["accuracy_delta_points"] >= -points,
        }


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{1e3 * value:.2f}"


def table(rows: list[dict[str, Any]], title: str) -> Table:
    """The rich table of the runs."""
    t = Table(title=title, caption="ratios vs the fp32/fp32 run of this invocation; uplink = all uplink bytes "
              "(activations + dL/dz gradients + control + evaluation), act = activation kind only; "
              "codec ms = mean per training step (edge enc / edge dec / cloud enc / cloud dec)")
    for header in ("uplink", "gradients", "val acc", "Δ acc\n(pts)", "uplink\nratio", "uplink act\nratio",
                   "downlink\nratio", "median\nstep s", "edge enc\nms/step", "edge dec\nms/step",
                   "cloud enc\nms/step", "cloud dec\nms/step"):
        t.add_column(header, justify="left" if header in ("uplink", "gradients") else "right")
    for row in rows:
        m, v = row["metrics"], row["vs_fp32"] or {}
        t.add_row(
            row["uplink"], row["gradients"], f"{m['final_val_accuracy']:.4f}",
            "n/a" if not v else f"{v['accuracy_delta_points']:+.2f}",
            "n/a" if not v else f"{v['uplink_bytes_ratio']:.3f}",
            "n/a" if not v else f"{v['uplink_activation_bytes_ratio']:.3f}",
            "n/a" if not v else f"{v['downlink_bytes_ratio']:.3f}",
            f"{m['median_step_seconds']:.3f}",
            *(_ms(m[f"{key}_per_step"]) for key in _CODEC_KEYS),
        )
    return t


def targets_table(rows: list[dict[str, Any]]) -> Table:
    """The issue's targets per codec."""
    t = Table(title="targets (reported, not enforced)")
    for header in ("uplink", "target", "uplink act ratio", "uplink total ratio", "Δ acc (pts)"):
        t.add_column(header)
    for row in rows:
        g = row["targets"]
        if g is None:
            continue
        v = row["vs_fp32"]

        def mark(ok: bool, text: str) -> str:
            return f"[green]{text} yes[/green]" if ok else f"[red]{text} no[/red]"

        t.add_row(
            row["uplink"],
            f"act ≤ {g['uplink_activation_ratio_max']}, acc ≥ -{g['accuracy_loss_points_max']} pt",
            mark(g["uplink_activation_ratio_met"], f"{v['uplink_activation_bytes_ratio']:.3f}"),
            mark(g["uplink_total_ratio_met"], f"{v['uplink_bytes_ratio']:.3f}"),
            mark(g["accuracy_met"], f"{v['accuracy_delta_points']:+.2f}"),
        )
    return t


def _variant(text: str) -> tuple[str, str]:
    up, sep, grads = text.partition("/")
    grads = grads if sep else "fp32"
    activation, gradient = codec_names("activation"), codec_names("gradient")
    if up not in activation or grads not in gradient:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected UPLINK[/GRADIENTS] with UPLINK in {', '.join(activation)} "
            f"and GRADIENTS in {', '.join(gradient)}"
        )
    return up, grads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    base = demo_config()
    parser = argparse.ArgumentParser(
        description=(
            "Train the demo configuration split over loopback gRPC (a cloud server and an edge worker "
            "process, one torch thread each) with skip policy 'none' once per link codec variant "
            "UPLINK/GRADIENTS, and compare accuracy, uplink/downlink bytes, step time and codec time "
            "against the fp32/fp32 run (which always runs first). Prints a table and writes JSON. "
            "Each run takes about 1-1.5 min on two CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--variants", default=",".join(label(v) for v in VARIANTS),
                        help="comma-separated UPLINK/GRADIENTS codec pairs (GRADIENTS defaults to fp32)")
    parser.add_argument("--epochs", type=int, default=base["train"]["epochs"], help="train.epochs (default: the demo's)")
    parser.add_argument("--out", type=Path, default=Path("bench_link.json"), help="JSON results file")
    parser.add_argument("--keep-runs", type=Path, default=None, metavar="DIR",
                        help="keep each run's config, run dir and node logs in DIR/UPLINK-GRADIENTS; "
                             "default: temporary, removed")
    args = parser.parse_args(argv)
    try:
        variants = [_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--variants: {exc}")
    if BASELINE not in variants:
        variants.insert(0, BASELINE)
    # The baseline first, duplicates dropped.
    args.variant_list = sorted(dict.fromkeys(variants), key=lambda v: v != BASELINE)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = report_console()
    base = demo_config()
    base["skip"] = {"policy": "none"}
    base["train"]["epochs"] = args.epochs
    variants = [
        (f"{up}-{grad}", "", {"link": {**base["link"], "uplink": up, "gradients": grad}})
        for up, grad in args.variant_list
    ]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for label, config, result in run_variants(base, variants, console=console, keep_dir=args.keep_runs):
        metrics = measure(result)
        console.print(
            f"  acc {metrics['final_val_accuracy']:.4f}  up {metrics['uplink_bytes'] / MIB:.1f} MiB  "
            f"down {metrics['downlink_bytes'] / MIB:.1f} MiB  ({result.wall_seconds:.0f} s)", highlight=False,
        )
        link = config["link"]
        rows.append({"uplink": link["uplink"], "gradients": link["gradients"], "downlink": link["downlink"],
                     "metrics": metrics})
    compare(rows)
    title = (f"link codecs on the demo config (skip none, downlink {base['link']['downlink']}, "
             f"{args.epochs} epochs)")
    targets = targets_table(rows) if any(r["targets"] for r in rows) else None
    publish(console, [table(rows, title), targets], args.out, "bench_link", argv, {
        "base_config": base,
        "epochs": args.epochs,
        "total_seconds": time.perf_counter() - started,
        "targets": {up: {"uplink_activation_ratio_max": r, "accuracy_loss_points_max": p}
                    for up, (r, p) in TARGETS.items()},
        "runs": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
