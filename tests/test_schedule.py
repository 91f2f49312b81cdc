"""The streaming schedule: each micro-batch's backward starts as soon as its gradient exists, and
the result does not depend on the order backward passes ran in."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edge_node.worker import train
from pipeline.models import build_configured
from pipeline.stage import Stage
from tests.conftest import make_config

MOBILENET = {"name": "mobilenetv2", "width": 0.25, "input_shape": [3, 16, 16]}


def _grads_after(stage: Stage, inputs: list[torch.Tensor], labels: list[torch.Tensor], order: list[int]):
    stage.begin_step()
    losses = {i: F.cross_entropy(stage.forward(i, x), y, reduction="sum") / 32 for i, (x, y) in enumerate(zip(inputs, labels))}
    for i in order:
        stage.backward(i, loss=losses[i])
    stage.accumulate_gradients()
    return [p.grad.clone() for p in stage.layers.parameters()]


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1]])
def test_any_backward_order_gives_gpipes_gradients_to_the_last_bit(order: list[int]) -> None:
    config = make_config(model=MOBILENET)
    model = build_configured(config.model)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(4)]
    labels = [torch.randint(0, 10, (8,), generator=g) for _ in range(4)]

    reference = copy.deepcopy(model)
    # GPipe's order: every forward, then the last micro-batch's backward first.
    outs = [F.cross_entropy(reference(x), y, reduction="sum") / 32 for x, y in zip(inputs, labels)]
    for loss in reversed(outs):
        loss.backward()
    expected = [p.grad for p in reference.parameters()]

    got = _grads_after(Stage(copy.deepcopy(model), 0), inputs, labels, order)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_stage_that_accumulated_in_a_different_order_would_differ() -> None:
    # The property above is not vacuous: plain accumulation in another order changes the bits.
    config = make_config(model=MOBILENET)
    model = build_configured(config.model)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(4)]
    labels = [torch.randint(0, 10, (8,), generator=g) for _ in range(4)]
    grads = []
    for order in ([3, 2, 1, 0], [0, 1, 2, 3]):
        replica = copy.deepcopy(model)
        losses = [F.cross_entropy(replica(x), y, reduction="sum") / 32 for x, y in zip(inputs, labels)]
        for i in order:
            losses[i].backward()
        grads.append([p.grad for p in replica.parameters()])
    assert not all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_edge_sends_each_gradient_as_soon_as_its_output_returns(recording_cloud, tmp_path: Path) -> None:
    config = make_config(partition={"edge_head": 1, "edge_tail": 1, "chunks": 4})
    address, servicer = recording_cloud(config)
    train(config, run_dir=tmp_path / "run", cloud=address, max_steps=2)
    for step in (0, 1):
        frames = [f for f in servicer.received if f.step == step]
        gradients = [f.micro_batch for f in frames if f.WhichOneof("body") == "gradient"]
        # Micro-batch order, not GPipe's reverse fill-drain order: micro-batch 0's backward
        # needs nothing but micro-batch 0.
        assert gradients == [0, 1, 2, 3], gradients


def test_the_next_step_begins_before_the_previous_one_drains(cloud, tmp_path: Path) -> None:
    config = make_config(partition={"edge_head": 1, "edge_tail": 1, "chunks": 2}, checkpoint={"every_steps": 100})
    run_dir = tmp_path / "run"
    train(config, run_dir=run_dir, cloud=cloud(config), max_steps=3, trace=run_dir / "trace.json")

    events = [e for e in json.loads((run_dir / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]

    def edge_spans(step: int, name: str) -> list[dict]:
        return [e for e in events if e["cat"] == "edge" and e["args"]["step"] == step and e["name"] == name]

    for step in (0, 1):
        # Not an epoch's end, no checkpoint: the next step's first activations leave before this
        # step's done frame has come back (the last wait of the step is the one for it).
        done_at = max(e["ts"] + e["dur"] for e in edge_spans(step, "wait"))
        first = min(e["ts"] for e in edge_spans(step + 1, "head forward"))
        assert edge_spans(step, "next step") and first < done_at, (step, first, done_at)
    # The last step has no next one to begin.
    assert not edge_spans(2, "next step")
