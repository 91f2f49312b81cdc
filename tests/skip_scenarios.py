"""Shared scenarios for the test_skip_* modules: a policy builder and step statistics (no tests here)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from pipeline.config import SkipSection
from pipeline.skip import Decision, LayerStat, ParamStat, SkipPolicy, StepStats, make_policy

#: The scenarios' model: layers 0, 2, 4 and 6 hold a convolution (kernel, bias), layer 7 a linear
#: layer (matrix, bias); tensors 0, 2, 4, 6 are the kernels (CAC's targets), 8 the matrix.
PARAM_LAYERS = (0, 0, 2, 2, 4, 4, 6, 6, 7, 7)
KERNEL, MATRIX, BIAS = (2, 2, 3, 3), (3, 2), (2,)

#: cac-auto's sampling in the scenarios: from step 20 on, every 10 steps.
CAC_START, CAC_SAMPLES = 20, 10
#: The same sampling as ``[skip]`` keys and as CAC environment variables.
CAC_CONFIGURED = {"start_step": CAC_START, "samples": CAC_SAMPLES}
CAC_ENV = {"CAC_VAR_START_ITR": str(CAC_START), "CAC_VAR_SAMPLES": str(CAC_SAMPLES)}

_UNREAD = 1e9  # a variance the policy must never read: as a peak it would stop the next target at once
# Variance of each layer's kernel at sample k (taken after step 19 + 10 k); the last value repeats.
_VARIANCES = {
    # First target: 1.06 / 1.1 = 0.964 is above start_thr; 1.04 / 1.1 = 0.945 is below (sample 3).
    0: [1.0, 1.1, 1.06, 1.04],
    # A mountain: first read at sample 3, peak updated 6 times (> 5) up to sample 8; then
    # 1.455 / 1.5 = 0.97 (a slope would stop here, a mountain not) and 1.43 / 1.5 = 0.953 < 0.96.
    2: [_UNREAD] * 3 + [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.455, 1.43],
    # A slope: first read at once when layer 2 stops (sample 10: 2.2 is the peak), then
    # 2.15 / 2.2 = 0.977 is below slope_thr and above mt_thr; 2.1 / 2.2 = 0.955 later.
    4: [_UNREAD] * 9 + [2.0, 2.2, 2.15, 2.15, 2.1],
    6: [_UNREAD],  # the cap (cac-auto's scenarios have 7 layers): never a target
}


def policy(
    *, num_layers: int = 8, edge_tail: int = 1, epochs: int = 4, param_layers: Sequence[int] = PARAM_LAYERS,
    env: Mapping[str, str] | None = None, **skip: object,
) -> SkipPolicy:
    """``make_policy`` for a ``[skip]`` section of ``skip`` keys, with an empty environment by default."""
    return make_policy(
        SkipSection(**skip),
        num_layers=num_layers,
        edge_tail=edge_tail,
        epochs=epochs,
        param_layers=param_layers,
        env={} if env is None else env,
    )


def step_stats(
    step: int, layers: Iterable[LayerStat] = (), *, epoch: int = 0, epoch_end: bool = False, lr: float = 0.1
) -> StepStats:
    """The statistics after ``step`` with base rate ``lr``."""
    return StepStats(step, epoch, epoch_end, lr, tuple(layers))


def layer(index: int, *, conv: bool = True, norm: float = 1.0, variance: float = 1.0,
          update: float | None = None) -> LayerStat:
    """Layer ``index`` with a kernel (``conv``) or a matrix of these statistics, and a bias."""
    bias_update = None if update is None else 0.0
    return LayerStat.of(index, [ParamStat(KERNEL if conv else MATRIX, norm, variance, update),
                                ParamStat(BIAS, 0.5, 0.25, bias_update)])


def run(skip_policy: SkipPolicy, stats_list: Iterable[StepStats]) -> list[Decision]:
    """Decisions indexed by the step they are for: [initial(), decision for step 1, ...]."""
    return [skip_policy.initial()] + [skip_policy.decide(stats) for stats in stats_list]


def boundaries(decisions: list[Decision]) -> list[int]:
    """The boundary of each decision."""
    return [d.boundary for d in decisions]


def changes(decisions: list[Decision]) -> dict[int, tuple[int | None, int]]:
    """{step: (frozen tensors, boundary)} for every step where they differ from the step before."""
    return {
        step: (d.frozen_parameters, d.boundary)
        for step, d in enumerate(decisions)
        if step > 0 and (d.frozen_parameters, d.boundary) != (decisions[step - 1].frozen_parameters,
                                                               decisions[step - 1].boundary)
    }


def epoch_stats(
    epochs_updates: Sequence[Mapping[int, tuple[bool, float]]], *, steps_per_epoch: int = 3,
    norms: Mapping[int, float] | None = None,
) -> list[StepStats]:
    """StepStats for whole epochs.

    ``epochs_updates[e]`` maps layer -> (has_conv, its update norm at the end of epoch e);
    ``norms`` gives weight norms (default 1.0).
    """
    stats = []
    for epoch, updates in enumerate(epochs_updates):
        for k in range(steps_per_epoch):
            end = k == steps_per_epoch - 1
            layers = [
                layer(index, conv=conv, norm=(norms or {}).get(index, 1.0), update=update if end else None)
                for index, (conv, update) in sorted(updates.items())
            ]
            stats.append(step_stats(epoch * steps_per_epoch + k, layers, epoch=epoch, epoch_end=end))
    return stats


def norm_ema_epochs(transition_norms: Iterable[tuple[int, float]]) -> list[dict[int, tuple[bool, float]]]:
    """Epochs where layer ``t`` has the given update norm and every other layer a tiny one."""
    return [
        {index: (True, norm if index == t else 1e-9) for index in (0, 2, 4, 6)}
        for t, norm in transition_norms
    ]


def cac_stats(steps: int = 200, lrs: Sequence[float] | None = None) -> list[StepStats]:
    """Steps whose kernel variances, at each cac-auto sample, follow ``_VARIANCES`` (see its comments)."""
    stats = []
    for step in range(steps):
        done = step + 1
        sampled = done >= CAC_START and done % CAC_SAMPLES == 0
        k = (done - CAC_START) // CAC_SAMPLES
        layers = [
            layer(index, variance=seq[min(k, len(seq) - 1)] if sampled else _UNREAD)
            for index, seq in _VARIANCES.items()
        ]
        stats.append(step_stats(step, layers, lr=0.1 if lrs is None else lrs[step]))
    return stats
