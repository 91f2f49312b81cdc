"""The freeze boundary over real gRPC: gradients stop crossing the link, frozen layers stay put."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edge_node.worker import train
from pipeline.checkpoint import load_state
from pipeline.config import Config
from tests.conftest import make_config

MOBILENET = {"name": "mobilenetv2", "width": 0.25, "input_shape": [3, 16, 16]}


def _steps(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "step" in line]


def _layer(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.split(".")[0] == name}


@pytest.mark.parametrize("edge_tail", [1, 0])
def test_frozen_head_stops_downlink_gradients(edge_tail, tmp_path, recording_cloud):
    freeze_at = 3
    config = make_config(
        partition={"edge_head": 1, "edge_tail": edge_tail, "chunks": 4},
        skip={"policy": "manual", "stop_layers": [0], "stop_steps": [freeze_at]},
    )
    address, servicer = recording_cloud(config)
    summary = train(config, run_dir=tmp_path / "split", cloud=address, max_steps=8)

    assert summary["freeze_events"] == [{"step": freeze_at, "boundary": 1}]
    gradients_sent = {step for step, kind in servicer.sent if kind == "gradient"}
    assert gradients_sent == set(range(freeze_at)), "the cloud sends input gradients only before the freeze"
    for line in _steps(tmp_path / "split"):
        down = line["by_kind"]["gradient"]["downlink_bytes"]
        assert (down == 0) == (line["step"] >= freeze_at), line
        assert line["boundary"] == (1 if line["step"] >= freeze_at else 0)
        if edge_tail:
            assert line["by_kind"]["gradient"]["uplink_bytes"] > 0, "the cloud layers still train"


def test_frozen_layers_stay_put_and_split_equals_local(tmp_path, cloud):
    # Freeze the edge head at step 2 and reach into the cloud (layer 3) at step 4.
    config = make_config(
        model=MOBILENET,
        partition={"edge_head": 2, "edge_tail": 1, "chunks": 2},
        skip={"policy": "manual", "stop_layers": [1, 3], "stop_steps": [2, 4]},
    )
    address = cloud(config)
    at_freeze = load_state_after(config, tmp_path / "four", address, steps=4)
    final = load_state_after(config, tmp_path / "eight", address, steps=8)
    local = load_state_after(config, tmp_path / "local", None, steps=8)

    for name in ("stem", "block1", "block2", "block3"):
        frozen_then, frozen_now = _layer(at_freeze, name), _layer(final, name)
        assert all(torch.equal(frozen_then[k], frozen_now[k]) for k in frozen_then), f"{name} moved after its freeze"
    for name in ("block4", "head_conv", "fc"):
        assert any(not torch.equal(at_freeze[k], final[k]) for k in _layer(final, name)), f"{name} stopped training"
    assert all(torch.equal(final[k], local[k]) for k in final), "split and local differ under the same policy"
    # Each step after the first began early with two activations. The freeze of the head (from
    # step 2) changed how the head runs, so step 2 sent them again and its line counts both; the
    # boundary's move past the head (step 4) did not, so step 4 kept them.
    uplink_activations = [line["by_kind"]["activation"]["messages"] - 2 for line in _steps(tmp_path / "eight")]
    assert uplink_activations[:5] == [2, 2, 4, 2, 2], uplink_activations


def load_state_after(config: Config, run_dir: Path, address: str | None, *, steps: int) -> dict[str, torch.Tensor]:
    train(config, run_dir=run_dir, cloud=address, max_steps=steps)
    return load_state(run_dir / "model.pt")


def test_automatic_policy_decides_the_same_split_and_local(tmp_path, cloud):
    # Strong weight decay shrinks the weight variance and the thresholds are scaled so that
    # cac-auto stops layers within a few steps; the cloud decides from both sides' statistics
    # and must reach exactly the decisions of the one-process run.
    config = make_config(
        model=MOBILENET,
        partition={"edge_head": 2, "edge_tail": 1, "chunks": 2},
        skip={"policy": "cac-auto", "start_step": 1, "samples": 1, "start_thr": 0.9999, "slope_thr": 0.9999},
        train={"lr": 0.001, "weight_decay": 0.5},
    )
    split = train(config, run_dir=tmp_path / "split", cloud=cloud(config), max_steps=10)
    local = train(config, run_dir=tmp_path / "local", max_steps=10)
    assert split["freeze_events"], "the scaled thresholds must freeze something"
    assert split["freeze_events"] == local["freeze_events"]
    a, b = load_state(tmp_path / "split" / "model.pt"), load_state(tmp_path / "local" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_partly_frozen_layer_splits_equal_to_local(tmp_path, cloud, monkeypatch):
    # CAC's stops name tensors of model.parameters(): 0 is block1's kernel (its bias and GroupNorm
    # train on), 4 block2's kernel, on the cloud. Braking 3 under the cosine schedule slows tensors
    # on both sides from the rate braking began at.
    for name, value in {"CAC_STOP_LAYER_NUM": "0,4", "CAC_STOP_LAYER_ITR": "2,5", "CAC_BRAKING_DISTANCE": "3"}.items():
        monkeypatch.setenv(name, value)
    config = make_config(partition={"edge_head": 1, "edge_tail": 1, "chunks": 2}, train={"lr_schedule": "cosine"})
    split = train(config, run_dir=tmp_path / "split", cloud=cloud(config), max_steps=10)
    local = train(config, run_dir=tmp_path / "local", max_steps=10)

    assert split["freeze_events"] == local["freeze_events"] == [{"step": 7, "boundary": 1}]
    lines = _steps(tmp_path / "split")
    columns = ("step", "boundary", "frozen_parameters", "loss")
    assert [[line[k] for k in columns] for line in lines] == [[line[k] for k in columns]
                                                              for line in _steps(tmp_path / "local")]
    # Each line's frozen_parameters, like its boundary, is what that step trained under.
    assert [line["frozen_parameters"] for line in lines] == [0, 0, 0, 0, 1, 1, 1, 5, 5, 5]
    assert [line["boundary"] for line in lines] == [0] * 7 + [1] * 3
    for line in lines:
        # Kernel 0 alone frozen leaves the head learning: gradients come down until block1 is whole.
        down = line["by_kind"]["gradient"]["downlink_bytes"]
        assert (down == 0) == (line["step"] >= 7), line
    a, b = load_state(tmp_path / "split" / "model.pt"), load_state(tmp_path / "local" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "split and local differ with a partly frozen layer"


def test_a_head_ending_without_parameters_freezes_whole_with_its_last_tensor(tmp_path, recording_cloud, monkeypatch):
    # tinycnn's head block1, block2, pool: CAC's stop of tensor 7 (block2's last) freezes the pool too,
    # so no gradient comes down from then on.
    monkeypatch.setenv("CAC_STOP_LAYER_NUM", "7")
    monkeypatch.setenv("CAC_STOP_LAYER_ITR", "2")
    config = make_config(partition={"edge_head": 3, "edge_tail": 0, "chunks": 2})
    address, servicer = recording_cloud(config)
    summary = train(config, run_dir=tmp_path / "split", cloud=address, max_steps=5)
    assert summary["freeze_events"] == [{"step": 3, "boundary": 3}]
    assert {step for step, kind in servicer.sent if kind == "gradient"} == {0, 1, 2}
