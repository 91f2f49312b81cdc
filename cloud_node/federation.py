"""A split-federated group on the cloud: its edges, the round barrier, the averages, splitfed-v2's shared middle."""
from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import torch

from cloud_node.refusal import Refusal, short
from cloud_node.session import CloudSession
from cloud_node.session_table import SessionTable
from cloud_node.streams import CallStream
from pipeline import wire
from pipeline.blueprint import Blueprint
from pipeline.federation import Admission, Contribution, GroupPolicy, edge_layers, exchanged_keys, fedavg, round_ends
from pipeline.partition import split
from pipeline.skip import Decision, LayerStat, SkipPolicy, StepStats
from pipeline.trainer import StageTrainer
from pipeline.trust import LOCAL_IDENTITY
from pipeline.trust.edges import is_edge_name
from protos import edgepipe_pb2 as pb

__all__ = ["Federation", "FederationGroup", "RoundResult", "member_name", "serve_sync"]

log = logging.getLogger("edgepipe.cloud")

#: Names a refusal lists at most: a status detail is short.
_NAMED = 6
#: The most training samples an edge may claim (its FedAvg weight).
_MAX_SAMPLES = 1 << 40
#: How long a Sync call waits for its session's previous call (a step still unwinding) to let go.
_LOCK_SECONDS = 5.0


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMED])
    return shown + (f" and {len(names) - _NAMED} more" if len(names) > _NAMED else "")


def _refused(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.FAILED_PRECONDITION, message)


class _GroupDecision(SkipPolicy):
    """A federated session's own policy: it keeps the group's decision, which moves at round ends only."""

    name = "group"

    def __init__(self, group: FederationGroup) -> None:
        super().__init__(group.num_layers, group.blueprint.param_layers)
        self.group = group

    def decide(self, stats: StepStats) -> Decision:
        """The group's decision, whatever this edge's step measured."""
        return self.group.decision


class _SharedMiddle:
    """One edge's handle on splitfed-v2's shared middle: the shared trainer, each commit noted in admission order."""

    def __init__(self, group: FederationGroup, name: str, session: CloudSession, shared: StageTrainer) -> None:
        self.group, self.name, self.session, self.shared = group, name, session, shared
        self.stage, self.optimizer, self.statistics = shared.stage, shared.optimizer, shared.statistics

    def apply(self, decision: Decision) -> None:
        """Apply a decision to the shared middle."""
        self.shared.apply(decision)

    def begin(self, lr: float) -> None:
        """Start this edge's step on the shared middle."""
        self.shared.begin(lr)

    def abort(self) -> None:
        """Forget this edge's unfinished step."""
        self.shared.abort()

    def commit(self, *, epoch_end: bool) -> list[LayerStat]:
        """Step the shared middle's optimizer; the step is admitted, in this order, for the replay."""
        stats = self.shared.commit(epoch_end=epoch_end)
        self.group.admitted(self.name, self.session.next_step)
        return stats


@dataclass
class _Member:
    name: str
    session: CloudSession


@dataclass(frozen=True)
class RoundResult:
    """What every edge of a round gets back: its averaged tensors, the next decision, the group and admissions."""

    tensors: dict[str, torch.Tensor]
    decision: Decision
    members: list[str]
    admissions: list[Admission]


@dataclass
class _Round:
    step: int
    started: float
    parts: dict[str, Contribution] = field(default_factory=dict)
    result: RoundResult | None = None


class FederationGroup:
    """The ``[federation] edges`` edges of one split-federated run, joined by name at Open.

    Every edge syncs at the end of each round (:func:`pipeline.federation.round_ends`); the
    round waits up to ``round_timeout_seconds`` for all of them, then averages, in the order
    of the edges' names, the middles (splitfed-v1) and the heads and tails, decides the next
    boundary for the whole group, and answers each edge. A round that times out fails the
    group, naming who is missing. In splitfed-v2 the members' sessions share one middle, used
    by one call at a time (:meth:`turn`), and each step is noted in the order it was admitted.
    """

    def __init__(self, blueprint: Blueprint, *, wait_seconds: float) -> None:
        self.blueprint = blueprint
        self.config = blueprint.config
        self.mode = self.config.federation.mode
        self.expected = self.config.federation.edges
        self.num_layers = blueprint.num_layers
        self.wait_seconds = wait_seconds
        self.decision = blueprint.new_policy().initial()
        self.members: dict[str, _Member] = {}
        self.failed: str | None = None
        self.finished = False
        self._changed = threading.Condition()
        self._round: _Round | None = None
        self._admissions: list[Admission] = []
        self._turn = threading.Lock()
        self._length: tuple[int, int] | None = None
        self._policy: GroupPolicy | None = None
        self._shared: StageTrainer | None = None
        if self.mode == "splitfed-v2":
            _, middle, _ = split(copy.deepcopy(blueprint.model), blueprint.cuts)
            middle.to(blueprint.device)
            self._shared = StageTrainer(middle, blueprint.cuts.middle_start, self.config.train, blueprint.param_layers)
            self._shared.apply(self.decision)
        self._edge_layers = edge_layers(self.config, self.num_layers)
        self._middle_layers = range(blueprint.cuts.middle_start, blueprint.cuts.middle_stop)

    @property
    def done(self) -> bool:
        """Whether the group can take no more edges: it finished its last round or failed."""
        return self.finished or self.failed is not None

    # -- joining -------------------------------------------------------------------------

    def join(self, session: CloudSession, name: str) -> None:
        """Make ``session`` (just opened, not yet in the session table) edge ``name`` of the group.

        Refused when the name is taken, the group is full, or the run's length differs from the
        group's (every edge must run the same steps for the rounds to line up).
        """
        length = (session.total_steps, session.steps_per_epoch)
        with self._changed:
            if name in self.members:
                raise _refused(f"an edge named {short(name)} is already in this federation; give each edge its own --name")
            if len(self.members) >= self.expected:
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the federation of {self.expected} edges is full ({_names(sorted(self.members))})")
            if self._length is not None and length != self._length:
                raise _refused(
                    f"this edge runs {length[0]} steps of {length[1]} per epoch, the federation "
                    f"{self._length[0]} of {self._length[1]}: give every edge as many samples (--shard K/N) "
                    "or the same --max-steps"
                )
            if self._policy is None:
                self._length = length
                self._policy = GroupPolicy(self.blueprint, total_steps=length[0])
            session.policy = _GroupDecision(self)
            session.decision = self.decision
            if self._shared is not None:
                session.trainer = _SharedMiddle(self, name, session, self._shared)
                session.stage = self._shared.stage
                session.turn = self.turn
            session.trainer.apply(self.decision)
            self.members[name] = _Member(name, session)
            log.info("edge %s joined the %s federation (%d of %d)", name, self.mode, len(self.members), self.expected)

    def member(self, session: CloudSession) -> _Member:
        """The member whose session is ``session``; refused for a session of no member."""
        with self._changed:
            for member in self.members.values():
                if member.session is session:
                    return member
        raise _refused("this session is not in the federation; open the run again")

    # -- splitfed-v2: one middle, one call at a time ------------------------------------

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the shared middle for one call (a step, an evaluation batch, the weights)."""
        if not self._turn.acquire(timeout=self.wait_seconds):
            raise _refused(
                f"waited {self.wait_seconds:g} s (link.timeout_seconds) for the shared middle, which another edge holds"
            )
        try:
            yield
        finally:
            self._turn.release()

    def admitted(self, name: str, step: int) -> None:
        """Note that edge ``name``'s step ``step`` has stepped the shared middle."""
        with self._changed:
            self._admissions.append(Admission(edge=name, step=step))

    # -- rounds --------------------------------------------------------------------------

    def edge_templates(self) -> dict[str, torch.Tensor]:
        """The tensors an edge sends at the current boundary, by name, as the model holds them."""
        assert self._policy is not None, "templates are asked for by members only"
        keys = exchanged_keys(self.blueprint.model, self._edge_layers, self.decision)
        return {key: self._policy.state[key] for key in keys}

    def sync(self, member: _Member, step: int, samples: int, tensors: dict[str, torch.Tensor]) -> RoundResult:
        """Add ``member``'s part of the round ending at ``step`` and wait for the others; the round's result."""
        session = member.session
        total, per_epoch = self._length or (0, 1)
        if not round_ends(step, sync_every=self.config.federation.sync_every, steps_per_epoch=per_epoch,
                          total_steps=total):
            raise _refused(f"step {step} does not end a round (federation.sync_every, epoch ends, the last step)")
        if session.next_step != step + 1 or session.in_step:
            raise _refused(f"a sync for step {step}, but this edge's session is at step {session.next_step}")
        timeout = self.config.federation.round_timeout_seconds
        with self._changed:
            self._check_alive()
            current = self._round
            if current is None or current.result is not None:
                current = self._round = _Round(step, time.monotonic())
            if current.step != step:
                self._fail(f"edge {member.name} synced step {step} while the round ends at step {current.step}")
            current.parts[member.name] = Contribution(member.name, samples, tensors)
            if len(current.parts) == self.expected:
                try:
                    current.result = self._average(current)
                except Exception as exc:
                    # The others wait for this round: they must hear why it will never end.
                    self._fail(f"the round ending at step {step} could not be averaged: {exc}")
                self._changed.notify_all()
            while current.result is None:
                self._check_alive()
                left = current.started + timeout - time.monotonic()
                if left <= 0:
                    self._fail(self._missing(current, timeout))
                self._changed.wait(left)
            result = current.result
        return RoundResult({k: result.tensors[k] for k in tensors}, result.decision, result.members, result.admissions)

    def _check_alive(self) -> None:
        if self.failed is not None:
            raise _refused(self.failed)

    def _fail(self, message: str) -> None:
        self.failed = f"the federation failed: {message}"
        log.warning("%s", self.failed)
        self._changed.notify_all()
        raise _refused(self.failed)

    def _missing(self, current: _Round, timeout: float) -> str:
        absent = sorted(set(self.members) - set(current.parts))
        unjoined = self.expected - len(self.members)
        parts = []
        if absent:
            parts.append(f"edge(s) {_names(absent)} did not reach it")
        if unjoined:
            parts.append(f"{unjoined} of the {self.expected} edges never joined")
        return (f"the round ending at step {current.step} waited {timeout:g} s (federation.round_timeout_seconds): "
                + "; ".join(parts))

    def _average(self, current: _Round) -> RoundResult:
        """FedAvg of the round (under the group's lock, every member parked in its sync)."""
        assert self._policy is not None and self._length is not None
        parts = dict(current.parts)
        if self._shared is None:
            middle_keys = exchanged_keys(self.blueprint.model, self._middle_layers, self.decision)
            for name, part in parts.items():
                state = self.members[name].session.stage.layers.state_dict()
                parts[name] = Contribution(name, part.samples, {**part.tensors, **{k: state[k] for k in middle_keys}})
            averaged = fedavg(list(parts.values()))
            with torch.no_grad():
                for member in self.members.values():
                    state = member.session.stage.layers.state_dict()
                    for key in middle_keys:
                        state[key].copy_(averaged[key])
            model = averaged
        else:
            averaged = fedavg(list(parts.values()))
            model = {**averaged, **self._shared.stage.layers.state_dict()}
        total, per_epoch = self._length
        step = current.step
        epoch_end = (step + 1) % per_epoch == 0 or step == total - 1
        self.decision = self._policy.round_end(step, step // per_epoch, epoch_end, model)
        for member in self.members.values():
            member.session.decision = self.decision
            member.session.trainer.apply(self.decision)
        admissions, self._admissions = self._admissions, []
        if step == total - 1:
            self.finished = True
        log.info("federation round ending at step %d averaged over %d edges; boundary %d", step, len(parts),
                 self.decision.boundary)
        return RoundResult(averaged, self.decision, sorted(self.members), admissions)


class Federation:
    """The cloud's current federation group; a new one forms once the last has finished or failed."""

    def __init__(self, blueprint: Blueprint, *, wait_seconds: float) -> None:
        self.blueprint = blueprint
        self.wait_seconds = wait_seconds
        self._lock = threading.Lock()
        self.group = FederationGroup(blueprint, wait_seconds=wait_seconds)
        self._groups: weakref.WeakKeyDictionary[CloudSession, FederationGroup] = weakref.WeakKeyDictionary()

    def join(self, session: CloudSession, identity: str, edge_name: str) -> None:
        """Add a freshly opened session to the federation as its edge's name (see :func:`member_name`)."""
        name = member_name(identity, edge_name)
        with self._lock:
            if self.group.done:
                self.group = FederationGroup(self.blueprint, wait_seconds=self.wait_seconds)
            group = self.group
        group.join(session, name)
        with self._lock:
            self._groups[session] = group

    def group_of(self, session: CloudSession) -> FederationGroup:
        """The group ``session`` joined; refused for a session of none."""
        with self._lock:
            group = self._groups.get(session)
        if group is None:
            raise _refused("this session is not in a federation")
        return group


def member_name(identity: str, edge_name: str) -> str:
    """An edge's name in a federation: its identity from the edges file, or, for loopback callers
    served without one, the name it gave (``--name``)."""
    name = edge_name if identity == LOCAL_IDENTITY else identity
    if not is_edge_name(name):
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f"edge name {short(name)}: a federation needs 1..64 characters of A-Z a-z 0-9 . _ -")
    return name


@contextmanager
def _holding(session: CloudSession) -> Iterator[None]:
    # The session's own lock only: in splitfed-v2 a sync must not hold the shared middle, or the
    # edges still training in the round could never reach its end.
    if not session.lock.acquire(timeout=_LOCK_SECONDS):
        raise _refused(f"session {session.id} is in another call (one call at a time per session)")
    try:
        yield
    finally:
        session.last_used = time.monotonic()
        session.lock.release()


def _read_tensors(stream: CallStream, first: pb.SyncFrame, templates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    while (frame := stream.next()) is not None:
        if frame.session != first.session or frame.step != first.step or frame.WhichOneof("body") != "tensor":
            raise wire.WireError("after its begin frame a sync sends tensors of the same session and step only")
        name = frame.tensor.name
        if name not in templates or name in tensors:
            raise wire.WireError(f"a sync sent {short(name)}, which is not a tensor it exchanges or came twice")
        tensor = wire.raw_from_message(frame.tensor.tensor, like=templates[name], what=f"sync tensor {name}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise wire.WireError(f"sync tensor {name} holds NaN or infinite values")
        tensors[name] = tensor
    missing = sorted(set(templates) - set(tensors))
    if missing:
        raise wire.WireError(f"a sync lacks {len(missing)} of the tensors it exchanges, e.g. {missing[0]!r}")
    return tensors


def serve_sync(
    federation: Federation, sessions: SessionTable, identity: str, stream: CallStream
) -> Iterator[pb.SyncFrame]:
    """One Sync call: read the edge's begin and tensors, wait for the round, send the average and done."""
    first = stream.next()
    if first is None or first.WhichOneof("body") != "begin":
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "a Sync call starts with a begin frame")
    session = sessions.get(first.session, identity)
    group = federation.group_of(session)
    member = group.member(session)
    samples = first.begin.samples
    try:
        if not 1 <= samples <= _MAX_SAMPLES:
            raise wire.WireError(f"begin.samples is {samples}; an edge trains on 1..{_MAX_SAMPLES} samples")
        tensors = _read_tensors(stream, first, group.edge_templates())
    except wire.WireError as exc:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    with _holding(session):
        result = group.sync(member, first.step, samples, tensors)
    for name, tensor in result.tensors.items():
        with stream.sending():
            yield pb.SyncFrame(session=session.id, step=first.step,
                               tensor=pb.NamedTensor(name=name, tensor=wire.raw_to_message(tensor)))
    done = pb.SyncDone(
        decision=wire.decision_to_message(result.decision), members=result.members,
        admissions=[pb.Admission(edge=a.edge, step=a.step) for a in result.admissions],
    )
    with stream.sending():
        yield pb.SyncFrame(session=session.id, step=first.step, done=done)
