"""Where a step's time goes on both machines: spans per micro-batch, written as a Chrome/Perfetto trace."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.checkpoint import write_atomically

__all__ = ["Span", "StepTimeline", "TraceError", "read_trace", "write_trace"]

#: The rows of the trace, one per machine; "link" holds what was in flight.
SIDES = ("edge", "cloud")


@dataclass(frozen=True)
class Span:
    """One piece of work: ``name`` (e.g. ``forward``, ``encode``) of micro-batch ``micro_batch``
    (-1 for the whole step) on ``side``, from ``start`` to ``end`` seconds after the step began."""

    side: str
    name: str
    micro_batch: int
    start: float
    end: float


class StepTimeline:
    """Collects one step's spans on the edge's clock; the cloud's come with its done frame.

    The cloud measures its spans from the moment its begin frame arrived; the edge places them
    half a round trip after it sent that frame, the best estimate without synchronised clocks.
    """

    def __init__(self, step: int, origin: float | None = None) -> None:
        """A timeline of step ``step`` that begins at ``origin`` (a ``time.perf_counter()``; None: now)."""
        self.step = step
        self._origin = time.perf_counter() if origin is None else origin
        self.spans: list[Span] = []

    @property
    def began(self) -> float:
        """When the step began, as a ``time.perf_counter()``."""
        return self._origin

    def now(self) -> float:
        """Seconds since the step began."""
        return time.perf_counter() - self._origin

    @contextmanager
    def span(self, name: str, micro_batch: int = -1, side: str = "edge") -> Iterator[None]:
        """Time the work inside the ``with`` block as one span."""
        start = self.now()
        try:
            yield
        finally:
            self.spans.append(Span(side, name, micro_batch, start, self.now()))

    def add_remote(self, spans: Sequence[tuple[str, int, float, float]], *, offset: float) -> None:
        """Add the cloud's ``(name, micro_batch, start, end)`` spans, shifted by ``offset`` seconds."""
        for name, micro_batch, start, end in spans:
            self.spans.append(Span("cloud", name, micro_batch, start + offset, end + offset))


def write_trace(path: str | Path, steps: Sequence[StepTimeline], *, step_starts: Sequence[float]) -> None:
    """Write ``steps`` as a Chrome trace (``chrome://tracing``, ui.perfetto.dev): one process per
    side, one thread row per micro-batch; ``step_starts`` places each step on one time axis."""
    events: list[dict[str, Any]] = []
    for pid, side in enumerate(SIDES):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": side}})
    for timeline, origin in zip(steps, step_starts, strict=True):
        for span in timeline.spans:
            events.append({
                "ph": "X", "name": span.name, "cat": span.side, "pid": SIDES.index(span.side),
                "tid": span.micro_batch + 1, "ts": (origin + span.start) * 1e6,
                "dur": max(span.end - span.start, 0.0) * 1e6,
                "args": {"step": timeline.step, **asdict(span)},
            })
    blob = json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}).encode()
    write_atomically(Path(path), lambda handle: handle.write(blob))


class TraceError(ValueError):
    """A trace file cannot be read; the message names the file and what is wrong."""


class _SpanEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ph: str
    args: dict[str, Any] = {}


class _Trace(BaseModel):
    model_config = ConfigDict(extra="ignore")

    traceEvents: list[_SpanEvent]  # noqa: N815 - the Chrome trace format's name


def read_trace(path: str | Path) -> dict[int, list[Span]]:
    """The spans of a trace written by :func:`write_trace`, by step, on each step's own clock."""
    path = Path(path)
    try:
        trace = _Trace.model_validate_json(path.read_bytes())
        steps: dict[int, list[Span]] = {}
        for event in trace.traceEvents:
            if event.ph == "X":
                span = Span(**{k: event.args[k] for k in ("side", "name", "micro_batch", "start", "end")})
                steps.setdefault(int(event.args["step"]), []).append(span)
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None
    except (ValidationError, KeyError, TypeError) as exc:
        raise TraceError(f"{path}: not a trace written by edgepipe-edge --trace ({type(exc).__name__})") from None
    if not steps:
        raise TraceError(f"{path}: the trace holds no step")
    return steps
