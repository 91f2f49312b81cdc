"""Split-federated rules both sides share: rounds, what is exchanged, FedAvg in name order, the group's decision."""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from pipeline.blueprint import Blueprint
from pipeline.config import Config, ConfigError
from pipeline.optim import learning_rate
from pipeline.skip import Decision, LayerStatistics, StepStats

__all__ = [
    "Admission",
    "Contribution",
    "FEDERATION_FILE",
    "FederationError",
    "FederationRecord",
    "GroupPolicy",
    "check_federation",
    "edge_layers",
    "exchanged_keys",
    "fedavg",
    "federated",
    "layer_keys",
    "load_record",
    "round_ends",
]

#: What every edge of a split-federated run writes into its run directory: the group and, for
#: splitfed-v2, the order in which the cloud admitted the edges' steps (the reference replays it).
FEDERATION_FILE = "federation.json"


class FederationError(ValueError):
    """A federation file, or an order of steps, that cannot be replayed; the message says why."""


def federated(config: Config) -> bool:
    """Whether ``config`` trains a split-federated group (any mode but ``none``)."""
    return config.federation.mode != "none"


def check_federation(config: Config) -> None:
    """The checks of ``[federation]`` against the other sections (ConfigError naming the keys).

    The group's skip policy decides at round ends only, so a policy that samples every
    ``skip.samples`` steps must sample at round ends.
    """
    fed = config.federation
    if federated(config) and config.skip.policy == "cac-auto" and config.skip.samples % fed.sync_every:
        raise ConfigError(
            f"skip.samples ({config.skip.samples}) must be a multiple of federation.sync_every ({fed.sync_every}): "
            "a federation's skip policy decides at round ends only"
        )


def round_ends(step: int, *, sync_every: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether step ``step`` (0-based) is the last of a round: every ``sync_every`` steps, at every
    epoch's last step and at the run's last step."""
    return (step + 1) % sync_every == 0 or (step + 1) % steps_per_epoch == 0 or step == total_steps - 1


def layer_keys(model: nn.Sequential) -> list[list[str]]:
    """The state-dict keys of each top-level layer of ``model``, in layer order."""
    return [[f"{name}.{key}" for key in layer.state_dict()] for name, layer in model.named_children()]


def edge_layers(config: Config, num_layers: int) -> list[int]:
    """The indices of the layers an edge holds: its head and its tail."""
    head, tail = config.partition.edge_head, config.partition.edge_tail
    return [*range(head), *range(num_layers - tail, num_layers)]


def exchanged_keys(model: nn.Sequential, layers: Iterable[int], decision: Decision) -> list[str]:
    """The state-dict keys of ``layers`` that a round exchanges under ``decision``.

    Frozen layers and frozen tensors are left out: every edge holds the same values of them,
    since decisions only change at round ends, right after an average, and averaging equal
    values would round them.
    """
    frozen = decision.frozen_parameters
    left_out: set[str] = set()
    count = 0
    for index, (name, layer) in enumerate(model.named_children()):
        for param, _ in layer.named_parameters():
            if (count < frozen) if frozen is not None else index < decision.boundary:
                left_out.add(f"{name}.{param}")
            count += 1
    keys = layer_keys(model)
    return [key for index in sorted(layers) if index >= decision.boundary for key in keys[index] if key not in left_out]


@dataclass(frozen=True)
class Contribution:
    """One edge's part of a round: its name, its training samples (its FedAvg weight) and its tensors."""

    name: str
    samples: int
    tensors: Mapping[str, torch.Tensor]


def fedavg(parts: Sequence[Contribution]) -> dict[str, torch.Tensor]:
    """The samples-weighted average of each tensor, summed in the order of the edges' names.

    Floating-point sums depend on their order: a fixed order makes a round repeat bit for bit,
    wherever it is computed. Integer tensors (BatchNorm's step counters, equal on every edge
    that ran the same steps) are taken from the first edge. Every part must hold the same keys.
    """
    if not parts:
        raise ValueError("an average needs at least one edge")
    ordered = sorted(parts, key=lambda part: part.name)
    total = sum(part.samples for part in ordered)
    keys = list(ordered[0].tensors)
    averaged: dict[str, torch.Tensor] = {}
    for key in keys:
        first = ordered[0].tensors[key]
        if not first.is_floating_point():
            averaged[key] = first.detach().clone()
            continue
        acc = torch.zeros_like(first)
        for part in ordered:
            acc.add_(part.tensors[key].detach(), alpha=part.samples / total)
        averaged[key] = acc
    return averaged


class GroupPolicy:
    """The skip controller of a whole group: one policy, fed at round ends with the averaged model.

    After a round every edge holds the averaged model, so its statistics are the group's: the
    policy sees those of the round's last step, and its decision holds for every edge for the
    whole next round. The cloud keeps one, and the one-process reference another, so both
    decide the same.
    """

    def __init__(self, blueprint: Blueprint, *, total_steps: int) -> None:
        self.train = blueprint.config.train
        self.total_steps = total_steps
        self.model = copy.deepcopy(blueprint.model)
        self.state = self.model.state_dict()
        self.statistics = LayerStatistics(self.model, 0)
        self.policy = blueprint.new_policy()
        self.decision = self.policy.initial()

    def round_end(self, step: int, epoch: int, epoch_end: bool, averaged: Mapping[str, torch.Tensor]) -> Decision:
        """The decision after round-ending step ``step``, given the model's averaged tensors (frozen ones
        may be left out: they have not changed)."""
        with torch.no_grad():
            for key, tensor in averaged.items():
                self.state[key].copy_(tensor)
        layers = tuple(self.statistics.collect(epoch_end=epoch_end))
        lr = learning_rate(self.train, step, self.total_steps)
        self.decision = self.policy.decide(StepStats(step, epoch, epoch_end, lr, layers))
        return self.decision


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Admission(_Schema):
    """One step of one edge on the shared middle (splitfed-v2)."""

    edge: str
    step: int = Field(ge=0)


class FederationRecord(_Schema):
    """``federation.json``: the group an edge trained in and, for splitfed-v2, the cloud's admission order."""

    mode: Literal["splitfed-v1", "splitfed-v2"]
    sync_every: int = Field(ge=1)
    members: list[str]
    admissions: list[Admission] = []


def load_record(path: str | Path) -> FederationRecord:
    """Read a federation file; FederationError names the file and what is wrong."""
    path = Path(path)
    try:
        return FederationRecord.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise FederationError(f"cannot read the federation file {path}: {exc.strerror}") from None
    except ValueError as exc:  # JSON and pydantic errors alike
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise FederationError(f"{path} is not a federation file: {detail}") from None
