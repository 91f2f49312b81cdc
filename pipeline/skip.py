"""The skip controller and its freeze policies; applying a freeze boundary to modules and optimizer."""
from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from pipeline.config import SkipSection
from pipeline.stage import Stage

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

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: The modules whose ``.weight`` makes up a layer's "weights" in the statistics.
_WEIGHTED = (*_CONVS, nn.Linear)


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LayerStat:
    """Statistics of one layer that has Conv/Linear weights, taken at the end of a step.

    ``index`` is the global layer index; the "weights" are the ``.weight`` tensors of the
    layer's Conv/Linear modules, concatenated; ``weight_variance`` is unbiased (as CAC's);
    ``epoch_update_norm`` is ``||w_now - w_epoch_start||`` on an epoch's last step, else None.
    """

    index: int
    has_conv: bool
    weight_norm: float
    weight_variance: float
    epoch_update_norm: float | None


@dataclass(frozen=True)
class StepStats:
    """What the policies see after optimizer step ``step`` (0-based) of epoch ``epoch`` (0-based).

    ``epoch_end`` marks an epoch's last step, ``lr`` is that step's base rate, and ``layers``
    holds both sides' statistics sorted by index.
    """

    step: int
    epoch: int
    epoch_end: bool
    lr: float
    layers: tuple[LayerStat, ...]


@dataclass(frozen=True)
class Decision:
    """Freeze layers ``[0, boundary)``; ``lr_factors`` slows single layers (absent means 1.0)."""

    boundary: int
    lr_factors: Mapping[int, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------- policies


class SkipPolicy(ABC):
    """A freeze policy: numbers in, :class:`Decision` out; no I/O and no tensors kept.

    Every decision's boundary is at most ``cap``. A subclass lists the attributes that make up
    its state in ``_STATE``; they must be JSON numbers so checkpoints stay readable.
    """

    name: ClassVar[str]
    _STATE: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cap: int) -> None:
        self.cap = cap

    def initial(self) -> Decision:
        """The decision for step 0."""
        return Decision(0)

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
        return Decision(0)


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
        return self._decision(0)

    def decide(self, stats: StepStats) -> Decision:
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


class LarsPolicy(SkipPolicy):
    """Layer skip learning with LARS variables, decided at epoch ends.

    For every layer with a convolution, ``nw = weight_norm / epoch_update_norm`` (an update
    norm of 0 gives infinity). The boundary for the next epoch is 1 + the deepest such layer
    with ``nw > alpha``; it never moves back. With ``full_every`` K, the epochs K, 2K, 3K, ...
    (epochs count from 0) train every layer (boundary 0); at the end of such an epoch the
    boundary is computed afresh from that epoch's statistics alone.
    """

    name = "lars"
    _STATE = ("boundary",)

    def __init__(self, cap: int, *, alpha: float, full_every: int | None) -> None:
        super().__init__(cap)
        self.alpha = alpha
        self.full_every = full_every
        self.boundary = 0

    def decide(self, stats: StepStats) -> Decision:
        if stats.epoch_end:
            if self.full_every is not None and (stats.epoch + 1) % self.full_every == 0:
                self.boundary = 0
            else:
                self.boundary = max(self.boundary, self._skip_point(stats))
        return Decision(self.boundary)

    def _skip_point(self, stats: StepStats) -> int:
        deepest = -1
        for s in stats.layers:
            if s.has_conv and s.epoch_update_norm is not None:
                nw = s.weight_norm / s.epoch_update_norm if s.epoch_update_norm > 0 else math.inf
                if nw > self.alpha:
                    deepest = max(deepest, s.index)
        return min(deepest + 1, self.cap)


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

    def __init__(self, cap: int, *, alpha: float, shift: int, ema: float) -> None:
        super().__init__(cap)
        self.alpha = alpha
        self.shift = shift
        self.ema = ema
        self.boundary = 0
        self.layer = -1  # the transition layer that ``average`` belongs to, -1 for none
        self.average = 0.0

    def decide(self, stats: StepStats) -> Decision:
        if stats.epoch_end:
            self._epoch_end(stats)
        return Decision(self.boundary)

    def _epoch_end(self, stats: StepStats) -> None:
        measured = [
            (s.index, s.epoch_update_norm)
            for s in stats.layers
            if self.boundary <= s.index < self.cap and s.epoch_update_norm is not None
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

    def __init__(self, cap: int, *, kind: str, c1: int, c2: int, epochs: int) -> None:
        super().__init__(cap)
        self.kind = kind
        self.c1 = c1
        self.c2 = c2
        self.epochs = epochs

    def initial(self) -> Decision:
        return Decision(self._boundary(0))

    def decide(self, stats: StepStats) -> Decision:
        return Decision(self._boundary(stats.epoch + (1 if stats.epoch_end else 0)))

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


# ---------------------------------------------------------------------------- construction


_Number = TypeVar("_Number", int, float)


def _env_raw(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    return raw or None


def _env_number(
    env: Mapping[str, str], name: str, default: _Number, convert: Callable[[str], _Number],
    valid: Callable[[_Number], bool], expected: str,
) -> _Number:
    raw = _env_raw(env, name)
    if raw is None:
        return default
    try:
        value = convert(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected {expected}") from None
    if not valid(value):
        raise ValueError(f"environment variable {name}={raw!r}: expected {expected}")
    return value


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    return _env_number(env, name, default, int, lambda v: v >= minimum, f"an integer >= {minimum}")


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    return _env_number(
        env, name, default, float, lambda v: math.isfinite(v) and v > 0, "a positive finite number"
    )


def _env_list(env: Mapping[str, str], name: str) -> list[int]:
    raw = _env_raw(env, name)
    if raw is None:
        return []
    try:
        values = [int(item) for item in raw.split(",")]
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r}: expected comma-separated integers like 10,20"
        ) from None
    if any(v < 0 for v in values):
        raise ValueError(f"environment variable {name}={raw!r}: values must be >= 0")
    return values


def _cac_manual_stops(env: Mapping[str, str], param_layers: Sequence[int]) -> list[tuple[int, int]] | None:
    numbers = _env_list(env, "CAC_STOP_LAYER_NUM")
    steps = _env_list(env, "CAC_STOP_LAYER_ITR")
    if not numbers and not steps:
        return None
    if not numbers or not steps:
        have, lack = ("CAC_STOP_LAYER_NUM", "CAC_STOP_LAYER_ITR")[:: 1 if numbers else -1]
        raise ValueError(
            f"environment variable {have} is set but {lack} is not: set both for manual stops, or neither"
        )
    if len(numbers) != len(steps):
        raise ValueError(
            f"environment variables CAC_STOP_LAYER_NUM ({len(numbers)} values) and "
            f"CAC_STOP_LAYER_ITR ({len(steps)} values) must have the same length"
        )
    for number in numbers:
        if number >= len(param_layers):
            raise ValueError(
                f"environment variable CAC_STOP_LAYER_NUM names parameter {number}, but the model has "
                f"parameter tensors 0..{len(param_layers) - 1} (CAC numbers parameters, not layers)"
            )
    return [(param_layers[number], step) for number, step in zip(numbers, steps)]


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
      ``param_layers[p]`` (see :func:`cac_parameter_layers`) and every layer before it, whole.
      Iteration S is the first step that does not train (steps count from 0).
    * ``CAC_VAR_START_ITR``, ``CAC_VAR_START_THR``, ``CAC_VAR_MT_COUNT_THR``,
      ``CAC_VAR_MT_THR``, ``CAC_VAR_SLOPE_THR`` and ``CAC_VAR_SAMPLES`` override the cac-auto
      fields, ``CAC_BRAKING_DISTANCE`` the braking distance of cac-auto and manual.

    A malformed variable raises ``ValueError`` naming it.
    """
    if num_layers < 1 or epochs < 1:
        raise ValueError(f"num_layers ({num_layers}) and epochs ({epochs}) must be positive")
    env = os.environ if env is None else env
    cap = max(0, num_layers - max(edge_tail, 1))
    if skip.max_boundary is not None:
        cap = min(cap, skip.max_boundary)
    policy = skip.policy
    stops = _cac_manual_stops(env, param_layers)
    if stops is not None:
        policy = "manual"
    if policy == "manual":
        if stops is None:
            stops = list(zip(skip.stop_layers, skip.stop_steps))
        for layer, _ in stops:
            if layer >= num_layers:
                raise ValueError(
                    f"skip.stop_layers names layer {layer}, but the model has layers 0..{num_layers - 1}"
                )
        braking = _env_int(env, "CAC_BRAKING_DISTANCE", skip.braking_distance, minimum=0)
        return ManualPolicy(cap, stops, braking)
    if policy == "cac-auto":
        return CacAutoPolicy(
            cap,
            start_step=_env_int(env, "CAC_VAR_START_ITR", skip.start_step, minimum=0),
            start_thr=_env_float(env, "CAC_VAR_START_THR", skip.start_thr),
            mt_count_thr=_env_int(env, "CAC_VAR_MT_COUNT_THR", skip.mt_count_thr, minimum=0),
            mt_thr=_env_float(env, "CAC_VAR_MT_THR", skip.mt_thr),
            slope_thr=_env_float(env, "CAC_VAR_SLOPE_THR", skip.slope_thr),
            samples=_env_int(env, "CAC_VAR_SAMPLES", skip.samples, minimum=1),
            braking=_env_int(env, "CAC_BRAKING_DISTANCE", skip.braking_distance, minimum=0),
        )
    if policy == "lars":
        return LarsPolicy(cap, alpha=2.0 if skip.alpha is None else skip.alpha, full_every=skip.full_every)
    if policy == "norm-ema":
        shift = max(1, round(0.1 * num_layers)) if skip.shift is None else skip.shift
        return NormEmaPolicy(cap, alpha=0.3 if skip.alpha is None else skip.alpha, shift=shift, ema=skip.ema)
    if policy == "schedule":
        if skip.c2 >= epochs:
            raise ValueError(
                f"skip.c2 ({skip.c2}) is the epoch freezing starts: "
                f"make it smaller than train.epochs ({epochs})"
            )
        c1 = cap if skip.c1 is None else skip.c1
        return SchedulePolicy(cap, kind=skip.schedule, c1=c1, c2=skip.c2, epochs=epochs)
    return NonePolicy(cap)


def cac_parameter_layers(model: nn.Sequential) -> list[int]:
    """The layer holding each tensor of ``model.parameters()``, in that order.

    CAC's environment variables number parameter tensors; this maps them to layers.
    """
    positions = {name: index for index, name in enumerate(model._modules)}
    layers = []
    for name, _ in model.named_parameters():
        child = name.split(".", 1)[0]
        if "." not in name or child not in positions:
            raise ValueError(
                f"parameter {name!r} belongs to no layer: "
                "register parameters inside the layers of the Sequential"
            )
        layers.append(positions[child])
    return layers


# ---------------------------------------------------------------------------- statistics


def _weighted_modules(layer: nn.Module) -> list[nn.Module]:
    return [m for m in layer.modules() if isinstance(m, _WEIGHTED)]


def _flat_weights(modules: Sequence[nn.Module]) -> torch.Tensor:
    # torch.cat always copies, so the result is safe to keep as a snapshot.
    return torch.cat([m.weight.detach().reshape(-1).float() for m in modules])


class LayerStatistics:
    """Per-side collector: keeps a float32 snapshot of its layers' weights at each epoch start.

    Build it after the model is on its device and before the first step of an epoch.
    """

    def __init__(self, layers: nn.Sequential, offset: int) -> None:
        self._layers: list[tuple[int, bool, list[nn.Module]]] = []
        for position, layer in enumerate(layers):
            modules = _weighted_modules(layer)
            if modules:
                has_conv = any(isinstance(m, _CONVS) for m in modules)
                self._layers.append((offset + position, has_conv, modules))
        self._snapshots = {index: _flat_weights(modules) for index, _, modules in self._layers}

    def collect(self, *, epoch_end: bool) -> list[LayerStat]:
        """Statistics of this side's layers with weights; at an epoch end also the epoch's update norm.

        At an epoch end the snapshot is retaken, so the next epoch's update starts here.
        """
        if not self._layers:
            return []
        rows = []
        for index, _, modules in self._layers:
            flat = _flat_weights(modules)
            # A single weight has no unbiased variance (NaN); report 0 instead.
            variance = torch.var(flat) if flat.numel() > 1 else flat.new_zeros(())
            row = [torch.linalg.vector_norm(flat), variance]
            if epoch_end:
                row.append(torch.linalg.vector_norm(flat - self._snapshots[index].to(flat.device)))
                self._snapshots[index] = flat
            rows.append(torch.stack(row))
        values = torch.stack(rows).tolist()  # one device sync for all layers
        return [
            LayerStat(index, has_conv, row[0], row[1], row[2] if epoch_end else None)
            for (index, has_conv, _), row in zip(self._layers, values)
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The epoch-start snapshots, keyed by global layer index, for checkpoints."""
        return {str(index): snapshot for index, snapshot in self._snapshots.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore snapshots saved by :meth:`state_dict` (on any device)."""
        expected = sorted(str(index) for index in self._snapshots)
        if sorted(state) != expected:
            raise ValueError(
                f"the checkpoint holds weight snapshots of layers {sorted(state)}, this side has "
                f"layers {expected}: resume with the partition it was saved with"
            )
        for index, snapshot in self._snapshots.items():
            saved = state[str(index)]
            if saved.shape != snapshot.shape:
                raise ValueError(
                    f"the weight snapshot of layer {index} has shape {tuple(saved.shape)}, "
                    f"expected {tuple(snapshot.shape)}: resume with the model it was saved with"
                )
            self._snapshots[index] = saved.to(device=snapshot.device, dtype=torch.float32).clone()


# ---------------------------------------------------------------------------- applying decisions


def _group(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], layer: int) -> dict[str, Any]:
    # The same hyper-parameters every group was built with; the lr is set by set_learning_rate.
    return {**optimizer.defaults, "params": params, "layer": layer, "lr_factor": 1.0}


def apply_boundary(
    boundary: int,
    layers: nn.Sequential,
    offset: int,
    optimizer: torch.optim.SGD,
    *,
    training: bool = True,
) -> None:
    """Apply the freeze boundary to one side's ``layers`` (global indices from ``offset``) and optimizer.

    A layer below ``boundary`` gets ``requires_grad = False``, ``eval()`` mode (BatchNorm keeps
    its running statistics), no gradient, and leaves the optimizer with its state, so neither
    momentum nor weight decay moves it. The other layers get ``requires_grad = True`` and
    ``train(training)``; one that comes back gets a fresh group (no momentum, lr factor 1).
    Groups of layers that stay keep their momentum. Groups stay ordered by layer; a side with
    nothing left to train holds the empty placeholder group (layer -1) as
    :func:`pipeline.optim.build_optimizer` makes it. Idempotent.

    Call it again after any ``train()``/``eval()`` on the model, and call
    :func:`pipeline.optim.set_learning_rate` before the next step.
    """
    existing = {group["layer"]: group for group in optimizer.param_groups}
    groups = []
    for position, layer in enumerate(layers):
        index = offset + position
        params = list(layer.parameters())
        frozen = index < boundary
        for p in params:
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None
                optimizer.state.pop(p, None)
        layer.train(training and not frozen)
        if params and not frozen:
            groups.append(existing.get(index) or _group(optimizer, params, index))
    if not groups:
        # torch wants at least one group; the placeholder keeps the side stepping in lock-step.
        groups.append(existing.get(-1) or _group(optimizer, [], -1))
    optimizer.param_groups[:] = groups


def apply_lr_factors(optimizer: torch.optim.Optimizer, factors: Mapping[int, float]) -> None:
    """Set each group's ``"lr_factor"`` from ``factors`` (by layer; absent means 1.0).

    :func:`pipeline.optim.set_learning_rate` multiplies the base rate by it.
    """
    for layer, factor in factors.items():
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"lr factor {factor} for layer {layer} is outside (0, 1]")
    for group in optimizer.param_groups:
        group["lr_factor"] = float(factors.get(group["layer"], 1.0))


def apply_decision(decision: Decision, stage: Stage, optimizer: torch.optim.SGD) -> None:
    """Apply a skip decision to one stage and its optimizer: the boundary, then the lr factors.

    The one call every side makes after each decision (edge head and tail, cloud middle, local model).
    """
    apply_boundary(decision.boundary, stage.layers, stage.offset, optimizer)
    apply_lr_factors(optimizer, decision.lr_factors)
    stage.boundary = decision.boundary
