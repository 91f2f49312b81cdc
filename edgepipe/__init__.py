"""edgepipe's Python API: load a configuration, build its model, train as an edge, serve as the cloud, read a run.

Everything a Python user needs is importable from here; the commands (``edgepipe``,
``edgepipe-cloud``, ``edgepipe-edge``) are thin layers over these names::

    import edgepipe

    config = edgepipe.load_config("my.toml")          # or edgepipe.parse_config({...})
    server, port, _ = edgepipe.serve(config, "127.0.0.1:0")
    summary = edgepipe.train(config, cloud=f"127.0.0.1:{port}", run_dir="runs/a")
    server.stop(None)
    run = edgepipe.read_run("runs/a")

:func:`train` is quiet; pass ``on_step`` / ``on_epoch`` callbacks (or a
:class:`TrainingProgress`) to see progress. Both :func:`train` and :func:`serve` take a
``model_factory`` (a callable returning an ``nn.Sequential``, used instead of ``[model] name``;
edge and cloud must use the same), and :func:`train` takes ``data=(train, validation)``: torch
``Dataset`` objects of ``(image, label)`` or ``(inputs, labels)`` tensor pairs. An edge of a
split-federated group trains ``train(..., shard=Shard(k, n))``; :func:`simulate_federation` is the
group's one-process reference. Devices come from ``[cloud] device`` / ``[edge] device``.
"""
from __future__ import annotations

from torch import nn

from cloud_node.servicer import serve
from edge_node.recovery import RunDirError
from edge_node.security import LinkSecurity
from edge_node.federation import simulate as simulate_federation
from edge_node.worker import EpochReport, StepReport, train
from edgepipe.progress import TrainingProgress
from pipeline.blueprint import Blueprint
from pipeline.config import Config, ConfigError, load_config, parse_config
from pipeline.data import DataError, Dataset, Shard
from pipeline.runs import Run, RunFileError
from pipeline.runs import load_run as read_run

__all__ = [
    "Blueprint",
    "Config",
    "ConfigError",
    "DataError",
    "Dataset",
    "EpochReport",
    "LinkSecurity",
    "Run",
    "RunDirError",
    "RunFileError",
    "Shard",
    "StepReport",
    "TrainingProgress",
    "build_model",
    "load_config",
    "parse_config",
    "read_run",
    "serve",
    "simulate_federation",
    "train",
]


def build_model(config: Config) -> nn.Sequential:
    """The untrained ``nn.Sequential`` a configuration describes, with its seeded initial weights.

    Raises :class:`ConfigError` (naming the key) when the configuration cannot be trained as a
    whole: the same checks the cloud makes at start-up.
    """
    return Blueprint(config).model
