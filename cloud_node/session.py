"""One edge's session on the cloud: its middle stage, optimizer, the run's schedule and the skip decisions."""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import grpc
import torch
import torch.nn.functional as F

from cloud_node.activation_cache import ActivationCache
from cloud_node.checkpointing import CloudCheckpoints
from cloud_node.refusal import Refusal
from cloud_node.run_rules import RunRules
from pipeline import wire
from pipeline.blueprint import Blueprint
from pipeline.early_start import early_start_stands
from pipeline.partition import split
from pipeline.skip import StepStats
from pipeline.skip.recorder import StatsRecorder
from pipeline.timeline import Span, StepTimeline
from pipeline.trainer import StageTrainer
from protos import edgepipe_pb2 as pb

__all__ = ["CloudSession"]

#: How long a call waits for the session's previous call (cancelled, still unwinding) to let go.
_LOCK_SECONDS = 5.0


def _out_of_order(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.FAILED_PRECONDITION, message)


class CloudSession:
    """The cloud half of one edge's training run.

    A step arrives as frames: ``begin``, then activations (and, when the edge holds a tail,
    gradients) per micro-batch, then ``end``.  The optimizer steps only at ``end`` after every
    micro-batch completed; anything else aborts the step and leaves the session as it was.
    The session belongs to ``owner``, and the handshake fixed the run's length: every step's
    learning rate and epoch follow from it, so the edge's begin frame must agree exactly. An
    ``end`` frame that asks for a checkpoint has the session's half of run ``run_id`` saved in
    ``checkpoints`` before the step is answered.
    """

    def __init__(
        self, session_id: str, blueprint: Blueprint, *, owner: str, total_steps: int, steps_per_epoch: int,
        checkpoints: CloudCheckpoints, run_id: str = "",
    ) -> None:
        self.id = session_id
        self.owner = owner
        self.run_id = run_id
        self.checkpoints = checkpoints
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.config = config = blueprint.config
        # Every session trains its own copy of the untrained model the blueprint built.
        model = copy.deepcopy(blueprint.model)
        self.num_layers = blueprint.num_layers
        self.cuts = blueprint.cuts
        self.uplink_shape, self.downlink_shape = blueprint.uplink_shape, blueprint.downlink_shape
        _, middle, _ = split(model, self.cuts)
        self.device = blueprint.device
        middle.to(self.device)
        self.trainer = StageTrainer(middle, self.cuts.middle_start, config.train, blueprint.param_layers)
        self.stage = self.trainer.stage
        self.policy = blueprint.new_policy()
        recording = checkpoints.run_file(self, "skip_stats.jsonl") if config.skip.record else None
        if recording is not None:
            self.policy = StatsRecorder(self.policy, recording)
        self.loss_on_cloud = config.partition.edge_tail == 0
        self.max_batch = config.micro_batch_size
        # torch.chunk's split of a mini-batch, as the edge makes it: full micro-batches, the last one shorter.
        self.micro_size = -(-config.train.batch_size // config.partition.chunks)
        self.chunks = -(-config.train.batch_size // self.micro_size)
        edge_layers = [*range(self.cuts.edge_head), *range(self.cuts.middle_stop, self.num_layers)]
        shapes = {i: tuple(tuple(p.shape) for p in blueprint.model[i].parameters()) for i in edge_layers}
        self.rules = RunRules(
            config.train, total_steps, steps_per_epoch, self.chunks, self.num_layers, frozenset(edge_layers), shapes
        )
        #: Frozen-head activation rows by sample index ([link] cache_frozen), used while the head is frozen.
        self.cache = (
            ActivationCache(config.cloud.cache_memory_mib << 20, checkpoints.directory)
            if config.link.cache_frozen else None
        )
        self.next_step = 0
        self.decision = self.policy.initial()
        #: The decision the last step ran under: a step begun early ran its head under it.
        self._decided_from = self.decision
        self.param_layers = blueprint.param_layers
        self.trainer.apply(self.decision)
        self.lock = threading.Lock()
        #: Held with the lock for each call: a federation whose edges share one middle (splitfed-v2)
        #: makes it the middle's, so that one call at a time uses it.
        self.turn: Callable[[], AbstractContextManager[None]] = nullcontext
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
    def caching(self) -> bool:
        """Whether activations are kept by sample index now: cache_frozen and a frozen head."""
        return self.cache is not None and not self.head_trains

    @property
    def middle_trains(self) -> bool:
        """Whether any cloud layer still learns, i.e. the edge must send output gradients."""
        return self.stage.trains

    # -- one training step ---------------------------------------------------------------

    def _reset_step(self) -> None:
        self._begin: pb.StepBegin | None = None
        # A dropped early step: how many more of its activations may come before it begins again.
        self._dropping: int | None = None
        # The step's spans for the edge's --trace; the begin frame restarts the clock when it arrives.
        self._timeline = StepTimeline(self.next_step)
        self._activations: set[int] = set()
        self._gradients: set[int] = set()
        self._losses: dict[int, torch.Tensor] = {}
        self._loss = 0.0
        self._backward_seconds = 0.0

    def _span(self, name: str, index: int) -> AbstractContextManager[None]:
        return self._timeline.span(name, index, side="cloud")

    def abort_step(self) -> None:
        """Forget an unfinished step: no optimizer step, BatchNorm statistics restored."""
        if self._begin is not None:
            self.trainer.abort()
        self._reset_step()

    def handle(self, frame: pb.StepFrame, received: float | None = None) -> Iterator[pb.StepFrame]:
        """Process one edge frame (it arrived at ``received``, a ``perf_counter``; None: now);
        yields the frames to send back."""
        self.last_used = time.monotonic()
        body = frame.WhichOneof("body")
        if self._dropping is not None:
            self._while_dropping(frame, body, received)
            return
        if self._begin is None and body != "begin":
            raise _out_of_order(f"step {frame.step} must start with a begin frame, got {body!r}")
        if self._begin is not None and frame.step != self.next_step:
            raise _out_of_order(f"frame for step {frame.step} inside step {self.next_step}")
        if body == "begin" and frame.begin.early:
            self._on_early_begin(frame, received)
        elif body == "begin":
            self._on_begin(frame, received)
        elif body == "activation":
            yield from self._on_activation(frame)
        elif body == "cached":
            yield from self._on_cached(frame)
        elif body == "gradient":
            yield from self._on_gradient(frame)
        elif body == "end":
            yield self._on_end(frame)
        else:
            raise wire.WireError(f"an edge may not send a {body!r} frame")

    def _on_early_begin(self, frame: pb.StepFrame, received: float | None) -> None:
        """A step the edge began before it read the decision for it: it stands, or is dropped alike on both sides."""
        if self._begin is not None:
            raise _out_of_order(f"step {self.next_step} has already begun")
        self._check_step(frame.step)
        before = self._decided_from
        if frame.begin.boundary != before.boundary:
            raise _out_of_order(
                f"step {frame.step} began early with boundary {frame.begin.boundary}; the step before it ran with {before.boundary}"
            )
        if early_start_stands(before, self.decision, edge_head=self.cuts.edge_head, param_layers=self.param_layers,
                              cache_frozen=self.cache is not None):
            self._start(frame, received)
        else:
            self.rules.check_begin(frame.step, frame.begin)
            self._dropping = self.chunks

    def _while_dropping(self, frame: pb.StepFrame, body: str | None, received: float | None) -> None:
        """The frames of a dropped early step, up to the plain begin that starts it again."""
        if frame.step != self.next_step:
            raise _out_of_order(f"frame for step {frame.step} inside step {self.next_step}")
        if body in ("activation", "cached") and self._dropping:
            self._dropping -= 1  # computed under the old decision: not used
            return
        if body != "begin" or frame.begin.early:
            raise _out_of_order(
                f"step {frame.step} began early under a decision that changed how the head runs: "
                f"begin it again, got {body!r}"
            )
        self._dropping = None
        self._on_begin(frame, received)

    def _check_step(self, step: int) -> None:
        if step != self.next_step:
            raise _out_of_order(
                f"the edge is at step {step} but this session is at step {self.next_step}; "
                "restart the edge (a step was lost on a broken stream)"
            )

    def _on_begin(self, frame: pb.StepFrame, received: float | None) -> None:
        begin = frame.begin
        if self._begin is not None:
            raise _out_of_order(f"step {self.next_step} has already begun")
        self._check_step(frame.step)
        if begin.boundary != self.decision.boundary:
            raise _out_of_order(f"the edge applies boundary {begin.boundary}, the cloud decided {self.decision.boundary}")
        self._start(frame, received)

    def _start(self, frame: pb.StepFrame, received: float | None) -> None:
        self.rules.check_begin(frame.step, frame.begin)
        self.trainer.begin(frame.begin.lr)
        self.clock.take()
        self._timeline = StepTimeline(frame.step, received)
        self._begin = frame.begin

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
        with self._span("decode", index):
            x = wire.decode_tensor(
                frame.activation, sample_shape=self.uplink_shape, max_batch=self.max_batch,
                what="uplink activation", clock=self.clock, device=self.device,
            )
        self._check_size(x, index, "uplink activation")
        if frame.samples:
            self._keep_rows(frame, len(x))
        self._activations.add(index)
        if self.loss_on_cloud:
            labels = wire.labels_from_frame(frame, batch=len(x), num_classes=self.config.model.num_classes)
            labels = labels.to(self.device)
            with self._span("forward", index):
                out = self.stage.forward(index, x, input_grad=self.head_trains)
                self._losses[index] = F.cross_entropy(out, labels, reduction="sum") / self._begin.samples
            if len(self._losses) == self._begin.chunks:
                yield from self._backward_losses(frame)
            return
        if frame.labels:
            raise wire.WireError("labels may only be sent when the loss is computed on the cloud (edge_tail = 0)")
        with self._span("forward", index):
            out = self.stage.forward(index, x, input_grad=self.head_trains)
        yield self._tensor_frame(frame, "activation", out)

    def _samples(self, frame: pb.StepFrame, rows: int) -> list[int]:
        if not self.caching:
            raise wire.WireError("sample indices are only sent while the cloud caches a frozen head's activations")
        samples = list(frame.samples)
        if len(samples) != rows or len(set(samples)) != rows or min(samples) < 0:
            raise wire.WireError(f"an activation of {rows} samples needs {rows} distinct, non-negative sample indices")
        return samples

    def _keep_rows(self, frame: pb.StepFrame, rows: int) -> None:
        samples = self._samples(frame, rows)
        data = frame.activation.data
        width = len(data) // rows  # validated by decode: every row has the same size
        for position, sample in enumerate(samples):
            self.cache.put(sample, data[position * width : (position + 1) * width])

    def _on_cached(self, frame: pb.StepFrame) -> Iterator[pb.StepFrame]:
        """A micro-batch of samples whose rows the cache holds: the activation is put back together
        from them, byte for byte as it first arrived, and computed like any other."""
        if not 0 < len(frame.samples) <= self.max_batch:
            raise wire.WireError(f"a cached micro-batch names 1 to {self.max_batch} samples, not {len(frame.samples)}")
        samples = self._samples(frame, len(frame.samples))
        missing = [sample for sample in samples if sample not in self.cache]
        if missing:
            raise wire.WireError(f"cached micro-batch {frame.micro_batch} names sample {missing[0]}, which this cloud does not hold")
        activation = pb.Tensor(
            codec=self.config.link.uplink, shape=[len(samples), *self.uplink_shape],
            data=b"".join(self.cache.get(sample) for sample in samples),
        )
        rebuilt = pb.StepFrame(
            session=frame.session, step=frame.step, micro_batch=frame.micro_batch, activation=activation,
            labels=frame.labels,
        )
        yield from self._on_activation(rebuilt)

    def _backward_losses(self, frame: pb.StepFrame) -> Iterator[pb.StepFrame]:
        # Reverse micro-batch order, as torchgpipe.GPipe accumulates gradients.
        for index in reversed(range(self._begin.chunks)):
            loss = self._losses[index]
            self._loss += loss.item()
            grad = self._backward(index, loss=loss)
            if grad is not None:
                yield self._tensor_frame(frame, "gradient", grad, index)

    def _on_gradient(self, frame: pb.StepFrame) -> Iterator[pb.StepFrame]:
        if self.loss_on_cloud or not self.middle_trains:
            raise wire.WireError("no gradient frames are expected: the cloud layers do not train from the edge")
        index = self._micro_batch(frame, self._gradients, "gradient")
        if index not in self._activations:
            raise wire.WireError(f"gradient for micro-batch {index} arrived before its activation")
        with self._span("decode", index):
            grad_out = wire.decode_tensor(
                frame.gradient, sample_shape=self.downlink_shape, max_batch=self.max_batch,
                what="gradient", clock=self.clock, device=self.device,
            )
        self._check_size(grad_out, index, "gradient")
        self._gradients.add(index)
        grad = self._backward(index, grad_out)
        if grad is not None:
            yield self._tensor_frame(frame, "gradient", grad)

    def _backward(
        self, index: int, grad: torch.Tensor | None = None, *, loss: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        start = time.perf_counter()
        with self._span("backward", index):
            grad_in = self.stage.backward(index, grad, loss=loss)
        self._backward_seconds += time.perf_counter() - start
        return grad_in

    def _tensor_frame(
        self, frame: pb.StepFrame, kind: str, tensor: torch.Tensor, index: int | None = None
    ) -> pb.StepFrame:
        codec = self.config.link.gradients if kind == "gradient" else self.config.link.downlink
        index = frame.micro_batch if index is None else index
        with self._span("encode", index):
            message = wire.encode_tensor(tensor, codec, kind, clock=self.clock, generator=self.rounding)
        return pb.StepFrame(session=self.id, step=frame.step, micro_batch=index, **{kind: message})

    def _on_end(self, frame: pb.StepFrame) -> pb.StepFrame:
        timeline, start = self._timeline, self._timeline.now()
        chunks = self._begin.chunks
        expected_gradients = 0 if self.loss_on_cloud or not self.middle_trains else chunks
        if len(self._activations) != chunks or len(self._gradients) != expected_gradients:
            raise _out_of_order(
                f"step {frame.step} ended after {len(self._activations)}/{chunks} activations and "
                f"{len(self._gradients)}/{expected_gradients} gradients"
            )
        edge_stats = self.rules.edge_stats(frame.step, frame.end)
        checkpoint = frame.end.checkpoint and self.checkpoints.keeps(self)
        if checkpoint:
            self.checkpoints.check(self)  # a refusal now leaves the step undone, not half saved
        own = self.trainer.commit(epoch_end=frame.end.epoch_end)
        stats = StepStats(
            step=frame.step,
            epoch=self._begin.epoch,
            epoch_end=frame.end.epoch_end,
            lr=self._begin.lr,
            layers=tuple(sorted(edge_stats + own, key=lambda s: s.index)),
        )
        self._decided_from = self.decision
        self.decision = self.policy.decide(stats)
        if self.cache is not None and self.decision.boundary != self._decided_from.boundary:
            self.cache.clear()  # the head's activations change with the boundary
        self.trainer.apply(self.decision)
        encode_seconds, decode_seconds = self.clock.take()
        done = pb.StepDone(
            decision=wire.decision_to_message(self.decision),
            loss=self._loss,
            encode_seconds=encode_seconds,
            decode_seconds=decode_seconds,
            backward_seconds=self._backward_seconds,
            checkpointed=checkpoint,
        )
        # The step is complete before it is saved: a failed save leaves no step to abort.
        self.next_step += 1
        self._reset_step()
        if checkpoint:
            self.checkpoints.save(self, frame.step)
        timeline.spans.append(Span("cloud", "end", -1, start, timeline.now()))
        done.spans.extend(
            pb.Span(name=s.name, micro_batch=s.micro_batch, start=s.start, end=s.end) for s in timeline.spans
        )
        return pb.StepFrame(session=self.id, step=frame.step, done=done)

    @property
    def in_step(self) -> bool:
        """Whether a step has begun (early or not) and not ended."""
        return self._begin is not None or self._dropping is not None

    # -- evaluation and weights ----------------------------------------------------------

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the session for one call; a call that overlaps a step beyond a short wait is refused."""
        if not self.lock.acquire(timeout=_LOCK_SECONDS):
            raise _out_of_order(f"session {self.id} is in a step (one call at a time per session)")
        try:
            with self.turn():
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
            frame.activation, sample_shape=self.uplink_shape, max_batch=self.max_batch, what="evaluation activation",
            device=self.device,
        )
        out = self.stage.evaluate(x)
        message = wire.encode_tensor(out, self.config.link.downlink, "activation")
        return pb.EvalFrame(session=self.id, batch=frame.batch, activation=message)

    def weights(self) -> Iterator[pb.NamedTensor]:
        """The middle's state dict, entry by entry, as raw tensors."""
        for name, tensor in self.stage.layers.state_dict().items():
            yield pb.NamedTensor(name=name, tensor=wire.raw_to_message(tensor))
