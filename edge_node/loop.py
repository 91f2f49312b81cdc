"""The training loop's state between steps: a step, an evaluation, their metrics lines, and what a checkpoint keeps."""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import torch.nn.functional as F

from edge_node.engines import NextStep, StepResult
from edge_node.recovery import (
    EdgeCheckpoints, Engine, RunDirError, RunPlan, restore_engine, traffic_from_json, traffic_sum, traffic_to_json,
)
from pipeline.checkpoint import truncate_lines
from pipeline.config import Config
from pipeline.data import Dataset, mini_batches, training_batches, training_indices
from pipeline.optim import learning_rate
from pipeline.skip import Decision
from pipeline.timeline import StepTimeline
from pipeline.traffic import TrafficCounts, TrafficMeter

__all__ = ["EpochReport", "Run", "StepReport"]


@dataclass(frozen=True)
class StepReport:
    """Passed to ``on_step`` after every optimizer step; ``record`` is its metrics.jsonl line."""

    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float
    boundary: int
    link_bytes: int
    record: dict[str, Any]


@dataclass(frozen=True)
class EpochReport:
    """Passed to ``on_epoch`` after every evaluation; ``record`` is its metrics.jsonl line."""

    epoch: int
    epochs: int
    val_loss: float
    val_accuracy: float
    boundary: int
    uplink_bytes: int
    downlink_bytes: int
    record: dict[str, Any]


_TIMING_KEYS = ("uplink_activation_fp32_bytes", "edge_backward_seconds", "cloud_backward_seconds",
                "edge_encode_seconds", "edge_decode_seconds", "cloud_encode_seconds", "cloud_decode_seconds")


def _step_line(
    step: int, epoch: int, lr: float, ran_with: Decision, seconds: float, result: StepResult, traffic: TrafficCounts
) -> dict[str, Any]:
    counts = traffic.to_json()
    return {
        "step": step,
        "epoch": epoch,
        "loss": result.loss,
        "lr": lr,
        "boundary": ran_with.boundary,
        "frozen_parameters": ran_with.frozen_parameters,
        "step_seconds": seconds,
        "uplink_bytes": counts["uplink_bytes"],
        "downlink_bytes": counts["downlink_bytes"],
        "by_kind": counts["by_kind"],
        "edge_encode_seconds": result.edge_codec_seconds[0],
        "edge_decode_seconds": result.edge_codec_seconds[1],
        "cloud_encode_seconds": result.cloud_codec_seconds[0],
        "cloud_decode_seconds": result.cloud_codec_seconds[1],
        "uplink_activation_fp32_bytes": counts["by_kind"]["activation"]["uplink_bytes"] + result.uplink_fp32_extra_bytes,
        "edge_backward_seconds": result.edge_backward_seconds,
        "cloud_backward_seconds": result.cloud_backward_seconds,
    }


def _evaluate(engine: Engine, data: Dataset, batch_size: int) -> tuple[float, float]:
    inputs, labels = [], []
    for x, y in mini_batches(data, batch_size, shuffle_seed=None, drop_last=False):
        inputs.append(x)
        labels.append(y)
    loss_sum = 0.0
    correct = 0
    for logits, y in zip(engine.evaluate_many(inputs), labels, strict=True):
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
    return loss_sum / len(data), correct / len(data)


#: What the summary totals besides the timing columns: the edge's checkpoints and their save time.
_CHECKPOINT_KEYS = ("checkpoints", "checkpoint_seconds")


class Run:
    """The state of the training loop that outlives one step, and the part of it a checkpoint keeps.

    Call :meth:`rewind` with the run's engine before the first step, and after losing the cloud
    with a fresh one.
    """

    def __init__(
        self, config: Config, meter: TrafficMeter, checkpoints: EdgeCheckpoints, plan: RunPlan, *,
        on_step: Callable[[StepReport], None] | None, on_epoch: Callable[[EpochReport], None] | None,
        on_link: Callable[[str], None], tracing: bool,
    ) -> None:
        self.config, self.meter, self.checkpoints = config, meter, checkpoints
        self.epochs, self.total_steps, self.steps_per_epoch = plan.epochs, plan.total_steps, plan.steps_per_epoch
        self.on_step, self.on_epoch, self.on_link, self.tracing = on_step, on_epoch, on_link, tracing
        self.metrics_path = checkpoints.store.directory.parent / "metrics.jsonl"
        self.engine: Engine | None = None
        self.metrics: TextIO | None = None
        self.origin = time.perf_counter()
        self.wall_base = 0.0
        #: Each traced step's timeline and when it began, in seconds since the run began.
        self.timelines: list[tuple[float, StepTimeline]] = []
        self.unconfirmed = False
        self._restore(None)

    def _restore(self, meta: dict[str, Any] | None) -> None:
        """The loop's state after the checkpoint ``meta`` (None: before the first step)."""
        meta = meta or {}
        self.step = meta.get("step", -1) + 1
        self.lines = meta.get("metrics_lines", 0)
        self.freeze_events = list(meta.get("freeze_events", []))
        zero = {key: 0 if key in ("uplink_activation_fp32_bytes", "checkpoints") else 0.0
                for key in (*_TIMING_KEYS, *_CHECKPOINT_KEYS)}
        self.totals: dict[str, float] = zero | meta.get("totals", {})
        accuracy = meta.get("val_accuracy")
        self.val_accuracy = math.nan if accuracy is None else accuracy
        self.traffic_base = traffic_from_json(meta.get("traffic", []))
        self.traffic_mark = self.meter.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """The loop's part of the checkpoint of the step just done."""
        return {
            "epoch": (self.step - 1) // self.steps_per_epoch,
            "metrics_lines": self.lines,
            "freeze_events": self.freeze_events,
            "totals": self.totals,
            "traffic": traffic_to_json(self.traffic()),
            "val_accuracy": None if math.isnan(self.val_accuracy) else self.val_accuracy,
            "wall_seconds": self.wall_seconds(),
        }

    def rewind(self, engine: Engine) -> int | None:
        """Restore ``engine`` (freshly built) and the loop to the run's latest checkpoint, or to the
        start when it has none; cut metrics.jsonl back to match. Returns the checkpoint's step."""
        latest = self.checkpoints.latest()
        if latest is not None:
            restore_engine(engine, *latest)
        meta = None if latest is None else latest[1]
        if self.engine is None and meta is not None:
            self.wall_base = meta["wall_seconds"]
        self._restore(meta)
        self.close_metrics()
        if self.lines:
            try:
                truncate_lines(self.metrics_path, self.lines)
            except ValueError as exc:  # fewer lines than the checkpoint counted: not this run's file
                raise RunDirError(str(exc)) from None
        # From the start, whatever metrics.jsonl held goes; else it continues after the checkpoint's lines.
        self.metrics = self.metrics_path.open("a" if self.lines else "w", encoding="utf-8")
        self.timelines = [entry for entry in self.timelines if entry[1].step < self.step]
        self.engine = engine
        return None if meta is None else meta["step"]

    def opened(self) -> None:
        """The engine is ready for the next step: a run that starts at step 0 notes its first boundary."""
        self.boundary = self.engine.decision.boundary
        if self.step == 0:
            self.freeze_events = [{"step": 0, "boundary": self.boundary}] if self.boundary else []

    def traffic(self) -> TrafficCounts:
        """The run's link traffic: what its checkpoint counted, and what crossed since."""
        return traffic_sum(self.traffic_base, self.meter.snapshot() - self.traffic_mark)

    def wall_seconds(self) -> float:
        """Seconds of training; a resumed run counts its checkpoint's and its own."""
        return self.wall_base + time.perf_counter() - self.origin

    def train_epoch(self, epoch: int, data: Dataset) -> None:
        train = self.config.train
        seed = self.config.model.seed
        batches = zip(training_batches(data, train.batch_size, seed=seed, epoch=epoch),
                      training_indices(data, train.batch_size, seed=seed, epoch=epoch), strict=True)
        # A resumed epoch starts where its checkpoint left it.
        first = self.step - epoch * self.steps_per_epoch
        # One batch ahead: the engine may begin the next step while this one drains.
        pending = itertools.islice(enumerate(batches), first, None)
        current = next(pending, None)
        while current is not None and self.step < self.total_steps:
            position, ((x, y), indices) = current
            current = next(pending, None)
            epoch_end = position == self.steps_per_epoch - 1 or self.step == self.total_steps - 1
            self.train_step(epoch, x, y, indices, epoch_end, None if current is None else current[1])

    def _checkpoint_due(self, epoch_end: bool) -> bool:
        # The last step's state is model.pt.
        every = self.config.checkpoint.every_steps
        return ((self.step + 1) % every == 0 or epoch_end) and self.step != self.total_steps - 1

    def train_step(
        self, epoch: int, x: Any, y: Any, indices: Any, epoch_end: bool,
        following: tuple[tuple[Any, Any], Any] | None,
    ) -> None:
        """One optimizer step on ``(x, y)`` (samples ``indices`` of the training set); ``following``
        is the epoch's next batch and its indices, if any."""
        lr = learning_rate(self.config.train, self.step, self.total_steps)
        checkpoint = self._checkpoint_due(epoch_end)
        # The next step may begin early only when nothing happens between the two: no evaluation
        # (epoch end), no checkpoint (it saves this step's state), and a next step to take.
        ahead = None
        if following is not None and not epoch_end and not checkpoint:
            (next_x, next_y), next_indices = following
            ahead = NextStep(self.step + 1, epoch, learning_rate(self.config.train, self.step + 1, self.total_steps),
                             next_x, next_y, next_indices)
        before, ran_with = self.meter.snapshot(), self.engine.decision
        tick = time.perf_counter()
        result = self.engine.step(self.step, epoch, lr, x, y, epoch_end, checkpoint, ahead, indices)
        seconds = time.perf_counter() - tick
        if self.tracing and result.timeline is not None:
            # A step the engine began early starts before it was called.
            self.timelines.append((result.timeline.began - self.origin, result.timeline))
        traffic = self.meter.snapshot() - before if result.traffic is None else result.traffic
        line = _step_line(self.step, epoch, lr, ran_with, seconds, result, traffic)
        for key in _TIMING_KEYS:
            self.totals[key] += line[key]
        self._write(line)
        if result.decision.boundary != self.boundary:
            self.boundary = result.decision.boundary
            self.freeze_events.append({"step": self.step + 1, "boundary": self.boundary})
        self.step += 1
        if result.checkpointed:
            self.totals["checkpoints"] += 1
            self.totals["checkpoint_seconds"] += self.checkpoints.save(self.step - 1, self.engine, self.snapshot())
        elif checkpoint and not self.unconfirmed:
            self.unconfirmed = True
            self.on_link(f"the cloud did not save its half of step {self.step - 1}: this run cannot be resumed "
                         "(start the cloud with --state-dir)")
        if self.on_step is not None:
            link = self.traffic()
            self.on_step(StepReport(self.step - 1, self.total_steps, epoch, self.epochs, result.loss, self.boundary,
                                    link.total("uplink") + link.total("downlink"), line))

    def evaluate(self, epoch: int, data: Dataset, batch_size: int) -> None:
        before = self.meter.snapshot()
        val_loss, self.val_accuracy = _evaluate(self.engine, data, batch_size)
        eval_traffic = (self.meter.snapshot() - before).to_json()
        line = {"epoch": epoch, "val_loss": val_loss, "val_accuracy": self.val_accuracy, **eval_traffic}
        self._write(line)
        if self.on_epoch is not None:
            link = self.traffic()
            self.on_epoch(EpochReport(epoch, self.epochs, val_loss, self.val_accuracy, self.boundary,
                                      link.total("uplink"), link.total("downlink"), line))

    def _write(self, record: dict[str, Any]) -> None:
        # One flushed line per record: a crash loses at most the line being written.
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        self.lines += 1

    def close_metrics(self) -> None:
        """Close metrics.jsonl (every line is already flushed)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def summary(self, mode: str, status: str, reason: str | None = None) -> dict[str, Any]:
        """summary.json of the run as it stands: ``status`` completed, interrupted or failed (with ``reason``)."""
        summary = {
            "mode": mode,
            "status": status,
            **({"reason": reason} if reason else {}),
            "run_id": self.checkpoints.run_id,
            "steps": self.step,
            "epochs": self.epochs,
            "wall_seconds": self.wall_seconds(),
            "final_val_accuracy": self.val_accuracy,
            "traffic": self.traffic().to_json(by_phase=True),
            "freeze_events": self.freeze_events,
            **{key: round(value, 6) if isinstance(value, float) else value for key, value in self.totals.items()},
            "config": self.config.to_dict(),
        }
        return summary
