"""The gRPC client end of the link: channel, handshake, one stream per step, deadlines, byte counting."""
from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from torch import nn

from pipeline import wire
from pipeline.config import Config
from pipeline.handshake import fingerprint
from pipeline.skip import Decision
from pipeline.traffic import TrafficMeter
from protos import edgepipe_pb2 as pb

__all__ = ["CloudLink", "LinkError", "StepCall"]

_SERVICE = "/edgepipe.v1.Cloud/"
_END = object()


class LinkError(RuntimeError):
    """The cloud refused a call or could not be reached; the message is one line for the user."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _link_error(address: str, exc: grpc.RpcError) -> LinkError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return LinkError(f"cannot reach the cloud at {address}: {details}", code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return LinkError(f"the cloud at {address} did not answer in time (link.timeout_seconds)", code)
    name = code.name if code is not None else "ERROR"
    return LinkError(f"cloud {address} answered {name}: {details}", code)


class StepCall:
    """One training step's bidirectional stream.

    Frames are sent from a queue the gRPC runtime drains, and replies are read by a thread
    into another queue, so the edge can compute while both directions move.
    """

    def __init__(self, open_stream: Callable[[Iterator[Any]], Iterator[pb.StepFrame]], address: str) -> None:
        self._address = address
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call = open_stream(iter(self._requests.get, _END))
        self._reader = threading.Thread(target=self._read, name="edgepipe-step-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._replies.put(reply)
            self._replies.put(_END)
        except grpc.RpcError as exc:
            self._replies.put(exc)

    def send(self, frame: pb.StepFrame) -> None:
        """Queue a frame for the cloud."""
        self._requests.put(frame)

    def _unwrap(self, item: Any) -> pb.StepFrame:
        if item is _END:
            raise LinkError(f"the cloud at {self._address} ended the step early")
        if isinstance(item, grpc.RpcError):
            raise _link_error(self._address, item)
        return item

    def poll(self) -> pb.StepFrame | None:
        """A reply if one has arrived, else None."""
        try:
            item = self._replies.get_nowait()
        except queue.Empty:
            return None
        return self._unwrap(item)

    def receive(self) -> pb.StepFrame:
        """Wait for the next reply (the call's deadline bounds the wait)."""
        return self._unwrap(self._replies.get())

    def finish(self) -> None:
        """Close the request stream and wait for the cloud to end the call."""
        self._requests.put(_END)
        self._reader.join()
        leftover = self._replies.get()
        if leftover is not _END:
            self._unwrap(leftover)
            raise LinkError(f"the cloud at {self._address} sent frames after the step ended")

    def cancel(self) -> None:
        """Abandon the step; the cloud aborts it too."""
        self._call.cancel()
        self._requests.put(_END)


class CloudLink:
    """The edge's connection to one cloud; every message crosses :class:`TrafficMeter` here."""

    def __init__(
        self, address: str, config: Config, model: nn.Sequential, meter: TrafficMeter, *, connect_timeout: float = 30.0
    ) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.config = config
        self.meter = meter
        self.session = ""
        self._fingerprint = fingerprint(config, model)
        limit = wire.message_limit(config, model)
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
            ],
        )
        self._open = self._method("unary_unary", "Open", pb.OpenReply)
        self._step = self._method("stream_stream", "Step", pb.StepFrame)
        self._evaluate = self._method("stream_stream", "Evaluate", pb.EvalFrame)
        self._weights = self._method("unary_stream", "Weights", pb.NamedTensor)
        self._close = self._method("unary_unary", "Close", pb.CloseReply)

    def _method(self, arity: str, name: str, reply_type: Any) -> Any:
        meter = self.meter

        def serialize(message: Any) -> bytes:
            data = message.SerializeToString()
            meter.count("uplink", wire.frame_kind(message), len(data))
            return data

        def deserialize(data: bytes) -> Any:
            message = reply_type.FromString(data)
            meter.count("downlink", wire.frame_kind(message), len(data))
            return message

        factory = getattr(self._channel, arity)
        return factory(_SERVICE + name, request_serializer=serialize, response_deserializer=deserialize)

    def open(self, edge_name: str, *, total_steps: int, steps_per_epoch: int) -> Decision:
        """Handshake for a run of ``total_steps`` steps; returns the freeze decision for step 0."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise LinkError(
                f"cannot reach the cloud at {self.address} (waited {self.connect_timeout:g} s, --connect-timeout)"
            ) from None
        request = pb.OpenRequest(
            fingerprint=self._fingerprint,
            config_json=json.dumps(self.config.agreed(), sort_keys=True),
            edge_name=edge_name,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
        )
        try:
            reply = self._open(request, timeout=self.config.link.timeout_seconds)
        except grpc.RpcError as exc:
            raise _link_error(self.address, exc) from None
        self.session = reply.session
        return wire.decision_from_message(reply.decision)

    def step(self) -> StepCall:
        """Start one training step's stream."""
        timeout = self.config.link.timeout_seconds
        return StepCall(lambda requests: self._step(requests, timeout=timeout), self.address)

    def evaluate(self, frames: Iterable[pb.EvalFrame]) -> Iterator[pb.EvalFrame]:
        """Stream evaluation activations up and middle outputs back."""
        try:
            yield from self._evaluate(iter(frames), timeout=self.config.link.timeout_seconds * 10)
        except grpc.RpcError as exc:
            raise _link_error(self.address, exc) from None

    def weights(self) -> Iterator[pb.NamedTensor]:
        """The cloud's trained middle, one state-dict entry per message."""
        try:
            yield from self._weights(pb.SessionRef(session=self.session), timeout=self.config.link.timeout_seconds)
        except grpc.RpcError as exc:
            raise _link_error(self.address, exc) from None

    def close(self) -> None:
        """End the session (best effort) and the channel."""
        if self.session:
            try:
                self._close(pb.SessionRef(session=self.session), timeout=10)
            except grpc.RpcError:
                pass  # the cloud reaps idle sessions itself
            self.session = ""
        self._channel.close()
