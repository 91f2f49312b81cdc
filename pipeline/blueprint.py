"""What a configuration builds, checked as a whole."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.devices import DeviceError, resolve_device
from pipeline.models import ModelError, build_configured, build_from_factory
from pipeline.partition import Cuts, PartitionError, cut_shapes, make_cuts
from pipeline.skip import SkipPolicy, cac_parameter_layers, make_policy

__all__ = ["Blueprint", "Side"]

#: The node that builds a blueprint: its section of the configuration names its device.
Side = Literal["edge", "cloud"]

#: The environment variables of Fujitsu CAC Gradient-Skip that the skip policies read.
_CAC_PREFIX = "CAC_"


class Blueprint:
    """The model, cuts, cut shapes and skip policy that ``config`` describes.

    Making one builds and checks all of them, so every configuration mistake (an impossible
    split, a ``skip`` value out of range for the model, a bad ``CAC_*`` variable, a failing model
    factory) is a one-line :class:`ConfigError` naming the key when a node starts, not at its
    first step. ``factory``, given from Python, builds the model instead of ``[model] name``;
    it is called with no arguments under the RNG seeded with ``model.seed``. ``side`` is the
    node that trains from it: its ``[edge]`` or ``[cloud]`` device is resolved now (a device
    this machine lacks is a ConfigError naming it and the devices there are); without a side
    the stages compute on the CPU.
    """

    config: Config
    model: nn.Sequential  # untrained; a side that trains it keeps it or copies it
    num_layers: int
    param_layers: list[int]  # the layer of each tensor of model.parameters() (CAC numbers those)
    cuts: Cuts
    uplink_shape: tuple[int, ...]  # per sample, what crosses cut 1 (the middle's input)
    downlink_shape: tuple[int, ...]  # per sample, what crosses cut 2 (the middle's output)
    device: torch.device  # where the side's stages, their optimizer state and received tensors live

    def __init__(
        self, config: Config, factory: Callable[[], nn.Sequential] | None = None, *, side: Side | None = None
    ) -> None:
        self.config = config
        self.device = _device(config, side)
        self.model = _build(config, factory)
        self.num_layers = len(self.model)
        try:
            self.param_layers = cac_parameter_layers(self.model)
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None
        self.cuts = _cuts(config, self.num_layers)
        try:
            self.uplink_shape, self.downlink_shape = cut_shapes(self.model, config.model.input_shape, self.cuts)
        except PartitionError as exc:
            raise ConfigError(f"model.input_shape {list(config.model.input_shape)}: {exc}") from None
        # Read once: every policy new_policy() makes then uses the variables checked here.
        self._env = {key: value for key, value in os.environ.items() if key.startswith(_CAC_PREFIX)}
        self.new_policy()  # made once now so that a bad [skip] value or CAC_* variable fails here

    def new_policy(self) -> SkipPolicy:
        """A fresh skip policy for this configuration (each side of a run needs its own)."""
        try:
            return make_policy(
                self.config.skip,
                num_layers=self.num_layers,
                edge_tail=self.config.partition.edge_tail,
                epochs=self.config.train.epochs,
                param_layers=self.param_layers,
                env=self._env,
            )
        except ValueError as exc:  # the message names the skip key or the CAC variable
            raise ConfigError(str(exc)) from None


def _build(config: Config, factory: Callable[[], nn.Sequential] | None) -> nn.Sequential:
    try:
        if factory is None:
            return build_configured(config.model)
        return build_from_factory(factory, _label(factory), seed=config.model.seed)
    except ModelError as exc:  # a factory's message names the factory
        raise ConfigError(str(exc) if factory else f"model.name = {config.model.name!r}: {exc}") from None


def _device(config: Config, side: Side | None) -> torch.device:
    if side is None:
        return torch.device("cpu")
    name = getattr(config, side).device
    try:
        return resolve_device(name)
    except DeviceError as exc:
        raise ConfigError(f"{side}.device = {name!r}: {exc}") from None


def _cuts(config: Config, num_layers: int) -> Cuts:
    try:
        return make_cuts(num_layers, config.partition.edge_head, config.partition.edge_tail)
    except PartitionError as exc:  # the message names partition.edge_head and edge_tail
        raise ConfigError(str(exc)) from None


def _label(factory: Callable[..., object]) -> str:
    name = getattr(factory, "__qualname__", None) or type(factory).__name__
    module = getattr(factory, "__module__", None)
    return f"{module}.{name}" if module else name
