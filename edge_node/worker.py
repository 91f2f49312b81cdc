"""Training as the edge, split or ``--local``: a run from its start or its checkpoint, reconnects, its files."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_node.engines import SplitEngine
from edge_node.federation import FederatedEngine, FederatedLink
from edge_node.link import CloudLink, LinkError, LinkSecurity
from edge_node.local_engine import LocalEngine
from edge_node.loop import EpochReport, Run, StepReport
from edge_node.reconnect import Reconnect
from edge_node.recovery import EdgeCheckpoints, Engine, RunDirError, RunPlan
from pipeline.blueprint import Blueprint
from pipeline.checkpoint import save_json, save_state
from pipeline.config import Config, ConfigError
from pipeline.data import DataError, Dataset, Shard, as_dataset, load_dataset, shard as take_shard
from pipeline.federation import FEDERATION_FILE, check_federation, federated
from pipeline.handshake import fingerprint
from pipeline.timeline import write_trace
from pipeline.traffic import TrafficMeter

__all__ = ["EpochReport", "StepReport", "train"]


def train(
    config: Config,
    *,
    run_dir: str | Path,
    cloud: str | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    edge_name: str = "edge",
    connect_timeout: float = 30.0,
    security: LinkSecurity | None = None,
    model_factory: Callable[[], nn.Sequential] | None = None,
    data: tuple[Any, Any] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    trace: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_link: Callable[[str], None] | None = None,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Train ``config`` split with the cloud at ``cloud`` (``HOST:PORT``), or in one process when it is None.

    Quiet: progress goes to ``on_step`` / ``on_epoch`` when given, and what happens to the run
    and the link (resumes, a lost cloud, each reconnect wait) to ``on_link`` as one-line
    messages. ``security`` is how the link checks the cloud and proves this edge (None: clear
    text to loopback only). ``model_factory`` builds the model instead of ``[model] name`` (the
    cloud must be served with the same); ``data`` is ``(train, validation)`` instead of
    ``[train] dataset``, each anything :func:`pipeline.data.as_dataset` takes (a torch
    ``Dataset`` or an ``(inputs, labels)`` pair). ``shard`` trains on that part of the training
    data only (:func:`pipeline.data.shard`), as one edge of a federation does.

    Writes ``metrics.jsonl`` as it goes, the edge's checkpoints to ``checkpoints/`` every
    ``[checkpoint] every_steps`` steps and at epoch ends, and ``summary.json`` and ``model.pt``
    at the end, all in ``run_dir``; with ``trace`` a Chrome/Perfetto trace of the split steps
    this call ran. A run that stops early leaves a summary with status ``interrupted`` or
    ``failed`` (and its ``reason``). ``resume`` continues the run in ``run_dir`` from its latest
    checkpoint; without it a ``run_dir`` holding another run is refused, unless ``overwrite``
    removes that run first. A cloud lost in mid-run is reconnected to for up to ``[link]
    reconnect_seconds``, and the steps after the last checkpoint are trained again.

    Returns the summary. Raises :class:`pipeline.config.ConfigError` for a configuration that
    cannot train, :class:`pipeline.trust.TrustError` for unusable ``security``,
    :class:`edge_node.recovery.RunDirError` for a run directory that cannot take this run,
    :class:`edge_node.link.LinkError` when the cloud fails or refuses,
    :class:`pipeline.data.DataError` for unusable data and :class:`OSError` when the run
    directory cannot be written.
    """
    blueprint = Blueprint(config, model_factory, side="edge")
    run_dir = Path(run_dir)
    group = federated(config)
    if group:
        _check_federated(config, cloud, resume)
    train_data, val_data = _datasets(config, data)
    if config.link.cache_frozen and train_data.augmented:
        raise ConfigError(
            "link.cache_frozen: the training data says it is randomly augmented, so a sample's frozen-head "
            "activation changes each time it is seen; set cache_frozen = false for this data"
        )
    if shard is not None:
        train_data = take_shard(train_data, shard, seed=config.model.seed)
    plan = _plan(config, blueprint, cloud, len(train_data), epochs or config.train.epochs, max_steps)
    meter = TrafficMeter()
    link = None
    if cloud is not None:
        link_type = FederatedLink if group else CloudLink
        link = link_type(cloud, config, blueprint.model, meter, connect_timeout=connect_timeout, security=security)

    def build(bp: Blueprint) -> Engine:
        if link is None:
            return LocalEngine(bp, run_dir)
        if group:
            return FederatedEngine(bp, link, edge_name, total_steps=plan.total_steps,
                                   steps_per_epoch=plan.steps_per_epoch, samples=len(train_data),
                                   record_path=run_dir / FEDERATION_FILE)
        return SplitEngine(bp, link, edge_name, total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch)

    try:
        checkpoints = EdgeCheckpoints.open(run_dir, plan, keep=config.checkpoint.keep, resume=resume,
                                           overwrite=overwrite)
        say = on_link or (lambda message: None)
        run = Run(config, meter, checkpoints, plan, on_step=on_step, on_epoch=on_epoch, on_link=say,
                  tracing=trace is not None)
        # A federated run keeps no checkpoints, so a lost cloud cannot be reconnected to: its group is gone.
        reconnect = None if cloud is None or group else Reconnect(cloud, config.link.reconnect_seconds, on_link)
        run.unconfirmed = group  # and no notice that the cloud saves no checkpoints: it is never asked
        eval_batch = config.train.eval_batch_size or config.micro_batch_size
        with _summary_if_stopped(run, plan.mode, run_dir / "summary.json"):
            resumed = _begin(run, build(blueprint), None)
            if resume:
                say(_resumed(run, resumed, "resuming run {run}"))
            state = _train_to_end(run, lambda: build(Blueprint(config, model_factory, side="edge")), reconnect,
                                  train_data, val_data, eval_batch)
    finally:
        if link is not None:
            link.close()
    save_state(state, run_dir / "model.pt")
    if trace is not None:
        write_trace(trace, [t for _, t in run.timelines], step_starts=[start for start, _ in run.timelines])
    summary = run.summary(plan.mode, "completed")
    save_json(summary, run_dir / "summary.json")
    return summary


def _check_federated(config: Config, cloud: str | None, resume: bool) -> None:
    """Refuse what a split-federated configuration cannot do: train alone, or resume."""
    check_federation(config)
    if cloud is None:
        raise ConfigError(
            f"federation.mode = {config.federation.mode!r} trains a group of edges with a cloud: give --cloud, "
            f"or train its one-process reference with --local --edges {config.federation.edges}"
        )
    if resume:
        raise RunDirError("a split-federated run keeps no checkpoints and cannot be resumed: start it again "
                          "(--overwrite), all edges together")


def _plan(
    config: Config, blueprint: Blueprint, cloud: str | None, samples: int, epochs: int, max_steps: int | None
) -> RunPlan:
    """The run's plan: where it trains, what it must share with a resume, and its length."""
    steps_per_epoch = samples // config.train.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"the training set has {samples} samples, fewer than train.batch_size = {config.train.batch_size}"
        )
    limit = max_steps or config.train.max_steps
    total_steps = epochs * steps_per_epoch if limit is None else min(limit, epochs * steps_per_epoch)
    return RunPlan("local" if cloud is None else "split", _planned(config), fingerprint(config, blueprint.model),
                   epochs, total_steps, steps_per_epoch)


@contextlib.contextmanager
def _summary_if_stopped(run: Run, mode: str, path: Path) -> Iterator[None]:
    """Close metrics.jsonl after the block; if it raised, leave a summary saying interrupted or failed, and why."""
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            summary = run.summary(mode, "interrupted")
        else:
            summary = run.summary(mode, "failed", _first_line(exc))
        # A run directory that cannot take its summary must not hide why the run stopped.
        with contextlib.suppress(OSError):
            save_json(summary, path)
        raise
    finally:
        run.close_metrics()


def _planned(config: Config) -> dict[str, Any]:
    """The configuration a resumed run must share: all of it but how long the edge retries a lost cloud
    and the devices (checkpoints are device-neutral: a run may resume on another device)."""
    data = config.to_dict()
    data["link"].pop("reconnect_seconds")
    data.pop("cloud")
    data.pop("edge")
    return data


def _begin(run: Run, engine: Engine, reconnect: Reconnect | None) -> int | None:
    """Rewind ``run`` onto ``engine`` and, split, open the run on the cloud (retried while ``reconnect``
    allows, when given); returns the checkpoint's step the run continues after, None from the start."""
    resume_step = run.rewind(engine)
    if isinstance(engine, SplitEngine):
        def attempt(wait: float | None) -> None:
            engine.open(run.checkpoints.run_id, resume_step=resume_step, wait=wait)

        if reconnect is None:
            attempt(None)
        else:
            reconnect.retry(attempt)
    run.opened()
    return resume_step


def _train_to_end(
    run: Run, rebuild: Callable[[], Engine], reconnect: Reconnect | None,
    train_data: Dataset, val_data: Dataset, eval_batch: int,
) -> dict[str, torch.Tensor]:
    """Train the rest of the run and return the trained model's state; a lost cloud is reconnected
    to and the steps after the last checkpoint trained again on a fresh engine."""
    while True:
        try:
            return _train_rest(run, train_data, val_data, eval_batch)
        except LinkError as exc:
            if reconnect is None or not reconnect.worth(exc):
                raise
            lost_at = run.step
            reconnect.lost(exc, lost_at)
            resumed = _begin(run, rebuild(), reconnect)
            redone = f"; steps {run.step}-{lost_at - 1} are trained again" if lost_at > run.step else ""
            what = f"reconnected to {reconnect.address}: run {{run}} continues"
            reconnect.report(_resumed(run, resumed, what) + redone)


def _train_rest(run: Run, train_data: Dataset, val_data: Dataset, eval_batch: int) -> dict[str, torch.Tensor]:
    steps_per_epoch = run.steps_per_epoch
    if run.step and run.step % steps_per_epoch == 0:
        # The checkpoint was the last step of an epoch, taken before that epoch's evaluation.
        run.evaluate(run.step // steps_per_epoch - 1, val_data, eval_batch)
    for epoch in range(run.step // steps_per_epoch, run.epochs):
        if run.step >= run.total_steps:
            break
        run.train_epoch(epoch, train_data)
        run.evaluate(epoch, val_data, eval_batch)
    return run.engine.state_dict()


def _resumed(run: Run, step: int | None, what: str) -> str:
    """``what`` (naming ``{run}``) and where the run continues: after checkpoint ``step``, or from the start."""
    where = "from the start: it has no checkpoint yet" if step is None else f"after step {step}, its latest checkpoint"
    return f"{what.format(run=run.checkpoints.run_id)} {where}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _datasets(config: Config, data: tuple[Any, Any] | None) -> tuple[Dataset, Dataset]:
    model = config.model
    if data is None:
        return load_dataset(
            config.train.dataset, input_shape=model.input_shape, num_classes=model.num_classes,
            val_fraction=config.train.val_fraction, seed=model.seed,
        )
    if not (isinstance(data, tuple) and len(data) == 2):
        raise DataError("data must be a (training, validation) pair")
    return tuple(  # type: ignore[return-value]
        as_dataset(part, input_shape=model.input_shape, num_classes=model.num_classes, what=what)
        for part, what in zip(data, ("training data", "validation data"))
    )
