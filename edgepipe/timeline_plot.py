"""One step's timeline as a picture: a row per machine, a bar per span, labelled by micro-batch."""
from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import write_atomically
from pipeline.timeline import Span

__all__ = ["plot_step_timeline"]

#: Colour per kind of work; codec work and waiting are greys so compute stands out.
_COLOURS = {
    "head forward": "tab:blue", "tail forward": "tab:cyan", "forward": "tab:blue",
    "tail backward": "tab:orange", "head backward": "tab:red", "backward": "tab:orange",
    "encode": "0.55", "decode": "0.75", "optimizer": "tab:green", "end": "tab:green", "wait": "0.92",
    "next step": "tab:purple",
}
_ROWS = ("edge", "cloud")


def plot_step_timeline(spans: list[Span], step: int, path: str | Path) -> None:
    """Draw the spans of step ``step`` into the PNG ``path`` (replaced atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(12, 3.2), layout="constrained")
    # A label only where it fits: about 1.5 % of the step's length.
    room = 0.015 * max(span.end for span in spans) * 1e3
    for span in spans:
        row = _ROWS.index(span.side)
        width = (span.end - span.start) * 1e3
        axes.broken_barh([(span.start * 1e3, width)], (row - 0.35, 0.7),
                         facecolors=_COLOURS.get(span.name, "tab:purple"), edgecolor="white", linewidth=0.3)
        if span.micro_batch >= 0 and width > room:
            axes.text(span.start * 1e3 + width / 2, row, str(span.micro_batch), ha="center", va="center", fontsize=7)
    axes.set_yticks(range(len(_ROWS)), _ROWS)
    axes.set_ylim(-0.6, len(_ROWS) - 0.4)
    axes.set_xlabel("ms since the edge began the step (numbers: micro-batch)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLOURS[name]) for name in sorted({s.name for s in spans} & set(_COLOURS))]
    axes.legend(handles, sorted({s.name for s in spans} & set(_COLOURS)), ncols=5, fontsize=7, loc="upper center",
                bbox_to_anchor=(0.5, -0.35), frameon=False)
    axes.set_title(f"step {step}: where the time went")
    write_atomically(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=100))
    plt.close(fig)
