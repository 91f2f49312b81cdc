"""How the edge computes one split step over the link, and what every engine reports of a step."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from edge_node.link import CloudLink, LinkError, StepCall
from pipeline import wire
from pipeline.blueprint import Blueprint
from pipeline.codecs import payload_bytes
from pipeline.early_start import early_start_stands
from pipeline.local_learning import CLASSIFIER, local_head
from pipeline.optim import set_learning_rate
from pipeline.partition import split
from pipeline.skip import Decision, SkipPolicy
from pipeline.timeline import StepTimeline
from pipeline.traffic import TrafficCounts
from pipeline.trainer import StageTrainer
from protos import edgepipe_pb2 as pb

__all__ = ["NextStep", "SplitEngine", "StepResult", "batch_loss", "micro_batches"]


@dataclass(frozen=True)
class NextStep:
    """The step after the one being run, so that its first frames can leave before this one drains."""

    step: int
    epoch: int
    lr: float
    x: torch.Tensor
    y: torch.Tensor
    #: The batch's training-set indices ([link] cache_frozen).
    indices: torch.Tensor | None = None


@dataclass
class StepResult:
    """What one step reports to the training loop."""

    loss: float
    decision: Decision
    edge_backward_seconds: float = 0.0
    cloud_backward_seconds: float = 0.0
    edge_codec_seconds: tuple[float, float] = (0.0, 0.0)
    cloud_codec_seconds: tuple[float, float] = (0.0, 0.0)
    #: How many more payload bytes the uplink activations would have taken as fp32.
    uplink_fp32_extra_bytes: int = 0
    #: Where the step's time went on both machines (split runs).
    timeline: StepTimeline | None = None
    #: Both sides hold this step's checkpoint now (it was asked for, and the cloud saved its half).
    checkpointed: bool = False
    #: The bytes of this step's frames (split runs; None: nothing crossed a link).
    traffic: TrafficCounts | None = None


def micro_batches(x: torch.Tensor, y: torch.Tensor, chunks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A mini-batch split into ``chunks`` micro-batches of inputs and labels."""
    # torch.chunk is how torchgpipe scatters a mini-batch: the same micro-batches, the same results.
    return list(zip(x.chunk(chunks), y.chunk(chunks)))


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, samples: int) -> torch.Tensor:
    """A micro-batch's share of the mini-batch's mean cross-entropy."""
    # Summed and divided by the whole mini-batch: micro-batch gradients add up to the mean's.
    return F.cross_entropy(logits, labels, reduction="sum") / samples


@dataclass
class _Step:
    """One split step in flight: its micro-batches and what has come back so far."""

    step: int
    epoch: int
    lr: float
    call: StepCall
    micro: list[tuple[torch.Tensor, torch.Tensor]]
    timeline: StepTimeline
    sent: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    head_gradients: set[int] = field(default_factory=set)
    backward_seconds: float = 0.0
    fp32_extra: int = 0
    codec_seconds: tuple[float, float] = (0.0, 0.0)
    #: Each micro-batch's training-set indices, when the cloud may cache activations.
    indices: list[list[int]] | None = None
    #: The samples whose activation rows this step sent while the cloud caches them.
    stored: set[int] = field(default_factory=set)

    @property
    def samples(self) -> int:
        return sum(len(yi) for _, yi in self.micro)

    def frame(self, session: str, index: int = 0, **body: object) -> pb.StepFrame:
        return pb.StepFrame(session=session, step=self.step, micro_batch=index, **body)

    def check(self, frame: pb.StepFrame, seen: object) -> int:
        """The micro-batch index of a reply; a reply for a step, micro-batch or kind that is not
        due breaks the step."""
        index = frame.micro_batch
        if frame.step != self.step or not 0 <= index < self.sent or index in seen:
            raise LinkError(
                f"unexpected {frame.WhichOneof('body')!r} frame from the cloud (step {frame.step}, "
                f"micro-batch {index}) in step {self.step}"
            )
        return index


#: Activations sent whose outputs have not come back, at most: two keep the cloud busy (one being
#: computed, one queued) while leaving the uplink free for the gradients between them.
_IN_FLIGHT = 2


class SplitEngine:
    """Edge head and tail here, the middle on the cloud; one gRPC stream per step.

    A step runs as handlers, like the cloud's: begin; then, until every micro-batch is done,
    send the next head output up while nothing has come back, run each returning middle output
    through the tail and send its gradient up at once, and run each returning head gradient
    through the head; end. So activations flow up while gradients flow down (both link
    directions busy), and each micro-batch's backward starts as soon as its gradient exists.
    Every stage keeps the micro-batches' parameter gradients apart and sums them in
    torchgpipe's order at the end, so the result equals the one-process run bit for bit.
    """

    def __init__(
        self, blueprint: Blueprint, link: CloudLink, edge_name: str, *, total_steps: int, steps_per_epoch: int
    ) -> None:
        """Set up the edge's stages; nothing crosses the link before :meth:`open`."""
        self.config = blueprint.config
        self.model = blueprint.model
        self.cuts = blueprint.cuts
        self.param_layers = blueprint.param_layers
        self.link = link
        self.uplink_shape, self.downlink_shape = blueprint.uplink_shape, blueprint.downlink_shape
        head, _, tail = split(self.model, self.cuts)
        self.device = blueprint.device
        head.to(self.device)
        tail.to(self.device)
        #: The head's local learning under [skip] prefix = "local" (None: a frozen head is frozen).
        self.local = local_head(head, blueprint, batch_loss)
        self.head = self.local or StageTrainer(head, 0, self.config.train, blueprint.param_layers)
        self.tail = StageTrainer(tail, self.cuts.middle_stop, self.config.train, blueprint.param_layers)
        self.max_batch = self.config.micro_batch_size
        self.clock = wire.CodecClock()
        # Stochastic rounding draws from its own seeded generator: runs repeat exactly.
        self.rounding = torch.Generator().manual_seed(self.config.model.seed + 1)
        self.edge_name, self.total_steps, self.steps_per_epoch = edge_name, total_steps, steps_per_epoch
        #: What a checkpoint holds: the cloud decides, so there is no policy here.
        self.policy: SkipPolicy | None = None
        self.trainers = {"head": self.head, "tail": self.tail}
        if self.local is not None:
            self.trainers[CLASSIFIER] = self.local.classifier
        self.generators = {"rounding": self.rounding}
        self.decision = Decision(0)
        #: The next step, begun while this one's done frame was on its way (see :meth:`step`).
        self._ahead: _Step | None = None
        #: The samples whose frozen-head activation the cloud holds ([link] cache_frozen): it keeps
        #: every row this side sent since the boundary last moved, as this side counts them.
        self._cloud_holds: set[int] = set()

    def apply(self, decision: Decision) -> None:
        """Make ``decision`` the one the next step runs with."""
        if decision.boundary != self.decision.boundary:
            self._cloud_holds.clear()  # so does the cloud: the head's activations change
        self.decision = decision
        self.head.apply(decision)
        self.tail.apply(decision)

    def open(self, run_id: str, *, resume_step: int | None = None, wait: float | None = None) -> None:
        """Open run ``run_id`` on the cloud: fresh, or after ``resume_step`` with this engine restored to it.

        A resumed run must get back the decision this side saved with that step.
        """
        decision = self.link.open(
            self.edge_name, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch, run_id=run_id,
            resume_step=resume_step, wait=wait,
        )
        if resume_step is None:
            self.apply(decision)
        elif decision != self.decision:
            raise LinkError(
                f"the cloud resumed run {run_id} after step {resume_step} with boundary {decision.boundary}, "
                f"but this edge saved boundary {self.decision.boundary} there: the two sides' checkpoints differ"
            )

    @property
    def _head_trains(self) -> bool:
        return self.decision.boundary < self.cuts.edge_head

    @property
    def _middle_trains(self) -> bool:
        return self.decision.boundary < self.cuts.middle_stop

    @property
    def _caching(self) -> bool:
        """Whether the cloud keeps activations by sample now: cache_frozen and a frozen head."""
        return self.config.link.cache_frozen and not self._head_trains

    @property
    def _loss_on_cloud(self) -> bool:
        return self.cuts.edge_tail == 0

    def step(
        self, step: int, epoch: int, lr: float, x: torch.Tensor, y: torch.Tensor, epoch_end: bool,
        checkpoint: bool = False, following: NextStep | None = None, indices: torch.Tensor | None = None,
    ) -> StepResult:
        """Stream the micro-batches through the cloud, then step both sides' optimizers.

        With ``checkpoint`` the cloud saves its half of this step before it answers. With
        ``following`` the next step begins (its first activations leave, on a call of their own)
        as soon as this side has stepped, while the cloud commits this step: the link does not
        drain between steps. The cloud holds those frames until this step is committed. When
        the cloud's decision changes how the head runs, the begun step's activations are sent
        again under the new decision, so the results are the same either way. ``indices`` (the
        batch's training-set indices) let a cloud that caches frozen-head activations
        (``[link] cache_frozen``) be sent only the indices of samples it holds.
        """
        run = self._take_ahead(step) or self._start(step, epoch, lr, x, y, indices)
        try:
            self._stream(run)
            done = self._end(run, epoch_end, checkpoint, following)
        except BaseException:
            run.call.cancel()
            self._drop_ahead()
            self.head.abort()
            self.tail.abort()
            raise
        # The cloud kept this step's rows before it decided (a moved boundary drops them again).
        self._cloud_holds |= run.stored
        self._decide(wire.decision_from_message(done.decision))
        return StepResult(
            loss=done.loss if self._loss_on_cloud else sum(run.losses[i] for i in sorted(run.losses)),
            decision=self.decision,
            edge_backward_seconds=run.backward_seconds,
            cloud_backward_seconds=done.backward_seconds,
            edge_codec_seconds=run.codec_seconds,
            cloud_codec_seconds=(done.encode_seconds, done.decode_seconds),
            uplink_fp32_extra_bytes=run.fp32_extra,
            timeline=run.timeline,
            checkpointed=checkpoint and done.checkpointed,
            traffic=run.call.traffic.snapshot(),
        )

    # -- the handlers --------------------------------------------------------------------

    def _start(
        self, step: int, epoch: int, lr: float, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor | None,
        *, early: bool = False,
    ) -> _Step:
        """Open step ``step``'s call and send its begin frame (``early``: the boundary is not known yet)."""
        chunks = self.config.partition.chunks
        micro = micro_batches(x.to(self.device), y.to(self.device), chunks)
        run = _Step(step, epoch, lr, self.link.step(), micro, StepTimeline(step))
        if self.config.link.cache_frozen and indices is not None:
            run.indices = [part.tolist() for part in indices.chunk(chunks)]
        try:
            self.head.begin(lr)
            self.tail.begin(lr)
            run.call.send(run.frame(self.link.session, begin=self._begin_message(run, early=early)))
        except BaseException:
            run.call.cancel()
            raise
        return run

    def _begin_message(self, run: _Step, *, early: bool = False) -> pb.StepBegin:
        return pb.StepBegin(
            epoch=run.epoch, lr=run.lr, chunks=len(run.micro), boundary=self.decision.boundary, samples=run.samples,
            early=early,
        )

    def _start_ahead(self, following: NextStep) -> None:
        """Begin ``following`` early and send its first activations: they cross while this step drains."""
        ahead = self._start(
            following.step, following.epoch, following.lr, following.x, following.y, following.indices, early=True
        )
        self._ahead = ahead
        while ahead.sent < min(len(ahead.micro), _IN_FLIGHT):
            self._send_activation(ahead)

    def _decide(self, decision: Decision) -> None:
        """Apply the cloud's decision for the next step; if that step began early, keep or redo its start.

        Both sides judge alike whether what was sent stands (:func:`pipeline.early_start.early_start_stands`):
        when the decision changed how the head runs, the cloud drops it and this side begins the
        step again, with a plain begin, under the new decision.
        """
        ahead, before = self._ahead, self.decision
        self.apply(decision)
        if ahead is None:
            return
        if early_start_stands(before, decision, edge_head=self.cuts.edge_head, param_layers=self.param_layers,
                              cache_frozen=self.config.link.cache_frozen):
            # The begun step set its rates before this decision's factors were known.
            set_learning_rate(self.head.optimizer, ahead.lr)
            set_learning_rate(self.tail.optimizer, ahead.lr)
            return
        for trainer in (self.head, self.tail):
            trainer.abort()
            trainer.begin(ahead.lr)
        ahead.sent, ahead.fp32_extra = 0, 0
        ahead.stored.clear()
        ahead.call.send(ahead.frame(self.link.session, begin=self._begin_message(ahead)))

    def _take_ahead(self, step: int) -> _Step | None:
        if self._ahead is not None and self._ahead.step != step:
            self._drop_ahead()
        ahead, self._ahead = self._ahead, None
        return ahead

    def _drop_ahead(self) -> None:
        """Cancel the begun next step and undo what it did here (the cloud aborts it too)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.call.cancel()
            self.head.abort()
            self.tail.abort()

    def _stream(self, run: _Step) -> None:
        chunks = len(run.micro)
        outputs = 0 if self._loss_on_cloud else chunks
        head_gradients = chunks if self._head_trains else 0
        while run.sent < chunks or len(run.losses) < outputs or len(run.head_gradients) < head_gradients:
            # What came back goes first, so gradients travel while later activations do; and no
            # more than _IN_FLIGHT activations wait for their outputs, because the link is one
            # stream: a gradient sent behind every queued activation would wait for all of them.
            may_send = run.sent < chunks and (not outputs or run.sent - len(run.losses) < _IN_FLIGHT)
            if may_send:
                frame = run.call.poll()
            else:
                with run.timeline.span("wait"):
                    frame = run.call.receive()
            kind = None if frame is None else frame.WhichOneof("body")
            if frame is None:
                self._send_activation(run)
            elif kind == "activation" and outputs:
                self._on_output(run, frame)
            elif kind == "gradient" and head_gradients:
                self._on_head_gradient(run, frame)
            else:
                raise LinkError(f"unexpected {kind!r} frame from the cloud in step {run.step}")

    def _send_activation(self, run: _Step) -> None:
        index = run.sent
        xi, yi = run.micro[index]
        labels = yi.tolist() if self._loss_on_cloud else []
        samples = run.indices[index] if run.indices is not None and self._caching else []
        if samples and all(sample in self._cloud_holds for sample in samples):
            # The frozen head's output for these samples is on the cloud already: no need to compute it.
            run.call.send(run.frame(self.link.session, index, cached=pb.Cached(), samples=samples, labels=labels))
            run.sent += 1
            return
        with run.timeline.span("head forward", index):
            activation = self.head.stage.forward(index, xi)
        uplink = self.config.link.uplink
        with run.timeline.span("encode", index):
            message = wire.encode_tensor(activation, uplink, "activation", clock=self.clock)
        run.fp32_extra += 4 * activation.numel() - payload_bytes(uplink, tuple(activation.shape))
        run.call.send(run.frame(self.link.session, index, activation=message, labels=labels, samples=samples))
        run.stored.update(samples)
        run.sent += 1
        if self.local is not None and self.local.active:
            # No gradient comes down for a covered head: it learns from its local loss, while the activation travels.
            start = time.perf_counter()
            with run.timeline.span("head backward", index):
                self.local.learn(index, activation, yi, run.samples)
            run.backward_seconds += time.perf_counter() - start

    def _on_output(self, run: _Step, frame: pb.StepFrame) -> None:
        index = run.check(frame, run.losses)
        with run.timeline.span("decode", index):
            z = wire.decode_tensor(
                frame.activation, sample_shape=self.downlink_shape, max_batch=self.max_batch,
                what="downlink activation", clock=self.clock, device=self.device,
            )
        with run.timeline.span("tail forward", index):
            out = self.tail.stage.forward(index, z, input_grad=self._middle_trains)
            loss = batch_loss(out, run.micro[index][1], run.samples)
            run.losses[index] = loss.item()
        start = time.perf_counter()
        with run.timeline.span("tail backward", index):
            grad = self.tail.stage.backward(index, loss=loss)
        run.backward_seconds += time.perf_counter() - start
        if self._middle_trains:
            with run.timeline.span("encode", index):
                message = wire.encode_tensor(
                    grad, self.config.link.gradients, "gradient", clock=self.clock, generator=self.rounding
                )
            run.call.send(run.frame(self.link.session, index, gradient=message))

    def _on_head_gradient(self, run: _Step, frame: pb.StepFrame) -> None:
        index = run.check(frame, run.head_gradients)
        with run.timeline.span("decode", index):
            grad = wire.decode_tensor(
                frame.gradient, sample_shape=self.uplink_shape, max_batch=self.max_batch,
                what="downlink gradient", clock=self.clock, device=self.device,
            )
        start = time.perf_counter()
        with run.timeline.span("head backward", index):
            self.head.stage.backward(index, grad)
        run.backward_seconds += time.perf_counter() - start
        run.head_gradients.add(index)

    def _end(self, run: _Step, epoch_end: bool, checkpoint: bool, following: NextStep | None) -> pb.StepDone:
        with run.timeline.span("optimizer"):
            stats = self.head.commit(epoch_end=epoch_end) + self.tail.commit(epoch_end=epoch_end)
        end = pb.StepEnd(epoch_end=epoch_end, stats=wire.stats_to_message(stats), checkpoint=checkpoint)
        sent = time.perf_counter()
        run.call.send(run.frame(self.link.session, end=end))
        # Nothing more goes up on this call: the cloud can end it right after its done frame.
        run.call.close()
        run.codec_seconds = self.clock.take()
        if following is not None:
            with run.timeline.span("next step"):
                self._start_ahead(following)
        with run.timeline.span("wait"):
            reply = run.call.receive()
        if reply.WhichOneof("body") != "done":
            raise LinkError(f"expected the cloud's step-done frame, got {reply.WhichOneof('body')!r}")
        run.call.finish()
        done = reply.done
        # The cloud's clock starts when our begin frame reached it, about half a round trip after
        # we sent it; the end/done exchange, less the cloud's time handling end, is one round trip.
        handling = sum(s.end - s.start for s in done.spans if s.name == "end")
        round_trip = max(run.call.arrived - sent - handling, 0.0)
        run.timeline.add_remote([(s.name, s.micro_batch, s.start, s.end) for s in done.spans], offset=round_trip / 2)
        return done

    # -- evaluation and the final weights -----------------------------------------------

    def evaluate_many(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Logits of each batch in order: head here, middle on the cloud (forward-only), tail here."""

        def frames() -> Iterator[pb.EvalFrame]:
            for index, xb in enumerate(batches):
                activation = self.head.stage.evaluate(xb.to(self.device))
                message = wire.encode_tensor(activation, self.config.link.uplink, "activation")
                yield pb.EvalFrame(session=self.link.session, batch=index, activation=message)

        for expected, reply in enumerate(self.link.evaluate(frames())):
            if reply.batch != expected:
                raise LinkError(f"evaluation reply for batch {reply.batch}, expected {expected}")
            z = wire.decode_tensor(
                reply.activation, sample_shape=self.downlink_shape, max_batch=self.max_batch,
                what="evaluation output", device=self.device,
            )
            yield self.tail.stage.evaluate(z).cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole trained model: the edge's layers plus the cloud's, fetched as raw tensors."""
        own = self.model.state_dict()
        _, middle, _ = split(self.model, self.cuts)
        expected = middle.state_dict()
        received: dict[str, torch.Tensor] = {}
        for entry in self.link.weights():
            if entry.name not in expected or entry.name in received:
                raise LinkError(f"the cloud sent an unexpected weight {entry.name!r}")
            try:
                received[entry.name] = wire.raw_from_message(entry.tensor, like=expected[entry.name], what=entry.name)
            except wire.WireError as exc:
                raise LinkError(f"bad weight from the cloud: {exc}") from None
        missing = sorted(set(expected) - set(received))
        if missing:
            raise LinkError(f"the cloud did not send {len(missing)} weights, e.g. {missing[0]!r}")
        own.update(received)
        return own
