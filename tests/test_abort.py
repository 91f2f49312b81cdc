"""An aborted step leaves no trace: BatchNorm running statistics and weights are as before it."""
from __future__ import annotations

import grpc
import torch

from pipeline.models import build_configured
from pipeline.partition import make_cuts, split
from pipeline.trainer import StageTrainer
from protos import edgepipe_pb2 as pb
from tests.conftest import make_config
from tests.test_bad_input import RawClient, _wrong_length, begin, expect_status, run_good_step

MOBILENET = {"name": "mobilenetv2", "width": 0.25, "input_shape": [3, 16, 16]}


def _buffers(trainer: StageTrainer) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in trainer.stage.layers.named_buffers()}


def test_abort_restores_the_batchnorm_statistics_of_a_stage() -> None:
    config = make_config(model=MOBILENET, partition={"edge_head": 2, "edge_tail": 1})
    model = build_configured(config.model)
    cuts = make_cuts(len(model), config.partition.edge_head, config.partition.edge_tail)
    head, _, _ = split(model, cuts)
    trainer = StageTrainer(head, 0, config.train)
    before = _buffers(trainer)
    assert any("running_mean" in name for name in before), "the head must hold BatchNorm"
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    trainer.begin(0.05)
    trainer.stage.forward(0, x)
    trainer.stage.forward(1, x * 2)
    moved = _buffers(trainer)
    assert not all(torch.equal(moved[k], before[k]) for k in before), "the forward passes must move the statistics"
    trainer.abort()
    after = _buffers(trainer)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_an_aborted_cloud_step_restores_batchnorm_statistics(cloud) -> None:
    config = make_config(model=MOBILENET, partition={"edge_head": 2, "edge_tail": 1, "chunks": 4})
    client = RawClient(cloud(config), config)
    try:
        session = client.open()
        run_good_step(client, session, step=0, seed=3)
        before = client.weights(session)
        assert any("running_mean" in name for name in before), "the cloud's middle must hold BatchNorm"
        # Two micro-batches go all the way through the middle (moving its running statistics),
        # then a broken frame aborts the step.
        frames = [begin(session, step=1)]
        for i in range(2):
            frames.append(pb.StepFrame(session=session, step=1, micro_batch=i, activation=client.activation(seed=i)))
        bad = _wrong_length(client)
        bad.session, bad.step, bad.micro_batch = session, 1, 2
        expect_status(lambda: client.step(frames + [bad]), grpc.StatusCode.INVALID_ARGUMENT)
        after = client.weights(session)
        changed = sorted(name for name in before if after[name] != before[name])
        assert not changed, f"the aborted step changed {changed[:3]}"
    finally:
        client.close()
