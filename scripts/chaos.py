"""Chaos run: train the demo config split, killing the cloud, the edge or both at random; nothing committed is lost.

An uninterrupted run of the demo's configuration (``edgepipe.demo.DEMO_CONFIG``, shortened by
``--epochs`` / ``--max-steps``, a checkpoint every ``--every`` steps) is the reference. Then
the same training runs again as processes, and at ``--kills`` random steps one side, or both,
is killed with SIGKILL: a killed cloud is restarted on the same address with the same
``--state-dir`` (the edge, left running, reconnects), a killed edge is restarted with
``--resume``. Printed: each kill (where, what was committed, where the run went on, the steps
trained again), the committed steps lost (must be 0), the wall-time overhead, each side's
checkpoint size and save time, and whether the final model is bit-identical to the reference.

    python scripts/chaos.py                              # 5 kills, 2 epochs, JSON to chaos.json
    python scripts/chaos.py --kills 8 --seed 3 --max-steps 120 --out runs/chaos.json
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from edgepipe.launch import LaunchError, edge_command, run_edge, start_cloud, stop, tail
from edgepipe.split_run import demo_config, publish, report_console, write_config
from pipeline.checkpoint import count_lines, load_state
from pipeline.checkpoints import CheckpointStore

ROOT = Path(__file__).resolve().parent.parent
VICTIMS = ("cloud", "edge", "both")
#: Where an edge says the run goes on: after a checkpoint's step, or from the start.
_RESUMED = re.compile(r"(?:resuming run|reconnected to \S+ run) [0-9a-f]{32} (?:continues )?"
                      r"(?:after step (\d+)|from the start)")
_WAIT_SECONDS = 600.0


class ChaosError(RuntimeError):
    """A node did not do what the chaos run waits for; the message holds the tail of its log."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="random kills, at least 5 (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of where the kills fall and whom they hit")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the demo config (default %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every this many steps (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("chaos.json"), help="JSON report (default %(default)s)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories and logs here")
    args = parser.parse_args(argv)
    if args.kills < 5:
        parser.error("--kills must be at least 5")
    return args


def _wait(condition: Callable[[], bool], process: subprocess.Popen[Any], what: str, log: Path) -> None:
    deadline = time.monotonic() + _WAIT_SECONDS
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise ChaosError(f"{what}: the process exited ({process.returncode}) or took too long:\n{tail(log)}")
        time.sleep(0.01)


class Chaos:
    """The processes of one chaos run: a cloud on a fixed address, an edge, their logs and the kills."""

    def __init__(self, config: Path, work: Path) -> None:
        self.config, self.work = config, work
        self.state, self.run_dir = work / "state", work / "run"
        self.logs = 0
        self.cloud, self.address = self._start_cloud("127.0.0.1:0")
        self.edge, self.edge_log = self._start_edge()
        self.edge_checkpoints = CheckpointStore(self.run_dir / "checkpoints")

    def _log(self, side: str) -> Path:
        self.logs += 1
        return self.work / f"{self.logs:02d}-{side}.log"

    def _start_cloud(self, listen: str) -> tuple[subprocess.Popen[str], str]:
        return start_cloud(self.config, stderr=self._log("cloud"), cwd=ROOT,
                           extra=["--listen", listen, "--state-dir", str(self.state)])

    def _start_edge(self, *flags: str) -> tuple[subprocess.Popen[Any], Path]:
        log = self._log("edge")
        command = edge_command(self.config, cloud=self.address, run_dir=self.run_dir, progress=False, extra=flags)
        with log.open("w") as out:
            return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT), log

    def step_lines(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return sum(1 for line in path.read_text().splitlines() if '"step"' in line) if path.exists() else 0

    def kill(self, at_lines: int, victim: str) -> dict[str, Any]:
        """Wait for ``at_lines`` metrics lines, kill ``victim``, bring it back; what it cost."""
        _wait(lambda: count_lines(self.run_dir / "metrics.jsonl") >= at_lines, self.edge, "training", self.edge_log)
        committed = self.edge_checkpoints.latest()
        if victim in ("edge", "both"):
            self.edge.kill()
            self.edge.wait()
        if victim in ("cloud", "both"):
            self.cloud.kill()
            self.cloud.wait()
        done = self.step_lines()
        seen = _RESUMED.findall(self.edge_log.read_text()) if victim == "cloud" else []
        if victim != "edge":
            stop(self.cloud)
            self.cloud, _ = self._start_cloud(self.address)
        if victim != "cloud":
            self.edge, self.edge_log = self._start_edge("--resume")
        _wait(lambda: len(_RESUMED.findall(self.edge_log.read_text())) > len(seen), self.edge, "the resume",
              self.edge_log)
        after = _RESUMED.findall(self.edge_log.read_text())[len(seen)]
        resumed = -1 if not after else int(after)
        last = -1 if committed is None else committed
        return {"victim": victim, "step": done, "committed": committed, "resumed_after": None if not after else resumed,
                "steps_redone": max(done - (resumed + 1), 0), "committed_lost": max(last - resumed, 0)}

    def finish(self) -> int:
        code = self.edge.wait(timeout=_WAIT_SECONDS)
        stop(self.cloud)
        return code


def reference_run(config: Path, work: Path) -> float:
    """The uninterrupted run into ``work/run``; its wall seconds."""
    started = time.perf_counter()
    cloud, address = start_cloud(config, stderr=work / "cloud.log", cwd=ROOT,
                                 extra=["--state-dir", str(work / "state")])
    try:
        code = run_edge(edge_command(config, cloud=address, run_dir=work / "run", progress=False),
                        log=work / "edge.log", cwd=ROOT)
    finally:
        stop(cloud)
    if code != 0:
        raise LaunchError(f"the reference edge exited with {code}:\n{tail(work / 'edge.log')}")
    return time.perf_counter() - started


def _lines(run_dir: Path, *, timing: bool = False) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, without the timing columns unless ``timing``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records if timing else [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


def _checkpoint_bytes(directory: Path) -> int:
    """Bytes of the newest checkpoint (tensors and record) under ``directory``."""
    records = sorted(directory.rglob("step-*.json"), key=lambda p: p.name)
    if not records:
        return 0
    newest = records[-1]
    return newest.stat().st_size + newest.with_suffix(".pt").stat().st_size


def sides(reference: Path) -> dict[str, Any]:
    """Each side's checkpoint size and save time, from the reference run."""
    run = reference / "run"
    summary = json.loads((run / "summary.json").read_text())
    every, last = summary["config"]["checkpoint"]["every_steps"], summary["steps"] - 1
    steps = [r for r in _lines(run, timing=True) if "step" in r]
    per_epoch = sum(1 for r in steps if r["epoch"] == 0)
    # The edge's rule (docs/RESUME_PROTOCOL.md): every N steps and at epoch ends, never the last step.
    saved = {r["step"] for r in steps if ((r["step"] + 1) % every == 0 or (r["step"] + 1) % per_epoch == 0)
             and r["step"] != last}
    with_save = statistics.median(r["step_seconds"] for r in steps if r["step"] in saved)
    without = statistics.median(r["step_seconds"] for r in steps if r["step"] not in saved)
    return {
        "edge_checkpoint_bytes": _checkpoint_bytes(run / "checkpoints"),
        "cloud_checkpoint_bytes": _checkpoint_bytes(reference / "state"),
        "edge_save_seconds": summary["checkpoint_seconds"] / max(summary["checkpoints"], 1),
        # The cloud saves inside the step, before it answers: the difference of median step times.
        "cloud_save_seconds_estimate": with_save - without,
        "checkpoints": summary["checkpoints"],
    }


def plan_kills(args: argparse.Namespace, total_lines: int) -> list[tuple[int, str]]:
    """Where (metrics line counts) the kills fall and whom they hit: each victim at least once."""
    chooser = random.Random(args.seed)
    points = sorted(chooser.sample(range(args.every + 1, total_lines - 2), args.kills))
    victims = [*VICTIMS, *(chooser.choice(VICTIMS) for _ in range(args.kills - len(VICTIMS)))]
    chooser.shuffle(victims)
    return list(zip(points, victims))


def kill_table(kills: list[dict[str, Any]]) -> Table:
    table = Table(title="kills")
    for header in ("#", "killed", "steps done", "committed", "went on after", "steps redone", "committed lost"):
        table.add_column(header, justify="right")
    for number, kill in enumerate(kills, 1):
        after = "start" if kill["resumed_after"] is None else str(kill["resumed_after"])
        table.add_row(str(number), kill["victim"], str(kill["step"]), str(kill["committed"]), after,
                      str(kill["steps_redone"]), str(kill["committed_lost"]))
    return table


def result_table(result: dict[str, Any]) -> Table:
    table = Table(title="chaos run vs the uninterrupted run")
    table.add_column("")
    table.add_column("value", justify="right")
    side = result["sides"]
    rows = [
        ("kills", str(len(result["kills"]))),
        ("steps redone", str(sum(k["steps_redone"] for k in result["kills"]))),
        ("committed steps lost (must be 0)", str(sum(k["committed_lost"] for k in result["kills"]))),
        ("wall s: uninterrupted / chaos", f"{result['reference_seconds']:.1f} / {result['chaos_seconds']:.1f}"),
        ("wall-time overhead", f"{result['chaos_seconds'] / result['reference_seconds'] - 1:+.0%}"),
        ("edge checkpoint KiB, save ms",
         f"{side['edge_checkpoint_bytes'] / 1024:.0f}, {side['edge_save_seconds'] * 1e3:.1f}"),
        ("cloud checkpoint KiB, save ms (from step times)",
         f"{side['cloud_checkpoint_bytes'] / 1024:.0f}, {side['cloud_save_seconds_estimate'] * 1e3:.1f}"),
        ("final model bit-identical", "yes" if result["bit_identical"] else "NO"),
        ("metrics lines identical (timing aside)", "yes" if result["metrics_identical"] else "NO"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = report_console()
    config = demo_config()
    config["train"]["epochs"] = args.epochs
    if args.max_steps is not None:
        config["train"]["max_steps"] = args.max_steps
    config["checkpoint"] = {"every_steps": args.every}
    work = Path(tempfile.mkdtemp(prefix="edgepipe-chaos-"))
    try:
        path = write_config(config, work / "config.toml", "chaos")
        (work / "reference").mkdir()
        (work / "chaos").mkdir()
        console.print("uninterrupted run ...")
        reference_seconds = reference_run(path, work / "reference")
        total_lines = count_lines(work / "reference" / "run" / "metrics.jsonl")
        kills = plan_kills(args, total_lines)
        console.print(f"chaos run: {len(kills)} kills at metrics lines {[at for at, _ in kills]} of {total_lines} ...")
        started = time.perf_counter()
        chaos = Chaos(path, work / "chaos")
        results = []
        for at, victim in kills:
            results.append(chaos.kill(at, victim))
            who = "both sides" if victim == "both" else f"the {victim}"
            console.print(f"  killed {who} after {results[-1]['step']} steps", highlight=False)
        if chaos.finish() != 0:
            raise ChaosError(f"the edge failed:\n{tail(chaos.edge_log)}")
        chaos_seconds = time.perf_counter() - started
        ours = load_state(work / "chaos" / "run" / "model.pt")
        theirs = load_state(work / "reference" / "run" / "model.pt")
        result = {
            "kills": results,
            "reference_seconds": reference_seconds,
            "chaos_seconds": chaos_seconds,
            "sides": sides(work / "reference"),
            "bit_identical": ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours),
            "metrics_identical": _lines(work / "chaos" / "run") == _lines(work / "reference" / "run"),
        }
        publish(console, [kill_table(results), result_table(result)], args.out, "chaos", argv,
                {"config": config, "seed": args.seed, **result})
    finally:
        if args.keep is not None:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    lost = sum(k["committed_lost"] for k in results)
    return 0 if lost == 0 and result["bit_identical"] and result["metrics_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
