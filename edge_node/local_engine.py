"""The one-process reference run (``--local``): the whole model, the operations of a split step in the same order."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from edge_node.engines import NextStep, StepResult, batch_loss, micro_batches
from pipeline.blueprint import Blueprint
from pipeline.config import ConfigError
from pipeline.local_learning import CLASSIFIER, local_head
from pipeline.skip import Decision, SkipPolicy, StepStats
from pipeline.skip.recorder import StatsRecorder
from pipeline.trainer import StageTrainer

__all__ = ["LocalEngine"]


class LocalEngine:
    """The whole model in this process: the reference a split run must match.

    With ``[skip] record = true`` the policy's statistics go to ``run_dir``/skip_stats.jsonl.
    Under ``[skip] prefix = "local"`` the edge head is a stage of its own, as in a split run:
    its gradient comes across the cut from the rest of the model, or, once the boundary covers
    it, from its local loss (:mod:`pipeline.local_learning`).
    """

    def __init__(self, blueprint: Blueprint, run_dir: Path | None = None) -> None:
        self.config = blueprint.config
        self.model = blueprint.model.to(blueprint.device)
        self.device = blueprint.device
        edge_head = blueprint.cuts.edge_head
        self.local = local_head(self.model[:edge_head], blueprint, batch_loss)
        rest = self.model if self.local is None else self.model[edge_head:]
        self.trainer = StageTrainer(rest, 0 if self.local is None else edge_head, self.config.train,
                                    blueprint.param_layers)
        self.policy: SkipPolicy = blueprint.new_policy()
        if self.config.skip.record:
            if run_dir is None:
                raise ConfigError("skip.record: the one-process run records into its run directory; none was given")
            self.policy = StatsRecorder(self.policy, Path(run_dir) / "skip_stats.jsonl")
        #: What a checkpoint holds besides the policy: the trainers, and no generators.
        self.trainers = {"model": self.trainer}
        if self.local is not None:
            self.trainers = {"head": self.local, "model": self.trainer, CLASSIFIER: self.local.classifier}
        self.generators: dict[str, torch.Generator] = {}
        self.apply(self.policy.initial())

    def apply(self, decision: Decision) -> None:
        """Make ``decision`` the one the next step runs with."""
        self.decision = decision
        for trainer in self._stages:
            trainer.apply(decision)

    @property
    def _stages(self) -> list[StageTrainer]:
        return [self.trainer] if self.local is None else [self.local, self.trainer]

    def _forward(self, index: int, x: torch.Tensor, y: torch.Tensor, samples: int) -> torch.Tensor:
        """The logits of micro-batch ``index``; a head that learns locally takes its local loss's backward at once."""
        if self.local is None:
            return self.trainer.stage.forward(index, x)
        head = self.local.stage.forward(index, x)
        if self.local.active:
            self.local.learn(index, head, y, samples)
        return self.trainer.stage.forward(index, head, input_grad=not self.local.active)

    def step(
        self, step: int, epoch: int, lr: float, x: torch.Tensor, y: torch.Tensor, epoch_end: bool,
        checkpoint: bool = False, following: NextStep | None = None, indices: torch.Tensor | None = None,
    ) -> StepResult:
        """Forward every micro-batch, backward them in reverse (GPipe's order), step, decide.

        ``checkpoint`` is only reported back: there is no other side to ask, no link to keep
        busy with ``following`` and no cloud to cache the activations of ``indices``.
        """
        stage = self.trainer.stage
        for trainer in self._stages:
            trainer.begin(lr)
        micro = micro_batches(x.to(self.device), y.to(self.device), self.config.partition.chunks)
        losses = [batch_loss(self._forward(index, xi, yi, len(y)), yi, len(y)) for index, (xi, yi) in enumerate(micro)]
        start = time.perf_counter()
        for index in reversed(range(len(micro))):
            grad = stage.backward(index, loss=losses[index])
            if self.local is not None and grad is not None:  # the head's gradient at the cut, as the cloud sends it
                self.local.stage.backward(index, grad)
        backward = time.perf_counter() - start
        total = sum(loss.item() for loss in losses)
        stats = StepStats(step, epoch, epoch_end, lr,
                          tuple(stat for trainer in self._stages for stat in trainer.commit(epoch_end=epoch_end)))
        self.apply(self.policy.decide(stats))
        return StepResult(total, self.decision, edge_backward_seconds=backward, checkpointed=checkpoint)

    def evaluate_many(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Logits of each batch, eval mode."""
        for xb in batches:
            x = xb.to(self.device)
            if self.local is not None:
                x = self.local.stage.evaluate(x)
            yield self.trainer.stage.evaluate(x).cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained model."""
        return self.model.state_dict()
