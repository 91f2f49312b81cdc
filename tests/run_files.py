"""What resume tests compare between two runs: their models, their metrics lines, their summaries."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import load_state


def equal_models(a: Path, b: Path) -> bool:
    """Whether two run directories' model.pt are equal to the last bit."""
    first, second = load_state(a / "model.pt"), load_state(b / "model.pt")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without its timing columns."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


def run_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json, parsed independently of pipeline.runs."""
    return json.loads((run_dir / "summary.json").read_text())
