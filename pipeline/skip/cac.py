"""The step-based policies of Fujitsu CAC Gradient-Skip: manual stops and auto (weight variance)."""
from __future__ import annotations

from collections.abc import Sequence

from pipeline.skip.decisions import Decision, LayerStat, StepStats
from pipeline.skip.policies import SkipPolicy

__all__ = ["CacAutoPolicy", "ManualPolicy"]


class ManualPolicy(SkipPolicy):
    """Fixed stops: from step ``S_k`` on, layer ``L_k`` and every layer before it are frozen.

    With ``braking`` N > 0 a layer that freezes at step S trains at step s in ``(S - N, S)``
    with lr factor ``((S - s) / N) ** 2``. Every layer's braking is planned on its own, so
    stops closer together than N all happen (CAC's implementation ignores a stop that falls
    inside the braking of the previous one). The policy is a pure function of the step.
    """

    name = "manual"

    def __init__(self, cap: int, stops: Sequence[tuple[int, int]], braking: int) -> None:
        super().__init__(cap)
        self.braking = braking
        # The step at which each layer below the cap freezes: the earliest stop at or above it.
        # It never decreases with the layer index, which makes the boundary a simple count.
        self._freeze_at = [
            min((step for layer, step in stops if layer >= index), default=None) for index in range(cap)
        ]

    def initial(self) -> Decision:
        """The stops that take effect at step 0."""
        return self._decision(0)

    def decide(self, stats: StepStats) -> Decision:
        """The stops and braking factors for the next step."""
        return self._decision(stats.step + 1)

    def _decision(self, step: int) -> Decision:
        boundary = sum(1 for at in self._freeze_at if at is not None and at <= step)
        factors = {
            index: ((at - step) / self.braking) ** 2
            for index, at in enumerate(self._freeze_at[boundary:], start=boundary)
            if at is not None and at - step < self.braking
        }
        return Decision(boundary, factors)


class CacAutoPolicy(SkipPolicy):
    """CAC Gradient-Skip's Auto mode: freeze layer after layer when its weight variance falls.

    Targets are the layers with weights, in order, starting at the boundary. After ``n``
    completed steps (``n = stats.step + 1``, CAC's iteration counter), when
    ``n >= start_step`` and ``n % samples == 0``, the target's variance is read: a value at or
    above the running peak becomes the peak and counts as a peak update; a lower one gives
    ``ratio = variance / peak``, and the target stops when the ratio is below ``start_thr``
    (first target), ``mt_thr`` (peak updated more than ``mt_count_thr`` times: a "mountain")
    or ``slope_thr`` (a "slope"). As in CAC the next target's first sample is taken from the
    same statistics, and no samples are taken while a target brakes.

    With ``braking`` N > 1 a target decided after step s trains at steps s+1 .. s+N-1 with
    lr factor ``((s + N - t) / N) ** 2`` at step t and is frozen from step s+N on (CAC's last
    braking step has factor 0, which is the same as frozen); otherwise it freezes at s+1.
    """

    name = "cac-auto"
    _STATE = ("boundary", "pending", "freeze_step", "peak", "peak_updates", "decided")

    def __init__(
        self,
        cap: int,
        *,
        start_step: int,
        start_thr: float,
        mt_count_thr: int,
        mt_thr: float,
        slope_thr: float,
        samples: int,
        braking: int,
    ) -> None:
        super().__init__(cap)
        self.start_step = start_step
        self.start_thr = start_thr
        self.mt_count_thr = mt_count_thr
        self.mt_thr = mt_thr
        self.slope_thr = slope_thr
        self.samples = samples
        self.braking = braking
        self.boundary = 0
        self.pending = -1  # the target that brakes, -1 when none does
        self.freeze_step = 0  # the step from which the pending target is frozen
        self.peak = 0.0
        self.peak_updates = 0
        self.decided = 0

    def decide(self, stats: StepStats) -> Decision:
        """Sample the target's variance when due; freeze or brake the decided target."""
        step = stats.step + 1
        if self.pending < 0 and step >= self.start_step and step % self.samples == 0:
            self._sample(stats, step)
        if self.pending >= 0 and step >= self.freeze_step:
            self.boundary, self.pending = self.pending + 1, -1
        factors: dict[int, float] = {}
        if self.pending >= 0:
            factor = ((self.freeze_step - step) / self.braking) ** 2
            factors = dict.fromkeys(range(self.boundary, self.pending + 1), factor)
        return Decision(self.boundary, factors)

    def _target(self, stats: StepStats, first: int) -> LayerStat | None:
        candidates = [s for s in stats.layers if first <= s.index < self.cap]
        return min(candidates, key=lambda s: s.index, default=None)

    def _sample(self, stats: StepStats, step: int) -> None:
        target = self._target(stats, self.boundary)
        if target is None:
            return
        variance = target.weight_variance
        if variance >= self.peak:
            self.peak = variance
            self.peak_updates += 1
            return
        if self.decided == 0:
            threshold = self.start_thr
        elif self.peak_updates > self.mt_count_thr:
            threshold = self.mt_thr
        else:
            threshold = self.slope_thr
        if variance / self.peak >= threshold:
            return
        self.decided += 1
        self.pending = target.index
        self.freeze_step = step + max(self.braking - 1, 0)
        following = self._target(stats, target.index + 1)
        self.peak = following.weight_variance if following is not None else 0.0
        self.peak_updates = 1 if following is not None else 0
