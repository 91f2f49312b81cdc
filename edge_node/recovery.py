"""The edge's side of resuming: the run directory's run record, its checkpoints, and restoring an engine from one."""
from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_node.engines import SplitEngine
from edge_node.local_engine import LocalEngine
from pipeline.checkpoint import save_json
from pipeline.checkpoints import CheckpointError, CheckpointStore, generator_state, restore_generator
from pipeline.skip import Decision
from pipeline.traffic import TrafficCounts

__all__ = [
    "Engine",
    "EdgeCheckpoints",
    "RunDirError",
    "RunPlan",
    "restore_engine",
    "traffic_from_json",
    "traffic_sum",
    "traffic_to_json",
]

Engine = LocalEngine | SplitEngine
CHECKPOINTS = "checkpoints"
#: The run's id and plan, written when it starts: a run killed before its first checkpoint
#: starts over under the same id.
RUN_RECORD = "run.json"
#: What a run leaves besides checkpoints/; --overwrite removes them.
RUN_FILES = ("metrics.jsonl", "summary.json", "model.pt", "trace.json", "federation.json")


class RunDirError(ValueError):
    """The run directory holds another run, or a run that cannot be resumed as asked; the message is one line."""


@dataclass(frozen=True)
class RunPlan:
    """What fixes every step of a run: where it trains, its configuration, its model and its length.

    ``config`` is the whole configuration but the edge-only ``link.reconnect_seconds``, which a
    resumed run may change.
    """

    mode: str
    config: dict[str, Any]
    fingerprint: str
    epochs: int
    total_steps: int
    steps_per_epoch: int

    def settings(self) -> dict[str, Any]:
        """The plan as one nested dict, for naming what differs."""
        length = {"epochs": self.epochs, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}
        return {**self.config, **length}


def _flag(mode: str) -> str:
    return "--local" if mode == "local" else "--cloud HOST:PORT"


class EdgeCheckpoints:
    """``RUN_DIR/checkpoints/``: the run record and the edge's half of each committed step, the newest ``keep`` kept."""

    def __init__(self, directory: Path, run_id: str, plan: RunPlan, keep: int) -> None:
        self.run_id, self.plan = run_id, plan
        self.store = CheckpointStore(directory, keep=keep)

    @classmethod
    def open(cls, run_dir: Path, plan: RunPlan, *, keep: int, resume: bool, overwrite: bool) -> EdgeCheckpoints:
        """The checkpoints of the run in ``run_dir``: the run being resumed, or a new one.

        A new run is refused where another run lives (metrics lines or checkpoints/) unless
        ``overwrite``, which removes that run's files first. A resume is refused when there is
        nothing to resume, the run completed, or ``plan`` differs from the run's (naming what).
        """
        if resume and overwrite:
            raise RunDirError("--resume continues the run in a directory and --overwrite replaces it: give one")
        directory = run_dir / CHECKPOINTS
        if resume:
            return cls(directory, _resumable(run_dir, plan), plan, keep)
        if overwrite:
            _remove_run(run_dir)
        elif _has_metrics(run_dir) or (directory.is_dir() and any(directory.iterdir())):
            raise RunDirError(
                f"{run_dir} holds another run{_status(run_dir)}: continue it with --resume, "
                "replace it with --overwrite, or choose another --run-dir"
            )
        run_id = uuid.uuid4().hex
        directory.mkdir(parents=True, exist_ok=True)
        save_json({"run_id": run_id, **asdict(plan)}, directory / RUN_RECORD)
        return cls(directory, run_id, plan, keep)

    def latest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The tensors and meta of the newest checkpoint, or None when the run has none yet."""
        step = self.store.latest()
        if step is None:
            return None
        try:
            tensors, meta = self.store.load(step)
        except CheckpointError as exc:
            raise RunDirError(str(exc)) from None
        if meta.get("run_id") != self.run_id or meta.get("fingerprint") != self.plan.fingerprint:
            raise RunDirError(f"{self.store.directory}: checkpoint {step} is not one of run {self.run_id} "
                              "with this configuration and model; remove it")
        return tensors, meta

    def save(self, step: int, engine: Engine, meta: dict[str, Any]) -> float:
        """Save the edge's half of step ``step`` (``meta``: the loop's part) and prune; returns the seconds it took."""
        start = time.perf_counter()
        tensors: dict[str, Any] = {
            name: {
                "layers": trainer.stage.layers.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "statistics": trainer.statistics.state_dict(),
            }
            for name, trainer in engine.trainers.items()
        }
        tensors["generators"] = {name: generator_state(g) for name, g in engine.generators.items()}
        decision = engine.decision.to_json()
        policy = {} if engine.policy is None else {"policy": engine.policy.state_dict()}
        run = {"run_id": self.run_id, "fingerprint": self.plan.fingerprint, "step": step,
               "total_steps": self.plan.total_steps, "steps_per_epoch": self.plan.steps_per_epoch}
        self.store.save(step, tensors, {**meta, **run, "decision": decision, **policy})
        self.store.prune()
        return time.perf_counter() - start


def restore_engine(engine: Engine, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Put a freshly built engine of this run in the state a checkpoint saved.

    The saved decision goes first, so that the optimizers have the saved parameter groups
    before their state is loaded.
    """
    engine.apply(Decision.from_json(meta["decision"]))
    try:
        for name, trainer in engine.trainers.items():
            trainer.stage.layers.load_state_dict(tensors[name]["layers"])
            trainer.optimizer.load_state_dict(tensors[name]["optimizer"])
            trainer.statistics.load_state_dict(tensors[name]["statistics"])
        for name, generator in engine.generators.items():
            restore_generator(generator, tensors["generators"][name])
        if engine.policy is not None:
            engine.policy.load_state_dict(meta["policy"])
    except (KeyError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunDirError(f"checkpoint of step {meta['step']} does not fit this run: {first}") from None


def traffic_to_json(counts: TrafficCounts) -> list[list[Any]]:
    """Traffic counts as JSON: ``[direction, kind, phase, bytes, messages]`` rows."""
    return [[*key, counts.nbytes[key], counts.messages.get(key, 0)] for key in sorted(counts.nbytes)]


def traffic_from_json(rows: list[list[Any]]) -> TrafficCounts:
    """The counts :func:`traffic_to_json` wrote."""
    return TrafficCounts({(d, k, p): n for d, k, p, n, _ in rows}, {(d, k, p): m for d, k, p, _, m in rows})


def traffic_sum(a: TrafficCounts, b: TrafficCounts) -> TrafficCounts:
    """The counts of ``a`` and ``b`` together."""
    keys = set(a.nbytes) | set(b.nbytes)
    return TrafficCounts(
        {k: a.nbytes.get(k, 0) + b.nbytes.get(k, 0) for k in keys},
        {k: a.messages.get(k, 0) + b.messages.get(k, 0) for k in keys},
    )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _differences(saved: dict[str, Any], now: dict[str, Any], limit: int = 4) -> str:
    """``train.lr: saved 0.05, now 0.1; ...`` for the keys whose values differ."""
    old, new = _flatten(saved), _flatten(now)
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    shown = "; ".join(f"{key}: saved {old.get(key)!r}, now {new.get(key)!r}" for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None


def _has_metrics(run_dir: Path) -> bool:
    try:
        return (run_dir / "metrics.jsonl").stat().st_size > 0
    except FileNotFoundError:
        return False


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    data = _read_json(path) if path.exists() else {}
    return data if isinstance(data, dict) else {}


def _status(run_dir: Path) -> str:
    summary = _summary(run_dir)
    # Summaries written before runs had a status are of completed runs.
    return f" ({summary.get('status', 'completed')} after {summary.get('steps')} steps)" if summary else ""


def _resumable(run_dir: Path, plan: RunPlan) -> str:
    """The id of the run in ``run_dir`` if ``plan`` may resume it."""
    record_path = run_dir / CHECKPOINTS / RUN_RECORD
    if not record_path.exists():
        raise RunDirError(f"nothing to resume in {run_dir}: it holds no {CHECKPOINTS}/{RUN_RECORD} "
                          "(start a new run without --resume)")
    record = _read_json(record_path)
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str) or not isinstance(
        record.get("config"), dict
    ):
        raise RunDirError(f"{record_path} is not a run record; use --overwrite to start the run again")
    if _summary(run_dir).get("status") == "completed":
        raise RunDirError(f"the run in {run_dir} completed; nothing to resume (use --overwrite to train it again)")
    if record.get("mode") != plan.mode:
        mode = str(record.get("mode"))
        raise RunDirError(f"{run_dir} holds a {mode} run: resume it with {_flag(mode)}")
    saved = RunPlan(**{key: record.get(key) for key in RunPlan.__dataclass_fields__})
    if saved.settings() != plan.settings():
        raise RunDirError(f"cannot resume {run_dir} with a changed configuration "
                          f"({_differences(saved.settings(), plan.settings())}); "
                          "resume with the configuration and flags it started with")
    if saved.fingerprint != plan.fingerprint:
        raise RunDirError(f"cannot resume {run_dir}: the model builds differently than when the run started")
    return record["run_id"]


def _remove_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
