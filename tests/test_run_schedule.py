"""The run's schedule over real gRPC: every begin frame's lr, samples and epoch, the run's length, finite tensors."""
from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
import torch

from protos import edgepipe_pb2 as pb
from tests.conftest import make_config
from tests.raw_client import (
    CHUNKS, SAMPLES, STEPS_PER_EPOCH, TIMEOUT, RawClient, begin, expect_status, good_step_frames, run_good_step,
)


@pytest.fixture
def client(cloud) -> Iterator[RawClient]:
    config = make_config()
    client = RawClient(cloud(config), config)
    yield client
    client.close()


def _begin_with(session: str, step: int = 0, **fields: object) -> pb.StepFrame:
    frame = begin(session, step)
    for name, value in fields.items():
        setattr(frame.begin, name, value)
    return frame


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"lr": math.inf}, ["begin.lr", "inf", "0.05"]),
        ({"lr": math.nan}, ["begin.lr", "nan"]),
        ({"lr": 0.05000001}, ["begin.lr", "0.05"]),
        ({"lr": -0.05}, ["begin.lr"]),
        ({"samples": SAMPLES * 2}, ["begin.samples", str(SAMPLES * 2), str(SAMPLES)]),
        ({"epoch": 3}, ["begin.epoch", "3", "0"]),
        ({"chunks": CHUNKS - 1}, ["begin.chunks"]),
    ],
    ids=["inf-lr", "nan-lr", "other-lr", "negative-lr", "samples", "epoch", "chunks"],
)
def test_a_begin_frame_off_the_agreed_schedule_is_invalid_argument(
    client: RawClient, fields: dict, words: list[str]
) -> None:
    session = client.open()
    details = expect_status(lambda: client.step([_begin_with(session, **fields)]), grpc.StatusCode.INVALID_ARGUMENT)
    for word in words:
        assert word in details, f"{word!r} not in {details!r}"
    run_good_step(client, session, step=0)


def test_the_epoch_of_a_step_follows_from_steps_per_epoch(client: RawClient) -> None:
    # Step 10 of a run with 10 steps per epoch is in epoch 1; the cloud refuses epoch 0 for it.
    session = client.open()
    for step in range(STEPS_PER_EPOCH):
        frames = good_step_frames(client, session, step)
        frames[-1].end.epoch_end = step == STEPS_PER_EPOCH - 1
        assert client.step(frames)[-1].WhichOneof("body") == "done"
    details = expect_status(lambda: client.step([_begin_with(session, STEPS_PER_EPOCH, epoch=0)]),
                            grpc.StatusCode.INVALID_ARGUMENT)
    assert "begin.epoch" in details
    run_good_step(client, session, step=STEPS_PER_EPOCH)


def test_an_end_frame_with_the_wrong_epoch_end_is_refused(client: RawClient) -> None:
    session = client.open()
    frames = good_step_frames(client, session)
    frames[-1].end.epoch_end = True
    details = expect_status(lambda: client.step(frames), grpc.StatusCode.INVALID_ARGUMENT)
    assert "end.epoch_end" in details
    run_good_step(client, session, step=0)


def test_no_step_beyond_the_run_length(client: RawClient) -> None:
    request = client.open_request()
    request.total_steps = 1
    session = client.stub.Open(request, timeout=TIMEOUT).session
    frames = good_step_frames(client, session)
    frames[-1].end.epoch_end = True   # the run's last step ends its epoch
    assert client.step(frames)[-1].WhichOneof("body") == "done"
    details = expect_status(lambda: client.step([begin(session, step=1)]), grpc.StatusCode.INVALID_ARGUMENT)
    assert "past the run's 1 steps" in details


@pytest.mark.parametrize(
    ("total_steps", "steps_per_epoch", "field"),
    [(0, 10, "total_steps"), (-5, 10, "total_steps"), (100, 0, "steps_per_epoch"), (2**40, 10, "total_steps")],
)
def test_open_without_a_usable_run_length_is_invalid_argument(
    client: RawClient, total_steps: int, steps_per_epoch: int, field: str
) -> None:
    request = client.open_request()
    request.total_steps, request.steps_per_epoch = total_steps, steps_per_epoch
    details = expect_status(lambda: client.stub.Open(request, timeout=TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT)
    assert f"OpenRequest.{field}" in details


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kind", ["activation", "gradient"])
def test_a_tensor_with_non_finite_values_is_refused(client: RawClient, kind: str, value: float) -> None:
    session = client.open()
    before = client.weights(session)
    frames = good_step_frames(client, session)
    # The first activation frame, or the last gradient frame (three micro-batches went through before it).
    target = frames[1] if kind == "activation" else frames[1 + CHUNKS + CHUNKS - 1]
    tensor = getattr(target, kind)
    values = torch.frombuffer(bytearray(tensor.data), dtype=torch.float32)
    values[5] = value
    tensor.data = values.numpy().tobytes()
    details = expect_status(lambda: client.step(frames), grpc.StatusCode.INVALID_ARGUMENT)
    assert "NaN or infinite" in details
    assert client.weights(session) == before
    run_good_step(client, session, step=0)


def test_end_statistics_may_name_only_the_edges_layers(client: RawClient) -> None:
    session = client.open()
    for stats in ([pb.LayerStat(index=1, weight_norm=1.0)],                       # a cloud layer
                  [pb.LayerStat(index=0, weight_norm=1.0)] * 2,                   # twice
                  [pb.LayerStat(index=0, weight_norm=1.0, epoch_update_norm=1.0)],  # not an epoch end
                  [pb.LayerStat(index=0, weight_norm=1.0)],                       # none of its tensors
                  [pb.LayerStat(index=0, weight_norm=1.0, params=[pb.LayerStat.Param(shape=[3])])]):  # another
        frames = good_step_frames(client, session)
        frames[-1].end.stats.extend(stats)
        details = expect_status(lambda: client.step(frames), grpc.StatusCode.INVALID_ARGUMENT)
        assert "end.stats" in details
    run_good_step(client, session, step=0)
