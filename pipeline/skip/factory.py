"""Building the skip policy that the ``[skip]`` section and the Fujitsu CAC environment ask for."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pipeline.config import SkipSection
from pipeline.skip.cac import CacAutoPolicy, ManualPolicy, braking_start
from pipeline.skip.cac_env import cac_manual_stops, cac_stop_numbers, env_float, env_int, env_samples
from pipeline.skip.decisions import layer_boundary, parameters_before
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
    policy freezes or slows a tensor of the edge tail or of the last layer. ``max_boundary = 0``
    forbids freezing. ``param_layers`` is the layer of each tensor of ``model.parameters()``.

    ``env`` (default ``os.environ``) is read as CAC Gradient-Skip reads it:

    * ``CAC_STOP_LAYER_NUM`` and ``CAC_STOP_LAYER_ITR`` (comma lists), when both are set,
      select the manual policy whatever ``skip.policy`` says. CAC numbers *parameter tensors*
      (the order of ``model.parameters()``), not layers: number p stops tensors ``0..p`` (a
      BatchNorm or bias after p keeps training), braking from iteration S (steps count from 0).
      ``CAC_STOP_LAYER_NUM`` alone restricts cac-auto's targets to those tensors.
    * ``CAC_VAR_START_ITR``, ``CAC_VAR_START_THR`` (-1, or any number <= 0: Auto never stops),
      ``CAC_VAR_MT_COUNT_THR``, ``CAC_VAR_MT_THR``, ``CAC_VAR_SLOPE_THR`` and ``CAC_VAR_SAMPLES``
      (unset or <= 0: every braking distance steps when braking, else 200) override the cac-auto
      fields, ``CAC_BRAKING_DISTANCE`` the braking distance of cac-auto and manual.

    ``skip.stop_layers`` / ``skip.stop_steps`` stop whole layers, frozen from that step (braking
    before it). A malformed variable, a ``skip.stop_layers`` entry past the last layer or a
    ``skip.c2`` not before the last epoch raises ``ValueError`` naming it.
    """
    if num_layers < 1 or epochs < 1:
        raise ValueError(f"num_layers ({num_layers}) and epochs ({epochs}) must be positive")
    env = os.environ if env is None else env
    cap = max(0, num_layers - max(edge_tail, 1))
    if skip.max_boundary is not None:
        cap = min(cap, skip.max_boundary)
    # Read even when another policy is configured: the CAC stop variables override it.
    stops = cac_manual_stops(env, len(param_layers))
    if stops is not None:
        tensor_stops = [(p + 1, layer_boundary(p + 1, param_layers, cap), step) for p, step in stops]
        return _manual(skip, cap, param_layers, tensor_stops, env)
    targets = cac_stop_numbers(env, len(param_layers))
    if targets is not None and skip.policy != "cac-auto":
        raise ValueError(
            "environment variable CAC_STOP_LAYER_NUM alone chooses cac-auto's targets, but skip.policy is "
            f"{skip.policy!r}: set skip.policy = \"cac-auto\", or CAC_STOP_LAYER_ITR too for manual stops"
        )
    if skip.policy == "manual":
        for layer in skip.stop_layers:
            if layer >= num_layers:
                raise ValueError(
                    f"skip.stop_layers names layer {layer}, but the model has layers 0..{num_layers - 1}"
                )
        braking = env_int(env, "CAC_BRAKING_DISTANCE", skip.braking_distance, minimum=0)
        layer_stops = [
            (parameters_before(param_layers, layer + 1), layer + 1, braking_start(step, braking))
            for layer, step in zip(skip.stop_layers, skip.stop_steps)
        ]
        return _manual(skip, cap, param_layers, layer_stops, env)
    if skip.policy == "cac-auto":
        return _cac_auto(skip, cap, param_layers, targets, env)
    if skip.policy == "lars":
        return LarsPolicy(
            cap, param_layers, alpha=2.0 if skip.alpha is None else skip.alpha, full_every=skip.full_every,
            granularity=skip.granularity,
        )
    if skip.policy == "norm-ema":
        shift = max(1, round(0.1 * num_layers)) if skip.shift is None else skip.shift
        return NormEmaPolicy(
            cap, param_layers, alpha=0.3 if skip.alpha is None else skip.alpha, shift=shift, ema=skip.ema
        )
    if skip.policy == "schedule":
        if skip.c2 >= epochs:
            raise ValueError(
                f"skip.c2 ({skip.c2}) is the epoch freezing starts: "
                f"make it smaller than train.epochs ({epochs})"
            )
        c1 = cap if skip.c1 is None else skip.c1
        return SchedulePolicy(cap, param_layers, kind=skip.schedule, c1=c1, c2=skip.c2, epochs=epochs)
    return NonePolicy(cap, param_layers)


def _manual(
    skip: SkipSection, cap: int, param_layers: Sequence[int], stops: list[tuple[int, int, int]],
    env: Mapping[str, str],
) -> ManualPolicy:
    braking = env_int(env, "CAC_BRAKING_DISTANCE", skip.braking_distance, minimum=0)
    return ManualPolicy(cap, param_layers, stops, braking)


def _cac_auto(
    skip: SkipSection, cap: int, param_layers: Sequence[int], targets: list[int] | None, env: Mapping[str, str]
) -> CacAutoPolicy:
    braking = env_int(env, "CAC_BRAKING_DISTANCE", skip.braking_distance, minimum=0)
    return CacAutoPolicy(
        cap,
        param_layers,
        start_step=env_int(env, "CAC_VAR_START_ITR", skip.start_step, minimum=0),
        start_thr=env_float(env, "CAC_VAR_START_THR", skip.start_thr, positive=False),
        mt_count_thr=env_int(env, "CAC_VAR_MT_COUNT_THR", skip.mt_count_thr, minimum=0),
        mt_thr=env_float(env, "CAC_VAR_MT_THR", skip.mt_thr),
        slope_thr=env_float(env, "CAC_VAR_SLOPE_THR", skip.slope_thr),
        samples=env_samples(env, skip.samples, braking),
        braking=braking,
        targets=targets,
    )
