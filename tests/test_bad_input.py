"""Bad input over real gRPC on 127.0.0.1: every refusal has the right status and says why,
and neither the session that got the bad frame nor any other session is harmed by it."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from edgepipe.edge_cli import main as edge_main
from edge_node.link import LinkError
from edge_node.worker import train
from pipeline import wire
from pipeline.config import Config, ConfigError
from protos import edgepipe_pb2 as pb
from tests.conftest import SMALL_TOML, make_config
from tests.raw_client import (
    CHUNKS, MIB, MICRO, TIMEOUT, RawClient, begin, cut_shapes_of, expect_status, good_step_frames, model_of,
    run_good_step,
)


@pytest.fixture
def setup(cloud: Callable[[Config], str]):
    config = make_config()
    address = cloud(config)
    client = RawClient(address, config)
    yield config, address, client
    client.close()


# -- different configurations ----------------------------------------------------------------


def test_worker_with_a_different_partition_is_refused(cloud, tmp_path: Path) -> None:
    address = cloud(make_config())
    edge_config = make_config(partition={"edge_head": 2})
    with pytest.raises(LinkError) as info:
        train(edge_config, run_dir=tmp_path / "run", cloud=address, max_steps=2)
    message = str(info.value)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "FAILED_PRECONDITION" in message
    assert "partition.edge_head" in message
    assert "edge 2" in message and "cloud 1" in message
    # Only what differs is named.
    assert "partition.edge_tail" not in message and "model.name" not in message
    assert "\n" not in message




def test_edge_cli_with_a_different_config_exits_with_one_line(cloud, tmp_path: Path, capsys) -> None:
    from pipeline.config import load_config

    cloud_file = tmp_path / "cloud.toml"
    edge_file = tmp_path / "edge.toml"
    cloud_file.write_text(SMALL_TOML.format(edge_head=1))
    edge_file.write_text(SMALL_TOML.format(edge_head=2))
    address = cloud(load_config(cloud_file))
    capsys.readouterr()
    code = edge_main(
        ["--config", str(edge_file), "--cloud", address, "--run-dir", str(tmp_path / "run"),
         "--max-steps", "2", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line reason, got:\n{err}"
    assert "partition.edge_head" in lines[0]
    assert "FAILED_PRECONDITION" in lines[0]


# -- malformed frames --------------------------------------------------------------------------


def _wrong_shape(client: RawClient) -> pb.StepFrame:
    good = client.activation()
    bad = pb.Tensor()
    bad.CopyFrom(good)
    del bad.shape[:]
    bad.shape.extend([MICRO, client.uplink[0] - 1, *client.uplink[1:]])
    return pb.StepFrame(micro_batch=0, activation=bad)


def _wrong_length(client: RawClient) -> pb.StepFrame:
    bad = pb.Tensor()
    bad.CopyFrom(client.activation())
    bad.data = bad.data[:-4]
    return pb.StepFrame(micro_batch=0, activation=bad)


def _unknown_codec(client: RawClient) -> pb.StepFrame:
    bad = pb.Tensor()
    bad.CopyFrom(client.activation())
    bad.codec = "int9"
    return pb.StepFrame(micro_batch=0, activation=bad)


def _nan_scale(client: RawClient) -> pb.StepFrame:
    bad = pb.Tensor()
    bad.CopyFrom(client.activation(codec="int8"))
    assert len(bad.scale) >= 1
    bad.scale[0] = math.nan
    return pb.StepFrame(micro_batch=0, activation=bad)


def _too_many_samples(client: RawClient) -> pb.StepFrame:
    # A consistent tensor (bytes match the shape) with one sample more than a micro-batch holds.
    return pb.StepFrame(micro_batch=0, activation=client.activation(n=MICRO + 1))


def _labels_with_tail(client: RawClient) -> pb.StepFrame:
    return pb.StepFrame(micro_batch=0, activation=client.activation(), labels=[1] * MICRO)


def _micro_batch_out_of_range(client: RawClient) -> pb.StepFrame:
    return pb.StepFrame(micro_batch=CHUNKS, activation=client.activation())


# (frame builder, words the status details must contain)
MALFORMED = {
    "wrong-shape": (_wrong_shape, ["shape", "[8, 7, 8, 8]", "[n, 8, 8, 8]"]),
    "wrong-byte-length": (_wrong_length, ["bytes", str(MICRO * 8 * 8 * 8 * 4 - 4), str(MICRO * 8 * 8 * 8 * 4)]),
    "unknown-codec": (_unknown_codec, ["'int9'", "unknown", "fp32"]),
    "nan-scale": (_nan_scale, ["scale", "nan", "finite"]),
    "too-many-samples": (_too_many_samples, [f"{MICRO + 1} samples", f"1 to {MICRO}"]),
    "labels-with-edge-tail": (_labels_with_tail, ["labels", "edge_tail"]),
    "micro-batch-out-of-range": (_micro_batch_out_of_range, [f"micro-batch {CHUNKS}", f"has {CHUNKS}"]),
}


def _send_bad(client: RawClient, session: str, make: Callable[[RawClient], pb.StepFrame]) -> str:
    frame = make(client)
    frame.session = session
    frame.step = 0
    return expect_status(lambda: client.step([begin(session), frame]), grpc.StatusCode.INVALID_ARGUMENT)


def test_the_shapes_this_file_assumes(setup) -> None:
    # The expectations in MALFORMED are written for tinycnn [1, 8, 8] cut after layer 1.
    config, _, client = setup
    assert client.uplink == (8, 8, 8) and client.downlink == (256,)
    assert config.micro_batch_size == MICRO


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_frame_is_invalid_argument_and_harms_nobody(setup, case: str) -> None:
    _, _, client = setup
    other = client.open()      # a session that must not notice anything
    session = client.open()
    make, words = MALFORMED[case]
    details = _send_bad(client, session, make)
    for word in words:
        assert word in details, f"{word!r} not in {details!r}"
    # The session is back at step 0, not inside a half-done step: a complete step 0 runs ...
    run_good_step(client, session, step=0)
    # ... and so does the next one, and the other session is untouched.
    run_good_step(client, session, step=1)
    run_good_step(client, other, step=0)


def test_training_works_after_all_bad_frames(setup, tmp_path: Path) -> None:
    config, address, client = setup
    session = client.open()
    for make, _ in MALFORMED.values():
        _send_bad(client, session, make)
    summary = train(config, run_dir=tmp_path / "run", cloud=address, max_steps=2)
    assert summary["steps"] == 2
    assert all(math.isfinite(json.loads(line)["loss"])
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"step"' in line)


# -- out of order ------------------------------------------------------------------------------


def _wrong_step_number(client: RawClient, session: str) -> list[pb.StepFrame]:
    return [begin(session), pb.StepFrame(session=session, step=1, micro_batch=0, activation=client.activation())]


def _early_end(client: RawClient, session: str) -> list[pb.StepFrame]:
    return [
        begin(session),
        pb.StepFrame(session=session, step=0, micro_batch=0, activation=client.activation()),
        pb.StepFrame(session=session, step=0, end=pb.StepEnd()),
    ]


def _no_begin(client: RawClient, session: str) -> list[pb.StepFrame]:
    return [pb.StepFrame(session=session, step=0, micro_batch=0, activation=client.activation())]


def _begin_ahead(client: RawClient, session: str) -> list[pb.StepFrame]:
    return [begin(session, step=1)]


OUT_OF_ORDER = {
    "wrong-step-number": (_wrong_step_number, ["step 1", "step 0"]),
    "end-before-all-micro-batches": (_early_end, ["1/4 activations"]),
    "no-begin": (_no_begin, ["begin"]),
    "begin-of-a-later-step": (_begin_ahead, ["step 1", "step 0"]),
}


@pytest.mark.parametrize("case", list(OUT_OF_ORDER))
def test_out_of_order_frames_are_failed_precondition(setup, case: str) -> None:
    _, _, client = setup
    session = client.open()
    make, words = OUT_OF_ORDER[case]
    details = expect_status(lambda: client.step(make(client, session)), grpc.StatusCode.FAILED_PRECONDITION)
    for word in words:
        assert word in details, f"{word!r} not in {details!r}"
    run_good_step(client, session, step=0)


def _early(frame: pb.StepFrame, boundary: int = 0) -> pb.StepFrame:
    """``frame`` (a begin) as an edge sends it before the previous step's done frame came back."""
    early = pb.StepFrame()
    early.CopyFrom(frame)
    early.begin.early, early.begin.boundary = True, boundary
    return early


def _payloads(replies: list[pb.StepFrame]) -> list[tuple[str, int, bytes]]:
    return [(r.WhichOneof("body"), r.micro_batch, getattr(r, r.WhichOneof("body")).data)
            for r in replies if r.WhichOneof("body") in ("activation", "gradient")]


def test_a_step_begun_early_under_the_same_decision_is_a_plain_step(setup) -> None:
    _, _, client = setup
    plain, early = client.open(), client.open()
    plain_replies = client.step(good_step_frames(client, plain, step=0, seed=3))
    frames = good_step_frames(client, early, step=0, seed=3)
    early_replies = client.step([_early(frames[0]), *frames[1:]])
    assert _payloads(early_replies) == _payloads(plain_replies) and len(_payloads(plain_replies)) == 2 * CHUNKS
    assert early_replies[-1].WhichOneof("body") == "done"
    assert client.weights(early) == client.weights(plain)


@pytest.fixture
def freezing(cloud: Callable[[Config], str]):
    """A cloud whose policy freezes the edge head (layer 0) from step 1, and a client of it."""
    config = make_config(skip={"policy": "manual", "stop_layers": [0], "stop_steps": [1]})
    client = RawClient(cloud(config), config)
    yield client
    client.close()


def _step_one(client: RawClient, session: str) -> list[pb.StepFrame]:
    """Step 1 as the edge sends it once the head is frozen: boundary 1, no head gradients come back."""
    frames = good_step_frames(client, session, step=1, seed=5)
    frames[0].begin.boundary = 1
    return frames


def test_a_step_begun_early_under_a_decision_that_froze_the_head_is_begun_again(freezing) -> None:
    client = freezing
    plain, early = client.open(), client.open()
    for session in (plain, early):
        client.step(good_step_frames(client, session, step=0, seed=2))
    plain_replies = client.step(_step_one(client, plain))
    frames = _step_one(client, early)
    # Begun under boundary 0 with two activations: the decision for step 1 froze the head, so the
    # cloud drops them, and the step begins again under boundary 1.
    early_replies = client.step([_early(frames[0]), *frames[1:3], *frames])
    assert _payloads(early_replies) == _payloads(plain_replies)
    assert {kind for kind, _, _ in _payloads(plain_replies)} == {"activation"}, "the head is frozen"
    assert client.weights(early) == client.weights(plain)


def test_a_dropped_early_step_takes_activations_until_begun_again_and_nothing_else(freezing) -> None:
    client = freezing
    session = client.open()
    client.step(good_step_frames(client, session, step=0))
    frames = _step_one(client, session)
    gradient = next(f for f in frames if f.WhichOneof("body") == "gradient")
    details = expect_status(lambda: client.step([_early(frames[0]), frames[1], gradient]),
                            grpc.StatusCode.FAILED_PRECONDITION)
    assert "begin it again" in details, details
    too_many = [_early(frames[0]), *frames[1:1 + CHUNKS], frames[1]]
    expect_status(lambda: client.step(too_many), grpc.StatusCode.FAILED_PRECONDITION)
    # An early begin must carry the boundary the step before it ran with.
    details = expect_status(lambda: client.step([_early(frames[0], boundary=1)]), grpc.StatusCode.FAILED_PRECONDITION)
    assert "ran with 0" in details, details
    client.step(frames)  # the session is intact, at step 1


def test_aborted_step_leaves_counter_and_weights_unchanged(setup) -> None:
    _, _, client = setup
    session = client.open()
    run_good_step(client, session, step=0, seed=100)   # momentum buffers exist from here on
    before = client.weights(session)

    # A step that gets as far as a full forward and backward of micro-batch 0, then breaks.
    frames = [
        begin(session, step=1),
        pb.StepFrame(session=session, step=1, micro_batch=0, activation=client.activation(seed=1)),
        pb.StepFrame(session=session, step=1, micro_batch=0, gradient=client.gradient(seed=1)),
    ]
    bad = _wrong_length(client)
    bad.session, bad.step, bad.micro_batch = session, 1, 1
    expect_status(lambda: client.step(frames + [bad]), grpc.StatusCode.INVALID_ARGUMENT)
    after = client.weights(session)
    assert after.keys() == before.keys()
    assert all(after[name] == before[name] for name in before), "an aborted step changed the cloud's weights"

    # The step counter did not move: step 2 is refused, step 1 is expected.
    details = expect_status(lambda: client.step([begin(session, step=2)]), grpc.StatusCode.FAILED_PRECONDITION)
    assert "step 1" in details

    # And the aborted step left nothing behind: the next step gives exactly what a session
    # that never saw the aborted step gives.
    twin = client.open()
    run_good_step(client, twin, step=0, seed=100)
    assert client.weights(twin) == before
    run_good_step(client, session, step=1, seed=7)
    run_good_step(client, twin, step=1, seed=7)
    trained, reference = client.weights(session), client.weights(twin)
    assert trained != before, "the step after the abort did not train"
    assert trained == reference


# -- unknown sessions ----------------------------------------------------------------------------


def test_unknown_session_is_not_found(setup) -> None:
    _, _, client = setup
    client.open()
    ghost = "no-such-session"
    calls = {
        "Step": lambda: client.step([begin(ghost)]),
        "Evaluate": lambda: list(
            client.stub.Evaluate(iter([pb.EvalFrame(session=ghost, batch=0, activation=client.activation())]),
                                 timeout=TIMEOUT)
        ),
        "Weights": lambda: list(client.stub.Weights(pb.SessionRef(session=ghost), timeout=TIMEOUT)),
        "Close": lambda: client.stub.Close(pb.SessionRef(session=ghost), timeout=TIMEOUT),
    }
    for name, call in calls.items():
        details = expect_status(call, grpc.StatusCode.NOT_FOUND)
        assert ghost in details, f"{name}: {details!r}"


def test_closed_session_is_not_found(setup) -> None:
    _, _, client = setup
    session = client.open()
    run_good_step(client, session)
    client.stub.Close(pb.SessionRef(session=session), timeout=TIMEOUT)
    expect_status(lambda: client.step([begin(session, step=1)]), grpc.StatusCode.NOT_FOUND)
    expect_status(lambda: client.stub.Close(pb.SessionRef(session=session), timeout=TIMEOUT), grpc.StatusCode.NOT_FOUND)


# -- message size bound ------------------------------------------------------------------------


@pytest.mark.parametrize("bound_mib", [1, 2])
def test_message_over_the_bound_is_resource_exhausted(cloud, bound_mib: int, tmp_path: Path) -> None:
    config = make_config(link={"max_message_mib": bound_mib})
    address = cloud(config)
    client = RawClient(address, config)
    try:
        other = client.open()
        session = client.open()
        # An activation frame about 1 MiB over the bound (never decoded: the transport refuses it).
        n = (bound_mib + 1) * MIB // (4 * math.prod(client.uplink))
        big = pb.Tensor(shape=[n, *client.uplink], codec="fp32", data=bytes(n * 4 * math.prod(client.uplink)))
        frame = pb.StepFrame(session=session, step=0, micro_batch=0, activation=big)
        assert frame.ByteSize() > bound_mib * MIB
        details = expect_status(lambda: client.step([begin(session), frame]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert details
        # The server still serves: the other session, a new one, and a whole training run.
        run_good_step(client, other, step=0)
        run_good_step(client, client.open(), step=0)
        summary = train(config, run_dir=tmp_path / "run", cloud=address, max_steps=2)
        assert summary["steps"] == 2
    finally:
        client.close()


def _largest_frames(config: Config) -> list[int]:
    """Serialized sizes of the largest legal messages: a full fp32 micro-batch at either cut, every weight."""
    model = model_of(config)
    uplink, downlink = cut_shapes_of(config)
    n = config.micro_batch_size
    sizes = [
        pb.StepFrame(session="s" * 32, step=2**40, micro_batch=n, labels=[config.model.num_classes - 1] * n,
                     activation=wire.encode_tensor(torch.ones(n, *shape), "fp32", "activation")).ByteSize()
        for shape in (uplink, downlink)
    ]
    sizes += [pb.NamedTensor(name=name, tensor=wire.raw_to_message(t)).ByteSize() for name, t in model.state_dict().items()]
    return sizes


def test_the_limit_is_what_the_configuration_needs_not_the_bound() -> None:
    # A tinycnn micro-batch is 16 KiB: the limit is about 0.1 MiB under the default 64 MiB bound,
    # and still holds every legal message with room to spare.
    config = make_config()
    limit = wire.message_limit(config, model_of(config))
    assert limit <= MIB // 8
    assert max(_largest_frames(config)) * 2 < limit
    # Any bound above the need gives the same limit.
    assert wire.message_limit(make_config(link={"max_message_mib": 1}), model_of(config)) == limit


def test_message_limit_refuses_a_config_that_needs_more() -> None:
    config = make_config(
        model={"name": "mobilenetv2", "width": 1.0, "input_shape": [3, 32, 32]},
        partition={"chunks": 1},
        train={"batch_size": 512},
        link={"max_message_mib": 1},
    )
    with pytest.raises(ConfigError) as info:
        wire.message_limit(config, model_of(config))
    message = str(info.value)
    assert "link.max_message_mib" in message
    assert "partition.chunks" in message  # says what else to change
    # With room enough the same configuration passes, and the limit is its need, far below the bound.
    roomy = make_config(
        model={"name": "mobilenetv2", "width": 1.0, "input_shape": [3, 32, 32]},
        partition={"chunks": 1},
        train={"batch_size": 512},
        link={"max_message_mib": 1024},
    )
    limit = wire.message_limit(roomy, model_of(roomy))
    assert max(_largest_frames(roomy)) < limit < 128 * MIB
