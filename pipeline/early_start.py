"""When a step the edge began early still stands: both sides judge it alike from the two decisions."""
from __future__ import annotations

from collections.abc import Sequence

from pipeline.skip import Decision

__all__ = ["early_start_stands"]


def _frozen_tensors(decision: Decision, param_layers: Sequence[int]) -> int:
    below = sum(1 for layer in param_layers if layer < decision.boundary)
    return max(below, decision.frozen_parameters or 0)


def early_start_stands(
    before: Decision, after: Decision, *, edge_head: int, param_layers: Sequence[int], cache_frozen: bool
) -> bool:
    """Whether the activations of a step begun under ``before`` are what ``after`` computes too.

    The edge begins a step before it reads the decision for it (the previous step's done frame).
    Its head ran the same forward under both decisions when the same head layers are frozen
    whole (eval mode, no autograd) and the same head tensors are frozen; learning-rate factors
    and a boundary past the head change nothing there. With ``cache_frozen`` any move of the
    boundary also empties the cloud's activation cache, which the begun step may have named.
    ``param_layers`` is the layer of each tensor of ``model.parameters()``.
    """
    if cache_frozen and before.boundary != after.boundary:
        return False
    head_tensors = sum(1 for layer in param_layers if layer < edge_head)

    def head(decision: Decision) -> tuple[int, int]:
        return min(decision.boundary, edge_head), min(_frozen_tensors(decision, param_layers), head_tensors)

    return head(before) == head(after)
