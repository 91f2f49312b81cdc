"""How the edge computes one step: split over the link, or the one-process reference (``--local``)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edge_node.link import CloudLink, LinkError
from pipeline import wire
from pipeline.codecs import payload_bytes
from pipeline.config import Config
from pipeline.optim import build_optimizer, set_learning_rate
from pipeline.partition import Cuts, cut_shapes, split
from pipeline.skip import (
    Decision,
    LayerStat,
    LayerStatistics,
    StepStats,
    apply_decision,
    cac_parameter_layers,
    make_policy,
)
from pipeline.stage import Stage
from protos import edgepipe_pb2 as pb

__all__ = ["LocalEngine", "SplitEngine", "StepResult"]


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


def _micro_batches(x: torch.Tensor, y: torch.Tensor, chunks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # torch.chunk is how torchgpipe scatters a mini-batch: the same micro-batches, the same results.
    return list(zip(x.chunk(chunks), y.chunk(chunks)))


def _loss(logits: torch.Tensor, labels: torch.Tensor, samples: int) -> torch.Tensor:
    # Summed and divided by the whole mini-batch: micro-batch gradients add up to the mean's.
    return F.cross_entropy(logits, labels, reduction="sum") / samples


class LocalEngine:
    """The whole model in this process: the reference a split run must match."""

    def __init__(self, config: Config, model: nn.Sequential) -> None:
        self.config = config
        self.model = model
        self.stage = Stage(model, 0)
        self.optimizer = build_optimizer(model, 0, config.train)
        self.statistics = LayerStatistics(model, 0)
        self.policy = make_policy(
            config.skip,
            num_layers=len(model),
            edge_tail=config.partition.edge_tail,
            epochs=config.train.epochs,
            param_layers=cac_parameter_layers(model),
        )
        self.decision = self.policy.initial()
        self._apply(self.decision)

    def _apply(self, decision: Decision) -> None:
        apply_decision(decision, self.stage, self.optimizer)

    def step(self, step: int, epoch: int, lr: float, x: torch.Tensor, y: torch.Tensor, epoch_end: bool) -> StepResult:
        """Forward every micro-batch, backward them in reverse (GPipe's order), step, decide."""
        self.optimizer.zero_grad(set_to_none=True)
        set_learning_rate(self.optimizer, lr)
        self.stage.begin_step()
        micro = _micro_batches(x, y, self.config.partition.chunks)
        losses = [_loss(self.stage.forward(index, xi), yi, len(y)) for index, (xi, yi) in enumerate(micro)]
        start = time.perf_counter()
        for index in reversed(range(len(micro))):
            self.stage.backward(index, loss=losses[index])
        backward = time.perf_counter() - start
        total = sum(loss.item() for loss in losses)
        self.optimizer.step()
        stats = StepStats(step, epoch, epoch_end, lr, tuple(self.statistics.collect(epoch_end=epoch_end)))
        self.decision = self.policy.decide(stats)
        self._apply(self.decision)
        return StepResult(total, self.decision, edge_backward_seconds=backward)

    def evaluate_many(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Logits of each batch, eval mode."""
        for xb in batches:
            yield self.stage.evaluate(xb)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained model."""
        return self.model.state_dict()

    def close(self) -> None:
        """Nothing to release."""


class SplitEngine:
    """Edge head and tail here, the middle on the cloud; one gRPC stream per step."""

    def __init__(self, config: Config, model: nn.Sequential, cuts: Cuts, link: CloudLink, edge_name: str) -> None:
        self.config = config
        self.model = model
        self.cuts = cuts
        self.link = link
        self.uplink_shape, self.downlink_shape = cut_shapes(model, config.model.input_shape, cuts)
        head, _, tail = split(model, cuts)
        self.head = Stage(head, 0)
        self.tail = Stage(tail, cuts.middle_stop)
        self.head_optimizer = build_optimizer(head, 0, config.train)
        self.tail_optimizer = build_optimizer(tail, cuts.middle_stop, config.train)
        self.head_statistics = LayerStatistics(head, 0)
        self.tail_statistics = LayerStatistics(tail, cuts.middle_stop)
        self.max_batch = config.micro_batch_size
        self.clock = wire.CodecClock()
        # Stochastic rounding draws from its own seeded generator: runs repeat exactly.
        self.rounding = torch.Generator().manual_seed(config.model.seed + 1)
        self.decision = link.open(edge_name)
        self._apply(self.decision)

    def _apply(self, decision: Decision) -> None:
        for stage, optimizer in ((self.head, self.head_optimizer), (self.tail, self.tail_optimizer)):
            apply_decision(decision, stage, optimizer)

    @property
    def _optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.head_optimizer, self.tail_optimizer)

    def _frame(self, step: int, index: int = 0, **body: object) -> pb.StepFrame:
        return pb.StepFrame(session=self.link.session, step=step, micro_batch=index, **body)

    @staticmethod
    def _check_reply(frame: pb.StepFrame, step: int, kind: str, sent: int, seen: object) -> int:
        index = frame.micro_batch
        body = frame.WhichOneof("body")
        if frame.step != step or body != kind or not 0 <= index < sent or index in seen:
            raise LinkError(
                f"unexpected {body!r} frame from the cloud (step {frame.step}, micro-batch {index}) "
                f"while waiting for {kind} frames of step {step}"
            )
        return index

    def step(self, step: int, epoch: int, lr: float, x: torch.Tensor, y: torch.Tensor, epoch_end: bool) -> StepResult:
        """Stream the micro-batches through the cloud, then step both sides' optimizers."""
        boundary = self.decision.boundary
        head_trains = boundary < self.cuts.edge_head
        middle_trains = boundary < self.cuts.middle_stop
        loss_on_cloud = self.cuts.edge_tail == 0
        micro = _micro_batches(x, y, self.config.partition.chunks)
        chunks, samples = len(micro), len(y)
        codec = self.config.link

        for optimizer in self._optimizers:
            optimizer.zero_grad(set_to_none=True)
            set_learning_rate(optimizer, lr)
        self.head.begin_step()
        self.tail.begin_step()
        self.clock.take()
        call = self.link.step()
        try:
            call.send(
                self._frame(step, begin=pb.StepBegin(epoch=epoch, lr=lr, chunks=chunks, boundary=boundary, samples=samples))
            )
            expect_gradients = chunks if head_trains else 0
            sent = gradients = fp32_extra = 0
            losses: dict[int, torch.Tensor] = {}
            # Forward phase: micro-batch i+1 goes up before i comes back; outputs coming back
            # go through the tail as they arrive.
            while sent < chunks or len(losses) < (0 if loss_on_cloud else chunks):
                frame = call.poll() if sent < chunks else call.receive()
                if frame is None:
                    xi, yi = micro[sent]
                    activation = self.head.forward(sent, xi)
                    message = wire.encode_tensor(activation, codec.uplink, "activation", clock=self.clock)
                    fp32_extra += 4 * activation.numel() - payload_bytes(codec.uplink, tuple(activation.shape))
                    labels = yi.tolist() if loss_on_cloud else []
                    call.send(self._frame(step, sent, activation=message, labels=labels))
                    sent += 1
                    continue
                index = self._check_reply(frame, step, "activation", sent, losses)
                z = wire.decode_tensor(
                    frame.activation, sample_shape=self.downlink_shape, max_batch=self.max_batch,
                    what="downlink activation", clock=self.clock,
                )
                out = self.tail.forward(index, z, input_grad=middle_trains)
                losses[index] = _loss(out, micro[index][1], samples)
            # Backward phase, in reverse micro-batch order as torchgpipe.GPipe runs it, so that
            # gradients accumulate in the same order and the result is bit-identical.
            backward = 0.0
            for index in reversed(sorted(losses)):
                start = time.perf_counter()
                grad = self.tail.backward(index, loss=losses[index])
                backward += time.perf_counter() - start
                if middle_trains:
                    message = wire.encode_tensor(
                        grad, codec.gradients, "gradient", clock=self.clock, generator=self.rounding
                    )
                    call.send(self._frame(step, index, gradient=message))
            done_gradients: set[int] = set()
            while gradients < expect_gradients:
                frame = call.receive()
                index = self._check_reply(frame, step, "gradient", sent, done_gradients)
                grad = wire.decode_tensor(
                    frame.gradient, sample_shape=self.uplink_shape, max_batch=self.max_batch,
                    what="downlink gradient", clock=self.clock,
                )
                start = time.perf_counter()
                self.head.backward(index, grad)
                backward += time.perf_counter() - start
                done_gradients.add(index)
                gradients += 1
            total = sum(loss.item() for loss in losses.values())

            for optimizer in self._optimizers:
                optimizer.step()
            stats: list[LayerStat] = self.head_statistics.collect(epoch_end=epoch_end)
            stats += self.tail_statistics.collect(epoch_end=epoch_end)
            call.send(self._frame(step, end=pb.StepEnd(epoch_end=epoch_end, stats=wire.stats_to_message(stats))))
            reply = call.receive()
            if reply.WhichOneof("body") != "done":
                raise LinkError(f"expected the cloud's step-done frame, got {reply.WhichOneof('body')!r}")
            call.finish()
        except BaseException:
            call.cancel()
            self.head.abort_step()
            self.tail.abort_step()
            raise
        done = reply.done
        self.decision = wire.decision_from_message(done.decision)
        self._apply(self.decision)
        return StepResult(
            loss=done.loss if loss_on_cloud else total,
            decision=self.decision,
            edge_backward_seconds=backward,
            cloud_backward_seconds=done.backward_seconds,
            edge_codec_seconds=self.clock.take(),
            cloud_codec_seconds=(done.encode_seconds, done.decode_seconds),
            uplink_fp32_extra_bytes=fp32_extra,
        )

    def evaluate_many(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Logits of each batch in order: head here, middle on the cloud (forward-only), tail here."""

        def frames() -> Iterator[pb.EvalFrame]:
            for index, xb in enumerate(batches):
                activation = self.head.evaluate(xb)
                message = wire.encode_tensor(activation, self.config.link.uplink, "activation")
                yield pb.EvalFrame(session=self.link.session, batch=index, activation=message)

        for expected, reply in enumerate(self.link.evaluate(frames())):
            if reply.batch != expected:
                raise LinkError(f"evaluation reply for batch {reply.batch}, expected {expected}")
            z = wire.decode_tensor(
                reply.activation, sample_shape=self.downlink_shape, max_batch=self.max_batch,
                what="evaluation output",
            )
            yield self.tail.evaluate(z)

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

    def close(self) -> None:
        """End the session on the cloud."""
        self.link.close()
