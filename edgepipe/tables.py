"""Rich tables of a run's traffic and savings and of a partition, and the one place units are formatted."""
from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from pipeline.accounting import EpochTraffic, FreezeSavings, epoch_traffic, freeze_savings, uplink_codec_use
from pipeline.partition import Crossing, Cuts, LayerProfile, PartitionError
from pipeline.runs import Run
from pipeline.traffic import KINDS, MIB, PHASES, SYNC

__all__ = [
    "format_bytes",
    "format_count",
    "format_mib",
    "partition_table",
    "phase_table",
    "render_report",
    "savings_table",
    "traffic_table",
]

_SHORT_KIND = {"activation": "act", "gradient": "grad", "control": "ctrl"}


def format_mib(nbytes: float, decimals: int = 3) -> str:
    """Bytes as a number of MiB without the unit (the caller names it), e.g. ``1.500``."""
    return f"{nbytes / MIB:.{decimals}f}"


def format_bytes(nbytes: int) -> str:
    """Bytes in binary units with one decimal, e.g. 256 -> ``256 B``, 32768 -> ``32.0 KiB``."""
    return _scaled(nbytes, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))


def format_count(count: int) -> str:
    """A count (FLOPs, samples) in SI units with one decimal, e.g. 999 -> ``999``, 1234567 -> ``1.2 M``."""
    return _scaled(count, 1000, ("", "K", "M", "G", "T"))


def _scaled(count: int, base: int, units: tuple[str, ...]) -> str:
    value, level = float(count), 0
    while abs(value) >= base and level < len(units) - 1:
        value /= base
        level += 1
    if level == 0:
        return f"{count} {units[0]}".rstrip()
    return f"{value:.1f} {units[level]}"


def traffic_table(run: Run) -> Table:
    """The link traffic table: one row per epoch (0-based, as in metrics.jsonl) and a total row.

    Columns per direction and per kind; rows where the freeze boundary moved are highlighted
    and say so in the notes column.
    """
    rows = epoch_traffic(run)
    table = Table(title=f"link traffic of {run.path.resolve().name} (MiB)", caption=_traffic_caption(run, rows))
    for header in ("epoch", "steps", "up", "down"):
        table.add_column(header, justify="right")
    for kind in KINDS:
        short = _SHORT_KIND[kind]
        for what in ("up", "down", "msgs"):
            table.add_column(f"{short}\n{what}", justify="right")
    table.add_column("val acc", justify="right")
    table.add_column("notes")
    for row in rows:
        if row.epoch is None:
            table.add_section()
        cells = [
            "total" if row.epoch is None else str(row.epoch),
            str(row.steps),
            format_mib(row.uplink_bytes),
            format_mib(row.downlink_bytes),
        ]
        for kind in KINDS:
            counts = row.by_kind[kind]
            cells += [format_mib(counts["uplink_bytes"]), format_mib(counts["downlink_bytes"]), str(counts["messages"])]
        cells += ["" if row.val_accuracy is None else f"{row.val_accuracy:.4f}", "; ".join(row.notes)]
        style = "bold" if row.epoch is None else ("bold yellow" if row.notes else None)
        table.add_row(*cells, style=style)
    return table


def _traffic_caption(run: Run, rows: list[EpochTraffic]) -> str:
    if run.is_local:
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
        f"(+{format_bytes(up)} up, +{format_bytes(down)} down)"
    )


def savings_table(savings: FreezeSavings) -> Table:
    """What freezing saved, one row per resource."""
    table = Table(title="saved by freezing (against the same steps unfrozen)")
    table.add_column("what")
    table.add_column("saved", justify="right")
    seconds = savings["edge_backward_seconds_saved"]
    table.add_row("steps run with the edge head frozen", str(savings["steps_frozen_head"]))
    table.add_row("downlink gradient", f"{format_mib(savings['downlink_gradient_bytes_saved'])} MiB")
    table.add_row("uplink gradient", f"{format_mib(savings['uplink_gradient_bytes_saved'])} MiB")
    table.add_row(f"backward FLOPs ({savings['steps_frozen']} steps)", format_count(savings["backward_flops_saved"]))
    table.add_row("edge backward time", "n/a (no unfrozen steps)" if seconds is None else f"{seconds:.3f} s")
    return table


def phase_table(run: Run) -> Table:
    """What the bytes were for: training steps apart from evaluation, weight fetch and handshake."""
    phases = run.summary.traffic.by_phase if run.summary is not None else None
    if not phases:
        raise ValueError(f"{run.path}: summary.json has no traffic by phase (a run of an older edgepipe)")
    table = Table(title="link traffic by phase (MiB)")
    for header in ("phase", "up", "down", "msgs", "share"):
        table.add_column(header, justify="right" if header != "phase" else "left")
    everything = sum(c.uplink_bytes + c.downlink_bytes for c in phases.values()) or 1
    for phase in (*PHASES, SYNC):
        counts = phases.get(phase)
        if counts is None:
            continue
        both = counts.uplink_bytes + counts.downlink_bytes
        table.add_row(phase, format_mib(counts.uplink_bytes), format_mib(counts.downlink_bytes),
                      str(counts.messages), f"{100 * both / everything:.1f} %")
    return table


def render_report(run: Run) -> list[RenderableType]:
    """The traffic table, the freeze savings (when something froze), the bytes by phase, the codec
    line and a one-line total."""
    total = epoch_traffic(run)[-1]
    parts: list[RenderableType] = [traffic_table(run)]
    if run.freeze_events():
        if run.summary is None:
            parts.append(Text("freeze savings need summary.json, which is written when training ends"))
        else:
            parts.append(savings_table(freeze_savings(run)))
    if run.summary is not None and run.summary.traffic.by_phase and not run.is_local:
        parts.append(phase_table(run))
    codec = uplink_codec_use(run)
    if codec is not None:
        parts.append(
            Text(
                f"uplink activations (training): {format_mib(codec.sent_bytes, 2)} MiB as {codec.codec}, "
                f"{format_mib(codec.fp32_bytes, 2)} MiB as fp32 would have cost: "
                f"{codec.sent_bytes / codec.fp32_bytes:.3f} of fp32"
            )
        )
    parts.append(
        Text(
            f"link total: {format_mib(total.uplink_bytes, 2)} MiB up, "
            f"{format_mib(total.downlink_bytes, 2)} MiB down in {total.steps} steps"
        )
    )
    return parts


def partition_table(profiles: list[LayerProfile], cuts: Cuts, crossings: list[Crossing]) -> Table:
    """The layer table with marker rows at each cut saying what crosses the link there, per sample.

    ``crossings`` (from :func:`pipeline.partition.link_crossings`) give the bytes with the
    configured codecs; a codec other than fp32 is named, with the fp32 bytes beside it.
    """
    if len(profiles) != cuts.num_layers:
        raise PartitionError(
            f"the cuts were made for {cuts.num_layers} layers but there are {len(profiles)} profiles: "
            "profile and cut the same model"
        )
    table = Table(caption=_partition_caption(profiles))
    table.add_column("#", justify="right")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("params", justify="right")
    table.add_column("FLOPs", justify="right")
    table.add_column("output/sample", justify="right")
    table.add_column("placement")

    markers = {cuts.middle_start: _cut_lines(1, cuts, crossings), cuts.middle_stop: _cut_lines(2, cuts, crossings)}
    for index, p in enumerate(profiles):
        if index in markers:
            _add_marker(table, markers[index])
        table.add_row(
            str(p.index),
            p.name,
            p.kind,
            f"{p.params:,}",
            format_count(p.flops),
            f"{format_bytes(p.output_bytes)} {list(p.output_shape)}",
            p.placement,
            style="cyan" if p.placement == "edge" else None,
        )
    if cuts.num_layers in markers:
        _add_marker(table, markers[cuts.num_layers])
    return table


def _add_marker(table: Table, lines: list[str]) -> None:
    # Rich has no column spans; the name column is the one wide enough to read the marker in.
    table.add_section()
    for line in lines:
        # Text, not markup: "[16, 32, 32]" is a shape, not a style tag.
        table.add_row("", Text(line), "", "", "", "", "", style="bold magenta")
    table.add_section()


def _cut_lines(cut: int, cuts: Cuts, crossings: list[Crossing]) -> list[str]:
    if cut == 2 and cuts.edge_tail == 0:
        return ["── cut 2: edge_tail = 0: the loss is computed on the cloud, so labels cross the link ──"]
    lines = []
    for crossing in (c for c in crossings if c.cut == cut):
        what = crossing.kind
        if crossing.kind == "activation" and cut == 1 and cuts.edge_head == 0:
            what = "raw input"
        size = f"{format_bytes(crossing.nbytes)}/sample"
        if crossing.codec != "fp32":
            size += f" {crossing.codec} ({format_bytes(crossing.fp32_bytes)} fp32)"
        when = ""
        if crossing.kind == "gradient":
            when = ", while the head trains" if cut == 1 else ", while the cloud trains"
        elif what == "raw input":
            when = " (edge_head = 0: the inputs leave the edge)"
        lines.append(f"── cut {cut}: {crossing.direction} {what} {list(crossing.shape)} = {size}{when} ──")
    return lines


def _partition_caption(profiles: list[LayerProfile]) -> Text:
    parts = []
    for placement in ("edge", "cloud"):
        side = [p for p in profiles if p.placement == placement]
        params = sum(p.params for p in side)
        flops = sum(p.flops for p in side)
        parts.append(f"{placement}: {len(side)} layers, {params:,} params, {format_count(flops)} FLOPs/sample")
    return Text(
        " · ".join(parts)
        + "\nat the cuts: tensor payload per sample with the [link] codecs (fp32 unless named; "
        "quantization scales and frame headers not counted)"
    )
