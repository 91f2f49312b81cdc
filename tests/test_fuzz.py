"""Fuzzing a real cloud: every bad message gets a definite status, the server stays up, an honest run is untouched."""
from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_node.link import LinkSecurity
from edge_node.worker import StepReport, train
from pipeline import wire
from protos import edgepipe_pb2 as pb
from tests.conftest import EdgeTokens, make_config
from tests.raw_client import RawClient, begin, good_step_frames, run_good_step

#: What a bad message may be answered with; OK only when a generated message happens to be legal.
DEFINITE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXAMPLES = 1000
HONEST_STEPS = 6
_TIMEOUT = 30.0
_KINDS = {"Open": "unary_unary", "Close": "unary_unary", "Weights": "unary_stream",
          "Step": "stream_stream", "Evaluate": "stream_stream"}


@dataclass(frozen=True)
class Case:
    """One call: a method, its raw request messages and who pretends to call."""

    method: str
    messages: tuple[bytes, ...]
    caller: str


# -- strategies ----------------------------------------------------------------------------------

_floats = st.floats(width=32) | st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-45, 3e38])
# Small values that reach the deeper checks, and the edges of each protobuf integer type.
_i32 = st.integers(-3, 40) | st.sampled_from([-(2**31), 2**31 - 1, 2**16])
_i64 = _i32 | st.sampled_from([2**40, -(2**63), 2**63 - 1])
_codecs = st.sampled_from(["fp32", "fp16", "bf16", "int8", "int4", "int8-sr", "raw", "", "int9"]) | st.text(max_size=12)


def _tensor_mutations(shape: tuple[int, ...]) -> st.SearchStrategy[pb.Tensor]:
    """A valid encoding of a ``[8, *shape]`` tensor with one part replaced by something bad."""

    def mutate(codec: str, part: str, ints: list[int], floats: list[float], data: bytes, nan_at: int) -> pb.Tensor:
        x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(nan_at))
        tensor = wire.encode_tensor(x, codec, "activation")
        if part == "shape":
            del tensor.shape[:]
            tensor.shape.extend(ints)
        elif part in ("scale", "zero_point"):
            field = getattr(tensor, part)
            del field[:]
            field.extend(floats)
        elif part == "data":
            tensor.data = data
        elif part == "channel_axis":
            tensor.channel_axis = max(min(ints[0], 2**31 - 1), -(2**31)) if ints else -1
        elif part == "nan":
            payload = torch.frombuffer(bytearray(tensor.data), dtype=torch.uint8)
            payload[nan_at % len(payload)] = 0xFF   # in fp32/fp16/bf16 payloads, often a NaN byte
            tensor.data = payload.numpy().tobytes()
        else:
            tensor.codec = part
        return tensor

    return st.builds(
        mutate,
        st.sampled_from(["fp32", "fp16", "bf16", "int8", "int4"]),
        st.sampled_from(["shape", "scale", "zero_point", "data", "channel_axis", "nan"]) | _codecs,
        st.lists(_i64, max_size=6),
        st.lists(_floats, max_size=10),
        st.binary(max_size=600),
        st.integers(0, 10_000),
    )


def _cases(client: RawClient, sessions: list[str]) -> st.SearchStrategy[Case]:
    session = st.sampled_from(sessions) | st.text(max_size=40)
    caller = st.sampled_from(["mallory"] * 6 + ["nobody", "forger", "thief"])
    uplink, downlink = client.uplink, client.downlink
    tensor = _tensor_mutations(uplink) | _tensor_mutations(downlink) | st.builds(
        pb.Tensor, shape=st.lists(_i64, max_size=5), codec=_codecs, data=st.binary(max_size=300),
        scale=st.lists(_floats, max_size=4), zero_point=st.lists(_floats, max_size=4), channel_axis=_i32,
    )
    step_begin = st.builds(pb.StepBegin, epoch=_i32, lr=st.floats() | st.just(0.05), chunks=_i32, boundary=_i32,
                           samples=_i32 | st.just(32))
    stats = st.lists(st.builds(pb.LayerStat, index=_i32, has_conv=st.booleans(), weight_norm=st.floats(),
                               weight_variance=st.floats()), max_size=4)
    body = st.one_of(
        st.builds(lambda b: {"begin": b}, step_begin),
        st.builds(lambda t: {"activation": t}, tensor),
        st.builds(lambda t: {"gradient": t}, tensor),
        st.builds(lambda e, s: {"end": pb.StepEnd(epoch_end=e, stats=s)}, st.booleans(), stats),
        st.just({"done": pb.StepDone(loss=1.0)}),
        st.just({}),
    )
    frame = st.builds(
        lambda s, step, mb, b, labels: pb.StepFrame(session=s, step=step, micro_batch=mb, labels=labels, **b),
        session, st.integers(-1, 3) | _i64, st.integers(-1, 5) | _i32, body, st.lists(_i32, max_size=9),
    )
    # Good frames of one session, sent out of order, repeated or cut short.
    vocabulary = [f.SerializeToString() for s in sessions for f in good_step_frames(client, s)]
    shuffled = st.lists(st.integers(0, len(vocabulary) - 1).map(lambda i: vocabulary[i]), max_size=11)
    step_messages = st.lists(frame.map(pb.StepFrame.SerializeToString), max_size=6) | shuffled | st.builds(
        lambda s, rest: [begin(s).SerializeToString(), *rest], st.sampled_from(sessions),
        st.lists(frame.map(pb.StepFrame.SerializeToString), max_size=4),
    )
    eval_messages = st.lists(st.builds(lambda s, b, t: pb.EvalFrame(session=s, batch=b, activation=t).SerializeToString(),
                                       session, _i32, tensor), max_size=4)
    agreed = json.dumps(client.config.agreed())
    good_open = client.open_request()
    open_request = st.builds(
        lambda fp, text, total, per_epoch, name: pb.OpenRequest(
            fingerprint=fp, config_json=text, total_steps=total, steps_per_epoch=per_epoch, edge_name=name
        ).SerializeToString(),
        st.just(good_open.fingerprint) | st.text(max_size=20),
        st.just(agreed) | st.text(max_size=200) | st.integers(1, 400).map(lambda n: "[" * n),
        _i64, _i64, st.text(max_size=30),
    )
    session_ref = st.builds(lambda s: pb.SessionRef(session=s).SerializeToString(), session)
    raw = st.lists(st.binary(max_size=200), min_size=1, max_size=3)
    return st.one_of(
        st.builds(Case, st.just("Step"), step_messages.map(tuple), caller),
        st.builds(Case, st.just("Evaluate"), eval_messages.map(tuple), caller),
        st.builds(Case, st.just("Open"), open_request.map(lambda m: (m,)), caller),
        st.builds(Case, st.sampled_from(["Weights", "Close"]), session_ref.map(lambda m: (m,)),
                  st.sampled_from(["nobody", "forger", "thief"])),
        st.builds(Case, st.just("Weights"), session_ref.map(lambda m: (m,)), caller),
        st.builds(Case, st.sampled_from(sorted(_KINDS)), raw.map(tuple), caller),
    )


# -- sending -------------------------------------------------------------------------------------


def _sender(channel: grpc.Channel, metadata: dict[str, object]) -> Callable[[Case], tuple[grpc.StatusCode, int]]:
    calls = {name: getattr(channel, kind)(f"/edgepipe.v1.Cloud/{name}", request_serializer=None,
                                          response_deserializer=None) for name, kind in _KINDS.items()}

    def send(case: Case) -> tuple[grpc.StatusCode, int]:
        call, kind = calls[case.method], _KINDS[case.method]
        extra = {"metadata": metadata[case.caller], "timeout": _TIMEOUT}
        try:
            if kind == "stream_stream":
                replies = list(call(iter(case.messages), **extra))
            else:
                message = case.messages[0] if len(case.messages) == 1 else b"".join(case.messages)
                replies = call(message, **extra)
                if kind == "unary_stream":
                    replies = list(replies)
            if case.method == "Open":
                # A legal Open made a session: give it back, so that the cloud does not fill up.
                calls["Close"](pb.SessionRef(session=pb.OpenReply.FromString(replies).session).SerializeToString(),
                               **extra)
        except grpc.RpcError as exc:
            return exc.code(), len(case.messages)
        return grpc.StatusCode.OK, len(case.messages)

    return send


def test_fuzzed_messages_get_definite_answers_while_an_honest_edge_trains(
    cloud_server, edge_tokens: EdgeTokens, tmp_path: Path
) -> None:
    config = make_config()
    address, servicer = cloud_server(config, edges=edge_tokens.registry)
    tokens = edge_tokens.tokens
    mallory = RawClient(address, config, token=tokens["mallory"])
    sessions = [mallory.open() for _ in range(3)]
    metadata = {
        "mallory": mallory.metadata,
        "thief": (("authorization", f"Bearer {tokens['bob']}"),),
        "forger": (("authorization", "Bearer forged-token"),),
        "nobody": None,
    }
    train(config, run_dir=tmp_path / "reference", max_steps=HONEST_STEPS)

    # The honest edge takes a step, waits until half the fuzzing is done, then trains on.
    started, halfway = threading.Event(), threading.Event()

    def pause(report: StepReport) -> None:
        if report.step == 0:
            started.set()
            halfway.wait(timeout=300)

    statuses: Counter[grpc.StatusCode] = Counter()
    messages = 0
    send = _sender(mallory.channel, metadata)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=_cases(mallory, sessions))
    def probe(case: Case) -> None:
        nonlocal messages
        code, sent = send(case)
        assert code in DEFINITE or code == grpc.StatusCode.OK, (code, case)
        statuses[code] += 1
        messages += sent
        if sum(statuses.values()) == EXAMPLES // 2:
            halfway.set()

    with futures.ThreadPoolExecutor(1) as pool:
        honest = pool.submit(train, config, run_dir=tmp_path / "honest", cloud=address, max_steps=HONEST_STEPS,
                             security=LinkSecurity(token=tokens["alice"]), on_step=pause)
        try:
            assert started.wait(timeout=120), "the honest edge never took its first step"
            probe()
        finally:
            halfway.set()
        summary = honest.result(timeout=300)

    print(f"fuzz: {sum(statuses.values())} calls, {messages} messages, "
          + ", ".join(f"{code.name} {count}" for code, count in statuses.most_common()))
    assert sum(statuses.values()) >= EXAMPLES and messages >= EXAMPLES
    assert len(statuses) >= 5, statuses   # the cases reach many different checks
    assert summary["steps"] == HONEST_STEPS
    honest_state = torch.load(tmp_path / "honest" / "model.pt", weights_only=True)
    reference = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)
    assert honest_state.keys() == reference.keys()
    assert all(torch.equal(honest_state[k], reference[k]) for k in reference)
    # The server is still up and serves a good step and a health check.
    fresh = RawClient(address, config, token=tokens["bob"])
    try:
        run_good_step(fresh, fresh.open())
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        fresh.close()
        mallory.close()
