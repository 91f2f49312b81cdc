"""scripts/bench_wan.py's pure logic: the grid, the bound, the planner's pick and the configs it writes."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_wan", ROOT / "scripts" / "bench_wan.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_wan"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _candidate(edge: float, cloud: float, step: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(busy_seconds={"edge": edge, "cloud": cloud, "uplink": 9.0, "downlink": 9.0},
                           step_seconds=step)


def test_bound_uses_the_runs_bytes_and_the_profiles_compute(bench: ModuleType) -> None:
    cell = bench.Cell(20.0, 8, "int8", "fp32")
    # 1 MB down at 20 Mbit/s is 0.4 s: more than either side's compute; the planner's link busy is ignored.
    seconds, which, terms = bench.bound(_candidate(0.02, 0.3), cell, 250_000, 1_000_000)
    assert (seconds, which) == (pytest.approx(0.4), "downlink")
    assert terms["uplink"] == pytest.approx(0.1)
    seconds, which, _ = bench.bound(_candidate(0.02, 0.3), bench.Cell(None, 8, "int8", "fp32"), 10**9, 10**9)
    assert (seconds, which) == (0.3, "cloud")  # direct: the link costs nothing


def test_planner_pick_against_the_best_measured_per_link(bench: ModuleType) -> None:
    def row(link: str, chunks: int, predicted: float, measured: float) -> dict:
        return {"link": link, "chunks": chunks, "uplink": "int8", "gradients": "int8",
                "predicted": {"step_seconds": predicted}, "today": {"median_step_seconds": measured}}

    rows = [row("20 Mbit/s", 1, 0.9, 1.0), row("20 Mbit/s", 8, 0.5, 0.55), row("20 Mbit/s", 4, 0.6, 0.5),
            row("direct", 8, 0.3, 0.3)]  # one cell at a link: nothing to choose
    [pick] = bench.planner_picks(rows)
    assert (pick["pick"], pick["best"]) == ("chunks 8 int8/int8", "chunks 4 int8/int8")
    assert pick["gap"] == pytest.approx(0.1) and pick["met"] is (pick["gap"] <= bench.TARGET_PICK_GAP)
    assert pick["runner_up_margin"] == pytest.approx(0.2)  # chunks 4 predicted at 0.6 against 0.5


def test_grids(bench: ModuleType) -> None:
    reduced = bench.reduced_grid()
    assert len(reduced) == 4 * 3 + 3 * 3 and len(set(reduced)) == len(reduced)
    assert {c.chunks for c in reduced if c.mbps != 20.0} == {8}
    assert {c.mbps for c in bench.QUICK} >= {None, 20.0}
    assert bench._mbps_list("5, 20,direct,20") == [5.0, 20.0, None]
    with pytest.raises(argparse.ArgumentTypeError):
        bench._mbps_list("0")
    with pytest.raises(argparse.ArgumentTypeError):
        bench._codec_list("int4/fp32")


def test_cell_config_is_the_demos_with_the_cells_choices(bench: ModuleType, tmp_path: Path) -> None:
    cell = bench.Cell(5.0, 2, "int8", "int8")
    data = bench.cell_config(cell)
    config = bench.write_cell_config(data, tmp_path / "c.toml", cell.name)
    assert (config.partition.chunks, config.link.uplink, config.link.gradients) == (2, "int8", "int8")
    assert config.skip.policy == "none"
    written = tomllib.loads((tmp_path / "c.toml").read_text(encoding="utf-8"))
    # Only the keys the demo's file sets: an older checkout with fewer keys reads it too.
    assert written == data and set(written) == {"model", "partition", "link", "skip", "train"}
