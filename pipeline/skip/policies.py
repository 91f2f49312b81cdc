"""The skip-policy interface and the policies decided on epoch statistics: none, lars, norm-ema, schedule."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from pipeline.skip.decisions import Decision, StepStats, layer_boundary, parameters_before

__all__ = ["LarsPolicy", "NonePolicy", "NormEmaPolicy", "SchedulePolicy", "SkipPolicy"]


class SkipPolicy(ABC):
    """A freeze policy: numbers in, :class:`Decision` out; no I/O and no tensors kept.

    Every decision's boundary is at most ``cap``. ``param_layers`` is the layer of each tensor of
    ``model.parameters()``: a policy decides whole layers (:meth:`_layers`) or a prefix of tensors
    (:meth:`_tensors`), and each decision carries both. A subclass lists the attributes that make
    up its state in ``_STATE``; they must be JSON values so checkpoints stay readable.
    """

    name: ClassVar[str]
    _STATE: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cap: int, param_layers: Sequence[int]) -> None:
        self.cap = cap
        self.param_layers = tuple(param_layers)

    def initial(self) -> Decision:
        """The decision for step 0."""
        return self._layers(0)

    def _layers(self, boundary: int) -> Decision:
        """Freeze the layers below ``boundary``, whole."""
        return Decision(boundary, {}, parameters_before(self.param_layers, boundary))

    def _tensors(
        self, frozen: int, factors: Mapping[int, float] | None = None, bases: Mapping[int, float] | None = None
    ) -> Decision:
        """Freeze the first ``frozen`` tensors; slow others by ``factors`` (from ``bases``)."""
        return Decision(layer_boundary(frozen, self.param_layers, self.cap), factors or {}, frozen, bases or {})

    @abstractmethod
    def decide(self, stats: StepStats) -> Decision:
        """Called after step ``stats.step``; returns the decision for step ``stats.step + 1``."""

    def state_dict(self) -> dict[str, Any]:
        """The policy's state, JSON-serialisable."""
        return {"policy": self.name, **{key: getattr(self, key) for key in self._STATE}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the next decisions equal the original's."""
        if state.get("policy") != self.name:
            raise ValueError(
                f"the checkpoint holds the state of skip policy {state.get('policy')!r}, "
                f"but this run uses {self.name!r}: resume with the configuration it was saved with"
            )
        missing = [key for key in self._STATE if key not in state]
        if missing:
            raise ValueError(f"skip policy state for {self.name!r} lacks {', '.join(missing)}")
        for key in self._STATE:
            setattr(self, key, state[key])


class NonePolicy(SkipPolicy):
    """Never freeze anything."""

    name = "none"

    def decide(self, stats: StepStats) -> Decision:
        """Always boundary 0."""
        return self._layers(0)


class LarsPolicy(SkipPolicy):
    """Layer skip learning with LARS variables, decided at epoch ends, whole layers at a time.

    ``nw = ||w|| / ||w - w_epoch_start||`` (an update norm of 0 gives infinity), with
    ``granularity`` "layer": for every layer with a convolution, over all its weights together
    (:class:`~pipeline.skip.decisions.LayerStat`); "conv": for every convolution kernel on its
    own, as the paper computes it per convolution layer (a MobileNetV2 block holds three). The
    boundary for the next epoch is 1 + the deepest layer with an ``nw > alpha``; it never moves
    back. With ``full_every`` K, the epochs K, 2K, 3K, ... (epochs count from 0) train every
    layer (boundary 0); at the end of such an epoch the boundary is computed afresh from that
    epoch's statistics alone.
    """

    name = "lars"
    _STATE = ("boundary",)

    def __init__(
        self, cap: int, param_layers: Sequence[int], *, alpha: float, full_every: int | None,
        granularity: Literal["layer", "conv"] = "layer",
    ) -> None:
        super().__init__(cap, param_layers)
        self.alpha = alpha
        self.full_every = full_every
        self.granularity = granularity
        self.boundary = 0

    def decide(self, stats: StepStats) -> Decision:
        """Move the boundary at an epoch end; keep it otherwise."""
        if stats.epoch_end:
            if self.full_every is not None and (stats.epoch + 1) % self.full_every == 0:
                self.boundary = 0
            else:
                self.boundary = max(self.boundary, self._skip_point(stats))
        return self._layers(self.boundary)

    def _skip_point(self, stats: StepStats) -> int:
        deepest = -1
        for s in stats.layers:
            if self.granularity == "conv":
                measured = [(p.norm, p.update_norm) for p in s.params if p.is_conv and p.update_norm is not None]
            elif s.has_conv and s.epoch_update_norm is not None:
                measured = [(s.weight_norm, s.epoch_update_norm)]
            else:
                measured = []
            if any(_nw(norm, update) > self.alpha for norm, update in measured):
                deepest = max(deepest, s.index)
        return min(deepest + 1, self.cap)


def _nw(norm: float, update: float) -> float:
    return norm / update if update > 0 else math.inf


class NormEmaPolicy(SkipPolicy):
    """Dynamic learning-mode selection on the transition layer's epoch update norm.

    The transition layer is the first layer with weights at or after the boundary. At each
    epoch end its update norm ``n`` first enters the running average
    (``avg = ema * avg + (1 - ema) * n``; the first epoch of a transition layer sets
    ``avg = n``), and then, if ``n < alpha * avg``, the boundary moves ``shift`` layers deeper,
    and at least past the transition layer. The average starts over whenever the transition
    layer changes.
    """

    name = "norm-ema"
    _STATE = ("boundary", "layer", "average")

    def __init__(self, cap: int, param_layers: Sequence[int], *, alpha: float, shift: int, ema: float) -> None:
        super().__init__(cap, param_layers)
        self.alpha = alpha
        self.shift = shift
        self.ema = ema
        self.boundary = 0
        self.layer = -1  # the transition layer that ``average`` belongs to, -1 for none
        self.average = 0.0

    def decide(self, stats: StepStats) -> Decision:
        """Move the boundary at an epoch end; keep it otherwise."""
        if stats.epoch_end:
            self._epoch_end(stats)
        return self._layers(self.boundary)

    def _epoch_end(self, stats: StepStats) -> None:
        measured = [
            (s.index, s.epoch_update_norm)
            for s in stats.layers
            if self.boundary <= s.index < self.cap and s.has_weights and s.epoch_update_norm is not None
        ]
        if not measured:
            return
        transition, norm = min(measured)
        if transition != self.layer:
            self.layer, self.average = transition, norm
        else:
            self.average = self.ema * self.average + (1.0 - self.ema) * norm
        if norm < self.alpha * self.average:
            self.boundary = min(self.cap, max(self.boundary + self.shift, transition + 1))
            self.layer, self.average = -1, 0.0


class SchedulePolicy(SkipPolicy):
    """A static boundary schedule over epochs.

    With E completed epochs (E = ``stats.epoch + 1`` after the last step of an epoch, else
    ``stats.epoch``) and ``u = clamp((E - c2) / (epochs - c2), 0, 1)`` the boundary is
    ``floor(c1 * u)``, ``floor(c1 * u**2)`` or ``floor(c1 * (2**u - 1))``, capped.
    """

    name = "schedule"

    def __init__(self, cap: int, param_layers: Sequence[int], *, kind: str, c1: int, c2: int, epochs: int) -> None:
        super().__init__(cap, param_layers)
        self.kind = kind
        self.c1 = c1
        self.c2 = c2
        self.epochs = epochs

    def initial(self) -> Decision:
        """The schedule's boundary with no epoch completed."""
        return self._layers(self._boundary(0))

    def decide(self, stats: StepStats) -> Decision:
        """The schedule's boundary for the epochs completed after this step."""
        return self._layers(self._boundary(stats.epoch + (1 if stats.epoch_end else 0)))

    def _boundary(self, completed: int) -> int:
        span = self.epochs - self.c2
        done = min(max(completed - self.c2, 0), span)
        # Integer arithmetic where possible: floor(8 * 1/3 * 3) must not become 7.999... -> 7.
        if self.kind == "linear":
            value = self.c1 * done // span
        elif self.kind == "quadratic":
            value = self.c1 * done * done // (span * span)
        else:
            value = math.floor(self.c1 * (2.0 ** (done / span) - 1.0) + 1e-9)
        return min(value, self.cap)
