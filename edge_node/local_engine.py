"""The one-process reference run (``--local``): the whole model, the operations of a split step in the same order."""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from edge_node.engines import StepResult, batch_loss, micro_batches
from pipeline.blueprint import Blueprint
from pipeline.skip import Decision, SkipPolicy, StepStats
from pipeline.trainer import StageTrainer

__all__ = ["LocalEngine"]


class LocalEngine:
    """The whole model in this process: the reference a split run must match."""

    def __init__(self, blueprint: Blueprint) -> None:
        self.config = blueprint.config
        self.model = blueprint.model
        self.trainer = StageTrainer(self.model, 0, self.config.train)
        self.policy: SkipPolicy = blueprint.new_policy()
        #: What a checkpoint holds besides the policy: the trainers, and no generators.
        self.trainers = {"model": self.trainer}
        self.generators: dict[str, torch.Generator] = {}
        self.apply(self.policy.initial())

    def apply(self, decision: Decision) -> None:
        """Make ``decision`` the one the next step runs with."""
        self.decision = decision
        self.trainer.apply(decision)

    def step(
        self, step: int, epoch: int, lr: float, x: torch.Tensor, y: torch.Tensor, epoch_end: bool,
        checkpoint: bool = False,
    ) -> StepResult:
        """Forward every micro-batch, backward them in reverse (GPipe's order), step, decide.

        ``checkpoint`` is only reported back: there is no other side to ask.
        """
        stage = self.trainer.stage
        self.trainer.begin(lr)
        micro = micro_batches(x, y, self.config.partition.chunks)
        losses = [batch_loss(stage.forward(index, xi), yi, len(y)) for index, (xi, yi) in enumerate(micro)]
        start = time.perf_counter()
        for index in reversed(range(len(micro))):
            stage.backward(index, loss=losses[index])
        backward = time.perf_counter() - start
        total = sum(loss.item() for loss in losses)
        stats = StepStats(step, epoch, epoch_end, lr, tuple(self.trainer.commit(epoch_end=epoch_end)))
        self.apply(self.policy.decide(stats))
        return StepResult(total, self.decision, edge_backward_seconds=backward, checkpointed=checkpoint)

    def evaluate_many(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Logits of each batch, eval mode."""
        for xb in batches:
            yield self.trainer.stage.evaluate(xb)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained model."""
        return self.model.state_dict()
