"""Accounting of a run: its link traffic per epoch, and what freezing and the uplink codec saved."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

from torch import nn

from pipeline.codecs import payload_bytes
from pipeline.config import Config, ConfigError, parse_config
from pipeline.models import ModelError, build_configured
from pipeline.partition import cut_shapes, make_cuts, profile
from pipeline.runs import KindCounts, Run, RunFileError, StepRecord
from pipeline.traffic import KINDS

__all__ = [
    "EpochTraffic",
    "FreezeSavings",
    "UplinkCodecUse",
    "epoch_traffic",
    "freeze_savings",
    "uplink_codec_use",
]

_COUNTERS = tuple(KindCounts.model_fields)
# What a step frame carries besides its tensor payload (session id, step, micro-batch index,
# shape, codec name): 55-58 bytes measured on tinycnn frames, rounded up.  Quantization scales
# (a few bytes per channel) are not counted: this is an estimate for runs that froze at step 0.
_FRAME_OVERHEAD_BYTES = 64


@dataclass(frozen=True)
class EpochTraffic:
    """Link traffic of one epoch (``epoch`` None: the whole run), shaped like summary.json's ``traffic``."""

    epoch: int | None
    steps: int
    uplink_bytes: int
    downlink_bytes: int
    by_kind: dict[str, dict[str, int]]
    val_accuracy: float | None
    notes: tuple[str, ...]


class FreezeSavings(TypedDict):
    """What freezing saved against the same steps run unfrozen (see :func:`freeze_savings`)."""

    steps_frozen: int
    steps_frozen_head: int
    downlink_gradient_bytes_saved: int
    uplink_gradient_bytes_saved: int
    backward_flops_saved: int
    edge_backward_seconds_saved: float | None


@dataclass(frozen=True)
class UplinkCodecUse:
    """Training uplink activation bytes as sent with ``codec``, and as fp32 would have sent them."""

    codec: str
    sent_bytes: int
    fp32_bytes: int


def _empty_kinds() -> dict[str, dict[str, int]]:
    return {kind: dict.fromkeys(_COUNTERS, 0) for kind in KINDS}


def _event_note(boundary: int, previous: int, step: int) -> str:
    if boundary > previous:
        layers = f"layer {previous}" if boundary - previous == 1 else f"layers {previous}-{boundary - 1}"
        return f"froze {layers} at step {step}"
    if boundary == 0:
        return f"unfroze all layers at step {step}"
    return f"unfroze layers {boundary}-{previous - 1} at step {step}"


def epoch_traffic(run: Run) -> list[EpochTraffic]:
    """Traffic per epoch (numbered as in metrics.jsonl, from 0), then the run's total.

    An epoch's bytes are its training steps plus its evaluation; evaluation frames are
    activations (as the wire counts them), so they are added to the activation bytes, and
    messages count the steps' only.  The total comes from summary.json when there is one, which
    also counts what no epoch does: the handshake and the final weight fetch.
    """
    epochs = sorted({r.epoch for r in run.steps} | {r.epoch for r in run.evals})
    kinds = {epoch: _empty_kinds() for epoch in epochs}
    step_counts = dict.fromkeys(epochs, 0)
    accuracy: dict[int, float | None] = dict.fromkeys(epochs)
    for record in run.steps:
        step_counts[record.epoch] += 1
        # A federated run's step lines also hold the round's sync.
        for kind, counts in record.by_kind.model_dump(exclude_none=True).items():
            target = kinds[record.epoch].setdefault(kind, dict.fromkeys(_COUNTERS, 0))
            for key in _COUNTERS:
                target[key] += counts[key]
    for evaluation in run.evals:
        target = kinds[evaluation.epoch]["activation"]
        target["uplink_bytes"] += evaluation.uplink_bytes
        target["downlink_bytes"] += evaluation.downlink_bytes
        if evaluation.val_accuracy is not None:
            accuracy[evaluation.epoch] = evaluation.val_accuracy

    notes: dict[int, list[str]] = {epoch: [] for epoch in epochs}
    epoch_of_step = {r.step: r.epoch for r in run.steps}
    previous = 0
    for event in run.freeze_events():
        # An event takes effect at its step; one decided after the last step lands on the last epoch.
        epoch = epoch_of_step.get(event.step, epoch_of_step.get(event.step - 1))
        if epoch is not None:
            notes[epoch].append(_event_note(event.boundary, previous, event.step))
        previous = event.boundary

    rows = [
        EpochTraffic(
            epoch=epoch,
            steps=step_counts[epoch],
            uplink_bytes=sum(counts["uplink_bytes"] for counts in kinds[epoch].values()),
            downlink_bytes=sum(counts["downlink_bytes"] for counts in kinds[epoch].values()),
            by_kind=kinds[epoch],
            val_accuracy=accuracy[epoch],
            notes=tuple(notes[epoch]),
        )
        for epoch in epochs
    ]
    return [*rows, _total(run, rows)]


def _total(run: Run, rows: list[EpochTraffic]) -> EpochTraffic:
    if run.summary is not None:
        traffic = run.summary.traffic
        by_kind = traffic.by_kind.model_dump(exclude_none=True)
        up, down = traffic.uplink_bytes, traffic.downlink_bytes
        final = run.summary.final_val_accuracy
    else:
        present = sorted({kind for r in rows for kind in r.by_kind}, key=lambda k: (k not in KINDS, k))
        by_kind = {kind: {key: sum(r.by_kind.get(kind, {}).get(key, 0) for r in rows) for key in _COUNTERS}
                   for kind in present}
        up, down = sum(r.uplink_bytes for r in rows), sum(r.downlink_bytes for r in rows)
        final = rows[-1].val_accuracy if rows else None
    return EpochTraffic(
        epoch=None,
        steps=len(run.steps),
        uplink_bytes=up,
        downlink_bytes=down,
        by_kind=by_kind,
        val_accuracy=None if final is None or math.isnan(final) else final,
        notes=(),
    )


def freeze_savings(run: Run) -> FreezeSavings:
    """What freezing saved against the same steps run unfrozen (estimates; zeros when nothing froze).

    Gradient bytes of an unfrozen step come from the run's own steps that still sent them
    (their mean), else from the cut shapes and the gradient codec.  Downlink gradients stop
    once the boundary covers the edge head, uplink gradients once it covers the whole middle.
    Backward FLOPs count 2 x forward FLOPs of each frozen layer per sample.  Edge backward
    seconds compare with the mean of the steps run with nothing frozen (None without any).
    Needs summary.json (the configuration lives there): raises :class:`RunFileError` without.
    """
    config = _config(run)
    frozen = [r for r in run.steps if r.boundary > 0]
    result = FreezeSavings(
        steps_frozen=len(frozen),
        steps_frozen_head=0,
        downlink_gradient_bytes_saved=0,
        uplink_gradient_bytes_saved=0,
        backward_flops_saved=0,
        edge_backward_seconds_saved=0.0,
    )
    if not frozen:
        return result
    model = _build(config, run)
    cuts = make_cuts(len(model), config.partition.edge_head, config.partition.edge_tail)
    layer_flops = [p.flops for p in profile(model, config.model.input_shape, cuts)]
    batch = config.train.batch_size
    result["backward_flops_saved"] = sum(batch * 2 * sum(layer_flops[: r.boundary]) for r in frozen)
    result["steps_frozen_head"] = sum(1 for r in frozen if 0 < cuts.edge_head <= r.boundary)
    if not run.is_local:
        uplink_shape, downlink_shape = cut_shapes(model, config.model.input_shape, cuts)
        # dL/da of the head's output comes down while the head trains; dL/dz of the middle's
        # output goes up while the middle trains.  Without a head (tail) neither ever flows.
        if cuts.edge_head > 0:
            saved = _gradient_saved(run.steps, config, "downlink", cuts.edge_head, uplink_shape)
            result["downlink_gradient_bytes_saved"] = saved
        if cuts.edge_tail > 0:
            saved = _gradient_saved(run.steps, config, "uplink", cuts.middle_stop, downlink_shape)
            result["uplink_gradient_bytes_saved"] = saved

    unfrozen = [r.edge_backward_seconds for r in run.steps if r.boundary == 0]
    timed = all(r.edge_backward_seconds is not None for r in run.steps)
    if unfrozen and timed:
        mean = sum(unfrozen) / len(unfrozen)
        result["edge_backward_seconds_saved"] = sum(mean - r.edge_backward_seconds for r in frozen)
    else:
        result["edge_backward_seconds_saved"] = None
    return result


def uplink_codec_use(run: Run) -> UplinkCodecUse | None:
    """Training uplink activations as sent against fp32; None when the codec saved nothing (or no record)."""
    steps = [r for r in run.steps if r.uplink_activation_fp32_bytes is not None]
    sent = sum(r.by_kind.activation.uplink_bytes for r in steps)
    fp32 = sum(r.uplink_activation_fp32_bytes for r in steps)
    if not sent or sent >= fp32:
        return None
    config = run.summary.config if run.summary is not None else None
    codec = config["link"]["uplink"] if config and isinstance(config.get("link"), dict) else "the configured codec"
    return UplinkCodecUse(codec=str(codec), sent_bytes=sent, fp32_bytes=fp32)


def _config(run: Run) -> Config:
    summary_path = run.path / "summary.json"
    if run.summary is None:
        raise RunFileError(
            f"{summary_path} not found: freeze savings need the run's configuration, which the edge "
            "writes there when training ends; finish (or rerun) the training"
        )
    if run.summary.config is None:
        raise RunFileError(f"{summary_path}: expected a \"config\" object (the run's configuration sections)")
    try:
        return parse_config(run.summary.config, f"{summary_path} config")
    except ConfigError as exc:
        raise RunFileError(str(exc)) from None


def _build(config: Config, run: Run) -> nn.Sequential:
    try:
        return build_configured(config.model)
    except ModelError as exc:
        raise RunFileError(
            f"cannot rebuild model {config.model.name!r} of {run.path} to count FLOPs: {exc}; "
            "make the model importable where the report runs"
        ) from None


def _gradient_saved(
    steps: list[StepRecord], config: Config, direction: str, stop: int, shape: tuple[int, ...]
) -> int:
    """Gradient bytes not sent in ``direction`` by the steps whose boundary reached ``stop``."""
    stopped = [r.by_kind.gradient.sent(direction) for r in steps if r.boundary >= stop]
    sending = [r.by_kind.gradient.sent(direction) for r in steps if r.boundary < stop]
    per_step = sum(sending) / len(sending) if sending else _gradient_step_bytes(config, shape)
    # Minus what those steps still sent, so a side that kept sending shows no saving.
    return max(0, round(per_step * len(stopped) - sum(stopped)))


def _gradient_step_bytes(config: Config, sample_shape: tuple[int, ...]) -> float:
    # Micro-batches as torch.chunk cuts the mini-batch: equal pieces of ceil(B/M), the last smaller.
    batch, chunks = config.train.batch_size, config.partition.chunks
    size = -(-batch // chunks)
    sizes = [size] * (batch // size) + ([batch % size] if batch % size else [])
    codec = config.link.gradients
    return float(sum(payload_bytes(codec, (n, *sample_shape)) + _FRAME_OVERHEAD_BYTES for n in sizes))
