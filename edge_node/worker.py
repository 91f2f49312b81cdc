"""The edge's training loop (split over the link, or ``--local``) and the files a run leaves."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edge_node.engines import LocalEngine, SplitEngine, StepResult
from edge_node.link import CloudLink
from pipeline.checkpoint import save_json, save_state
from pipeline.config import Config
from pipeline.data import DataError, Dataset, load_dataset, mini_batches, training_batches
from pipeline.models import build_configured
from pipeline.optim import learning_rate
from pipeline.partition import make_cuts
from pipeline.traffic import TrafficCounts, TrafficMeter

__all__ = ["train"]

_MIB = float(1 << 20)


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


class _Progress:
    """Steps, loss and link MiB on stderr while training; one line per epoch on stdout."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  link {task.fields[mib]:.2f} MiB  boundary {task.fields[boundary]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=True,
        )
        self._task = self._progress.add_task("training", total=total, loss=math.nan, mib=0.0, boundary=0)

    def __enter__(self) -> _Progress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def step(self, loss: float, link_bytes: int, boundary: int) -> None:
        self._progress.update(self._task, advance=1, loss=loss, mib=link_bytes / _MIB, boundary=boundary)

    def epoch(self, line: str) -> None:
        print(line, flush=True)


def train(
    config: Config,
    *,
    run_dir: str | Path,
    cloud: str | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    edge_name: str = "edge",
) -> dict[str, Any]:
    """Train ``config`` split with the cloud at ``cloud`` (or in one process when it is None).

    Writes ``metrics.jsonl`` as it goes and ``summary.json`` and ``model.pt`` at the end, all in
    ``run_dir``; returns the summary.  Raises :class:`edge_node.link.LinkError` when the cloud
    fails, :class:`pipeline.data.DataError` for unusable data.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = epochs or config.train.epochs
    train_data, val_data = load_dataset(
        config.train.dataset,
        input_shape=config.model.input_shape,
        num_classes=config.model.num_classes,
        val_fraction=config.train.val_fraction,
        seed=config.model.seed,
    )
    steps_per_epoch = len(train_data) // config.train.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"the training set has {len(train_data)} samples, fewer than train.batch_size = {config.train.batch_size}"
        )
    limit = max_steps or config.train.max_steps
    total_steps = epochs * steps_per_epoch if limit is None else min(limit, epochs * steps_per_epoch)
    eval_batch = config.train.eval_batch_size or config.micro_batch_size

    model = build_configured(config.model)
    meter = TrafficMeter()
    engine: LocalEngine | SplitEngine
    if cloud is None:
        engine = LocalEngine(config, model)
    else:
        cuts = make_cuts(len(model), config.partition.edge_head, config.partition.edge_tail)
        engine = SplitEngine(config, model, cuts, CloudLink(cloud, config, model, meter), edge_name)

    freeze_events: list[dict[str, int]] = []
    boundary = engine.decision.boundary
    if boundary:
        freeze_events.append({"step": 0, "boundary": boundary})
    val_accuracy = math.nan
    step = 0
    totals = {"uplink_activation_fp32_bytes": 0, "edge_backward_seconds": 0.0, "cloud_backward_seconds": 0.0, "edge_encode_seconds": 0.0,
              "edge_decode_seconds": 0.0, "cloud_encode_seconds": 0.0, "cloud_decode_seconds": 0.0}
    metrics_path = run_dir / "metrics.jsonl"
    try:
        with metrics_path.open("w", encoding="utf-8") as metrics, _Progress(total_steps, progress) as bar:
            for epoch in range(epochs):
                if step >= total_steps:
                    break
                batches = training_batches(train_data, config.train.batch_size, seed=config.model.seed, epoch=epoch)
                for position, (x, y) in enumerate(batches):
                    if step >= total_steps:
                        break
                    epoch_end = position == steps_per_epoch - 1 or step == total_steps - 1
                    lr = learning_rate(config.train, step, total_steps)
                    before = meter.snapshot()
                    tick = time.perf_counter()
                    result = engine.step(step, epoch, lr, x, y, epoch_end)
                    seconds = time.perf_counter() - tick
                    line = _step_line(step, epoch, lr, boundary, seconds, result, meter.snapshot() - before)
                    for key in totals:
                        totals[key] += line[key]
                    _write(metrics, line)
                    if result.decision.boundary != boundary:
                        boundary = result.decision.boundary
                        freeze_events.append({"step": step + 1, "boundary": boundary})
                    step += 1
                    link = meter.snapshot()
                    bar.step(result.loss, link.total("uplink") + link.total("downlink"), boundary)
                before = meter.snapshot()
                val_loss, val_accuracy = _evaluate(engine, val_data, eval_batch)
                eval_traffic = (meter.snapshot() - before).to_json()
                _write(metrics, {"epoch": epoch, "val_loss": val_loss, "val_accuracy": val_accuracy, **eval_traffic})
                link = meter.snapshot()
                bar.epoch(
                    f"epoch {epoch + 1}/{epochs}: val_loss {val_loss:.4f}  val_accuracy {val_accuracy:.4f}  "
                    f"boundary {boundary}  link up {link.total('uplink') / _MIB:.2f} MiB  "
                    f"down {link.total('downlink') / _MIB:.2f} MiB"
                )
        state = engine.state_dict()
    finally:
        engine.close()
    save_state(state, run_dir / "model.pt")
    summary = {
        "mode": "local" if cloud is None else "split",
        "steps": step,
        "epochs": epochs,
        "wall_seconds": time.perf_counter() - started,
        "final_val_accuracy": val_accuracy,
        "traffic": meter.snapshot().to_json(),
        "freeze_events": freeze_events,
        **{key: round(value, 6) if isinstance(value, float) else value for key, value in totals.items()},
        "config": config.to_dict(),
    }
    save_json(summary, run_dir / "summary.json")
    return summary


def _write(handle: TextIO, record: dict[str, Any]) -> None:
    # One flushed line per record: a crash loses at most the line being written.
    handle.write(json.dumps(record) + "\n")
    handle.flush()
