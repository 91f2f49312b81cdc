"""pipeline.blueprint: what a configuration builds, and every mistake in it refused when it is made."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from pipeline.blueprint import Blueprint
from pipeline.config import Config, ConfigError
from tests.conftest import make_config


def _error(config: Config, factory=None) -> str:
    with pytest.raises(ConfigError) as info:
        Blueprint(config, factory)
    message = str(info.value)
    assert "\n" not in message, "one line"
    return message


def _three_layers() -> nn.Sequential:
    # For make_config()'s [1, 8, 8] inputs and its cuts after layer 0 and before layer 2.
    return nn.Sequential(
        OrderedDict(conv=nn.Conv2d(1, 4, 3, padding=1), act=nn.ReLU(), fc=nn.Sequential(nn.Flatten(), nn.Linear(256, 10)))
    )


def test_blueprint_of_the_small_config() -> None:
    blueprint = Blueprint(make_config())  # tinycnn [1, 8, 8], edge_head 1, edge_tail 1
    assert blueprint.num_layers == len(blueprint.model) == 4
    assert (blueprint.cuts.middle_start, blueprint.cuts.middle_stop) == (1, 3)
    assert blueprint.uplink_shape == (8, 8, 8)
    assert blueprint.downlink_shape == (16 * 4 * 4,)
    assert len(blueprint.param_layers) == len(list(blueprint.model.parameters()))
    # Each side gets its own policy.
    assert blueprint.new_policy() is not blueprint.new_policy()


def test_stop_layers_past_the_last_layer_names_the_key() -> None:
    config = make_config(skip={"policy": "manual", "stop_layers": [9], "stop_steps": [3]})
    message = _error(config)
    assert "skip.stop_layers" in message and "0..3" in message


def test_a_bad_cac_variable_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAC_VAR_SAMPLES", "many")
    message = _error(make_config(skip={"policy": "cac-auto"}))
    assert "CAC_VAR_SAMPLES" in message and "'many'" in message


def test_the_cac_environment_is_read_once_when_the_blueprint_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    blueprint = Blueprint(make_config(skip={"policy": "cac-auto"}))
    monkeypatch.setenv("CAC_VAR_SAMPLES", "many")
    assert blueprint.new_policy().name == "cac-auto"  # the checked settings, not a later surprise


def test_c2_not_before_the_last_epoch_is_refused_by_the_schema() -> None:
    # Found before there is a blueprint to make: the configuration alone shows it.
    with pytest.raises(ConfigError, match=r"skip\.c2 \(2\).*train\.epochs \(2\)"):
        make_config(skip={"policy": "schedule", "c2": 2}, train={"epochs": 2})
    Blueprint(make_config(skip={"policy": "schedule", "c2": 1}, train={"epochs": 2}))


def test_a_split_that_leaves_the_cloud_no_layer_names_both_keys() -> None:
    # The file alone cannot know the model's depth: the cut is refused where the model is known.
    message = _error(make_config(partition={"edge_head": 3, "edge_tail": 1}))
    assert "partition.edge_head" in message and "partition.edge_tail" in message
    assert "no layer for the cloud" in message and "<= 3" in message  # allowed for this 4-layer model
    Blueprint(make_config(partition={"edge_head": 2, "edge_tail": 1}))


def test_an_unknown_model_name_names_the_key() -> None:
    message = _error(make_config(model={"name": "vgg16"}))
    assert message.startswith("model.name = 'vgg16':")


def test_a_factory_that_needs_arguments_names_it_and_how_it_is_called() -> None:
    def build(depth: int) -> nn.Sequential:
        raise AssertionError("never called")

    message = _error(make_config(), build)
    assert "build" in message and "build()" in message and "'depth'" in message and "no arguments" in message


def test_a_factory_returning_no_sequential_names_it() -> None:
    def build() -> nn.Module:
        return nn.Linear(4, 2)

    message = _error(make_config(), build)
    assert "build" in message and "Linear" in message and "nn.Sequential" in message


def test_a_factory_that_fails_names_it_and_the_error() -> None:
    def build() -> nn.Sequential:
        raise RuntimeError("out of widgets\nand a traceback-like second line")

    message = _error(make_config(), build)
    assert "build" in message and "RuntimeError: out of widgets" in message


def test_a_factory_model_that_does_not_fit_input_shape_names_the_key() -> None:
    message = _error(make_config(model={"input_shape": [3, 8, 8]}), _three_layers)
    assert message.startswith("model.input_shape [3, 8, 8]:") and "layer 0 (conv)" in message


def test_a_factory_model_is_seeded_with_model_seed() -> None:
    first, second = (Blueprint(make_config(), _three_layers).model for _ in range(2))
    other = Blueprint(make_config(model={"seed": 1}), _three_layers).model
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    assert not torch.equal(first.conv.weight, other.conv.weight)
