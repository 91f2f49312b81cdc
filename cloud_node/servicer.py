"""The gRPC service: frames in, frames out, errors to status codes; sessions live in session.py."""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from torch import nn

from cloud_node.session import CloudSession, SessionError
from pipeline import wire
from pipeline.codecs import CodecError
from pipeline.blueprint import Blueprint
from pipeline.config import Config
from pipeline.handshake import describe_differences, fingerprint
from protos import edgepipe_pb2 as pb
from protos import edgepipe_pb2_grpc as pb_grpc

__all__ = ["CloudServicer", "serve"]

log = logging.getLogger("edgepipe.cloud")


class CloudServicer(pb_grpc.CloudServicer):
    """Serves any number of edge sessions that run this server's configuration."""

    def __init__(self, blueprint: Blueprint, *, max_sessions: int = 8, session_timeout: float = 1800.0) -> None:
        self.blueprint = blueprint
        self.config = blueprint.config
        self.fingerprint = fingerprint(blueprint.config, blueprint.model)
        self.message_limit = wire.message_limit(blueprint.config, blueprint.model)
        self.max_sessions = max_sessions
        self.session_timeout = session_timeout
        self._sessions: dict[str, CloudSession] = {}
        self._lock = threading.Lock()

    # -- sessions ------------------------------------------------------------------------

    def _reap_idle(self) -> None:
        # A session whose edge vanished would hold memory for ever; drop idle ones.
        now = time.monotonic()
        with self._lock:
            for sid, session in list(self._sessions.items()):
                if now - session.last_used > self.session_timeout and not session.lock.locked():
                    log.info("session %s idle for %.0f s: closed", sid, now - session.last_used)
                    del self._sessions[sid]

    def _session(self, session_id: str, context: grpc.ServicerContext) -> CloudSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r} on this cloud; call Open first")
        return session

    # -- calls ---------------------------------------------------------------------------

    def Open(self, request: pb.OpenRequest, context: grpc.ServicerContext) -> pb.OpenReply:
        if request.fingerprint != self.fingerprint:
            try:
                edge_config = json.loads(request.config_json)
            except ValueError:
                edge_config = {}
            differences = describe_differences(edge_config, self.config.agreed())
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"edge and cloud run different configurations: {differences}",
            )
        self._reap_idle()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this cloud already serves {self.max_sessions} sessions (--max-sessions)",
                )
        session = CloudSession(uuid.uuid4().hex, self.blueprint)
        with self._lock:
            self._sessions[session.id] = session
        log.info("session %s opened for edge %r", session.id, request.edge_name or "?")
        return pb.OpenReply(session=session.id, decision=wire.decision_to_message(session.decision))

    def Step(self, request_iterator: Iterator[pb.StepFrame], context: grpc.ServicerContext) -> Iterator[pb.StepFrame]:
        first = next(request_iterator, None)
        if first is None:
            return
        session = self._session(first.session, context)
        # A short wait covers a previous call of this session that gRPC cancelled and whose
        # handler is still unwinding; a genuinely concurrent step is refused.
        if not session.lock.acquire(timeout=5.0):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"session {session.id} is already in a step")
        try:
            frame = first
            while frame is not None:
                if frame.session != session.id:
                    raise wire.WireError(f"frame of session {frame.session!r} on the stream of {session.id!r}")
                yield from session.handle(frame)
                frame = next(request_iterator, None)
            if session.in_step:
                session.abort_step()
                log.warning("session %s: stream closed inside a step; step aborted", session.id)
        except (wire.WireError, CodecError) as exc:
            session.abort_step()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except SessionError as exc:
            session.abort_step()
            context.abort(exc.code, str(exc))
        except BaseException:
            # Cancelled streams (GeneratorExit) and bugs alike leave the session as before the step.
            session.abort_step()
            raise
        finally:
            session.lock.release()

    def Evaluate(self, request_iterator: Iterator[pb.EvalFrame], context: grpc.ServicerContext) -> Iterator[pb.EvalFrame]:
        session = None
        for frame in request_iterator:
            if session is None:
                session = self._session(frame.session, context)
            elif frame.session != session.id:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "one evaluation stream serves one session")
            try:
                yield session.evaluate(frame)
            except (wire.WireError, CodecError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def Weights(self, request: pb.SessionRef, context: grpc.ServicerContext) -> Iterator[pb.NamedTensor]:
        session = self._session(request.session, context)
        yield from session.weights()

    def Close(self, request: pb.SessionRef, context: grpc.ServicerContext) -> pb.CloseReply:
        with self._lock:
            session = self._sessions.pop(request.session, None)
        if session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.session!r} on this cloud")
        log.info("session %s closed after %d steps", session.id, session.next_step)
        return pb.CloseReply()


def serve(
    config: Config,
    listen: str,
    *,
    max_sessions: int = 8,
    workers: int = 16,
    model_factory: Callable[[], nn.Sequential] | None = None,
) -> tuple[grpc.Server, int, CloudServicer]:
    """Start a server for ``config`` on ``listen`` (``HOST:PORT``, port 0 picks one).

    ``model_factory`` builds the model instead of ``[model] name`` (the edges must build the
    same). Returns the started server, the bound port and the servicer. Raises
    :class:`pipeline.config.ConfigError` for a configuration that cannot train and
    :class:`OSError` when the address cannot be bound (in use, or not this machine's).
    """
    servicer = CloudServicer(Blueprint(config, model_factory), max_sessions=max_sessions)
    limit = servicer.message_limit
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgepipe-cloud"),
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Without this a second server on the same port "listens" too and takes half the edges.
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=workers,
    )
    pb_grpc.add_CloudServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen}: the port is in use or the address is not this machine's")
    server.start()
    return server, port, servicer
