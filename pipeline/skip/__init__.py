"""The skip controller: freeze policies, their statistics, and applying a freeze decision."""
from __future__ import annotations

from pipeline.skip.boundary import apply_decision
from pipeline.skip.cac_env import cac_parameter_layers
from pipeline.skip.decisions import Decision, LayerStat, ParamStat, StepStats, layer_boundary, parameters_before
from pipeline.skip.factory import make_policy
from pipeline.skip.policies import SkipPolicy
from pipeline.skip.statistics import LayerStatistics

__all__ = [
    "Decision",
    "LayerStat",
    "LayerStatistics",
    "ParamStat",
    "SkipPolicy",
    "StepStats",
    "apply_decision",
    "cac_parameter_layers",
    "layer_boundary",
    "make_policy",
    "parameters_before",
]
