"""Tests for `edgepipe skip replay` and the statistics recorder: every policy on hand-built statistics, CAC's cases."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_node.local_engine import LocalEngine
from edgepipe.cli import main
from pipeline.blueprint import Blueprint
from pipeline.optim import learning_rate
from pipeline.skip.replay import StatsFileError, read_stats
from tests.conftest import SMALL_TOML, make_config

#: tinycnn's tensors: block1 (kernel 0, bias, GroupNorm weight and bias), block2 (kernel 4, ...),
#: pool (none), fc (matrix 8, bias 9). CAC's targets are the kernels 0 and 4; the cap is layer 3.
SHAPES = [[8, 1, 3, 3], [8], [8], [8], [16, 8, 3, 3], [16], [16], [16], [10, 256], [10]]
PARAM_LAYERS = [0, 0, 0, 0, 1, 1, 1, 1, 3, 3]
TOTAL = 60

Variance = Callable[[int, int], float]


def _cosine(step: int) -> float:
    return 0.5 * 0.05 * (1 + math.cos(math.pi * step / TOTAL))


def stats_lines(
    steps: int, variance: Variance, *, lr: Callable[[int], float] = _cosine, steps_per_epoch: int = 1000,
    norm: Callable[[int, int], float] = lambda step, index: 1.0,
    update: Callable[[int, int], float] = lambda step, index: 1.0,
) -> list[dict[str, Any]]:
    """A statistics file's lines: ``variance(n, index)`` after n = step + 1 completed steps."""
    lines = []
    for step in range(steps):
        epoch_end = (step + 1) % steps_per_epoch == 0
        params = []
        for index, shape in enumerate(SHAPES):
            row = {"index": index, "shape": shape, "variance": variance(step + 1, index), "norm": norm(step, index)}
            if epoch_end:
                row["update_norm"] = update(step, index)
            params.append(row)
        lines.append({"step": step, "lr": lr(step), "epoch": step // steps_per_epoch, "epoch_end": epoch_end,
                      "params": params})
    return lines


def replay(tmp_path: Path, skip: dict[str, Any], lines: list[dict[str, Any]],
           monkeypatch: pytest.MonkeyPatch, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``edgepipe skip replay`` on ``lines`` with a config of ``skip`` keys and ``env``; its output lines."""
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "config.toml"
    keys = "".join(f"{key} = {json.dumps(value)}\n" for key, value in skip.items())
    config.write_text(SMALL_TOML.format(edge_head=1) + "\n[skip]\n" + keys, encoding="utf-8")
    stats = tmp_path / "skip_stats.jsonl"
    stats.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "decisions.jsonl"
    assert main(["skip", "replay", str(stats), str(config), "--out", str(out)]) == 0
    decided = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["step"] for d in decided] == list(range(len(lines) + 1))
    return decided


def frozen(decided: list[dict[str, Any]]) -> dict[int, tuple[int, int]]:
    """{step: (frozen_parameters, boundary)} where they change."""
    return {d["step"]: (d["frozen_parameters"], d["boundary"]) for k, d in enumerate(decided)
            if k and (d["frozen_parameters"], d["boundary"]) != (decided[k - 1]["frozen_parameters"],
                                                                 decided[k - 1]["boundary"])}


def braking(decided: list[dict[str, Any]]) -> dict[int, tuple[dict[str, float], dict[str, float]]]:
    """{step: (lr_factors, lr_bases)} of the steps that brake."""
    return {d["step"]: (d["lr_factors"], d["lr_bases"]) for d in decided if d["lr_factors"]}


# Kernel 0: peak 1.0 at n = 10, 0.9 at n = 20 (0.9 < start_thr 0.95). Kernel 4: 2.0 from n = 10 on
# (peak updates), 1.8 from n = 40 (0.9 < slope_thr 0.98). Every other tensor's variance collapses at
# once: were a bias, a GroupNorm weight or the Linear matrix a target, it would stop at the first sample.
def _falling(n: int, index: int) -> float:
    if index == 0:
        return 1.0 if n < 20 else 0.9
    if index == 4:
        return 2.0 if n < 40 else 1.8
    return 1.0 if n < 10 else 1e-6


CAC = {"policy": "cac-auto", "start_step": 10, "samples": 10}


def test_cac_auto_freezes_kernels_only_one_step_after_the_decision(tmp_path, monkeypatch):
    decided = replay(tmp_path, CAC, stats_lines(50, _falling), monkeypatch)
    # Decided after steps 19 and 39 (n = 20, 40); as CAC, steps 20 and 40 still train.
    # Kernel 0 alone first: its bias and GroupNorm train on (layer 0 partly frozen, boundary 0);
    # then tensors 0..4: block1 whole (boundary 1), block2's bias and GroupNorm train on.
    assert frozen(decided) == {21: (1, 0), 41: (5, 1)}
    assert braking(decided) == {}


def test_cac_auto_through_the_environment(tmp_path, monkeypatch):
    env = {"CAC_VAR_START_ITR": "10", "CAC_VAR_SAMPLES": "10"}
    decided = replay(tmp_path, {"policy": "cac-auto"}, stats_lines(50, _falling), monkeypatch, env)
    assert frozen(decided) == {21: (1, 0), 41: (5, 1)}


def test_cac_var_start_thr_minus_one_turns_auto_off(tmp_path, monkeypatch):
    decided = replay(tmp_path, CAC, stats_lines(50, _falling), monkeypatch, {"CAC_VAR_START_THR": "-1"})
    assert frozen(decided) == {} and all(d["frozen_parameters"] == 0 for d in decided)


def test_cac_stop_layer_num_alone_restricts_autos_targets(tmp_path, monkeypatch):
    # Kernel 4 is the only target: kernel 0's fall is ignored, and kernel 4, now the first target,
    # stops on start_thr at n = 40 (1.8 / 2.0), freezing tensors 0..4.
    decided = replay(tmp_path, CAC, stats_lines(50, _falling), monkeypatch, {"CAC_STOP_LAYER_NUM": "4"})
    assert frozen(decided) == {41: (5, 1)}


def test_cac_compares_in_float32(tmp_path, monkeypatch):
    # 0.94999999 / 1.0 is below 0.95 in float64, but both are the same float32: no stop at n = 20.
    def variance(n: int, index: int) -> float:
        if index == 0:
            return {10: 1.0, 20: 0.94999999}.get(n, 0.9)
        return 2.0
    decided = replay(tmp_path, CAC, stats_lines(40, variance), monkeypatch)
    assert frozen(decided) == {31: (1, 0)}


def test_cac_auto_braking_samples_every_braking_distance_and_brakes_from_the_decision_steps_rate(
    tmp_path, monkeypatch
):
    # CAC_VAR_SAMPLES unset with braking 5: a sample every 5 steps (the default 200 would never come).
    def variance(n: int, index: int) -> float:
        return 1.0 if n < 10 or index != 0 else 0.5
    env = {"CAC_VAR_START_ITR": "0", "CAC_BRAKING_DISTANCE": "5"}
    decided = replay(tmp_path, {"policy": "cac-auto"}, stats_lines(20, variance), monkeypatch, env)
    # Peak at n = 5, 0.5 at n = 10 (after step 9): steps 10..13 brake, frozen from 14. Under the cosine
    # schedule the factors multiply the rate of step 10, where braking began, not each step's own.
    rate = _cosine(10)
    assert braking(decided) == {
        10: ({"0": (4 / 5) ** 2}, {}),
        11: ({"0": (3 / 5) ** 2}, {"0": rate}),
        12: ({"0": (2 / 5) ** 2}, {"0": rate}),
        13: ({"0": (1 / 5) ** 2}, {"0": rate}),
    }
    assert frozen(decided) == {14: (1, 0)}
    assert _cosine(11) != rate


def test_cac_manual_brakes_from_the_stop_iteration(tmp_path, monkeypatch):
    env = {"CAC_STOP_LAYER_NUM": "0", "CAC_STOP_LAYER_ITR": "20", "CAC_BRAKING_DISTANCE": "4"}
    decided = replay(tmp_path, {"policy": "none"}, stats_lines(30, lambda n, i: 1.0), monkeypatch, env)
    rate = _cosine(20)
    assert braking(decided) == {20: ({"0": 0.5625}, {}), 21: ({"0": 0.25}, {"0": rate}),
                                22: ({"0": 0.0625}, {"0": rate})}
    assert frozen(decided) == {23: (1, 0)}


def test_cac_manual_without_braking_trains_the_stop_iteration(tmp_path, monkeypatch):
    env = {"CAC_STOP_LAYER_NUM": "0,5", "CAC_STOP_LAYER_ITR": "20,25"}
    decided = replay(tmp_path, {"policy": "none"}, stats_lines(30, lambda n, i: 1.0), monkeypatch, env)
    # Tensor 5 is block2's bias: tensors 0..5, block1 whole, block2's kernel and bias.
    assert frozen(decided) == {21: (1, 0), 26: (6, 1)}


def test_manual_stops_closer_than_the_braking_distance_all_happen(tmp_path, monkeypatch):
    # Documented improvement: CAC drops the second stop, which falls inside the first one's braking.
    env = {"CAC_STOP_LAYER_NUM": "0,4", "CAC_STOP_LAYER_ITR": "20,21", "CAC_BRAKING_DISTANCE": "4"}
    decided = replay(tmp_path, {"policy": "none"}, stats_lines(30, lambda n, i: 1.0), monkeypatch, env)
    first, second = _cosine(20), _cosine(21)
    later = ["1", "2", "3", "4"]
    assert braking(decided) == {
        20: ({"0": 9 / 16}, {}),
        21: ({"0": 4 / 16, **dict.fromkeys(later, 9 / 16)}, {"0": first}),
        22: ({"0": 1 / 16, **dict.fromkeys(later, 4 / 16)}, {"0": first, **dict.fromkeys(later, second)}),
        23: (dict.fromkeys(later, 1 / 16), dict.fromkeys(later, second)),
    }
    assert frozen(decided) == {23: (1, 0), 24: (5, 1)}


def test_manual_stop_layers_freeze_whole_layers_from_their_step(tmp_path, monkeypatch):
    skip = {"policy": "manual", "stop_layers": [0, 1], "stop_steps": [5, 8], "braking_distance": 2}
    decided = replay(tmp_path, skip, stats_lines(10, lambda n, i: 1.0, lr=lambda s: 0.1), monkeypatch)
    assert frozen(decided) == {5: (4, 1), 8: (8, 2)}
    assert braking(decided) == {4: (dict.fromkeys("0123", 0.25), {}),
                                7: (dict.fromkeys("4567", 0.25), {})}


def test_every_per_layer_policy_replays(tmp_path, monkeypatch):
    # Two epochs of 3 steps. Epoch 0: kernel 0 has nw 3 (> 2); epoch 1: kernel 4 too.
    def update(step: int, index: int) -> float:
        return {0: 1 / 3 if step < 3 else 0.1, 4: 1.0 if step < 3 else 1 / 3}.get(index, 1.0)
    lines = stats_lines(6, lambda n, i: 1.0, steps_per_epoch=3, update=update)
    expected = {
        "none": {},
        "lars": {3: (4, 1), 6: (8, 2)},
        # Layer 0's update norm falls from 1/3 to 0.1, below 0.6 * the average (0.217): shift past it.
        "norm-ema": {6: (4, 1)},
        # Linear to c1 = 3 layers over the config's one epoch; layers decide whole, the pool (layer 2) too.
        "schedule": {3: (8, 3)},
    }
    configs = {"none": {}, "lars": {}, "norm-ema": {"ema": 0.5, "alpha": 0.6}, "schedule": {"schedule": "linear", "c1": 3}}
    for name, extra in configs.items():
        decided = replay(tmp_path, {"policy": name, **extra}, lines, monkeypatch)
        assert frozen(decided) == expected[name], name
        assert braking(decided) == {}, name


def test_lars_per_convolution_kernel(tmp_path, monkeypatch):
    # Kernel 0's nw is 3, but block1's GroupNorm weight is 1-D and not a weight: per layer nw is 3 too.
    # Make the layer's nw small and one kernel's large: only "conv" granularity skips.
    lines = stats_lines(3, lambda n, i: 1.0, steps_per_epoch=3,
                        norm=lambda s, i: {0: 3.0, 4: 3.0}.get(i, 1.0),
                        update=lambda s, i: {0: 1.0, 4: 10.0}.get(i, 1.0))
    assert frozen(replay(tmp_path, {"policy": "lars", "granularity": "conv"}, lines, monkeypatch)) == {3: (4, 1)}
    assert frozen(replay(tmp_path, {"policy": "lars", "alpha": 3.5}, lines, monkeypatch)) == {}


def test_a_malformed_statistics_file_names_the_line(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(SMALL_TOML.format(edge_head=1), encoding="utf-8")
    good = stats_lines(2, lambda n, i: 1.0)
    bad = dict(good[1], step=5)
    stats = tmp_path / "stats.jsonl"
    stats.write_text(json.dumps(good[0]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    assert main(["skip", "replay", str(stats), str(config)]) == 2
    assert "line 2: step 5 where step 1 was due" in capsys.readouterr().err
    for broken, message in (
        ({**good[0], "params": good[0]["params"][:3]}, "layer 0 name 3 parameter tensors; it has 4"),
        ({**good[0], "params": good[0]["params"] + good[0]["params"][-1:]}, "layer 3 name 3 parameter tensors"),
        ({**good[0], "params": [dict(p, index=p["index"] or 1) for p in good[0]["params"]]},
         "each of its parameter tensors exactly once"),
        ({**good[0], "epoch_end": True}, "update_norm exactly when epoch_end"),
        ({**good[0], "lr": "fast"}, "lr"),
    ):
        with pytest.raises(StatsFileError, match=f"^line 1: .*{message}"):
            list(read_stats([json.dumps(broken)], PARAM_LAYERS))


def test_a_recorded_local_run_replays_to_its_own_decisions(tmp_path):
    # The statistics the one-process run records are exactly what its policy read.
    config = make_config(
        skip={"policy": "cac-auto", "start_step": 1, "samples": 1, "start_thr": 0.9999, "slope_thr": 0.9999,
              "braking_distance": 3, "record": True},
        train={"lr": 0.001, "weight_decay": 0.5, "lr_schedule": "cosine"},
    )
    engine = LocalEngine(Blueprint(config), tmp_path)
    generator = torch.Generator().manual_seed(0)
    decisions = [engine.decision]
    for step in range(12):
        x, y = torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        lr = learning_rate(config.train, step, 12)
        decisions.append(engine.step(step, step // 4, lr, x, y, step % 4 == 3).decision)
    assert decisions[-1].frozen_parameters, "the scaled thresholds must freeze something"
    assert any(d.lr_factors for d in decisions), "and brake"

    with (tmp_path / "skip_stats.jsonl").open(encoding="utf-8") as source:
        steps = list(read_stats(source, engine.policy.param_layers))
    assert [s.step for s in steps] == list(range(12))
    replayed = Blueprint(config).new_policy()
    again = [replayed.initial()] + [replayed.decide(s) for s in steps]
    assert again == decisions


def test_a_split_run_records_on_the_cloud_next_to_its_checkpoints(tmp_path, cloud_server):
    from edge_node.worker import train

    config = make_config(
        partition={"edge_head": 1, "edge_tail": 1, "chunks": 2},
        skip={"policy": "cac-auto", "start_step": 1, "samples": 1, "start_thr": 0.9999, "slope_thr": 0.9999,
              "record": True},
        train={"lr": 0.001, "weight_decay": 0.5},
    )
    address, _ = cloud_server(config, state_dir=tmp_path / "state")
    train(config, run_dir=tmp_path / "run", cloud=address, max_steps=8)
    (recorded,) = (tmp_path / "state").glob("*/*/skip_stats.jsonl")
    assert not (tmp_path / "run" / "skip_stats.jsonl").exists(), "the cloud's session decides, so it records"
    blueprint = Blueprint(config)
    with recorded.open(encoding="utf-8") as source:
        steps = list(read_stats(source, blueprint.param_layers))
    assert [s.step for s in steps] == list(range(8))
    replayed = blueprint.new_policy()
    decided = [replayed.decide(s) for s in steps]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # A step's line holds the decision it trained under: the one replayed after the step before.
    ran_with = [m["frozen_parameters"] for m in metrics if "step" in m]
    assert [d.frozen_parameters for d in decided[:-1]] == ran_with[1:] and ran_with[0] == 0
    assert decided[-1].frozen_parameters, "the scaled thresholds must freeze something"
