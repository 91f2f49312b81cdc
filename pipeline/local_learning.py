"""Local learning of a frozen edge head (``[skip] prefix = "local"``): an auxiliary classifier on the head's output."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pipeline.blueprint import Blueprint
from pipeline.config import TrainSection
from pipeline.skip import Decision, LayerStat
from pipeline.trainer import StageTrainer

__all__ = ["CLASSIFIER", "LocalHeadTrainer", "auxiliary_classifier", "local_head"]

#: The checkpoint entry of the auxiliary classifier (weights, optimizer state) beside the engine's stages.
CLASSIFIER = "local_classifier"

#: A micro-batch's loss from its logits, labels and the mini-batch's sample count (the main loss's function).
LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def auxiliary_classifier(sample_shape: Sequence[int], num_classes: int, seed: int) -> nn.Sequential:
    """Global average pooling, flatten and one Linear layer to ``num_classes``, on outputs of ``sample_shape``.

    A ``(C, H, W)`` output is averaged over its cells, a ``(C,)`` output taken as it is. The
    weights are drawn under a forked RNG seeded from ``seed`` (the model's seed, offset so that
    they do not repeat the model's first draws): equal seeds give equal classifiers anywhere.
    """
    if len(sample_shape) == 3:
        pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    elif len(sample_shape) == 1:
        pool = [nn.Flatten()]
    else:
        raise ValueError(
            f'skip.prefix = "local": the edge head outputs samples of shape {list(sample_shape)}; the auxiliary '
            "classifier takes (channels, height, width) or (features,)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)  # seed + 1 is the edge's stochastic rounding
        return nn.Sequential(*pool, nn.Linear(sample_shape[0], num_classes))


class LocalHeadTrainer(StageTrainer):
    """The edge head's trainer under ``[skip] prefix = "local"``, with its auxiliary classifier.

    Until a decision's boundary covers the whole head it is a plain head trainer (layers below
    the boundary frozen). From then on (:attr:`active`) every head layer trains, in its
    optimizer, from the local loss of :meth:`learn` instead of a gradient from the cloud: the
    classifier's loss on the head's output, backward through classifier and head, each
    micro-batch's parameter gradients kept apart and summed in GPipe's order like every stage's;
    :meth:`commit` steps both with the same hyper-parameters and rate. :attr:`classifier` is a
    stage trainer of its own (offset 0, never given a decision), checkpointed as :data:`CLASSIFIER`.
    """

    def __init__(
        self, layers: nn.Sequential, train: TrainSection, classifier: nn.Sequential, loss: LossFn,
        param_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__(layers, 0, train, param_layers)
        self.classifier = StageTrainer(classifier, 0, train)
        self._loss = loss
        self.active = False

    def apply(self, decision: Decision) -> None:
        """Apply ``decision``; one whose boundary covers the head leaves every head layer training (locally)."""
        self.active = decision.boundary >= len(self.stage.layers)
        super().apply(Decision(0) if self.active else decision)

    def begin(self, lr: float) -> None:
        """Start a step of head and classifier at base rate ``lr``."""
        super().begin(lr)
        self.classifier.begin(lr)

    def abort(self) -> None:
        """Forget an unfinished step of head and classifier."""
        super().abort()
        self.classifier.abort()

    def learn(self, key: int, activation: torch.Tensor, labels: torch.Tensor, samples: int) -> None:
        """Local loss and backward of micro-batch ``key`` while :attr:`active`.

        ``activation`` is the head's training output of :meth:`pipeline.stage.Stage.forward`
        for ``key``, ``labels`` its labels and ``samples`` the mini-batch's size.
        """
        classifier = self.classifier.stage
        logits = classifier.forward(key, activation, input_grad=True)
        grad = classifier.backward(key, loss=self._loss(logits, labels, samples))
        self.stage.backward(key, grad)

    def commit(self, *, epoch_end: bool) -> list[LayerStat]:
        """Step head and classifier; return the head's statistics (the classifier is no layer of the model)."""
        stats = super().commit(epoch_end=epoch_end)
        self.classifier.stage.accumulate_gradients()
        self.classifier.optimizer.step()  # without gradients (not active) SGD leaves every weight as it is
        return stats


def local_head(layers: nn.Sequential, blueprint: Blueprint, loss: LossFn) -> LocalHeadTrainer | None:
    """The trainer of the edge head ``layers`` under ``[skip] prefix = "local"``; None under ``"freeze"``.

    The classifier takes the head's output (the uplink's shape) on the blueprint's device;
    ``loss`` is the main loss's function.
    """
    config = blueprint.config
    if config.skip.prefix != "local":
        return None
    model = config.model
    classifier = auxiliary_classifier(blueprint.uplink_shape, model.num_classes, model.seed).to(blueprint.device)
    return LocalHeadTrainer(layers, config.train, classifier, loss, blueprint.param_layers)
