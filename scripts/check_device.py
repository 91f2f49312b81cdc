"""Check the cloud on this machine's best device: the demo config trained split, against the same run on the CPU.

Both runs are the demo's built-in configuration (``edgepipe.demo.DEMO_CONFIG``) for a handful of
steps, launched as a user would: a cloud server process (``--device cpu``, then ``--device
BEST``) and an edge worker process on the CPU. The table shows each run's step time and the
largest difference of any parameter of the trained model from the CPU run's; on a machine whose
best device is the CPU both runs are the same computation and the difference is 0.

    python scripts/check_device.py                     # 8 steps, JSON to runs/check_device.json
    python scripts/check_device.py --steps 20 --out /tmp/device.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgepipe.launch import LaunchError, edge_command, run_edge, start_cloud, stop, tail
from edgepipe.demo import DEMO_CONFIG
from pipeline.checkpoint import load_state, save_json
from pipeline.devices import available_devices, best_device
from pipeline.runs import load_run


def _train(config: Path, work: Path, device: str, steps: int, threads: int, timeout: float) -> dict[str, Any]:
    """One split run of ``config`` with the cloud on ``device``, in a new directory of ``work``: its step
    times and trained model."""
    work.mkdir(parents=True)
    run_dir, cloud_log, edge_log = work / "run", work / "cloud.log", work / "edge.log"
    cloud, address = start_cloud(config, threads=threads, stderr=cloud_log, extra=["--device", device])
    try:
        command = edge_command(config, cloud=address, run_dir=run_dir, threads=threads, max_steps=steps,
                               progress=False, extra=["--device", "cpu"])
        code = run_edge(command, log=edge_log, timeout=timeout)
    finally:
        stop(cloud)
    if code != 0:
        raise LaunchError(f"the edge worker exited with {code}:\n{tail(edge_log)}")
    seconds = [record.step_seconds for record in load_run(run_dir).steps if record.step_seconds is not None]
    return {"device": device, "step_seconds": seconds, "model": load_state(run_dir / "model.pt")}


def _largest_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest absolute difference of any floating-point entry of two state dicts."""
    return max(
        ((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point() and a[k].numel()),
        default=0.0,
    )


def main(argv: list[str] | None = None) -> int:
    """Train both runs, print the table, write the JSON; 1 when a run failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take (default %(default)g)")
    parser.add_argument("--out", type=Path, default=Path("runs/check_device.json"),
                        help="JSON results (default %(default)s)")
    args = parser.parse_args(argv)
    best = best_device()
    console = Console()
    console.print(f"devices here: {', '.join(available_devices())}; best: [bold]{best}[/bold]")
    with tempfile.TemporaryDirectory(prefix="check-device-") as tmp:
        work = Path(tmp)
        config = work / "demo.toml"
        config.write_text(DEMO_CONFIG, encoding="utf-8")
        try:
            runs = [
                _train(config, work / label, device, args.steps, args.threads, args.timeout)
                for label, device in (("reference", "cpu"), ("best", best))
            ]
        except LaunchError as exc:
            print(f"check_device: {exc}", file=sys.stderr)
            return 1
    reference = runs[0]["model"]
    table = Table(title=f"demo config, {args.steps} steps, edge on cpu")
    table.add_column("run")
    table.add_column("cloud device")
    for column in ("first step s", "median step s", "largest |Δ| vs cpu"):
        table.add_column(column, justify="right")
    results = []
    for label, run in zip(("reference", "best"), runs):
        seconds = run["step_seconds"]
        median = statistics.median(seconds[1:]) if len(seconds) > 1 else None  # the first step warms up
        difference = _largest_difference(run["model"], reference)
        results.append({"run": label, "cloud_device": run["device"], "steps": len(seconds), "step_seconds": seconds,
                        "median_step_seconds": median, "max_parameter_difference": difference})
        table.add_row(label, run["device"], f"{seconds[0]:.3f}" if seconds else "-",
                      "-" if median is None else f"{median:.3f}", f"{difference:.3g}")
    console.print(table)
    save_json({"best_device": best, "available_devices": available_devices(), "runs": results}, args.out)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
