"""A gRPC client for tests that builds every frame itself, so it can build wrong ones, and the frames of a good step."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import grpc
import pytest
import torch

from pipeline import wire
from pipeline.config import Config
from pipeline.handshake import fingerprint
from pipeline.models import build_configured
from pipeline.partition import cut_shapes, make_cuts
from protos import edgepipe_pb2 as pb
from protos import edgepipe_pb2_grpc as pb_grpc

MIB = 1 << 20
TIMEOUT = 30.0
# make_config(): tinycnn on [1, 8, 8], edge_head 1, edge_tail 1, 32 samples in 4 micro-batches of 8.
SAMPLES, CHUNKS = 32, 4
MICRO = SAMPLES // CHUNKS
#: The run length RawClient announces at Open: steps 0..9 are epoch 0.
TOTAL_STEPS, STEPS_PER_EPOCH = 100, 10


def model_of(config: Config) -> torch.nn.Sequential:
    return build_configured(config.model)


def cut_shapes_of(config: Config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    model = model_of(config)
    cuts = make_cuts(len(model), config.partition.edge_head, config.partition.edge_tail)
    return cut_shapes(model, config.model.input_shape, cuts)


class RawClient:
    """A client that builds every frame itself, so it can build wrong ones.

    ``token`` goes as ``authorization: Bearer`` metadata on every call; ``credentials`` make
    the channel TLS (``server_name`` is the name the cloud's certificate holds).
    """

    def __init__(
        self,
        address: str,
        config: Config,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
    ) -> None:
        self.config = config
        options = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        self.stub = pb_grpc.CloudStub(self.channel)
        self.uplink, self.downlink = cut_shapes_of(config)

    def close(self) -> None:
        self.channel.close()

    def open_request(self) -> pb.OpenRequest:
        return pb.OpenRequest(
            fingerprint=fingerprint(self.config, model_of(self.config)),
            config_json=json.dumps(self.config.agreed()),
            edge_name="raw-test-client",
            total_steps=TOTAL_STEPS,
            steps_per_epoch=STEPS_PER_EPOCH,
        )

    def open(self) -> str:
        reply = self.stub.Open(self.open_request(), timeout=TIMEOUT, metadata=self.metadata)
        assert reply.session
        return reply.session

    def step(self, frames: Iterable[pb.StepFrame]) -> list[pb.StepFrame]:
        return list(self.stub.Step(iter(list(frames)), timeout=TIMEOUT, metadata=self.metadata))

    def evaluate(self, frames: Iterable[pb.EvalFrame]) -> list[pb.EvalFrame]:
        return list(self.stub.Evaluate(iter(list(frames)), timeout=TIMEOUT, metadata=self.metadata))

    def weights(self, session: str) -> dict[str, bytes]:
        entries = list(self.stub.Weights(pb.SessionRef(session=session), timeout=TIMEOUT, metadata=self.metadata))
        assert entries
        return {e.name: bytes(e.tensor.data) for e in entries}

    def close_session(self, session: str) -> None:
        self.stub.Close(pb.SessionRef(session=session), timeout=TIMEOUT, metadata=self.metadata)

    # -- frames --------------------------------------------------------------------------

    def activation(self, n: int = MICRO, seed: int = 0, codec: str = "fp32") -> pb.Tensor:
        g = torch.Generator().manual_seed(seed)
        return wire.encode_tensor(torch.randn((n, *self.uplink), generator=g), codec, "activation")

    def gradient(self, n: int = MICRO, seed: int = 0) -> pb.Tensor:
        g = torch.Generator().manual_seed(10_000 + seed)
        return wire.encode_tensor(torch.randn((n, *self.downlink), generator=g) * 1e-2, "fp32", "gradient")


def begin(session: str, step: int = 0) -> pb.StepFrame:
    """The begin frame the cloud expects for ``step`` of a TOTAL_STEPS run of make_config() (constant lr)."""
    return pb.StepFrame(
        session=session,
        step=step,
        begin=pb.StepBegin(epoch=step // STEPS_PER_EPOCH, lr=0.05, chunks=CHUNKS, boundary=0, samples=SAMPLES),
    )


def good_step_frames(client: RawClient, session: str, step: int = 0, seed: int = 0) -> list[pb.StepFrame]:
    """A complete, correct step (edge_tail > 0, head trains): activations, gradients, end."""
    frames = [begin(session, step)]
    for i in range(CHUNKS):
        frames.append(pb.StepFrame(session=session, step=step, micro_batch=i, activation=client.activation(seed=seed + i)))
    for i in reversed(range(CHUNKS)):
        frames.append(pb.StepFrame(session=session, step=step, micro_batch=i, gradient=client.gradient(seed=seed + i)))
    frames.append(pb.StepFrame(session=session, step=step, end=pb.StepEnd(epoch_end=False)))
    return frames


def run_good_step(client: RawClient, session: str, step: int = 0, seed: int = 0) -> None:
    replies = client.step(good_step_frames(client, session, step, seed))
    kinds = [r.WhichOneof("body") for r in replies]
    # The cloud answers every activation with its output and every gradient with dL/da
    # (the head still trains at boundary 0), and ends with done.
    assert kinds.count("activation") == CHUNKS
    assert kinds.count("gradient") == CHUNKS
    assert kinds[-1] == "done"
    assert all(r.step == step and r.session == session for r in replies)
    for r in replies:
        if r.WhichOneof("body") == "activation":
            assert list(r.activation.shape) == [MICRO, *client.downlink]
        elif r.WhichOneof("body") == "gradient":
            assert list(r.gradient.shape) == [MICRO, *client.uplink]


def expect_status(call: Callable[[], object], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, f"expected {code.name}, got {info.value.code().name}: {info.value.details()}"
    return info.value.details()
