"""The step-based policies of Fujitsu CAC Gradient-Skip: manual stops and auto (weight variance), per tensor."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.skip.decisions import Decision, ParamStat, StepStats, parameters_before
from pipeline.skip.policies import SkipPolicy

__all__ = ["CacAutoPolicy", "ManualPolicy", "braking_start", "freeze_step"]


def freeze_step(start: int, braking: int) -> int:
    """The first frozen step of a stop whose braking starts at step ``start`` (CAC's timing).

    With braking distance N >= 2 the steps ``start .. start + N - 2`` brake and the stop is frozen
    from ``start + N - 1`` (CAC's last braking factor would be 0: frozen); with N = 1 from
    ``start``; with N = 0 CAC still trains ``start`` and freezes from ``start + 1``.
    """
    return start + braking - 1 if braking >= 1 else start + 1


def braking_start(frozen_from: int, braking: int) -> int:
    """The braking start of a stop that is frozen from step ``frozen_from`` (the inverse of :func:`freeze_step`)."""
    return frozen_from - braking + 1 if braking >= 1 else frozen_from - 1


def _factor(frozen_from: int, step: int, braking: int) -> float:
    return ((frozen_from - step) / braking) ** 2


class ManualPolicy(SkipPolicy):
    """Fixed stops, each ``(frozen, boundary, start)``: braking from step ``start`` on, the stop
    freezes the first ``frozen`` tensors of ``model.parameters()`` (and the layers below
    ``boundary`` whole).

    CAC's ``CAC_STOP_LAYER_NUM`` p is ``frozen = p + 1`` (a BatchNorm or bias after tensor p
    keeps training) and ``CAC_STOP_LAYER_ITR`` is ``start``; ``[skip] stop_layers`` L is the
    whole layers up to L, and ``stop_steps`` the first frozen step (:func:`braking_start`
    turns it into ``start``). With braking distance
    N the stopping tensors train at steps ``S .. S + N - 2`` with lr factor
    ``((S + N - 1 - t) / N) ** 2`` at step t, times the base rate of step S (CAC brakes from the
    rate the braking began at, which matters under the cosine schedule), and freeze from
    ``S + N - 1``; with N = 0 they train step S and freeze from S + 1 (:func:`freeze_step`).

    Deliberately unlike CAC: every stop's braking is planned on its own, so stops closer
    together than N all happen (CAC's implementation drops a stop that falls inside the braking
    of the previous one, and every stop after it).
    """

    name = "manual"
    _STATE = ("bases",)

    def __init__(
        self, cap: int, param_layers: Sequence[int], stops: Sequence[tuple[int, int, int]], braking: int
    ) -> None:
        super().__init__(cap, param_layers)
        self.braking = braking
        limit = parameters_before(param_layers, cap)
        # No stop reaches past the cap; a stop that would keeps to it.
        self.stops = [(min(frozen, limit), min(boundary, cap), start) for frozen, boundary, start in stops]
        #: The base rate each stop brakes from: that of its first braking step, once it is known.
        self.bases: list[float | None] = [None] * len(self.stops)

    def initial(self) -> Decision:
        """The stops that take effect at step 0."""
        return self._decision(0)

    def decide(self, stats: StepStats) -> Decision:
        """The stops and braking factors for the next step."""
        for k, (_, _, start) in enumerate(self.stops):
            if stats.step == start:
                self.bases[k] = stats.lr
        return self._decision(stats.step + 1)

    def _decision(self, step: int) -> Decision:
        fired = [(frozen, boundary) for frozen, boundary, start in self.stops
                 if freeze_step(start, self.braking) <= step]
        frozen = max((f for f, _ in fired), default=0)
        boundary = max((b for _, b in fired), default=0)
        factors: dict[int, float] = {}
        bases: dict[int, float] = {}
        # Each tensor brakes for the stop that freezes it first.
        for k, (stop_frozen, _, start) in sorted(
            enumerate(self.stops), key=lambda item: freeze_step(item[1][2], self.braking)
        ):
            frozen_from = freeze_step(start, self.braking)
            if self.braking < 2 or not start <= step < frozen_from:
                continue
            for index in range(frozen, stop_frozen):
                if index not in factors:
                    factors[index] = _factor(frozen_from, step, self.braking)
                    if step > start and self.bases[k] is not None:
                        bases[index] = self.bases[k]
        return Decision(boundary, factors, frozen, bases)


class CacAutoPolicy(SkipPolicy):
    """CAC Gradient-Skip's Auto mode: freeze tensor after tensor when its weight variance falls.

    The targets are ``targets`` (tensor indices; default: every 4-D tensor, i.e. each
    convolution kernel on its own, in ``model.parameters()`` order) below the cap; the current
    one is the first at or after the frozen prefix. After ``n`` completed steps (``n =
    stats.step + 1``, CAC's iteration counter), when ``n >= start_step`` and ``n % samples ==
    0``, the target's variance (of that tensor alone) is read: a value at or above the running
    peak becomes the peak and counts as a peak update; a lower one gives ``ratio = variance /
    peak``, and the target stops when the ratio is below ``start_thr`` (first target; a negative
    one turns Auto off), ``mt_thr`` (peak updated more than ``mt_count_thr`` times: a
    "mountain") or ``slope_thr`` (a "slope"). Comparisons are in float32, as CAC's. As in CAC the
    next target's first sample is taken from the same statistics, and no samples are taken
    while a target brakes.

    Stopping target p freezes tensors ``0..p`` (a BatchNorm or bias after it keeps training).
    Decided after step s, it brakes from step s + 1 with braking distance N and freezes as
    :func:`freeze_step` says for ``start = s + 1``: with N = 0 step s + 1 still trains and the
    target freezes from s + 2; with N >= 2 the factors at steps s + 1 .. s + N - 1 are
    ``((s + N - t) / N) ** 2`` times the base rate of step s + 1.
    """

    name = "cac-auto"
    _STATE = ("frozen", "pending", "frozen_from", "base", "peak", "peak_updates", "decided")

    def __init__(
        self,
        cap: int,
        param_layers: Sequence[int],
        *,
        start_step: int,
        start_thr: float,
        mt_count_thr: int,
        mt_thr: float,
        slope_thr: float,
        samples: int,
        braking: int,
        targets: Sequence[int] | None = None,
    ) -> None:
        super().__init__(cap, param_layers)
        self.start_step = start_step
        self.start_thr = start_thr
        self.mt_count_thr = mt_count_thr
        self.mt_thr = mt_thr
        self.slope_thr = slope_thr
        self.samples = samples
        self.braking = braking
        self.targets = None if targets is None else sorted(set(targets))
        self.limit = parameters_before(param_layers, cap)  # tensors at or past it are never targets
        self.frozen = 0
        self.pending = -1  # the target that brakes, -1 when none does
        self.frozen_from = 0  # the step from which the pending target is frozen
        self.base: float | None = None  # the base rate of the pending target's first braking step
        self.peak = 0.0
        self.peak_updates = 0
        self.decided = 0

    def decide(self, stats: StepStats) -> Decision:
        """Sample the target's variance when due; freeze or brake the decided target."""
        step = stats.step + 1
        if self.pending >= 0 and self.base is None:
            self.base = stats.lr  # the step just done was the first braking step
        if self.pending < 0 and step >= self.start_step and step % self.samples == 0:
            self._sample(dict(stats.parameters(self.param_layers)), step)
        if self.pending >= 0 and step >= self.frozen_from:
            self.frozen, self.pending, self.base = self.pending + 1, -1, None
        factors: dict[int, float] = {}
        bases: dict[int, float] = {}
        if self.pending >= 0 and self.braking >= 2:
            factors = dict.fromkeys(range(self.frozen, self.pending + 1), _factor(self.frozen_from, step, self.braking))
            if self.base is not None:
                bases = dict.fromkeys(factors, self.base)
        return self._tensors(self.frozen, factors, bases)

    def _target(self, params: dict[int, ParamStat], first: int) -> int | None:
        if self.targets is not None:
            candidates = [t for t in self.targets if first <= t < self.limit and t in params]
        else:
            candidates = [i for i, p in params.items() if first <= i < self.limit and len(p.shape) == 4]
        return min(candidates, default=None)

    def _sample(self, params: dict[int, ParamStat], step: int) -> None:
        target = self._target(params, self.frozen)
        if target is None:
            return
        variance = np.float32(params[target].variance)
        if variance >= np.float32(self.peak):
            self.peak = float(variance)
            self.peak_updates += 1
            return
        if self.decided == 0:
            threshold = self.start_thr
        elif self.peak_updates > self.mt_count_thr:
            threshold = self.mt_thr
        else:
            threshold = self.slope_thr
        if variance / np.float32(self.peak) >= np.float32(threshold):
            return
        self.decided += 1
        self.pending = target
        self.frozen_from = freeze_step(step, self.braking)
        self.base = None
        following = self._target(params, target + 1)
        self.peak = float(np.float32(params[following].variance)) if following is not None else 0.0
        self.peak_updates = 1 if following is not None else 0
