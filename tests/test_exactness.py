"""A split run over real gRPC equals the one-process run and torchgpipe.GPipe, parameter for parameter."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchgpipe import GPipe

from edge_node.worker import train
from pipeline.checkpoint import load_state
from pipeline.config import Config
from pipeline.data import load_dataset, training_batches
from pipeline.models import build_configured
from tests.conftest import make_config

STEPS = 6

MOBILENET = {"name": "mobilenetv2", "width": 0.25, "input_shape": [3, 16, 16]}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def _gpipe_reference(config: Config, steps: int) -> dict[str, torch.Tensor]:
    model = build_configured(config.model)
    head, tail = config.partition.edge_head, config.partition.edge_tail
    balance = [n for n in (head, len(model) - head - tail, tail) if n]
    pipe = GPipe(model, balance=balance, devices=["cpu"] * len(balance), chunks=config.partition.chunks, checkpoint="never")
    optimizer = torch.optim.SGD(
        pipe.parameters(), lr=config.train.lr, momentum=config.train.momentum, weight_decay=config.train.weight_decay
    )
    train_data, _ = load_dataset(
        config.train.dataset, input_shape=config.model.input_shape, num_classes=config.model.num_classes,
        val_fraction=config.train.val_fraction, seed=config.model.seed,
    )
    batches = training_batches(train_data, config.train.batch_size, seed=config.model.seed, epoch=0)
    for _, (x, y) in zip(range(steps), batches):
        optimizer.zero_grad()
        F.cross_entropy(pipe(x), y).backward()
        optimizer.step()
    return model.state_dict()


def _run(config: Config, tmp_path: Path, name: str, cloud: str | None) -> dict[str, torch.Tensor]:
    summary = train(config, run_dir=tmp_path / name, cloud=cloud, max_steps=STEPS)
    assert summary["steps"] == STEPS
    return load_state(tmp_path / name / "model.pt")


@pytest.mark.parametrize(
    "model, partition",
    [
        ({}, {"edge_head": 1, "edge_tail": 1}),
        ({}, {"edge_head": 2, "edge_tail": 0}),
        (MOBILENET, {"edge_head": 2, "edge_tail": 1}),
        (MOBILENET, {"edge_head": 3, "edge_tail": 0}),
    ],
    ids=["tinycnn-tail1", "tinycnn-tail0", "mobilenetv2-tail1", "mobilenetv2-tail0"],
)
def test_split_equals_local_and_gpipe(model, partition, tmp_path, cloud):
    config = make_config(model=model, partition={**partition, "chunks": 4})
    split = _run(config, tmp_path, "split", cloud(config))
    local = _run(config, tmp_path, "local", None)
    initial = build_configured(config.model).state_dict()

    assert _max_difference(split, initial) > 1e-3, "training must have moved the weights"
    # Same operations in the same order: equal to the last bit, not just within tolerance.
    assert all(torch.equal(split[k], local[k]) for k in split)
    gpipe = _gpipe_reference(config, STEPS)
    assert all(torch.equal(split[k], gpipe[k]) for k in split), "split run differs from torchgpipe.GPipe"


def test_batchnorm_running_statistics_match(tmp_path, cloud):
    config = make_config(model=MOBILENET, partition={"edge_head": 2, "edge_tail": 1, "chunks": 2})
    split = _run(config, tmp_path, "split", cloud(config))
    local = _run(config, tmp_path, "local", None)
    running = [k for k in split if k.endswith("running_mean") or k.endswith("running_var")]
    assert running, "mobilenetv2 has BatchNorm buffers"
    for key in running + [k for k in split if k.endswith("num_batches_tracked")]:
        assert torch.equal(split[key], local[key]), key
    assert int(split["stem.1.num_batches_tracked"]) == STEPS * 2
