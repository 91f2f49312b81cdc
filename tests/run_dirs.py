"""Real run directories for the run-report tests: a split run over loopback gRPC and a local run, trained once."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cloud_node.servicer import serve
from edge_node.worker import train
from pipeline.config import Config, parse_config

#: 10 % of digits for training: 5 steps of 32 per epoch, so 12 steps span three epochs (0, 1, 2).
MAX_STEPS = 12
#: The manual policy freezes layer 0 (the whole edge head) from this step on.
FREEZE_STEP = 5


def run_config(policy: str = "manual") -> Config:
    """tinycnn on the digits, edge head = layer 0, frozen at :data:`FREEZE_STEP` (``policy="none"``: never)."""
    skip = {"policy": "manual", "stop_layers": [0], "stop_steps": [FREEZE_STEP]} if policy == "manual" else {}
    return parse_config(
        {
            "model": {"name": "tinycnn", "input_shape": [1, 8, 8]},
            "partition": {"edge_head": 1, "edge_tail": 1, "chunks": 4},
            "skip": skip,
            "train": {"dataset": "digits", "batch_size": 32, "epochs": 3, "val_fraction": 0.9, "eval_batch_size": 64},
        }
    )


def trained_run(factory: pytest.TempPathFactory, mode: str) -> Path:
    """The run directory of a ``split`` or ``local`` run of :func:`run_config`, trained once per session.

    Every test module asks for the same two runs; they live under the session's base temporary
    directory, so the second module to ask reuses them.  Tests that change files copy them first.
    """
    run_dir = factory.getbasetemp() / f"edgepipe-{mode}-run"
    if (run_dir / "summary.json").exists() and summary(run_dir).get("status") == "completed":
        return run_dir
    config = run_config()
    if mode == "local":
        train(config, run_dir=run_dir, max_steps=MAX_STEPS, overwrite=True)
        return run_dir
    server, port, _ = serve(config, "127.0.0.1:0")
    try:
        train(config, run_dir=run_dir, cloud=f"127.0.0.1:{port}", max_steps=MAX_STEPS, overwrite=True)
    finally:
        server.stop(None)
    return run_dir


def records(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of metrics.jsonl, parsed independently of pipeline.runs."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict[str, Any]:
    """summary.json, parsed independently of pipeline.runs."""
    return json.loads((run_dir / "summary.json").read_text())


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of ``run_dir`` under ``tmp_path``, for tests that damage files."""
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))
