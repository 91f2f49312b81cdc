"""Building the skip policy that the ``[skip]`` section and the Fujitsu CAC environment ask for."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pipeline.config import SkipSection
from pipeline.skip.cac import CacAutoPolicy, ManualPolicy
from pipeline.skip.cac_env import cac_manual_stops, env_float, env_int
from pipeline.skip.policies import LarsPolicy, NonePolicy, NormEmaPolicy, SchedulePolicy, SkipPolicy

__all__ = ["make_policy"]


def make_policy(
    skip: SkipSection,
    *,
    num_layers: int,
    edge_tail: int,
    epochs: int,
    param_layers: Sequence[int],
    env: Mapping[str, str] | None = None,
) -> SkipPolicy:
    """Build the policy that ``skip`` (and the Fujitsu CAC environment variables) ask for.

    The cap, ``min(max_boundary, num_layers - max(edge_tail, 1))``, bounds every boundary: no
    policy freezes the edge tail or the last layer. ``max_boundary = 0`` forbids freezing.

    ``env`` (default ``os.environ``) is read as CAC Gradient-Skip reads it:

    * ``CAC_STOP_LAYER_NUM`` and ``CAC_STOP_LAYER_ITR`` (comma lists), when both are set,
      select the manual policy whatever ``skip.policy`` says. CAC numbers *parameter tensors*
      (the order of ``model.parameters()``), not layers: number p stops the layer
      ``param_layers[p]`` (see :func:`~pipeline.skip.cac_env.cac_parameter_layers`) and every
      layer before it, whole. Iteration S is the first step that does not train (steps count
      from 0).
    * ``CAC_VAR_START_ITR``, ``CAC_VAR_START_THR``, ``CAC_VAR_MT_COUNT_THR``,
      ``CAC_VAR_MT_THR``, ``CAC_VAR_SLOPE_THR`` and ``CAC_VAR_SAMPLES`` override the cac-auto
      fields, ``CAC_BRAKING_DISTANCE`` the braking distance of cac-auto and manual.

    A malformed variable, a ``skip.stop_layers`` entry past the last layer or a ``skip.c2``
    not before the last epoch raises ``ValueError`` naming it.
    """
    if num_layers < 1 or epochs < 1:
        raise ValueError(f"num_layers ({num_layers}) and epochs ({epochs}) must be positive")
    env = os.environ if env is None else env
    cap = max(0, num_layers - max(edge_tail, 1))
    if skip.max_boundary is not None:
        cap = min(cap, skip.max_boundary)
    # Read even when another policy is configured: the CAC stop variables override it.
    stops = cac_manual_stops(env, param_layers)
    if stops is not None or skip.policy == "manual":
        return _manual(skip, cap, num_layers, stops, env)
    if skip.policy == "cac-auto":
        return _cac_auto(skip, cap, env)
    if skip.policy == "lars":
        return LarsPolicy(cap, alpha=2.0 if skip.alpha is None else skip.alpha, full_every=skip.full_every)
    if skip.policy == "norm-ema":
        shift = max(1, round(0.1 * num_layers)) if skip.shift is None else skip.shift
        return NormEmaPolicy(cap, alpha=0.3 if skip.alpha is None else skip.alpha, shift=shift, ema=skip.ema)
    if skip.policy == "schedule":
        if skip.c2 >= epochs:
            raise ValueError(
                f"skip.c2 ({skip.c2}) is the epoch freezing starts: "
                f"make it smaller than train.epochs ({epochs})"
            )
        c1 = cap if skip.c1 is None else skip.c1
        return SchedulePolicy(cap, kind=skip.schedule, c1=c1, c2=skip.c2, epochs=epochs)
    return NonePolicy(cap)


def _manual(
    skip: SkipSection, cap: int, num_layers: int, stops: list[tuple[int, int]] | None,
    env: Mapping[str, str],
) -> ManualPolicy:
    if stops is None:
        stops = list(zip(skip.stop_layers, skip.stop_steps))
    for layer, _ in stops:
        if layer >= num_layers:
            raise ValueError(
                f"skip.stop_layers names layer {layer}, but the model has layers 0..{num_layers - 1}"
            )
    braking = env_int(env, "CAC_BRAKING_DISTANCE", skip.braking_distance, minimum=0)
    return ManualPolicy(cap, stops, braking)


def _cac_auto(skip: SkipSection, cap: int, env: Mapping[str, str]) -> CacAutoPolicy:
    return CacAutoPolicy(
        cap,
        start_step=env_int(env, "CAC_VAR_START_ITR", skip.start_step, minimum=0),
        start_thr=env_float(env, "CAC_VAR_START_THR", skip.start_thr),
        mt_count_thr=env_int(env, "CAC_VAR_MT_COUNT_THR", skip.mt_count_thr, minimum=0),
        mt_thr=env_float(env, "CAC_VAR_MT_THR", skip.mt_thr),
        slope_thr=env_float(env, "CAC_VAR_SLOPE_THR", skip.slope_thr),
        samples=env_int(env, "CAC_VAR_SAMPLES", skip.samples, minimum=1),
        braking=env_int(env, "CAC_BRAKING_DISTANCE", skip.braking_distance, minimum=0),
    )
