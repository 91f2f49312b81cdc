"""The Python API: what README shows runs as shown, and every exported name is documented."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

import edgepipe
from pipeline.checkpoint import load_state

ROOT = Path(__file__).resolve().parent.parent


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python example"
    return match.group(1)


def test_the_readme_example_runs_as_shown(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _readme_example()], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "epoch 1:" in result.stdout, result.stdout
    state = load_state(tmp_path / "runs" / "api" / "model.pt")
    assert state and all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_every_exported_name_is_documented() -> None:
    assert edgepipe.__all__, "the API exports nothing"
    undocumented = [name for name in edgepipe.__all__ if not (getattr(edgepipe, name).__doc__ or "").strip()]
    assert not undocumented, f"exported without a docstring: {undocumented}"


def test_train_is_quiet_without_callbacks(tmp_path: Path, capfd) -> None:
    config = edgepipe.parse_config({"model": {"input_shape": [1, 8, 8]}, "train": {"dataset": "synthetic",
                                    "batch_size": 16, "epochs": 1, "max_steps": 2}})
    summary = edgepipe.train(config, run_dir=tmp_path / "run")
    out, err = capfd.readouterr()
    assert summary["steps"] == 2
    assert out == "" and err == "", f"train() printed: {out!r} {err!r}"
    assert edgepipe.read_run(tmp_path / "run").summary.steps == 2
