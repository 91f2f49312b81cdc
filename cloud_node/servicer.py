"""The gRPC service: who calls, which of its sessions, frames in and out, every problem a status code."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from torch import nn

from cloud_node.capacity import DEFAULT_MAX_SESSIONS, Capacity, StreamGate
from cloud_node.checkpointing import CloudCheckpoints, SavedStep, check_run_id, restore_session
from cloud_node.federation import Federation, serve_sync
from cloud_node.handover import Handover
from cloud_node.refusal import Refusal, answering, short
from cloud_node.server import start_server
from cloud_node.run_rules import check_run_length
from cloud_node.session import CloudSession
from cloud_node.session_table import SessionTable
from cloud_node.streams import CallGone, CallStream, IdleWatch
from cloud_node.throttle import ThrottledLog
from pipeline import wire
from pipeline.blueprint import Blueprint
from pipeline.codecs import CodecError
from pipeline.config import Config
from pipeline.federation import check_federation, federated
from pipeline.handshake import describe_differences, fingerprint
from pipeline.trust import EdgeRegistry, TrustError, caller_identity, is_loopback, parse_address
from protos import edgepipe_pb2 as pb
from protos import edgepipe_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_SESSION_IDLE_SECONDS", "CloudServicer", "serve"]

log = logging.getLogger("edgepipe.cloud")

DEFAULT_SESSION_IDLE_SECONDS = 300.0
#: The longest configuration text Open reads (the agreed configuration is about 2 KiB).
_CONFIG_JSON_CHARS = 64 << 10
#: Open names at most this many differing keys: the status detail is short.
_DIFFERENCES = 4
#: Replies a step may have computed and not yet sent: enough to keep computing while one is sent.
_UNSENT_REPLIES = 4
#: The same words for every unauthenticated call, whatever it asked for.
_UNAUTHENTICATED = "not authenticated: this cloud serves registered edges only (a token or a client certificate)"


class CloudServicer(pb_grpc.CloudServicer):
    """Serves the sessions of the edges in ``registry`` (None: loopback callers, as one identity).

    Every call first identifies its caller; a session is reachable only by the identity that
    opened it. Every wait on the peer is bounded by ``link.timeout_seconds``; :meth:`close`
    ends the helper threads. ``state_dir`` keeps each run's checkpoints (None: none are kept).
    """

    def __init__(
        self,
        blueprint: Blueprint,
        *,
        registry: EdgeRegistry | None = None,
        capacity: Capacity | None = None,
        session_idle_seconds: float = DEFAULT_SESSION_IDLE_SECONDS,
        state_dir: Path | None = None,
    ) -> None:
        self.blueprint = blueprint
        self.config = blueprint.config
        self.fingerprint = fingerprint(blueprint.config, blueprint.model)
        self.message_limit = wire.message_limit(blueprint.config, blueprint.model)
        self.registry = registry
        self.capacity = capacity or Capacity.plan()
        self.idle_seconds = self.config.link.timeout_seconds
        self.throttled = ThrottledLog(log)
        # Before any thread starts: a state directory that cannot be made fails the constructor.
        self.checkpoints = CloudCheckpoints(
            state_dir, self.config, self.fingerprint,
            is_live=lambda session: self.sessions.holds(session), lock_seconds=self.idle_seconds,
        )
        self.sessions = SessionTable(self.capacity.max_sessions, session_idle_seconds)
        self.watch = IdleWatch()
        self._gate = StreamGate(self.capacity.stream_slots)
        #: The group of a split-federated configuration (None: every edge trains its own middle).
        self.federation = Federation(blueprint, wait_seconds=self.idle_seconds) if federated(self.config) else None

    def close(self) -> None:
        """Stop the idle watch and the session reaper."""
        self.watch.stop()
        self.sessions.stop()

    # -- who calls, and the calls' shared parts -------------------------------------------

    def identify(self, context: grpc.ServicerContext) -> str:
        """The caller's identity; an unknown caller is refused with UNAUTHENTICATED, told nothing else."""
        identity = caller_identity(context, self.registry)
        if identity is None:
            self.throttled.warning("unauthenticated", "refused an unauthenticated call from %s", short(context.peer()))
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
        return identity

    def stream(self, requests: Iterator[object], context: grpc.ServicerContext) -> CallStream:
        """The call's requests under the idle bound."""
        return CallStream(requests, context, self.watch, self.idle_seconds)

    @contextmanager
    def _stream_slot(self, identity: str) -> Iterator[None]:
        with self._gate.slot(identity, self.sessions.owned(identity)):
            yield

    def _note_gone(self, gone: CallGone, method: str) -> None:
        if gone.idle:
            self.throttled.warning(
                "idle", "cancelled a %s call whose peer sent nothing for %g s (link.timeout_seconds)",
                method, self.idle_seconds,
            )

    def _differences(self, config_json: str) -> str:
        if len(config_json) > _CONFIG_JSON_CHARS:
            return f"the edge's configuration text is {len(config_json)} characters, more than the cloud reads"
        try:
            edge = json.loads(config_json)
            if isinstance(edge, dict):
                return describe_differences(edge, self.config.agreed(), limit=_DIFFERENCES)
        except (ValueError, RecursionError):
            pass  # hostile or broken text: say so below, never fail the call on it
        return "the edge's configuration text is not a readable configuration"

    # -- the calls -------------------------------------------------------------------------

    def Open(self, request: pb.OpenRequest, context: grpc.ServicerContext) -> pb.OpenReply:
        """Handshake: same configuration, a run length, a run id; a new session for the caller, fresh or resumed.

        A fresh Open of a run the caller already has (a live session, checkpoints) starts it over;
        a resume replaces the run's live session with one restored from its checkpoint.
        """
        with answering(context):
            identity = self.identify(context)
            if request.fingerprint != self.fingerprint:
                raise Refusal(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"edge and cloud run different configurations: {self._differences(request.config_json)}",
                )
            check_run_length(request.total_steps, request.steps_per_epoch)
            if request.resume and self.federation is not None:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              "a split-federated run keeps no checkpoints and cannot be resumed")
            check_run_id(request.run_id, resume=request.resume)
            if request.resume:
                session = self._resume(identity, request)
            elif request.run_id:
                with self.checkpoints.holding(identity, request.run_id):
                    session = self._open_session(identity, request)
                    self.checkpoints.forget(identity, request.run_id)
            else:
                session = self._open_session(identity, request)
            log.info(
                "session %s opened for %s (edge name %s) at step %d", session.id, identity, short(request.edge_name),
                session.next_step,
            )
            return pb.OpenReply(
                session=session.id, decision=wire.decision_to_message(session.decision), next_step=session.next_step
            )

    def _open_session(self, identity: str, request: pb.OpenRequest, saved: SavedStep | None = None) -> CloudSession:
        """A new session of the caller's run (restored to ``saved``), in place of the run's live one."""

        def build(session_id: str) -> CloudSession:
            session = CloudSession(
                session_id, self.blueprint, owner=identity, total_steps=request.total_steps,
                steps_per_epoch=request.steps_per_epoch, checkpoints=self.checkpoints, run_id=request.run_id,
            )
            if saved is not None:
                restore_session(session, saved)
            if self.federation is not None:
                self.federation.join(session, identity, request.edge_name)
            return session

        return self.sessions.open(identity, build, run_id=request.run_id)

    def _resume(self, identity: str, request: pb.OpenRequest) -> CloudSession:
        run_id, step = request.run_id, request.resume_step
        with self.checkpoints.holding(identity, run_id):
            saved = self.checkpoints.load(identity, run_id, step)
            self.checkpoints.check_saved_run(
                saved, total_steps=request.total_steps, steps_per_epoch=request.steps_per_epoch
            )
            session = self._open_session(identity, request, saved)
            # The cloud may hold steps after S that the edge never committed; the run redoes them.
            self.checkpoints.discard_after(identity, run_id, step)
        return session

    def Step(self, request_iterator: Iterator[pb.StepFrame], context: grpc.ServicerContext) -> Iterator[pb.StepFrame]:
        """One training step's frames."""
        with answering(context):
            identity = self.identify(context)
            with self._stream_slot(identity):
                stream = self.stream(request_iterator, context)
                try:
                    first = stream.next()
                    # The step's clock starts on arrival: a step begun early waits for the previous one.
                    arrived = time.perf_counter()
                    if first is None:
                        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "a Step call needs frames, a begin frame first")
                    session = self.sessions.get(first.session, identity)
                    with session.held():
                        yield from self._step(session, first, arrived, stream)
                except CallGone as gone:
                    self._note_gone(gone, "Step")

    def _step(
        self, session: CloudSession, first: pb.StepFrame, arrived: float, stream: CallStream
    ) -> Iterator[pb.StepFrame]:
        def compute(emit: Callable[[pb.StepFrame], None]) -> None:
            frame, received = first, arrived
            while frame is not None:
                if frame.session != session.id:
                    raise wire.WireError(f"a frame of session {short(frame.session)} on this session's stream")
                for reply in session.handle(frame, received):
                    emit(reply)
                frame, received = stream.next(), None

        try:
            # The frames are read and computed on a thread of their own while this one sends.
            with Handover(compute, limit=_UNSENT_REPLIES, name="edgepipe-step") as replies:
                for reply in replies:
                    with stream.sending():
                        yield reply
        except (wire.WireError, CodecError) as exc:
            session.abort_step()
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except BaseException:
            # Refusals, cancelled or idle streams (GeneratorExit, CallGone) and bugs alike leave
            # the session as before the step.
            session.abort_step()
            raise
        if session.in_step:
            session.abort_step()
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the stream ended inside step {session.next_step}, before its end frame: the step is aborted",
            )

    def Evaluate(self, request_iterator: Iterator[pb.EvalFrame], context: grpc.ServicerContext) -> Iterator[pb.EvalFrame]:
        """Forward-only passes of evaluation batches, all of one session."""
        with answering(context):
            identity = self.identify(context)
            with self._stream_slot(identity):
                stream = self.stream(request_iterator, context)
                try:
                    frame = stream.next()
                    if frame is None:
                        return
                    session = self.sessions.get(frame.session, identity)
                    with session.evaluation():
                        while frame is not None:
                            if frame.session != session.id:
                                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "one evaluation stream serves one session")
                            reply = self._evaluate(session, frame)
                            with stream.sending():
                                yield reply
                            frame = stream.next()
                except CallGone as gone:
                    self._note_gone(gone, "Evaluate")

    @staticmethod
    def _evaluate(session: CloudSession, frame: pb.EvalFrame) -> pb.EvalFrame:
        try:
            with session.held():
                return session.evaluate(frame)
        except (wire.WireError, CodecError) as exc:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def Weights(self, request: pb.SessionRef, context: grpc.ServicerContext) -> Iterator[pb.NamedTensor]:
        """The caller's session's trained middle, one state-dict entry per message."""
        with answering(context):
            identity = self.identify(context)
            with self._stream_slot(identity):
                session = self.sessions.get(request.session, identity)
                with session.held():
                    entries = list(session.weights())
                for entry in entries:
                    with self.watch.waiting(context, self.idle_seconds):
                        yield entry

    def Sync(self, request_iterator: Iterator[pb.SyncFrame], context: grpc.ServicerContext) -> Iterator[pb.SyncFrame]:
        """A split-federated round's end: the caller's head and tail in, the group's average out."""
        with answering(context):
            identity = self.identify(context)
            if self.federation is None:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "this cloud trains no federation ([federation] mode)")
            with self._stream_slot(identity):
                stream = self.stream(request_iterator, context)
                try:
                    yield from serve_sync(self.federation, self.sessions, identity, stream)
                except CallGone as gone:
                    self._note_gone(gone, "Sync")

    def Close(self, request: pb.SessionRef, context: grpc.ServicerContext) -> pb.CloseReply:
        """End the caller's session and free its memory."""
        with answering(context):
            identity = self.identify(context)
            session = self.sessions.close(request.session, identity)
            log.info("session %s closed after %d steps", session.id, session.next_step)
            return pb.CloseReply()


def _check_listen(listen: str, secure: bool, allow_insecure: bool) -> None:
    host, _ = parse_address(listen)
    if not secure and not allow_insecure and not is_loopback(host):
        raise TrustError(
            f"refusing to serve {listen} in clear text: give --tls-cert and --tls-key, "
            "or --insecure inside a trusted network or tunnel"
        )


def serve(
    config: Config,
    listen: str,
    *,
    credentials: grpc.ServerCredentials | None = None,
    edges: EdgeRegistry | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    workers: int | None = None,
    session_idle_seconds: float = DEFAULT_SESSION_IDLE_SECONDS,
    allow_insecure: bool = False,
    model_factory: Callable[[], nn.Sequential] | None = None,
    state_dir: str | Path | None = None,
) -> tuple[grpc.Server, int, CloudServicer]:
    """Start a server for ``config`` on ``listen`` (``HOST:PORT``, port 0 picks one).

    ``credentials`` (pipeline.trust.server_credentials) turn TLS on; without them only a
    loopback address is served unless ``allow_insecure``. ``edges`` are the edges let in
    (None: loopback callers only). ``workers`` None sizes the thread pool from
    ``max_sessions``. ``model_factory`` builds the model instead of ``[model] name`` (the
    edges must build the same). ``state_dir`` keeps the runs' checkpoints, so that edges can
    resume them, also after this cloud restarts with the same directory (None: a checkpoint
    step is refused). Returns the started server, the bound port and the servicer.
    Raises :class:`pipeline.config.ConfigError` for a configuration that cannot train,
    :class:`pipeline.trust.TrustError` for clear text to the network, ValueError for too few
    workers and :class:`OSError` when the address cannot be bound or the state directory made.
    """
    _check_listen(listen, credentials is not None, allow_insecure)
    if federated(config):
        _check_federation(config, max_sessions, state_dir)
    capacity = Capacity.plan(max_sessions, workers)
    servicer = CloudServicer(
        Blueprint(config, model_factory, side="cloud"), registry=edges, capacity=capacity, session_idle_seconds=session_idle_seconds,
        state_dir=None if state_dir is None else Path(state_dir),
    )
    try:
        server, port = start_server(servicer, listen, credentials)
    except OSError:
        servicer.close()
        raise
    return server, port, servicer


def _check_federation(config: Config, max_sessions: int, state_dir: str | Path | None) -> None:
    """Refuse a federation this cloud cannot serve: more edges than sessions, or checkpoints."""
    check_federation(config)
    edges = config.federation.edges
    if edges > max_sessions:
        raise ValueError(f"federation.edges = {edges} needs --max-sessions of at least {edges} (it is {max_sessions})")
    if state_dir is not None:
        raise ValueError("a split-federated run cannot be checkpointed or resumed yet: start the cloud without --state-dir")
