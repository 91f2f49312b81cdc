"""The skip controller: freeze policies, their statistics, and applying a freeze boundary."""
from __future__ import annotations

from pipeline.skip.boundary import apply_boundary, apply_decision, apply_lr_factors
from pipeline.skip.cac_env import cac_parameter_layers
from pipeline.skip.decisions import Decision, LayerStat, StepStats
from pipeline.skip.factory import make_policy
from pipeline.skip.policies import SkipPolicy
from pipeline.skip.statistics import LayerStatistics

__all__ = [
    "Decision",
    "LayerStat",
    "LayerStatistics",
    "SkipPolicy",
    "StepStats",
    "apply_boundary",
    "apply_decision",
    "apply_lr_factors",
    "cac_parameter_layers",
    "make_policy",
]
