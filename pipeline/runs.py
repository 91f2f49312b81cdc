"""A run directory read back: the lines of metrics.jsonl and summary.json, validated by their schema."""
from __future__ import annotations

import json
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.traffic import DIRECTIONS, KINDS, SYNC

__all__ = [
    "ByKind",
    "EvalRecord",
    "FreezeEvent",
    "KindCounts",
    "Run",
    "RunFileError",
    "StepRecord",
    "Summary",
    "Traffic",
    "load_run",
]


class RunFileError(ValueError):
    """A run directory is missing or unreadable; the message names the file, the line and the key."""


class _Schema(BaseModel):
    # Strict: a byte count written as 1.0, "1" or true is a broken file, not a number to coerce.
    # Keys this reader does not know (a newer writer's) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _Sent:
    """For records with ``uplink_bytes`` and ``downlink_bytes``: the bytes of one direction by name."""

    # No annotations here: pydantic would take them for fields ahead of the record's own.
    def sent(self, direction: str) -> int:
        """Bytes sent in ``direction`` (``uplink`` or ``downlink``)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
        return int(getattr(self, f"{direction}_bytes"))


class KindCounts(_Schema, _Sent):
    """Bytes each way and messages of one traffic kind."""

    uplink_bytes: int
    downlink_bytes: int
    messages: int


class ByKind(_Schema):
    """Counts per traffic kind: one field per kind of :data:`pipeline.traffic.KINDS`."""

    activation: KindCounts
    gradient: KindCounts
    control: KindCounts
    #: A split-federated run's exchange of weights at round ends (absent from other runs).
    sync: KindCounts | None = None

    def of(self, kind: str) -> KindCounts:
        """The counts of ``kind`` (``sync``: zero when the run exchanged nothing)."""
        if kind == SYNC:
            return self.sync or KindCounts(uplink_bytes=0, downlink_bytes=0, messages=0)
        if kind not in KINDS:
            raise ValueError(f"unknown traffic kind {kind!r}; expected one of {', '.join((*KINDS, SYNC))}")
        return getattr(self, kind)


class Traffic(_Schema, _Sent):
    """The ``traffic`` object of summary.json: totals per direction, per kind and (newer runs) per phase."""

    uplink_bytes: int
    downlink_bytes: int
    by_kind: ByKind
    by_phase: dict[str, KindCounts] | None = None


class _Timings(_Schema):
    """The timing columns of a step line, and their totals in summary.json (absent from older runs)."""

    uplink_activation_fp32_bytes: int | None = None
    edge_backward_seconds: float | None = None
    cloud_backward_seconds: float | None = None
    edge_encode_seconds: float | None = None
    edge_decode_seconds: float | None = None
    cloud_encode_seconds: float | None = None
    cloud_decode_seconds: float | None = None


class StepRecord(_Timings, _Sent):
    """One training step line of metrics.jsonl (timing columns are absent from older runs)."""

    step: int
    epoch: int
    boundary: int
    uplink_bytes: int
    downlink_bytes: int
    by_kind: ByKind
    loss: float | None = None
    lr: float | None = None
    step_seconds: float | None = None


class EvalRecord(_Schema, _Sent):
    """One evaluation line of metrics.jsonl: the end of an epoch."""

    epoch: int
    val_loss: float | None = None
    val_accuracy: float | None = None
    uplink_bytes: int = 0
    downlink_bytes: int = 0


class FreezeEvent(_Schema):
    """The freeze boundary became ``boundary`` from step ``step`` on."""

    step: int
    boundary: int


class Summary(_Timings):
    """summary.json: written once, when training ends."""

    mode: Literal["split", "local"] = "split"
    steps: int
    epochs: int | None = None
    wall_seconds: float | None = None
    final_val_accuracy: float | None = None
    traffic: Traffic
    freeze_events: list[FreezeEvent]
    config: dict[str, Any] | None = None


@dataclass(frozen=True)
class Run:
    """One run directory: its step and evaluation records and, once training ended, its summary."""

    path: Path
    steps: list[StepRecord]
    evals: list[EvalRecord]
    summary: Summary | None

    @property
    def is_local(self) -> bool:
        """Whether the summary says the run trained in one process (``--local``): no link traffic."""
        return self.summary is not None and self.summary.mode == "local"

    def freeze_events(self) -> list[FreezeEvent]:
        """Each change of the freeze boundary: from summary.json, else from the steps' boundaries."""
        if self.summary is not None:
            return list(self.summary.freeze_events)
        # No summary (the run did not finish): the boundary each step ran with tells the same story.
        events, previous = [], 0
        for record in self.steps:
            if record.boundary != previous:
                events.append(FreezeEvent(step=record.step, boundary=record.boundary))
                previous = record.boundary
        return events


def load_run(run_dir: str | Path) -> Run:
    """Read ``metrics.jsonl`` and (if training finished) ``summary.json`` from ``run_dir``.

    A truncated last metrics line, as a crash mid-write leaves, is dropped with a warning;
    any other malformed line is a :class:`RunFileError`.  Keys this reader does not know are ignored.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise RunFileError(f"run directory {path} does not exist; pass the --run-dir an edge worker wrote")
    steps, evals = _read_metrics(path / "metrics.jsonl")
    summary_path = path / "summary.json"
    summary = _read_summary(summary_path) if summary_path.exists() else None
    return Run(path=path, steps=steps, evals=evals, summary=summary)


def _read_metrics(path: Path) -> tuple[list[StepRecord], list[EvalRecord]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFileError(
            f"{path} not found: a run directory is what `edgepipe-edge --run-dir DIR` writes "
            "(metrics.jsonl, summary.json)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"cannot read {path}: {exc}") from None
    steps: list[StepRecord] = []
    evals: list[EvalRecord] = []
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
            raise RunFileError(f"{where}: not valid JSON ({exc.msg}); expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise RunFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "step" in record:
            steps.append(_validate(StepRecord, record, where))
        elif "epoch" in record:
            evals.append(_validate(EvalRecord, record, where))
        else:
            raise RunFileError(
                f"{where}: neither a step record (with \"step\") nor an evaluation record (with \"epoch\")"
            )
    return steps, evals


def _read_summary(path: Path) -> Summary:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path}: not valid JSON ({exc.msg}); expected the summary an edge worker writes") from None
    if not isinstance(summary, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return _validate(Summary, summary, str(path))


_Model = typing.TypeVar("_Model", bound=BaseModel)


def _validate(model: type[_Model], record: dict[str, Any], where: str) -> _Model:
    try:
        return model.model_validate(record)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        key = ".".join(str(part) for part in first["loc"])
        expected = _describe(_annotation(model, first["loc"]))
        got = "but it is missing" if first["type"] == "missing" else f"got {first['input']!r}"
        others = len(errors) - 1
        more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
        raise RunFileError(f"{where}: expected {key!r} to be {expected}, {got}{more}") from None


def _annotation(model: type[BaseModel], loc: tuple[int | str, ...]) -> Any:
    """The declared type at ``loc`` (field names and list indices) of ``model``."""
    annotation: Any = model
    for part in loc:
        annotation = _without_none(annotation)
        if isinstance(part, int):
            annotation = typing.get_args(annotation)[0]
        else:
            annotation = annotation.model_fields[part].annotation
    return annotation


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def _describe(annotation: Any) -> str:
    """What a value of ``annotation`` looks like in JSON, in words."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return f"{_describe(_without_none(annotation))} or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is list:
        item = args[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return f"a list of objects with {', '.join(_required(item))}"
        return "a list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"an object with {', '.join(_required(annotation))}"
    return {int: "an integer", float: "a number", str: "a string"}.get(annotation, "an object")


def _required(model: type[BaseModel]) -> list[str]:
    return [name for name, field in model.model_fields.items() if field.is_required()]
