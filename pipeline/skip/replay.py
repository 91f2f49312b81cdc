"""Replaying a skip policy offline on recorded statistics: the skip_stats.jsonl format, read and written."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.skip.decisions import Decision, LayerStat, ParamStat, StepStats
from pipeline.skip.policies import SkipPolicy

__all__ = ["StatsFileError", "decision_line", "read_stats", "replay", "stats_line"]


class StatsFileError(ValueError):
    """A statistics file is malformed; the message names the line and what was wrong."""


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    index: int = Field(ge=0)
    shape: list[int]
    variance: float = Field(ge=0.0, allow_inf_nan=False)
    norm: float = Field(ge=0.0, allow_inf_nan=False)
    update_norm: float | None = Field(None, ge=0.0, allow_inf_nan=False)


class _Line(BaseModel):
    """One step of a statistics file: what the policy read after optimizer step ``step``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    step: int = Field(ge=0)
    lr: float = Field(gt=0.0, allow_inf_nan=False)
    epoch: int = Field(ge=0)
    epoch_end: bool
    params: list[_Tensor]

    @model_validator(mode="after")
    def _update_norms_at_epoch_ends(self) -> _Line:
        if any((p.update_norm is not None) != self.epoch_end for p in self.params):
            raise ValueError("every tensor has an update_norm exactly when epoch_end is true")
        return self


def stats_line(stats: StepStats, param_layers: Sequence[int]) -> dict[str, Any]:
    """The statistics file's line for ``stats`` (tensors numbered as in ``model.parameters()``)."""
    params = []
    for index, p in stats.parameters(param_layers):
        row: dict[str, Any] = {"index": index, "shape": list(p.shape), "variance": p.variance, "norm": p.norm}
        if p.update_norm is not None:
            row["update_norm"] = p.update_norm
        params.append(row)
    return {"step": stats.step, "lr": stats.lr, "epoch": stats.epoch, "epoch_end": stats.epoch_end, "params": params}


def _stats(line: _Line, param_layers: Sequence[int]) -> StepStats:
    layers: dict[int, list[tuple[int, ParamStat]]] = {}
    for p in sorted(line.params, key=lambda p: p.index):
        if p.index >= len(param_layers):
            raise ValueError(f"tensor {p.index} is past the model's {len(param_layers)} parameter tensors")
        layers.setdefault(param_layers[p.index], []).append(
            (p.index, ParamStat(tuple(p.shape), p.norm, p.variance, p.update_norm))
        )
    stats = StepStats(
        line.step, line.epoch, line.epoch_end, line.lr,
        tuple(LayerStat.of(layer, [p for _, p in params]) for layer, params in sorted(layers.items())),
    )
    # Each listed layer must list all its tensors, each once: the policies number them by position.
    got = [index for index, _ in stats.parameters(param_layers)]
    if got != sorted(p.index for p in line.params):
        raise ValueError("every layer named must list each of its parameter tensors exactly once")
    return stats


def read_stats(lines: Iterable[str], param_layers: Sequence[int]) -> Iterator[StepStats]:
    """The steps of a statistics file (its lines), checked: consecutive steps from 0, tensors of this model.

    Raises :class:`StatsFileError` naming the line.
    """
    expected = 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            line = _Line.model_validate(json.loads(text))
            if line.step != expected:
                raise ValueError(f"step {line.step} where step {expected} was due (steps count from 0, one a line)")
            stats = _stats(line, param_layers)
        except json.JSONDecodeError as exc:
            raise StatsFileError(f"line {number}: not JSON ({exc.msg})") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "line"
            raise StatsFileError(f"line {number}: {where}: {first['msg']}") from None
        except ValueError as exc:
            raise StatsFileError(f"line {number}: {exc}") from None
        expected += 1
        yield stats


def decision_line(step: int, decision: Decision) -> dict[str, Any]:
    """The replay's line for the decision step ``step`` trains with."""
    return {
        "step": step,
        "frozen_parameters": decision.frozen_parameters,
        "boundary": decision.boundary,
        "lr_factors": {str(index): factor for index, factor in sorted(decision.lr_factors.items())},
        "lr_bases": {str(index): base for index, base in sorted(decision.lr_bases.items())},
    }


def replay(policy: SkipPolicy, steps: Iterable[StepStats]) -> Iterator[dict[str, Any]]:
    """The decisions ``policy`` takes on ``steps``: one line for step 0 (its initial decision) and one
    for the step after each recorded one, as :func:`decision_line` writes them."""
    yield decision_line(0, policy.initial())
    for stats in steps:
        yield decision_line(stats.step + 1, policy.decide(stats))
