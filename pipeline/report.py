"""Run reports: read a run directory and present its link traffic as tables and a plot."""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from torch import nn

from pipeline.checkpoint import write_atomically
from pipeline.codecs import payload_bytes
from pipeline.config import Config, ConfigError, parse_config
from pipeline.models import ModelError, build_configured
from pipeline.partition import cut_shapes, make_cuts, profile
from pipeline.traffic import DIRECTIONS, KINDS

__all__ = [
    "EpochTraffic",
    "ReportError",
    "Run",
    "epoch_traffic",
    "freeze_savings",
    "load_run",
    "plot_traffic",
    "render_report",
    "traffic_table",
]

_MIB = float(1 << 20)
_COUNTERS = ("uplink_bytes", "downlink_bytes", "messages")
# What a step frame carries besides its tensor payload (session id, step, micro-batch index,
# shape, codec name): 55-58 bytes measured on tinycnn frames, rounded up.  Quantization scales
# (a few bytes per channel) are not counted: this is an estimate for runs that froze at step 0.
_FRAME_OVERHEAD_BYTES = 64
_SHORT_KIND = {"activation": "act", "gradient": "grad", "control": "ctrl"}


class ReportError(ValueError):
    """A run directory is missing or unreadable; the message names the file and what is expected."""


@dataclass(frozen=True)
class Run:
    """One run directory: its step and evaluation records and, once training ended, its summary."""

    path: Path
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    summary: dict[str, Any] | None


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


def load_run(run_dir: str | Path) -> Run:
    """Read ``metrics.jsonl`` and (if training finished) ``summary.json`` from ``run_dir``.

    A truncated last metrics line, as a crash mid-write leaves, is dropped with a warning;
    any other malformed line is an error.  Keys this reader does not know are ignored.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory {path} does not exist; pass the --run-dir an edge worker wrote")
    steps, evals = _read_metrics(path / "metrics.jsonl")
    summary_path = path / "summary.json"
    summary = _read_summary(summary_path) if summary_path.exists() else None
    return Run(path=path, steps=steps, evals=evals, summary=summary)


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(
            f"{path} not found: a run directory is what `edgepipe-edge --run-dir DIR` writes "
            "(metrics.jsonl, summary.json)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    steps: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            # The worker writes each line with its newline in one flushed write, so only an
            # unterminated last line can be a crash's leftover; anything else is corruption.
            if number == len(lines):
                warnings.warn(f"{where}: ignoring a truncated last line (the run was interrupted)", stacklevel=3)
                continue
            raise ReportError(f"{where}: not valid JSON ({exc.msg}); expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise ReportError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "step" in record:
            for key in ("step", "epoch", "boundary", "uplink_bytes", "downlink_bytes"):
                _need_int(record, key, where)
            _check_by_kind(record, where)
            steps.append(record)
        elif "epoch" in record:
            _need_int(record, "epoch", where)
            for key in ("uplink_bytes", "downlink_bytes"):
                if key in record:
                    _need_int(record, key, where)
            evals.append(record)
        else:
            raise ReportError(
                f"{where}: neither a step record (with \"step\") nor an evaluation record (with \"epoch\")"
            )
    return steps, evals


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg}); expected the summary an edge worker writes") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    traffic = summary.get("traffic")
    if not isinstance(traffic, dict):
        raise ReportError(f"{path}: expected a \"traffic\" object with uplink_bytes, downlink_bytes and by_kind")
    for key in ("uplink_bytes", "downlink_bytes"):
        _need_int(traffic, key, f"{path}, traffic")
    _check_by_kind(traffic, f"{path}, traffic")
    events = summary.get("freeze_events")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ReportError(f"{path}: expected \"freeze_events\" to be a list of {{\"step\", \"boundary\"}} objects")
    for event in events:
        _need_int(event, "step", f"{path}, freeze_events")
        _need_int(event, "boundary", f"{path}, freeze_events")
    return summary


def _need_int(record: dict[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReportError(f"{where}: expected {key!r} to be an integer, got {value!r}")
    return value


def _check_by_kind(record: dict[str, Any], where: str) -> None:
    by_kind = record.get("by_kind")
    if not isinstance(by_kind, dict):
        raise ReportError(f"{where}: expected a \"by_kind\" object with the kinds {', '.join(KINDS)}")
    for kind in KINDS:
        counts = by_kind.get(kind)
        if not isinstance(counts, dict):
            raise ReportError(f"{where}: by_kind lacks {kind!r}; expected {', '.join(_COUNTERS)} per kind")
        for key in _COUNTERS:
            _need_int(counts, key, f"{where}, by_kind.{kind}")


def _freeze_events(run: Run) -> list[dict[str, int]]:
    if run.summary is not None:
        return list(run.summary["freeze_events"])
    # No summary (the run did not finish): the boundary each step ran with tells the same story.
    events, previous = [], 0
    for record in run.steps:
        if record["boundary"] != previous:
            events.append({"step": record["step"], "boundary": record["boundary"]})
            previous = record["boundary"]
    return events


def _event_note(boundary: int, previous: int, step: int) -> str:
    if boundary > previous:
        layers = f"layer {previous}" if boundary - previous == 1 else f"layers {previous}-{boundary - 1}"
        return f"froze {layers} at step {step}"
    if boundary == 0:
        return f"unfroze all layers at step {step}"
    return f"unfroze layers {boundary}-{previous - 1} at step {step}"


def _empty_kinds() -> dict[str, dict[str, int]]:
    return {kind: dict.fromkeys(_COUNTERS, 0) for kind in KINDS}


def epoch_traffic(run: Run) -> list[EpochTraffic]:
    """Traffic per epoch, then the run's total (from summary.json when there is one).

    An epoch's bytes are its training steps plus its evaluation; evaluation lines carry no
    per-kind split, and evaluation frames are activations (as the wire counts them), so
    they are added to the activation bytes.  The total also counts what no epoch does:
    the handshake and the final weight fetch.
    """
    epochs = sorted({r["epoch"] for r in run.steps} | {r["epoch"] for r in run.evals})
    kinds = {epoch: _empty_kinds() for epoch in epochs}
    step_counts = dict.fromkeys(epochs, 0)
    accuracy: dict[int, float | None] = dict.fromkeys(epochs)
    for record in run.steps:
        step_counts[record["epoch"]] += 1
        for kind in KINDS:
            for key in _COUNTERS:
                kinds[record["epoch"]][kind][key] += record["by_kind"][kind][key]
    for record in run.evals:
        target = kinds[record["epoch"]]["activation"]
        for key in ("uplink_bytes", "downlink_bytes"):
            target[key] += record.get(key, 0)
        if isinstance(record.get("val_accuracy"), (int, float)):
            accuracy[record["epoch"]] = float(record["val_accuracy"])

    notes: dict[int, list[str]] = {epoch: [] for epoch in epochs}
    epoch_of_step = {r["step"]: r["epoch"] for r in run.steps}
    previous = 0
    for event in _freeze_events(run):
        # An event takes effect at its step; one decided after the last step lands on the last epoch.
        epoch = epoch_of_step.get(event["step"], epoch_of_step.get(event["step"] - 1))
        if epoch is not None:
            notes[epoch].append(_event_note(event["boundary"], previous, event["step"]))
        previous = event["boundary"]

    rows = [
        EpochTraffic(
            epoch=epoch,
            steps=step_counts[epoch],
            uplink_bytes=sum(kinds[epoch][k]["uplink_bytes"] for k in KINDS),
            downlink_bytes=sum(kinds[epoch][k]["downlink_bytes"] for k in KINDS),
            by_kind=kinds[epoch],
            val_accuracy=accuracy[epoch],
            notes=tuple(notes[epoch]),
        )
        for epoch in epochs
    ]
    if run.summary is not None:
        traffic = run.summary["traffic"]
        total_kinds = {kind: {key: traffic["by_kind"][kind][key] for key in _COUNTERS} for kind in KINDS}
        total_up, total_down = traffic["uplink_bytes"], traffic["downlink_bytes"]
        final = run.summary.get("final_val_accuracy")
    else:
        total_kinds = {kind: {key: sum(r.by_kind[kind][key] for r in rows) for key in _COUNTERS} for kind in KINDS}
        total_up, total_down = sum(r.uplink_bytes for r in rows), sum(r.downlink_bytes for r in rows)
        final = rows[-1].val_accuracy if rows else None
    total = EpochTraffic(
        epoch=None,
        steps=len(run.steps),
        uplink_bytes=total_up,
        downlink_bytes=total_down,
        by_kind=total_kinds,
        val_accuracy=float(final) if isinstance(final, (int, float)) and not math.isnan(final) else None,
        notes=(),
    )
    return [*rows, total]


def _mib(nbytes: int) -> str:
    return f"{nbytes / _MIB:.3f}"


def traffic_table(run: Run) -> Table:
    """The link traffic table: one row per epoch and a total row, per direction and per kind.

    Rows where the freeze boundary moved are highlighted and say so in the notes column.
    """
    rows = epoch_traffic(run)
    table = Table(title=f"link traffic of {run.path.resolve().name} (MiB)", caption=_caption(run, rows))
    table.add_column("epoch", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("up", justify="right")
    table.add_column("down", justify="right")
    for kind in KINDS:
        short = _SHORT_KIND[kind]
        table.add_column(f"{short}\nup", justify="right")
        table.add_column(f"{short}\ndown", justify="right")
        table.add_column(f"{short}\nmsgs", justify="right")
    table.add_column("val acc", justify="right")
    table.add_column("notes")
    for row in rows:
        if row.epoch is None:
            table.add_section()
        cells = [
            "total" if row.epoch is None else str(row.epoch),
            str(row.steps),
            _mib(row.uplink_bytes),
            _mib(row.downlink_bytes),
        ]
        for kind in KINDS:
            counts = row.by_kind[kind]
            cells += [_mib(counts["uplink_bytes"]), _mib(counts["downlink_bytes"]), str(counts["messages"])]
        cells += ["" if row.val_accuracy is None else f"{row.val_accuracy:.4f}", "; ".join(row.notes)]
        style = "bold" if row.epoch is None else ("bold yellow" if row.notes else None)
        table.add_row(*cells, style=style)
    return table


def _caption(run: Run, rows: list[EpochTraffic]) -> str:
    if run.summary is not None and run.summary.get("mode") == "local":
        return "local run: nothing crossed a link"
    epochs_only = (
        "epoch rows: training steps plus evaluation bytes (evaluation counted as activation, messages: steps only)"
    )
    if run.summary is None:
        return f"{epochs_only}; total: their sum (no summary.json: the run did not finish)"
    total = rows[-1]
    up = total.uplink_bytes - sum(r.uplink_bytes for r in rows[:-1])
    down = total.downlink_bytes - sum(r.downlink_bytes for r in rows[:-1])
    return (
        f"{epochs_only}; total: summary.json, which also counts the handshake and final weight fetch "
        f"(+{up / 1024:.1f} KiB up, +{down / 1024:.1f} KiB down)"
    )


def freeze_savings(run: Run) -> dict[str, Any]:
    """What freezing saved against the same steps run unfrozen (estimates; zeros when nothing froze).

    Gradient bytes of an unfrozen step come from the run's own steps that still sent them
    (their mean), else from the cut shapes and the gradient codec.  Downlink gradients stop
    once the boundary covers the edge head, uplink gradients once it covers the whole middle.
    Backward FLOPs count 2 x forward FLOPs of each frozen layer per sample.  Edge backward
    seconds compare with the mean of the steps run with nothing frozen (None without any).
    Needs summary.json: the configuration lives there.
    """
    config = _config(run)
    frozen = [r for r in run.steps if r["boundary"] > 0]
    result: dict[str, Any] = {
        "steps_frozen": len(frozen),
        "steps_frozen_head": 0,
        "downlink_gradient_bytes_saved": 0,
        "uplink_gradient_bytes_saved": 0,
        "backward_flops_saved": 0,
        "edge_backward_seconds_saved": 0.0,
    }
    if not frozen:
        return result
    model = _build(config, run)
    cuts = make_cuts(len(model), config.partition.edge_head, config.partition.edge_tail)
    layer_flops = [p.flops for p in profile(model, config.model.input_shape, cuts)]
    batch = config.train.batch_size
    result["backward_flops_saved"] = sum(batch * 2 * sum(layer_flops[: r["boundary"]]) for r in frozen)

    head_frozen = [r for r in frozen if cuts.edge_head > 0 and r["boundary"] >= cuts.edge_head]
    result["steps_frozen_head"] = len(head_frozen)
    if run.summary.get("mode") != "local":
        uplink_shape, downlink_shape = cut_shapes(model, config.model.input_shape, cuts)
        # dL/da of the head's output comes down while the head trains; dL/dz of the middle's
        # output goes up while the middle trains.  Without a head (tail) neither ever flows.
        if cuts.edge_head > 0:
            saved = _gradient_saved(run, config, "downlink", cuts.edge_head, uplink_shape)
            result["downlink_gradient_bytes_saved"] = saved
        if cuts.edge_tail > 0:
            saved = _gradient_saved(run, config, "uplink", cuts.middle_stop, downlink_shape)
            result["uplink_gradient_bytes_saved"] = saved

    unfrozen = [r for r in run.steps if r["boundary"] == 0]
    timed = all(isinstance(r.get("edge_backward_seconds"), (int, float)) for r in run.steps)
    if unfrozen and timed:
        mean = sum(r["edge_backward_seconds"] for r in unfrozen) / len(unfrozen)
        result["edge_backward_seconds_saved"] = sum(mean - r["edge_backward_seconds"] for r in frozen)
    else:
        result["edge_backward_seconds_saved"] = None
    return result


def _config(run: Run) -> Config:
    summary_path = run.path / "summary.json"
    if run.summary is None:
        raise ReportError(
            f"{summary_path} not found: freeze savings need the run's configuration, which the edge "
            "writes there when training ends; finish (or rerun) the training"
        )
    config = run.summary.get("config")
    if not isinstance(config, dict):
        raise ReportError(f"{summary_path}: expected a \"config\" object (the run's configuration sections)")
    try:
        return parse_config(config, f"{summary_path} config")
    except ConfigError as exc:
        raise ReportError(str(exc)) from None


def _build(config: Config, run: Run) -> nn.Sequential:
    try:
        return build_configured(config.model)
    except ModelError as exc:
        raise ReportError(
            f"cannot rebuild model {config.model.name!r} of {run.path} to count FLOPs: {exc}; "
            "make the model importable where the report runs"
        ) from None


def _gradient_saved(run: Run, config: Config, direction: str, stop: int, shape: tuple[int, ...]) -> int:
    """Gradient bytes not sent in ``direction`` by the steps whose boundary reached ``stop``."""
    key = f"{direction}_bytes"
    stopped = [r["by_kind"]["gradient"][key] for r in run.steps if r["boundary"] >= stop]
    sending = [r["by_kind"]["gradient"][key] for r in run.steps if r["boundary"] < stop]
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


def _si(count: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(count) < 1000:
            return f"{count:.1f} {unit}".rstrip()
        count /= 1000
    return f"{count:.1f} T"


def _savings_table(savings: dict[str, Any]) -> Table:
    table = Table(title="saved by freezing (against the same steps unfrozen)")
    table.add_column("what")
    table.add_column("saved", justify="right")
    seconds = savings["edge_backward_seconds_saved"]
    table.add_row("steps run with the edge head frozen", str(savings["steps_frozen_head"]))
    table.add_row("downlink gradient", f"{savings['downlink_gradient_bytes_saved'] / _MIB:.3f} MiB")
    table.add_row("uplink gradient", f"{savings['uplink_gradient_bytes_saved'] / _MIB:.3f} MiB")
    table.add_row(f"backward FLOPs ({savings['steps_frozen']} steps)", _si(savings["backward_flops_saved"]))
    table.add_row("edge backward time", "n/a (no unfrozen steps)" if seconds is None else f"{seconds:.3f} s")
    return table


def render_report(run: Run) -> list[RenderableType]:
    """The traffic table, the freeze savings (when something froze) and a one-line total."""
    total = epoch_traffic(run)[-1]
    parts: list[RenderableType] = [traffic_table(run)]
    if _freeze_events(run):
        if run.summary is None:
            parts.append(Text("freeze savings need summary.json, which is written when training ends"))
        else:
            parts.append(_savings_table(freeze_savings(run)))
    codec_line = _uplink_codec_line(run)
    if codec_line:
        parts.append(Text(codec_line))
    parts.append(
        Text(
            f"link total: {total.uplink_bytes / _MIB:.2f} MiB up, "
            f"{total.downlink_bytes / _MIB:.2f} MiB down in {total.steps} steps"
        )
    )
    return parts


def _uplink_codec_line(run: Run) -> str | None:
    """Training uplink activations as sent against what fp32 would have cost (split runs)."""
    steps = [line for line in run.steps if "uplink_activation_fp32_bytes" in line]
    sent = sum(line["by_kind"]["activation"]["uplink_bytes"] for line in steps)
    fp32 = sum(line["uplink_activation_fp32_bytes"] for line in steps)
    if not sent or sent >= fp32:
        return None  # fp32 on the uplink: nothing to compare
    codec = run.summary["config"]["link"]["uplink"] if run.summary else "the configured codec"
    return (
        f"uplink activations (training): {sent / _MIB:.2f} MiB as {codec}, "
        f"{fp32 / _MIB:.2f} MiB as fp32 would have cost: {sent / fp32:.3f} of fp32"
    )


# Per-step series of the plot: (label, direction or None for both, kind, line style).  Equal
# series overlap (an uplink activation is the size of the downlink gradient it brings back):
# thick solid uplink under thin dashed downlink keeps both visible.
_SERIES = (
    ("uplink activation", "uplink", "activation", {"linewidth": 3.0}),
    ("uplink gradient", "uplink", "gradient", {"linewidth": 3.0}),
    ("downlink activation", "downlink", "activation", {"linewidth": 1.5, "linestyle": "--"}),
    ("downlink gradient", "downlink", "gradient", {"linewidth": 1.5, "linestyle": "--"}),
    ("control", None, "control", {"linewidth": 1.0, "linestyle": ":"}),
)


def plot_traffic(run: Run, path: str | Path) -> None:
    """Plot bytes per step by direction and kind, and cumulative bytes per direction, as a PNG.

    Freeze events are dashed vertical lines labelled with the new boundary.  The file is
    replaced atomically, so a reader never sees half a picture.
    """
    # Imported here: matplotlib costs a few hundred ms that table-only reports need not pay.
    # The object API with an explicit Agg canvas: no display, no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not run.steps:
        raise ReportError(f"{run.path / 'metrics.jsonl'} has no training steps: nothing to plot")
    steps = [r["step"] for r in run.steps]
    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    per_step, cumulative = fig.subplots(2, 1, sharex=True)
    for label, direction, kind, style in _SERIES:
        directions = DIRECTIONS if direction is None else (direction,)
        kib = [sum(r["by_kind"][kind][f"{d}_bytes"] for d in directions) / 1024 for r in run.steps]
        per_step.plot(steps, kib, label=label, drawstyle="steps-post", **style)
    for direction in DIRECTIONS:
        running, series = 0, []
        for record in run.steps:
            running += record[f"{direction}_bytes"]
            series.append(running / _MIB)
        cumulative.plot(steps, series, label=direction)
    for event in _freeze_events(run):
        for axes in (per_step, cumulative):
            axes.axvline(event["step"], color="grey", linestyle="--", linewidth=1)
        per_step.text(
            event["step"], 0.98, f" boundary {event['boundary']}", transform=per_step.get_xaxis_transform(),
            rotation=90, va="top", ha="right", fontsize=8, color="dimgrey",
        )
    per_step.set_ylabel("KiB per step")
    per_step.legend(loc="upper right", fontsize=8)
    cumulative.set_ylabel("cumulative MiB (training steps)")
    cumulative.set_xlabel("step")
    cumulative.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"link traffic of {run.path.resolve().name}")

    target = Path(path)
    if not target.parent.is_dir():
        raise ReportError(f"cannot write {target}: pick a path in an existing, writable folder")
    write_atomically(target, lambda handle: fig.savefig(handle, format="png", dpi=100))
