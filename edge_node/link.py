"""The gRPC client end of the link: channel, handshake, a stream per step, deadlines, byte counting, errors."""
from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from torch import nn

from pipeline import wire
from pipeline.config import Config
from pipeline.handshake import fingerprint
from pipeline.skip import Decision
from pipeline.traffic import TrafficMeter
from edge_node.security import LinkSecurity
from protos import edgepipe_pb2 as pb

__all__ = ["CloudLink", "LinkError", "LinkSecurity", "StepCall", "link_error"]

_SERVICE = "/edgepipe.v1.Cloud/"
#: What each call's bytes are for, in the traffic ledger.
_PHASES = {"Open": "handshake", "Close": "handshake", "Step": "training", "Evaluate": "evaluation", "Weights": "weights"}
#: A method the cloud does not have: a fail-fast call to it returns the channel's last
#: connection error, or UNIMPLEMENTED once connected, and never touches a session.
_PROBE = _SERVICE + "Probe"
#: Bounds the probe when the channel is still connecting (a black-holed address).
_PROBE_SECONDS = 5.0
_END = object()
#: A dead cloud or a cut link is noticed in about 15 s (measured with a proxy that stops
#: forwarding), not at the step deadline (link.timeout_seconds, minutes). No keepalive ping goes
#: out while gRPC's own flow-control ping is unanswered, and that one waits 60 s by default:
#: both get the same timeout.
_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
#: A cloud that comes back (restarted on the same address) is found within a second or two;
#: gRPC's default backoff grows to two minutes between connection attempts.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
#: Failures a reconnect may mend: the cloud is gone or restarting, the link cut, a step
#: aborted (the cloud could not save its checkpoint). Refusals are final.
_TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
})
#: Connection errors that retrying cannot mend: the TLS handshake failed, or the cloud closed
#: the connection during it (it wanted a client certificate it did not get or did not trust).
_TLS_FAILURE = re.compile(r"handshake|certificate|verification|TSI_|SSL|Socket closed", re.IGNORECASE)
_REFUSED_HINT = "check --token-file / EDGEPIPE_TOKEN and the cloud's edges file"
_FULL_HINT = "try again later, or serve more edges at once (edgepipe-cloud --max-sessions, --workers)"
_TLS_HINT = "check --tls-ca and --tls-server-name, and --tls-cert/--tls-key if the cloud wants client certificates"


class LinkError(RuntimeError):
    """The cloud refused a call or could not be reached; the message is one line for the user.

    ``transient`` says whether reconnecting may mend it (the cloud went away or restarts, a
    stream broke), as opposed to a refusal; ``reason`` is the short cause, for reports.
    """

    def __init__(
        self, message: str, code: grpc.StatusCode | None = None, *, transient: bool = False, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.transient = transient
        self.reason = reason or message


def link_error(address: str, exc: grpc.RpcError) -> LinkError:
    """The :class:`LinkError` for a failed call to the cloud at ``address``: transient or not, and why."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in _TRANSIENT:
        reason = f"{code.name}: {' '.join((details or '').split())}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"the cloud at {address} did not answer in time (link.timeout_seconds)"
        elif code == grpc.StatusCode.UNAVAILABLE:
            message = f"cannot reach the cloud at {address}: {details}"
        else:
            message = f"cloud {address} answered {code.name}: {details}"
        return LinkError(message, code, transient=True, reason=reason)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return LinkError(f"the cloud at {address} refused this edge ({code.name}: {details}); {_REFUSED_HINT}", code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return LinkError(f"the cloud at {address} is full ({details}); {_FULL_HINT}", code)
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
        self._closed = False
        #: When the reply returned last by :meth:`poll` or :meth:`receive` arrived (``perf_counter``).
        self.arrived = 0.0
        #: This call's own frames, as the link's meter counts them: a step's traffic is its call's,
        #: whenever its frames happen to cross (a step begun early sends during the previous one).
        self.traffic = TrafficMeter()
        self._call = open_stream(self._outgoing())
        self._reader = threading.Thread(target=self._read, name="edgepipe-step-reader", daemon=True)
        self._reader.start()

    def _outgoing(self) -> Iterator[pb.StepFrame]:
        for frame in iter(self._requests.get, _END):
            # Counted as gRPC takes it: a frame still queued when the call is cancelled never crosses.
            self.traffic.count("uplink", wire.frame_kind(frame), frame.ByteSize())
            yield frame

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.traffic.count("downlink", wire.frame_kind(reply), reply.ByteSize())
                self._replies.put((time.perf_counter(), reply))
            self._replies.put((time.perf_counter(), _END))
        except grpc.RpcError as exc:
            self._replies.put((time.perf_counter(), exc))

    def send(self, frame: pb.StepFrame) -> None:
        """Queue a frame for the cloud."""
        self._requests.put(frame)

    def close(self) -> None:
        """End the request stream: nothing more is sent, replies still arrive (idempotent)."""
        if not self._closed:
            self._closed = True
            self._requests.put(_END)

    def _unwrap(self, entry: tuple[float, Any]) -> pb.StepFrame:
        self.arrived, item = entry
        if item is _END:
            raise LinkError(f"the cloud at {self._address} ended the step early", transient=True,
                            reason="the step's stream ended early")
        if isinstance(item, grpc.RpcError):
            raise link_error(self._address, item)
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
        self.close()
        self._reader.join()
        leftover = self._replies.get()
        if leftover[1] is not _END:
            self._unwrap(leftover)
            raise LinkError(f"the cloud at {self._address} sent frames after the step ended")

    def cancel(self) -> None:
        """Abandon the step; the cloud aborts it too."""
        self._call.cancel()
        self.close()


class CloudLink:
    """The edge's connection to one cloud; every message crosses :class:`TrafficMeter` here."""

    def __init__(
        self,
        address: str,
        config: Config,
        model: nn.Sequential,
        meter: TrafficMeter,
        *,
        connect_timeout: float = 30.0,
        security: LinkSecurity | None = None,
    ) -> None:
        """Set up the channel to ``address``; nothing connects before :meth:`open`.

        ``security`` None is clear text without a token, to loopback only. Raises
        :class:`pipeline.trust.TrustError` for settings that must not or cannot be used.
        """
        self.address = address
        self.connect_timeout = connect_timeout
        self.config = config
        self.meter = meter
        self.session = ""
        self.security = security or LinkSecurity()
        self._fingerprint = fingerprint(config, model)
        limit = wire.message_limit(config, model)
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                   *_KEEPALIVE_OPTIONS, *_RECONNECT_OPTIONS]
        self._raw, self._channel = self.security.channel(address, options)
        self._probe = self._raw.unary_unary(_PROBE)
        self._open = self._method("unary_unary", "Open", pb.OpenReply)
        self._step = self._method("stream_stream", "Step", pb.StepFrame)
        self._evaluate = self._method("stream_stream", "Evaluate", pb.EvalFrame)
        self._weights = self._method("unary_stream", "Weights", pb.NamedTensor)
        self._close = self._method("unary_unary", "Close", pb.CloseReply)

    def _method(self, arity: str, name: str, reply_type: Any) -> Any:
        phase = _PHASES[name]
        meter = self.meter

        def serialize(message: Any) -> bytes:
            data = message.SerializeToString()
            meter.count("uplink", wire.frame_kind(message), len(data), phase)
            return data

        def deserialize(data: bytes) -> Any:
            message = reply_type.FromString(data)
            meter.count("downlink", wire.frame_kind(message), len(data), phase)
            return message

        factory = getattr(self._channel, arity)
        return factory(_SERVICE + name, request_serializer=serialize, response_deserializer=deserialize)

    def open(
        self, edge_name: str, *, total_steps: int, steps_per_epoch: int, run_id: str,
        resume_step: int | None = None, wait: float | None = None,
    ) -> Decision:
        """Handshake for run ``run_id`` of ``total_steps`` steps, fresh or resumed after ``resume_step``.

        Waits up to ``wait`` seconds (None: the connect timeout) for the channel to connect.
        Returns the freeze decision for the first step to run: 0, or ``resume_step + 1``.
        """
        self._wait_until_ready(wait)
        request = pb.OpenRequest(
            fingerprint=self._fingerprint,
            config_json=json.dumps(self.config.agreed(), sort_keys=True),
            edge_name=edge_name,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            run_id=run_id,
            resume=resume_step is not None,
            resume_step=resume_step or 0,
        )
        try:
            reply = self._open(request, timeout=self.config.link.timeout_seconds)
        except grpc.RpcError as exc:
            raise link_error(self.address, exc) from None
        expected = 0 if resume_step is None else resume_step + 1
        if reply.next_step != expected:
            raise LinkError(
                f"the cloud at {self.address} would run step {reply.next_step} of run {run_id} next, not step "
                f"{expected}: it does not resume runs (start a cloud that has --state-dir)"
            )
        self.session = reply.session
        return wire.decision_from_message(reply.decision)

    def _wait_until_ready(self, wait: float | None) -> None:
        # A cloud still starting is waited for; a TLS failure ends the wait at once, since
        # retrying cannot mend a wrong CA or a refused certificate.
        seconds = self.connect_timeout if wait is None else wait
        states: queue.SimpleQueue[grpc.ChannelConnectivity] = queue.SimpleQueue()
        notify = states.put
        self._raw.subscribe(notify, try_to_connect=True)
        deadline = time.monotonic() + seconds
        state = None
        try:
            while state is not grpc.ChannelConnectivity.READY:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    failure = self._last_failure()
                    hint = ", --connect-timeout" if wait is None else ""
                    raise LinkError(
                        f"cannot reach the cloud at {self.address} (waited {seconds:g} s{hint}){failure}",
                        grpc.StatusCode.UNAVAILABLE, transient=True, reason=failure.removeprefix(": ") or "unreachable",
                    )
                try:
                    state = states.get(timeout=remaining)
                except queue.Empty:
                    continue
                if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and self.security.tls:
                    reason = self._last_failure()
                    if _TLS_FAILURE.search(reason):
                        raise LinkError(f"TLS with the cloud at {self.address} failed{reason}; {_TLS_HINT}")
        finally:
            self._raw.unsubscribe(notify)

    def _last_failure(self) -> str:
        """``": <why the last connection attempt failed>"``, or ``""`` when the channel has none."""
        try:
            self._probe(b"", timeout=_PROBE_SECONDS)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                reason = " ".join((exc.details() or "").split())
                if not self.security.tls and "Socket closed" in reason:
                    reason += " (if the cloud serves TLS, give --tls-ca)"
                return f": {reason}"
        return ""

    def step(self) -> StepCall:
        """Start one training step's stream."""
        timeout = self.config.link.timeout_seconds
        return StepCall(lambda requests: self._step(requests, timeout=timeout), self.address)

    def evaluate(self, frames: Iterable[pb.EvalFrame]) -> Iterator[pb.EvalFrame]:
        """Stream evaluation activations up and middle outputs back."""
        try:
            yield from self._evaluate(iter(frames), timeout=self.config.link.timeout_seconds * 10)
        except grpc.RpcError as exc:
            raise link_error(self.address, exc) from None

    def weights(self) -> Iterator[pb.NamedTensor]:
        """The cloud's trained middle, one state-dict entry per message."""
        try:
            yield from self._weights(pb.SessionRef(session=self.session), timeout=self.config.link.timeout_seconds)
        except grpc.RpcError as exc:
            raise link_error(self.address, exc) from None

    def close(self) -> None:
        """End the session (best effort) and the channel."""
        if self.session:
            try:
                self._close(pb.SessionRef(session=self.session), timeout=10)
            except grpc.RpcError:
                pass  # the cloud reaps idle sessions itself
            self.session = ""
        self._raw.close()
