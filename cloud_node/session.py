"""One edge's session on the cloud: its middle stage, optimizer, the run's schedule and the skip decisions."""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import torch
import torch.nn.functional as F

from cloud_node.refusal import Refusal
from pipeline import wire
from pipeline.blueprint import Blueprint
from pipeline.optim import learning_rate
from pipeline.partition import split
from pipeline.skip import LayerStat, StepStats
from pipeline.trainer import StageTrainer
from protos import edgepipe_pb2 as pb

__all__ = ["CloudSession", "check_run_length"]

#: Step and epoch numbers travel as int64 and int32.
_MAX_STEPS = 2**31 - 1
#: How long a call waits for the session's previous call (cancelled, still unwinding) to let go.
_LOCK_SECONDS = 5.0


def _out_of_order(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.FAILED_PRECONDITION, message)


def check_run_length(total_steps: int, steps_per_epoch: int) -> None:
    """Refuse a handshake whose run length is missing or impossible (INVALID_ARGUMENT).

    Nothing more can be checked against ``[train] epochs`` and ``max_steps``: the edge's
    ``--epochs`` and ``--max-steps`` override them, and only the edge knows its dataset's size.
    """
    for name, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if not 1 <= value <= _MAX_STEPS:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"OpenRequest.{name} is {value}; it must lie in 1..{_MAX_STEPS} (is the edge older than this cloud?)",
            )


class CloudSession:
    """The cloud half of one edge's training run.

    A step arrives as frames: ``begin``, then activations (and, when the edge holds a tail,
    gradients) per micro-batch, then ``end``.  The optimizer steps only at ``end`` after every
    micro-batch completed; anything else aborts the step and leaves the session as it was.
    The session belongs to ``owner``, and the handshake fixed the run's length: every step's
    learning rate and epoch follow from it, so the edge's begin frame must agree exactly.
    """

    def __init__(
        self, session_id: str, blueprint: Blueprint, *, owner: str, total_steps: int, steps_per_epoch: int
    ) -> None:
        self.id = session_id
        self.owner = owner
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.config = config = blueprint.config
        # Every session trains its own copy of the untrained model the blueprint built.
        model = copy.deepcopy(blueprint.model)
        self.num_layers = blueprint.num_layers
        self.cuts = blueprint.cuts
        self.uplink_shape, self.downlink_shape = blueprint.uplink_shape, blueprint.downlink_shape
        _, middle, _ = split(model, self.cuts)
        self.trainer = StageTrainer(middle, self.cuts.middle_start, config.train)
        self.stage = self.trainer.stage
        self.policy = blueprint.new_policy()
        self.loss_on_cloud = config.partition.edge_tail == 0
        self.max_batch = config.micro_batch_size
        # torch.chunk's split of a mini-batch, as the edge makes it: full micro-batches, the last one shorter.
        self.micro_size = -(-config.train.batch_size // config.partition.chunks)
        self.chunks = -(-config.train.batch_size // self.micro_size)
        edge_layers = [*range(self.cuts.edge_head), *range(self.cuts.middle_stop, self.num_layers)]
        self.edge_layers = frozenset(edge_layers)
        self.next_step = 0
        self.decision = self.policy.initial()
        self.trainer.apply(self.decision)
        self.lock = threading.Lock()
        self._claims = threading.Lock()
        self._evaluating = False
        self.last_used = time.monotonic()
        self.clock = wire.CodecClock()
        # Stochastic rounding draws from its own seeded generator: runs repeat exactly.
        self.rounding = torch.Generator().manual_seed(config.model.seed + 2)
        self._reset_step()

    # -- the freeze boundary -------------------------------------------------------------

    @property
    def head_trains(self) -> bool:
        """Whether the edge head still learns, i.e. needs the gradient of the uplink activation."""
        return self.decision.boundary < self.cuts.edge_head

    @property
    def middle_trains(self) -> bool:
        """Whether any cloud layer still learns, i.e. the edge must send output gradients."""
        return self.stage.trains

    # -- one training step ---------------------------------------------------------------

    def _reset_step(self) -> None:
        self._begin: pb.StepBegin | None = None
        self._activations: set[int] = set()
        self._gradients: set[int] = set()
        self._losses: dict[int, torch.Tensor] = {}
        self._loss = 0.0
        self._backward_seconds = 0.0

    def abort_step(self) -> None:
        """Forget an unfinished step: no optimizer step, BatchNorm statistics restored."""
        if self._begin is not None:
            self.trainer.abort()
        self._reset_step()

    def handle(self, frame: pb.StepFrame) -> Iterator[pb.StepFrame]:
        """Process one edge frame; yields the frames to send back."""
        self.last_used = time.monotonic()
        body = frame.WhichOneof("body")
        if self._begin is None and body != "begin":
            raise _out_of_order(f"step {frame.step} must start with a begin frame, got {body!r}")
        if self._begin is not None and frame.step != self.next_step:
            raise _out_of_order(f"frame for step {frame.step} inside step {self.next_step}")
        if body == "begin":
            self._on_begin(frame)
        elif body == "activation":
            yield from self._on_activation(frame)
        elif body == "gradient":
            yield from self._on_gradient(frame)
        elif body == "end":
            yield self._on_end(frame)
        else:
            raise wire.WireError(f"an edge may not send a {body!r} frame")

    def _on_begin(self, frame: pb.StepFrame) -> None:
        begin = frame.begin
        if self._begin is not None:
            raise _out_of_order(f"step {self.next_step} has already begun")
        if frame.step != self.next_step:
            raise _out_of_order(
                f"the edge is at step {frame.step} but this session is at step {self.next_step}; "
                "restart the edge (a step was lost on a broken stream)"
            )
        if begin.boundary != self.decision.boundary:
            raise _out_of_order(f"the edge applies boundary {begin.boundary}, the cloud decided {self.decision.boundary}")
        self._check_begin(frame.step, begin)
        self.trainer.begin(begin.lr)
        self.clock.take()
        self._begin = begin

    def _check_begin(self, step: int, begin: pb.StepBegin) -> None:
        # Each value follows from the configuration and the run length agreed at Open; one that
        # differs is a broken or hostile edge (an lr of inf or NaN would poison every weight).
        if step >= self.total_steps:
            raise wire.WireError(f"step {step} is past the run's {self.total_steps} steps")
        train = self.config.train
        expected = {
            "lr": learning_rate(train, step, self.total_steps),
            "samples": train.batch_size,
            "epoch": step // self.steps_per_epoch,
            "chunks": self.chunks,
        }
        for field, value in expected.items():
            got = getattr(begin, field)
            if got != value:
                raise wire.WireError(f"begin.{field} is {got!r}; step {step} of this run has {field} {value!r}")

    def _micro_batch(self, frame: pb.StepFrame, seen: set[int], what: str) -> int:
        index = frame.micro_batch
        if not 0 <= index < self._begin.chunks:
            raise wire.WireError(f"{what} for micro-batch {index}; this step has {self._begin.chunks}")
        if index in seen:
            raise wire.WireError(f"second {what} for micro-batch {index}")
        return index

    def _check_size(self, tensor: torch.Tensor, index: int, what: str) -> None:
        # The loss is a mean over the whole mini-batch: micro-batches must add up to it exactly.
        expected = min(self.micro_size, self.config.train.batch_size - index * self.micro_size)
        if len(tensor) != expected:
            raise wire.WireError(f"{what} for micro-batch {index} carries {len(tensor)} samples; it holds {expected}")

    def _on_activation(self, frame: pb.StepFrame) -> Iterator[pb.StepFrame]:
        index = self._micro_batch(frame, self._activations, "activation")
        x = wire.decode_tensor(
            frame.activation, sample_shape=self.uplink_shape, max_batch=self.max_batch,
            what="uplink activation", clock=self.clock,
        )
        self._check_size(x, index, "uplink activation")
        self._activations.add(index)
        if self.loss_on_cloud:
            labels = wire.labels_from_frame(frame, batch=len(x), num_classes=self.config.model.num_classes)
            out = self.stage.forward(index, x, input_grad=self.head_trains)
            self._losses[index] = F.cross_entropy(out, labels, reduction="sum") / self._begin.samples
            if len(self._losses) == self._begin.chunks:
                yield from self._backward_losses(frame)
            return
        if frame.labels:
            raise wire.WireError("labels may only be sent when the loss is computed on the cloud (edge_tail = 0)")
        out = self.stage.forward(index, x, input_grad=self.head_trains)
        yield self._tensor_frame(frame, "activation", out)

    def _backward_losses(self, frame: pb.StepFrame) -> Iterator[pb.StepFrame]:
        # Reverse micro-batch order, as torchgpipe.GPipe accumulates gradients.
        for index in reversed(range(self._begin.chunks)):
            loss = self._losses[index]
            self._loss += loss.item()
            start = time.perf_counter()
            grad = self.stage.backward(index, loss=loss)
            self._backward_seconds += time.perf_counter() - start
            if grad is not None:
                yield self._tensor_frame(frame, "gradient", grad, index)

    def _on_gradient(self, frame: pb.StepFrame) -> Iterator[pb.StepFrame]:
        if self.loss_on_cloud or not self.middle_trains:
            raise wire.WireError("no gradient frames are expected: the cloud layers do not train from the edge")
        index = self._micro_batch(frame, self._gradients, "gradient")
        if index not in self._activations:
            raise wire.WireError(f"gradient for micro-batch {index} arrived before its activation")
        grad_out = wire.decode_tensor(
            frame.gradient, sample_shape=self.downlink_shape, max_batch=self.max_batch,
            what="gradient", clock=self.clock,
        )
        self._check_size(grad_out, index, "gradient")
        self._gradients.add(index)
        start = time.perf_counter()
        grad = self.stage.backward(index, grad_out)
        self._backward_seconds += time.perf_counter() - start
        if grad is not None:
            yield self._tensor_frame(frame, "gradient", grad)

    def _tensor_frame(
        self, frame: pb.StepFrame, kind: str, tensor: torch.Tensor, index: int | None = None
    ) -> pb.StepFrame:
        codec = self.config.link.gradients if kind == "gradient" else self.config.link.downlink
        message = wire.encode_tensor(tensor, codec, kind, clock=self.clock, generator=self.rounding)
        index = frame.micro_batch if index is None else index
        return pb.StepFrame(session=self.id, step=frame.step, micro_batch=index, **{kind: message})

    def _on_end(self, frame: pb.StepFrame) -> pb.StepFrame:
        chunks = self._begin.chunks
        expected_gradients = 0 if self.loss_on_cloud or not self.middle_trains else chunks
        if len(self._activations) != chunks or len(self._gradients) != expected_gradients:
            raise _out_of_order(
                f"step {frame.step} ended after {len(self._activations)}/{chunks} activations and "
                f"{len(self._gradients)}/{expected_gradients} gradients"
            )
        edge_stats = self._edge_stats(frame)
        own = self.trainer.commit(epoch_end=frame.end.epoch_end)
        stats = StepStats(
            step=frame.step,
            epoch=self._begin.epoch,
            epoch_end=frame.end.epoch_end,
            lr=self._begin.lr,
            layers=tuple(sorted(edge_stats + own, key=lambda s: s.index)),
        )
        self.decision = self.policy.decide(stats)
        self.trainer.apply(self.decision)
        encode_seconds, decode_seconds = self.clock.take()
        done = pb.StepDone(
            decision=wire.decision_to_message(self.decision),
            loss=self._loss,
            encode_seconds=encode_seconds,
            decode_seconds=decode_seconds,
            backward_seconds=self._backward_seconds,
        )
        self.next_step += 1
        self._reset_step()
        return pb.StepFrame(session=self.id, step=frame.step, done=done)

    def _edge_stats(self, frame: pb.StepFrame) -> list[LayerStat]:
        epoch_end = (frame.step + 1) % self.steps_per_epoch == 0 or frame.step == self.total_steps - 1
        if frame.end.epoch_end != epoch_end:
            raise wire.WireError(f"end.epoch_end is {frame.end.epoch_end}; step {frame.step} of this run has {epoch_end}")
        stats = wire.stats_from_message(frame.end.stats, num_layers=self.num_layers)
        indices = [s.index for s in stats]
        if not set(indices) <= self.edge_layers or len(set(indices)) != len(indices):
            raise wire.WireError("end.stats must name each of the edge's layers at most once, and no cloud layer")
        if any((s.epoch_update_norm is not None) != epoch_end for s in stats):
            raise wire.WireError("end.stats carry an epoch update norm exactly on an epoch's last step")
        return stats

    @property
    def in_step(self) -> bool:
        """Whether a step has begun and not ended."""
        return self._begin is not None

    # -- evaluation and weights ----------------------------------------------------------

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the session for one call; a call that overlaps a step beyond a short wait is refused."""
        if not self.lock.acquire(timeout=_LOCK_SECONDS):
            raise _out_of_order(f"session {self.id} is in a step (one call at a time per session)")
        try:
            yield
        finally:
            self.last_used = time.monotonic()
            self.lock.release()

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Mark the one evaluation stream this session may have open."""
        with self._claims:
            if self._evaluating:
                raise _out_of_order(f"session {self.id} already has an evaluation stream")
            self._evaluating = True
        try:
            yield
        finally:
            self._evaluating = False

    def evaluate(self, frame: pb.EvalFrame) -> pb.EvalFrame:
        """Forward-only pass of one evaluation batch."""
        self.last_used = time.monotonic()
        x = wire.decode_tensor(
            frame.activation, sample_shape=self.uplink_shape, max_batch=self.max_batch, what="evaluation activation"
        )
        out = self.stage.evaluate(x)
        message = wire.encode_tensor(out, self.config.link.downlink, "activation")
        return pb.EvalFrame(session=self.id, batch=frame.batch, activation=message)

    def weights(self) -> Iterator[pb.NamedTensor]:
        """The middle's state dict, entry by entry, as raw tensors."""
        for name, tensor in self.stage.layers.state_dict().items():
            yield pb.NamedTensor(name=name, tensor=wire.raw_to_message(tensor))
