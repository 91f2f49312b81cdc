"""Benchmark pipeline.codecs: one-thread encode/decode throughput and error per codec on realistic tensors."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from pipeline import codecs

# (name, shape, data kind): MobileNetV2-CIFAR block 1 output at micro-batch 16, before and after
# its ReLU6, and 4 MiB tensors laid out as a wide activation and as a fully connected gradient.
CASES = (
    ("mnv2-block1 normal", (16, 16, 32, 32), "normal"),
    ("mnv2-block1 relu", (16, 16, 32, 32), "relu"),
    ("4MiB [1,1024,1024]", (1, 1024, 1024), "normal"),
    ("4MiB [256,4096]", (256, 4096), "normal"),
)
# fp32/fp16/bf16 do not depend on the role, so they are measured once, as activations.
RUNS = tuple((codec, "activation") for codec in codecs.codec_names("activation")) + (
    ("int8", "gradient"),
    ("int4", "gradient"),
    ("int8-sr", "gradient"),
)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_tensor(shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    """Random-normal data, or the same through ReLU6 (half the elements exactly 0)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.clamp(0.0, 6.0) if kind == "relu" else x


def bench(repeats: int, seed: int) -> list[dict[str, object]]:
    """One result row per case x codec x role."""
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for case, shape, kind in CASES:
        x = make_tensor(shape, kind, seed)
        nbytes = x.numel() * 4
        for codec, role in RUNS:
            encoded = codecs.encode(x, codec, role, generator=generator)
            enc_s = median_seconds(lambda: codecs.encode(x, codec, role, generator=generator), repeats)
            dec_s = median_seconds(lambda: codecs.decode(encoded), repeats)
            err = codecs.decode(encoded) - x
            rows.append(
                {
                    "case": case,
                    "shape": list(shape),
                    "codec": codec,
                    "role": role,
                    "input_bytes": nbytes,
                    "payload_bytes": len(encoded.data),
                    "params": len(encoded.scale) + len(encoded.zero_point),
                    "encode_ms": enc_s * 1e3,
                    "decode_ms": dec_s * 1e3,
                    "encode_gbps": nbytes / enc_s / 1e9,
                    "decode_gbps": nbytes / dec_s / 1e9,
                    "rel_rms_error": float(err.norm() / x.norm()),
                    "max_abs_error": float(err.abs().max()),
                }
            )
    return rows


def show(rows: list[dict[str, object]], console: Console) -> None:
    table = Table(title="pipeline.codecs, 1 thread, median (GB/s of float32 input)")
    for name in ("case", "codec", "role"):
        table.add_column(name)
    for name in ("payload", "params", "enc GB/s", "dec GB/s", "enc ms", "dec ms", "rel RMS err"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            str(r["case"]),
            str(r["codec"]),
            str(r["role"]),
            f"{r['payload_bytes']:,}",
            str(r["params"]),
            f"{r['encode_gbps']:.2f}",
            f"{r['decode_gbps']:.2f}",
            f"{r['encode_ms']:.3f}",
            f"{r['decode_ms']:.3f}",
            f"{r['rel_rms_error']:.2e}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Measure encode and decode throughput of every link codec on ONE torch thread, in GB/s of "
            "float32 input, for a MobileNetV2 block-1 activation at micro-batch 16 ([16,16,32,32], "
            "random-normal and post-ReLU6) and two 4 MiB tensors ([1,1024,1024], [256,4096]). "
            "Each figure is the median of --repeats timed calls. Prints a table and writes JSON."
        )
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench_codecs.json"), help="JSON result file (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=21, help="timed calls per measurement (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the test tensors and int8-sr (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    torch.set_num_threads(1)
    rows = bench(args.repeats, args.seed)
    console = Console()
    # Rich assumes 80 columns when output is redirected, which would wrap every row.
    show(rows, console if console.is_terminal else Console(width=150))
    report = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
