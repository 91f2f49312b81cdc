"""Tests for pipeline.skip.cac_env: CAC's parameter numbering and its environment variables."""

from functools import partial

import pytest
from torch import nn

from pipeline.skip import Decision, cac_parameter_layers
from pipeline.skip.cac_env import cac_manual_stops, env_float, env_int
from tests.skip_scenarios import boundaries, policy, run, step_stats


def _cac_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),  # layer 0: parameters 0 (weight), 1 (bias)
        nn.BatchNorm2d(2),  # layer 1: parameters 2, 3
        nn.ReLU(),  # layer 2
        nn.Conv2d(2, 2, 3, bias=False),  # layer 3: parameter 4
        nn.Flatten(),  # layer 4
        nn.Linear(8, 3),  # layer 5: parameters 5, 6
    )


def test_cac_parameter_layers_follow_model_parameters():
    model = _cac_model()
    layers = cac_parameter_layers(model)
    assert layers == [0, 0, 1, 1, 3, 5, 5]
    assert len(layers) == len(list(model.parameters()))


def test_a_parameter_outside_the_layers_is_refused():
    model = _cac_model()
    model.register_parameter("loose", nn.Parameter(model[0].bias.detach().clone()))
    with pytest.raises(ValueError, match="'loose' belongs to no layer"):
        cac_parameter_layers(model)


def test_cac_stop_variables_override_the_policy_and_name_parameters():
    env = {"CAC_STOP_LAYER_NUM": "1, 4", "CAC_STOP_LAYER_ITR": "0,5", "CAC_BRAKING_DISTANCE": "2"}
    param_layers = cac_parameter_layers(_cac_model())
    manual = policy(policy="lars", num_layers=6, param_layers=param_layers, env=env)
    assert manual.name == "manual"
    decisions = run(manual, [step_stats(s) for s in range(6)])
    # Parameter 1 is layer 0's bias: layer 0 stops at step 0. Parameter 4 is layer 3's weight.
    assert boundaries(decisions) == [1, 1, 1, 1, 1, 4, 4]
    assert decisions[4] == Decision(1, {1: 0.25, 2: 0.25, 3: 0.25})


def test_unset_or_blank_variables_keep_the_defaults():
    env = {"CAC_VAR_SAMPLES": "  ", "CAC_STOP_LAYER_NUM": ""}
    assert cac_manual_stops(env, [0, 0]) is None
    assert env_int(env, "CAC_VAR_SAMPLES", 200, minimum=1) == 200
    assert env_int({}, "CAC_VAR_START_ITR", 5000, minimum=0) == 5000
    assert env_float({}, "CAC_VAR_MT_THR", 0.96) == 0.96
    assert env_int({"CAC_VAR_SAMPLES": " 7 "}, "CAC_VAR_SAMPLES", 200, minimum=1) == 7
    assert env_float({"CAC_VAR_MT_THR": "0.5"}, "CAC_VAR_MT_THR", 0.96) == 0.5


def test_one_cac_stop_variable_without_the_other_is_an_error():
    with pytest.raises(ValueError, match="CAC_STOP_LAYER_ITR"):
        policy(policy="none", env={"CAC_STOP_LAYER_NUM": "1"}, param_layers=[0, 0])


@pytest.mark.parametrize(
    ("skip_policy", "env", "variable"),
    [
        ("none", {"CAC_STOP_LAYER_NUM": "1,x", "CAC_STOP_LAYER_ITR": "0,1"}, "CAC_STOP_LAYER_NUM"),
        ("none", {"CAC_STOP_LAYER_NUM": "7", "CAC_STOP_LAYER_ITR": "0"}, "CAC_STOP_LAYER_NUM"),
        ("none", {"CAC_STOP_LAYER_NUM": "1", "CAC_STOP_LAYER_ITR": "-3"}, "CAC_STOP_LAYER_ITR"),
        ("none", {"CAC_STOP_LAYER_NUM": "1,2", "CAC_STOP_LAYER_ITR": "0"}, "same length"),
        ("manual", {"CAC_BRAKING_DISTANCE": "-1"}, "CAC_BRAKING_DISTANCE"),
        ("cac-auto", {"CAC_VAR_SAMPLES": "0"}, "CAC_VAR_SAMPLES"),
        ("cac-auto", {"CAC_VAR_START_ITR": "soon"}, "CAC_VAR_START_ITR"),
        ("cac-auto", {"CAC_VAR_MT_THR": "high"}, "CAC_VAR_MT_THR"),
        ("cac-auto", {"CAC_VAR_START_THR": "-1"}, "CAC_VAR_START_THR"),
        ("cac-auto", {"CAC_VAR_SLOPE_THR": "inf"}, "CAC_VAR_SLOPE_THR"),
        ("cac-auto", {"CAC_VAR_MT_COUNT_THR": "2.5"}, "CAC_VAR_MT_COUNT_THR"),
    ],
)
def test_bad_cac_variables_are_named(skip_policy, env, variable):
    with pytest.raises(ValueError, match=variable) as error:
        policy(policy=skip_policy, num_layers=6, param_layers=cac_parameter_layers(_cac_model()), env=env)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("read", "name", "raw", "allowed"),
    [
        (partial(env_int, default=200, minimum=1), "CAC_VAR_SAMPLES", "0", "an integer >= 1"),
        (partial(env_int, default=0, minimum=0), "CAC_BRAKING_DISTANCE", "x", "an integer >= 0"),
        (partial(env_float, default=0.96), "CAC_VAR_MT_THR", "nan", "a positive finite number"),
    ],
)
def test_a_bad_number_names_what_is_allowed(read, name, raw, allowed):
    with pytest.raises(ValueError, match=f"^environment variable {name}='{raw}': expected {allowed}$"):
        read({name: raw}, name)


def test_a_stop_past_the_parameters_names_the_parameter_range():
    with pytest.raises(ValueError, match=r"parameter 2, but the model has parameter tensors 0\.\.1 "):
        cac_manual_stops({"CAC_STOP_LAYER_NUM": "2", "CAC_STOP_LAYER_ITR": "0"}, [0, 0])
    with pytest.raises(ValueError, match="parameter 0, but the model has parameter tensors none "):
        cac_manual_stops({"CAC_STOP_LAYER_NUM": "0", "CAC_STOP_LAYER_ITR": "0"}, [])
