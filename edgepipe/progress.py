"""The progress display of a training run: a bar on stderr, one line per epoch on stdout."""
from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edge_node.worker import EpochReport, StepReport
from pipeline.traffic import MIB

__all__ = ["TrainingProgress"]


class TrainingProgress:
    """Pass ``on_step`` and ``on_epoch`` to :func:`edgepipe.train`; use it as a context manager.

    Epochs are shown as they are written to metrics.jsonl: counted from 0.
    """

    def __init__(self, *, bar: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  link {task.fields[mib]:.2f} MiB  boundary {task.fields[boundary]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not bar,
            transient=True,
        )
        self._task = self._progress.add_task("training", total=None, loss=math.nan, mib=0.0, boundary=0)

    def __enter__(self) -> TrainingProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def on_step(self, report: StepReport) -> None:
        """Advance the bar by one step."""
        self._progress.update(
            self._task, completed=report.step + 1, total=report.total_steps, loss=report.loss,
            mib=report.link_bytes / MIB, boundary=report.boundary,
        )

    def on_epoch(self, report: EpochReport) -> None:
        """Print the epoch's evaluation."""
        self._progress.console.file.flush()
        print(
            f"epoch {report.epoch} (of 0-{report.epochs - 1}): val_loss {report.val_loss:.4f}  "
            f"val_accuracy {report.val_accuracy:.4f}  boundary {report.boundary}  "
            f"link up {report.uplink_bytes / MIB:.2f} MiB  down {report.downlink_bytes / MIB:.2f} MiB",
            flush=True,
        )
