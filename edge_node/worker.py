"""The edge's training loop (split over the link, or ``--local``) and the files a run leaves."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch.nn.functional as F
from torch import nn

from edge_node.engines import LocalEngine, SplitEngine, StepResult
from edge_node.link import CloudLink, LinkSecurity
from pipeline.blueprint import Blueprint
from pipeline.checkpoint import save_json, save_state
from pipeline.config import Config
from pipeline.data import DataError, Dataset, as_dataset, load_dataset, mini_batches, training_batches
from pipeline.optim import learning_rate
from pipeline.timeline import StepTimeline, write_trace
from pipeline.traffic import TrafficCounts, TrafficMeter

__all__ = ["EpochReport", "StepReport", "train"]


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
    step: int, epoch: int, lr: float, boundary: int, seconds: float, result: StepResult, traffic: TrafficCounts
) -> dict[str, Any]:
    counts = traffic.to_json()
    return {
        "step": step,
        "epoch": epoch,
        "loss": result.loss,
        "lr": lr,
        "boundary": boundary,
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


def _evaluate(engine: LocalEngine | SplitEngine, data: Dataset, batch_size: int) -> tuple[float, float]:
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


@dataclass
class _Run:
    """The state of the training loop that outlives one step."""

    config: Config
    engine: LocalEngine | SplitEngine
    meter: TrafficMeter
    metrics: TextIO
    epochs: int
    total_steps: int
    steps_per_epoch: int
    on_step: Callable[[StepReport], None] | None
    on_epoch: Callable[[EpochReport], None] | None
    tracing: bool = False
    step: int = 0
    val_accuracy: float = math.nan

    def __post_init__(self) -> None:
        self.boundary = self.engine.decision.boundary
        self.freeze_events = [{"step": 0, "boundary": self.boundary}] if self.boundary else []
        self.totals: dict[str, float] = dict.fromkeys(_TIMING_KEYS, 0.0)
        self.totals["uplink_activation_fp32_bytes"] = 0
        self.origin = time.perf_counter()
        #: Each traced step's timeline and when it began, in seconds since the run began.
        self.timelines: list[tuple[float, StepTimeline]] = []

    def train_epoch(self, epoch: int, data: Dataset) -> None:
        train = self.config.train
        batches = training_batches(data, train.batch_size, seed=self.config.model.seed, epoch=epoch)
        for position, (x, y) in enumerate(batches):
            if self.step >= self.total_steps:
                break
            epoch_end = position == self.steps_per_epoch - 1 or self.step == self.total_steps - 1
            self.train_step(epoch, x, y, epoch_end)

    def train_step(self, epoch: int, x: Any, y: Any, epoch_end: bool) -> None:
        lr = learning_rate(self.config.train, self.step, self.total_steps)
        before = self.meter.snapshot()
        tick = time.perf_counter()
        result = self.engine.step(self.step, epoch, lr, x, y, epoch_end)
        seconds = time.perf_counter() - tick
        if self.tracing and result.timeline is not None:
            self.timelines.append((tick - self.origin, result.timeline))
        line = _step_line(self.step, epoch, lr, self.boundary, seconds, result, self.meter.snapshot() - before)
        for key in self.totals:
            self.totals[key] += line[key]
        _write(self.metrics, line)
        if result.decision.boundary != self.boundary:
            self.boundary = result.decision.boundary
            self.freeze_events.append({"step": self.step + 1, "boundary": self.boundary})
        self.step += 1
        if self.on_step is not None:
            link = self.meter.snapshot()
            self.on_step(StepReport(self.step - 1, self.total_steps, epoch, self.epochs, result.loss, self.boundary,
                                    link.total("uplink") + link.total("downlink"), line))

    def evaluate(self, epoch: int, data: Dataset, batch_size: int) -> None:
        before = self.meter.snapshot()
        val_loss, self.val_accuracy = _evaluate(self.engine, data, batch_size)
        eval_traffic = (self.meter.snapshot() - before).to_json()
        line = {"epoch": epoch, "val_loss": val_loss, "val_accuracy": self.val_accuracy, **eval_traffic}
        _write(self.metrics, line)
        if self.on_epoch is not None:
            link = self.meter.snapshot()
            self.on_epoch(EpochReport(epoch, self.epochs, val_loss, self.val_accuracy, self.boundary,
                                      link.total("uplink"), link.total("downlink"), line))


def train(
    config: Config,
    *,
    run_dir: str | Path,
    cloud: str | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    edge_name: str = "edge",
    connect_timeout: float = 30.0,
    security: LinkSecurity | None = None,
    model_factory: Callable[[], nn.Sequential] | None = None,
    data: tuple[Any, Any] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    trace: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``config`` split with the cloud at ``cloud`` (``HOST:PORT``), or in one process when it is None.

    Quiet: progress goes to ``on_step`` / ``on_epoch`` when given. ``security`` is how the
    link checks the cloud and proves this edge (None: clear text to loopback only). ``model_factory`` builds
    the model instead of ``[model] name`` (the cloud must be served with the same);
    ``data`` is ``(train, validation)`` instead of ``[train] dataset``, each anything
    :func:`pipeline.data.as_dataset` takes (a torch ``Dataset`` or an ``(inputs, labels)`` pair). Writes
    ``metrics.jsonl`` as it goes and ``summary.json`` and ``model.pt`` at the end, all in
    ``run_dir``, and with ``trace`` a Chrome/Perfetto trace of every split step there; returns the summary. Raises :class:`pipeline.config.ConfigError` for a
    configuration that cannot train, :class:`pipeline.trust.TrustError` for unusable
    ``security``, :class:`edge_node.link.LinkError` when the cloud fails or refuses,
    :class:`pipeline.data.DataError` for unusable data and :class:`OSError` when the run
    directory cannot be written.
    """
    started = time.perf_counter()
    blueprint = Blueprint(config, model_factory)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = epochs or config.train.epochs
    train_data, val_data = _datasets(config, data)
    steps_per_epoch = len(train_data) // config.train.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"the training set has {len(train_data)} samples, fewer than train.batch_size = {config.train.batch_size}"
        )
    limit = max_steps or config.train.max_steps
    total_steps = epochs * steps_per_epoch if limit is None else min(limit, epochs * steps_per_epoch)
    eval_batch = config.train.eval_batch_size or config.micro_batch_size

    meter = TrafficMeter()
    engine: LocalEngine | SplitEngine
    with (run_dir / "metrics.jsonl").open("w", encoding="utf-8") as metrics:
        if cloud is None:
            engine = LocalEngine(blueprint)
        else:
            link = CloudLink(cloud, config, blueprint.model, meter, connect_timeout=connect_timeout, security=security)
            engine = SplitEngine(blueprint, link, edge_name, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        try:
            run = _Run(config, engine, meter, metrics, epochs, total_steps, steps_per_epoch, on_step, on_epoch,
                       tracing=trace is not None)
            for epoch in range(epochs):
                if run.step >= total_steps:
                    break
                run.train_epoch(epoch, train_data)
                run.evaluate(epoch, val_data, eval_batch)
            state = engine.state_dict()
        finally:
            engine.close()
    save_state(state, run_dir / "model.pt")
    if trace is not None:
        write_trace(trace, [t for _, t in run.timelines], step_starts=[start for start, _ in run.timelines])
    summary = {
        "mode": "local" if cloud is None else "split",
        "steps": run.step,
        "epochs": epochs,
        "wall_seconds": time.perf_counter() - started,
        "final_val_accuracy": run.val_accuracy,
        "traffic": meter.snapshot().to_json(by_phase=True),
        "freeze_events": run.freeze_events,
        **{key: round(value, 6) if isinstance(value, float) else value for key, value in run.totals.items()},
        "config": config.to_dict(),
    }
    save_json(summary, run_dir / "summary.json")
    return summary


def _datasets(config: Config, data: tuple[Any, Any] | None) -> tuple[Dataset, Dataset]:
    model = config.model
    if data is None:
        return load_dataset(
            config.train.dataset, input_shape=model.input_shape, num_classes=model.num_classes,
            val_fraction=config.train.val_fraction, seed=model.seed,
        )
    if not (isinstance(data, tuple) and len(data) == 2):
        raise DataError("data must be a (training, validation) pair")
    return tuple(  # type: ignore[return-value]
        as_dataset(part, input_shape=model.input_shape, num_classes=model.num_classes, what=what)
        for part, what in zip(data, ("training data", "validation data"))
    )


def _write(handle: TextIO, record: dict[str, Any]) -> None:
    # One flushed line per record: a crash loses at most the line being written.
    handle.write(json.dumps(record) + "\n")
    handle.flush()
