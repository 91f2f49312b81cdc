"""A stage with its optimizer and skip statistics: the unit each side of a split run trains."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipeline.config import TrainSection
from pipeline.optim import build_optimizer, set_learning_rate
from pipeline.skip import Decision, LayerStat, LayerStatistics, apply_decision, parameters_before
from pipeline.stage import Stage

__all__ = ["StageTrainer"]


class StageTrainer:
    """Layers ``[offset, offset + len(layers))`` of the model, trained as one unit.

    The edge holds two (head and tail), the cloud one (the middle), the one-process reference
    one (the whole model); all of them step through the same calls in the same order.
    ``param_layers`` (the layer of each tensor of the whole model's ``parameters()``, as
    :attr:`pipeline.blueprint.Blueprint.param_layers` has it) places the stage's tensors in the
    model, which a decision that freezes or slows single tensors needs; a stage at offset 0
    knows it without.
    """

    def __init__(
        self, layers: nn.Sequential, offset: int, train: TrainSection, param_layers: Sequence[int] | None = None
    ) -> None:
        first = None
        if param_layers is not None:
            first = parameters_before(param_layers, offset)
            held = parameters_before(param_layers, offset + len(layers)) - first
            if held != len(list(layers.parameters())):
                raise ValueError(
                    f"layers {offset}..{offset + len(layers) - 1} hold {len(list(layers.parameters()))} "
                    f"parameter tensors, the model's map says {held}"
                )
        self.stage = Stage(layers, offset, first)
        self.optimizer = build_optimizer(layers, offset, train)
        self.statistics = LayerStatistics(layers, offset)

    def apply(self, decision: Decision) -> None:
        """Apply a skip decision (frozen tensors, boundary and learning-rate factors) to the stage and optimizer."""
        apply_decision(decision, self.stage, self.optimizer)

    def begin(self, lr: float) -> None:
        """Start a step at base learning rate ``lr``: clear gradients, remember BatchNorm buffers."""
        self.optimizer.zero_grad(set_to_none=True)
        set_learning_rate(self.optimizer, lr)
        self.stage.begin_step()

    def abort(self) -> None:
        """Forget an unfinished step: no optimizer step, BatchNorm buffers as before it."""
        self.stage.abort_step()
        self.optimizer.zero_grad(set_to_none=True)

    def commit(self, *, epoch_end: bool) -> list[LayerStat]:
        """Sum the micro-batch gradients, step the optimizer; return this stage's statistics."""
        self.stage.accumulate_gradients()
        self.optimizer.step()
        return self.statistics.collect(epoch_end=epoch_end)
