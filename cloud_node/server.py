"""The gRPC server of a cloud: raw-bytes handlers, the health service, keepalive and a bounded stop."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2

from cloud_node.refusal import Refusal, answering
from cloud_node.streams import CallGone, decoded
from protos import edgepipe_pb2 as pb

if TYPE_CHECKING:
    from cloud_node.servicer import CloudServicer

__all__ = ["CloudServer", "start_server"]

_SERVICE = "edgepipe.v1.Cloud"
#: Dead peers (a crashed edge, a cut cable) are found by pings within about half a minute, and
#: the edges' own keepalive pings (every 10 s, even between calls) are welcome.
_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
#: Health checks answered at once; they need no token, so they get a small share of their own.
_HEALTH_CALLS = 4


class CloudServer(grpc.Server):
    """A started cloud server; :meth:`stop` also reports NOT_SERVING and ends the servicer's threads."""

    def __init__(self, server: grpc.Server, servicer: CloudServicer, health_servicer: health.HealthServicer) -> None:
        self._server = server
        self._servicer = servicer
        self._health = health_servicer

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Any) -> None:
        """Add handlers to the underlying server."""
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_insecure_port(self, address: str) -> int:
        """Listen on one more address, in clear text."""
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        """Listen on one more address, with TLS."""
        return self._server.add_secure_port(address, server_credentials)

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, cancel the running ones after ``grace`` seconds (None: now); set when done."""
        self._health.enter_graceful_shutdown()
        done = self._server.stop(grace)
        self._servicer.close()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops or ``timeout`` passes."""
        return self._server.wait_for_termination(timeout)


def _unary(servicer: CloudServicer, method: Callable[[Any, grpc.ServicerContext], Any], kind: type[Message]) -> Any:
    # The caller is identified before a byte of its request is read, and the request must
    # arrive within the idle bound: a call that sends headers and nothing else holds no thread.
    def handle(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        with answering(context):
            servicer.identify(context)
            try:
                request = servicer.stream(decoded(requests, kind, servicer.throttled), context).first(
                    kind.DESCRIPTOR.name
                )
            except CallGone:
                raise Refusal(grpc.StatusCode.CANCELLED, "the call ended before its request arrived") from None
        return method(request, context)

    return handle


def _cloud_handlers(servicer: CloudServicer) -> grpc.GenericRpcHandler:
    # Requests arrive as bytes (no deserializer): parsing them here keeps a malformed message a
    # one-line INVALID_ARGUMENT. Unary methods are served as client-streaming, which is the same
    # on the wire, so that their single request is read under the idle bound too.
    def step(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.StepFrame]:
        return servicer.Step(decoded(requests, pb.StepFrame, servicer.throttled), context)

    def evaluate(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.EvalFrame]:
        return servicer.Evaluate(decoded(requests, pb.EvalFrame, servicer.throttled), context)

    def sync(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.SyncFrame]:
        return servicer.Sync(decoded(requests, pb.SyncFrame, servicer.throttled), context)

    open_ = _unary(servicer, servicer.Open, pb.OpenRequest)
    weights = _unary(servicer, servicer.Weights, pb.SessionRef)
    close = _unary(servicer, servicer.Close, pb.SessionRef)
    return grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Open": grpc.stream_unary_rpc_method_handler(open_, response_serializer=pb.OpenReply.SerializeToString),
            "Step": grpc.stream_stream_rpc_method_handler(step, response_serializer=pb.StepFrame.SerializeToString),
            "Evaluate": grpc.stream_stream_rpc_method_handler(
                evaluate, response_serializer=pb.EvalFrame.SerializeToString
            ),
            "Weights": grpc.stream_stream_rpc_method_handler(
                weights, response_serializer=pb.NamedTensor.SerializeToString
            ),
            "Close": grpc.stream_unary_rpc_method_handler(close, response_serializer=pb.CloseReply.SerializeToString),
            "Sync": grpc.stream_stream_rpc_method_handler(sync, response_serializer=pb.SyncFrame.SerializeToString),
        },
    )


def _health_handlers(servicer: CloudServicer, health_servicer: health.HealthServicer) -> grpc.GenericRpcHandler:
    # Only Check, the call load balancers make: Watch would hold a thread per watcher for ever,
    # and anyone may call health.
    slots = threading.BoundedSemaphore(_HEALTH_CALLS)

    def check(requests: Iterator[bytes], context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        with answering(context):
            if not slots.acquire(blocking=False):
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many health checks at once")
            try:
                stream = servicer.stream(decoded(requests, health_pb2.HealthCheckRequest, servicer.throttled), context)
                request = stream.first("Check")
            except CallGone:
                raise Refusal(grpc.StatusCode.CANCELLED, "the call ended before its request arrived") from None
            finally:
                slots.release()
        return health_servicer.Check(request, context)

    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.stream_unary_rpc_method_handler(
            check, response_serializer=health_pb2.HealthCheckResponse.SerializeToString
        )},
    )


def start_server(
    servicer: CloudServicer, listen: str, credentials: grpc.ServerCredentials | None = None
) -> tuple[CloudServer, int]:
    """Serve ``servicer`` and the health service on ``listen`` (TLS with ``credentials``); the server and port.

    Raises :class:`OSError` when the address cannot be bound.
    """
    capacity = servicer.capacity
    limit = servicer.message_limit
    health_servicer = health.HealthServicer()
    health_servicer.set(_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=capacity.workers, thread_name_prefix="edgepipe-cloud"),
        handlers=[_cloud_handlers(servicer), _health_handlers(servicer, health_servicer)],
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Without this a second server on the same port "listens" too and takes half the edges.
            ("grpc.so_reuseport", 0),
            *_KEEPALIVE_OPTIONS,
        ],
        maximum_concurrent_rpcs=capacity.max_calls,
    )
    try:
        port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen}: the port is in use or the address is not this machine's")
    server.start()
    return CloudServer(server, servicer, health_servicer), port
