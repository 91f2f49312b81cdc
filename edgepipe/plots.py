"""The traffic plot of a run: bytes per step by direction and kind, and cumulative bytes, as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.accounting import epoch_traffic
from pipeline.checkpoint import write_atomically
from pipeline.runs import Run
from pipeline.traffic import DIRECTIONS, KINDS, MIB

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PlotError", "plot_traffic", "traffic_figure"]

#: Line style per kind in the per-step panels, and per direction in the cumulative one: series
#: can be equal (the uplink activation is the size of the downlink gradient it brings back, and
#: with fp32 both directions carry the same total), so no two lines of a panel look alike.
_KIND_STYLE = {
    "activation": {"color": "tab:blue", "linestyle": "-", "linewidth": 2.0},
    "gradient": {"color": "tab:orange", "linestyle": "--", "linewidth": 1.5},
    "control": {"color": "tab:grey", "linestyle": ":", "linewidth": 1.2},
}
_DIRECTION_STYLE = {
    "uplink": {"color": "tab:blue", "linestyle": "-", "linewidth": 2.0},
    "downlink": {"color": "tab:red", "linestyle": "--", "linewidth": 1.5},
}
#: The per-step panels leave this much room above the data for the boundary labels.
_HEADROOM = 1.5


class PlotError(ValueError):
    """A run has nothing to plot, or the picture cannot be written where asked."""


def traffic_figure(run: Run) -> Figure:
    """Uplink and downlink KiB per step by kind, and cumulative MiB per direction.

    Epoch starts are ticks on the top axis (epochs numbered from 0, as in metrics.jsonl) and
    dotted lines; freeze events are dashed lines labelled with the new boundary.  The
    cumulative panel adds each epoch's evaluation at its end and what no epoch holds
    (handshake, weight fetch) after the last step, so it ends at the traffic table's total.
    Raises :class:`PlotError` for a ``--local`` run (no link traffic) or one without steps.
    """
    # Imported here: matplotlib costs a few hundred ms that importing PlotError need not pay.
    # The object API with an explicit Agg canvas: no display, no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if run.is_local:
        raise PlotError(f"nothing to plot: {run.path} is a --local run (no link traffic)")
    if not run.steps:
        raise PlotError(f"nothing to plot: {run.path / 'metrics.jsonl'} has no training steps")
    fig = Figure(figsize=(11, 9), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(3, 1, sharex=True)
    # One KiB scale for both directions, so their heights compare; headroom for the labels.
    panels[1].sharey(panels[0])
    highest = max(r.by_kind.of(kind).sent(d) for r in run.steps for kind in KINDS for d in DIRECTIONS) / 1024
    panels[0].set_ylim(0, highest * _HEADROOM or 1.0)
    for axes, direction in zip(panels[:2], DIRECTIONS, strict=True):
        _per_step_panel(axes, run, direction)
    _cumulative_panel(panels[2], run)
    _mark_epochs(panels, run)
    _mark_freezes(panels, run)
    panels[2].set_xlabel("step")
    fig.suptitle(f"link traffic of {run.path.resolve().name}")
    return fig


def plot_traffic(run: Run, path: str | Path) -> None:
    """Draw :func:`traffic_figure` into the PNG ``path``, replaced atomically (never half a picture)."""
    target = Path(path)
    if not target.parent.is_dir():
        raise PlotError(f"cannot write {target}: pick a path in an existing, writable folder")
    fig = traffic_figure(run)
    write_atomically(target, lambda handle: fig.savefig(handle, format="png", dpi=100))


def _per_step_panel(axes: Axes, run: Run, direction: str) -> None:
    # steps-post draws step s over [s, s + 1): the repeated last value draws the last step.
    steps = [r.step for r in run.steps] + [run.steps[-1].step + 1]
    for kind in KINDS:
        kib = [r.by_kind.of(kind).sent(direction) / 1024 for r in run.steps]
        axes.plot(steps, [*kib, kib[-1]], label=kind, drawstyle="steps-post", **_KIND_STYLE[kind])
    axes.set_ylabel(f"{direction}\nKiB per step")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _cumulative_panel(axes: Axes, run: Run) -> None:
    total = epoch_traffic(run)[-1]
    last_step = {r.epoch: r.step for r in run.steps}
    for direction in DIRECTIONS:
        evaluation = {e.epoch: e.sent(direction) for e in run.evals}
        # x is "steps done": step s ends at s + 1, where its epoch's evaluation follows it.
        xs, ys, running = [run.steps[0].step], [0], 0
        for record in run.steps:
            running += record.sent(direction)
            xs.append(record.step + 1)
            ys.append(running)
            if last_step[record.epoch] == record.step:
                running += evaluation.pop(record.epoch, 0)
                xs.append(record.step + 1)
                ys.append(running)
        xs.append(run.steps[-1].step + 1)
        ys.append(total.uplink_bytes if direction == "uplink" else total.downlink_bytes)
        axes.plot(xs, [y / MIB for y in ys], label=direction, **_DIRECTION_STYLE[direction])
    axes.set_ylabel("cumulative MiB")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes.set_title(
        "steps, evaluations (at their epoch's end), handshake and weight fetch (at the end)", fontsize=9, loc="left"
    )


def _mark_epochs(panels: list[Axes], run: Run) -> None:
    starts: dict[int, int] = {}
    for record in run.steps:
        starts.setdefault(record.epoch, record.step)
    for axes in panels:
        for step in starts.values():
            axes.axvline(step, color="lightgrey", linestyle=":", linewidth=1.0, zorder=0, gid="epoch-start")
    top = panels[0].secondary_xaxis("top")
    top.set_xticks(list(starts.values()), labels=[str(epoch) for epoch in starts])
    top.set_xlabel("epoch")


def _mark_freezes(panels: list[Axes], run: Run) -> None:
    for event in run.freeze_events():
        for axes in panels:
            axes.axvline(event.step, color="dimgrey", linestyle="--", linewidth=1.0, gid="freeze")
        # A few points left of its line, in the headroom above the data: it covers neither.
        panels[0].annotate(
            f"boundary {event.boundary}",
            xy=(event.step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-3, -3),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="top",
            fontsize=8,
            color="dimgrey",
            gid="boundary-label",
        )
