"""[skip] prefix = "local": a covered edge head learns on from its auxiliary classifier, split equal to --local."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_node.worker import train
from pipeline.blueprint import Blueprint
from pipeline.checkpoint import load_state
from pipeline.checkpoints import CheckpointStore
from pipeline.config import Config, ConfigError, parse_config
from pipeline.local_learning import CLASSIFIER, auxiliary_classifier
from tests.conftest import make_config
from tests.run_files import equal_models, metrics_lines

#: The head (block1) is covered from step 3; the boundary reaches into the cloud (block2) at step 6.
COVERED, INTO_CLOUD = 3, 6
STEPS = 9


def _config(prefix: str, **sections: dict[str, Any]) -> Config:
    return make_config(
        partition={"edge_head": 1, "edge_tail": 1, "chunks": 4},
        skip={"policy": "manual", "stop_layers": [0, 1], "stop_steps": [COVERED, INTO_CLOUD], "prefix": prefix},
        **sections,
    )


def _steps(run_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "step" in line]


def _layer(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.split(".")[0] == name}


def _trained(config: Config, run_dir: Path, address: str | None, steps: int) -> dict[str, torch.Tensor]:
    train(config, run_dir=run_dir, cloud=address, max_steps=steps)
    return load_state(run_dir / "model.pt")


def test_a_covered_head_learns_locally_and_the_split_run_equals_local(tmp_path: Path, cloud) -> None:
    config = _config("local")
    address = cloud(config)
    covered = _trained(config, tmp_path / "covered", address, COVERED)
    split = _trained(config, tmp_path / "split", address, STEPS)
    local = _trained(config, tmp_path / "local", None, STEPS)

    assert set(split) == set(local) == set(covered), "model.pt holds the model's keys only, no classifier"
    assert all(torch.equal(split[k], local[k]) for k in split), "split and local differ under prefix local"
    head = _layer(split, "block1")
    assert all(not torch.equal(head[k], covered[k]) for k in head), "the covered head stopped learning"
    lines = _steps(tmp_path / "split")
    boundaries = [0] * COVERED + [1] * (INTO_CLOUD - COVERED) + [2] * (STEPS - INTO_CLOUD)
    assert [line["boundary"] for line in lines] == boundaries
    for line in lines:
        down = line["by_kind"]["gradient"]["downlink_bytes"]
        assert (down == 0) == (line["step"] >= COVERED), line
    # The cloud's block2, frozen from step 6, stays put as with prefix "freeze".
    at_cloud_freeze = _trained(config, tmp_path / "six", address, INTO_CLOUD)
    assert all(torch.equal(at_cloud_freeze[k], split[k]) for k in _layer(split, "block2"))


def test_with_prefix_freeze_the_covered_head_stays_put(tmp_path: Path, cloud) -> None:
    config = _config("freeze")
    address = cloud(config)
    covered = _trained(config, tmp_path / "covered", address, COVERED)
    final = _trained(config, tmp_path / "final", address, STEPS)
    assert all(torch.equal(covered[k], final[k]) for k in _layer(final, "block1"))
    assert any(not torch.equal(covered[k], final[k]) for k in _layer(final, "fc")), "the tail stopped learning"


def _interrupt_after(step: int) -> Callable[[Any], None]:
    def on_step(report: Any) -> None:
        if report.step == step:
            raise KeyboardInterrupt

    return on_step


@pytest.mark.parametrize("mode", ["local", "split"])
def test_an_interrupted_run_resumes_with_the_classifier_as_saved(mode: str, tmp_path: Path, cloud_server) -> None:
    # Checkpoints after steps 3 and 7: the interrupt after step 10 resumes after step 7, with the head
    # learning locally since step 3, so the rest of the run depends on the classifier's weights and momentum.
    config = _config("local", checkpoint={"every_steps": 4})
    address = None
    if mode == "split":
        address, _ = cloud_server(config, state_dir=tmp_path / "state")
    reference = tmp_path / "reference"
    train(config, run_dir=reference, max_steps=12)
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir=tmp_path / "run", cloud=address, max_steps=12, on_step=_interrupt_after(10))
    tensors, _ = CheckpointStore(tmp_path / "run" / "checkpoints").load(7)
    saved = tensors[CLASSIFIER]
    assert set(saved["layers"]) == {"2.weight", "2.bias"}
    assert saved["optimizer"]["state"], "the classifier's momentum is saved"
    messages: list[str] = []
    train(config, run_dir=tmp_path / "run", cloud=address, max_steps=12, resume=True, on_link=messages.append)
    assert any("after step 7" in message for message in messages), messages
    assert equal_models(tmp_path / "run", reference)
    columns = ("step", "loss", "boundary", "frozen_parameters")
    assert [[line.get(k) for k in columns] for line in metrics_lines(tmp_path / "run")] == [
        [line.get(k) for k in columns] for line in metrics_lines(reference)
    ]


def test_the_classifier_is_built_alike_from_the_seed_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = auxiliary_classifier((8, 4, 4), 10, seed=0), auxiliary_classifier((8, 4, 4), 10, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    other = auxiliary_classifier((8, 4, 4), 10, seed=1)
    assert not torch.equal(a[-1].weight, other[-1].weight)
    assert a(torch.zeros(2, 8, 4, 4)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"shape \[8, 4\]"):
        auxiliary_classifier((8, 4), 10, seed=0)


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"partition": {"edge_head": 0, "edge_tail": 1}}, "partition.edge_head is 0"),
        ({"federation": {"mode": "splitfed-v1"}}, 'federation.mode = "splitfed-v1"'),
        ({"link": {"cache_frozen": True}}, "link.cache_frozen needs skip.prefix"),
    ],
)
def test_combinations_local_learning_cannot_serve_are_refused(sections: dict[str, Any], named: str) -> None:
    data: dict[str, Any] = {"skip": {"prefix": "local"}, **sections}
    with pytest.raises(ConfigError, match=named):
        parse_config(data, "test config")
    Blueprint(_config("local"))  # the accepted configuration builds
