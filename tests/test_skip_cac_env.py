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
    # Parameter 1 is layer 0's bias: tensors 0..1 brake at step 0 and are frozen from 1 (S + N - 1).
    # Parameter 4 is layer 3's weight: tensors 0..4 brake at 5 and are frozen from 6; layers 0..4
    # are frozen whole (the Flatten after layer 3 has no parameters).
    assert decisions[0] == Decision(0, {0: 0.25, 1: 0.25}, 0)
    assert boundaries(decisions) == [0, 1, 1, 1, 1, 1, 5]
    assert decisions[5] == Decision(1, {2: 0.25, 3: 0.25, 4: 0.25}, 2)
    assert decisions[6] == Decision(5, {}, 5)


def test_cac_manual_without_braking_trains_the_stop_step():
    # CAC_STOP_LAYER_ITR=20 with no braking distance: step 20 still trains, frozen from 21.
    env = {"CAC_STOP_LAYER_NUM": "0", "CAC_STOP_LAYER_ITR": "20"}
    manual = policy(policy="none", num_layers=6, param_layers=cac_parameter_layers(_cac_model()), env=env)
    decisions = run(manual, [step_stats(s) for s in range(22)])
    assert decisions[20] == Decision(0, {}, 0)
    # Only tensor 0 (layer 0's kernel): its bias and the BatchNorm after it keep training.
    assert decisions[21] == decisions[22] == Decision(0, {}, 1)


def test_cac_manual_braking_starts_at_the_stop_step():
    # N = 4, S = 20: factors 0.5625, 0.25, 0.0625 at steps 20..22 (from step 20's rate), frozen from 23.
    env = {"CAC_STOP_LAYER_NUM": "0", "CAC_STOP_LAYER_ITR": "20", "CAC_BRAKING_DISTANCE": "4"}
    manual = policy(policy="none", num_layers=6, param_layers=cac_parameter_layers(_cac_model()), env=env)
    lrs = [0.1 - s / 1000 for s in range(24)]
    decisions = run(manual, [step_stats(s, lr=lrs[s]) for s in range(24)])
    assert decisions[19] == Decision(0, {}, 0)
    assert decisions[20] == Decision(0, {0: 0.5625}, 0)
    assert decisions[21] == Decision(0, {0: 0.25}, 0, {0: lrs[20]})
    assert decisions[22] == Decision(0, {0: 0.0625}, 0, {0: lrs[20]})
    assert decisions[23] == decisions[24] == Decision(0, {}, 1)


def test_cac_stop_numbers_alone_restrict_cac_autos_targets():
    env = {"CAC_STOP_LAYER_NUM": "4", "CAC_VAR_START_ITR": "0", "CAC_VAR_SAMPLES": "1"}
    cac_auto = policy(policy="cac-auto", num_layers=6, param_layers=cac_parameter_layers(_cac_model()), env=env)
    assert cac_auto.name == "cac-auto" and cac_auto.targets == [4]
    with pytest.raises(ValueError, match=r"CAC_STOP_LAYER_NUM alone chooses cac-auto's targets.*'lars'"):
        policy(policy="lars", num_layers=6, param_layers=cac_parameter_layers(_cac_model()),
               env={"CAC_STOP_LAYER_NUM": "4"})


def test_cac_var_samples_unset_or_not_positive_samples_every_braking_distance():
    layers = cac_parameter_layers(_cac_model())
    for env in ({}, {"CAC_VAR_SAMPLES": "0"}, {"CAC_VAR_SAMPLES": "-5"}):
        cac_auto = policy(policy="cac-auto", num_layers=6, param_layers=layers,
                          env={**env, "CAC_BRAKING_DISTANCE": "7"})
        assert cac_auto.samples == 7, env
    assert policy(policy="cac-auto", num_layers=6, param_layers=layers).samples == 200
    assert policy(policy="cac-auto", num_layers=6, param_layers=layers, env={"CAC_VAR_SAMPLES": "0"}).samples == 200
    assert policy(policy="cac-auto", samples=9, braking_distance=7, num_layers=6, param_layers=layers).samples == 9
    braking = {"CAC_BRAKING_DISTANCE": "7", "CAC_VAR_SAMPLES": "3"}
    assert policy(policy="cac-auto", num_layers=6, param_layers=layers, env=braking).samples == 3


def test_unset_or_blank_variables_keep_the_defaults():
    env = {"CAC_VAR_SAMPLES": "  ", "CAC_STOP_LAYER_NUM": ""}
    assert cac_manual_stops(env, 2) is None
    assert env_int(env, "CAC_VAR_SAMPLES", 200, minimum=1) == 200
    assert env_int({}, "CAC_VAR_START_ITR", 5000, minimum=0) == 5000
    assert env_float({}, "CAC_VAR_MT_THR", 0.96) == 0.96
    assert env_int({"CAC_VAR_SAMPLES": " 7 "}, "CAC_VAR_SAMPLES", 200, minimum=1) == 7
    assert env_float({"CAC_VAR_MT_THR": "0.5"}, "CAC_VAR_MT_THR", 0.96) == 0.5
    assert env_float({"CAC_VAR_START_THR": "-1"}, "CAC_VAR_START_THR", 0.95, positive=False) == -1.0


def test_the_stop_iterations_without_the_numbers_are_an_error():
    with pytest.raises(ValueError, match="CAC_STOP_LAYER_ITR is set but CAC_STOP_LAYER_NUM is not"):
        policy(policy="none", env={"CAC_STOP_LAYER_ITR": "1"}, param_layers=[0, 0])


@pytest.mark.parametrize(
    ("skip_policy", "env", "variable"),
    [
        ("none", {"CAC_STOP_LAYER_NUM": "1,x", "CAC_STOP_LAYER_ITR": "0,1"}, "CAC_STOP_LAYER_NUM"),
        ("none", {"CAC_STOP_LAYER_NUM": "7", "CAC_STOP_LAYER_ITR": "0"}, "CAC_STOP_LAYER_NUM"),
        ("none", {"CAC_STOP_LAYER_NUM": "1", "CAC_STOP_LAYER_ITR": "-3"}, "CAC_STOP_LAYER_ITR"),
        ("none", {"CAC_STOP_LAYER_NUM": "1,2", "CAC_STOP_LAYER_ITR": "0"}, "same length"),
        ("manual", {"CAC_BRAKING_DISTANCE": "-1"}, "CAC_BRAKING_DISTANCE"),
        ("cac-auto", {"CAC_VAR_SAMPLES": "x"}, "CAC_VAR_SAMPLES"),
        ("cac-auto", {"CAC_VAR_START_ITR": "soon"}, "CAC_VAR_START_ITR"),
        ("cac-auto", {"CAC_VAR_MT_THR": "high"}, "CAC_VAR_MT_THR"),
        ("cac-auto", {"CAC_VAR_START_THR": "nan"}, "CAC_VAR_START_THR"),
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
        cac_manual_stops({"CAC_STOP_LAYER_NUM": "2", "CAC_STOP_LAYER_ITR": "0"}, 2)
    with pytest.raises(ValueError, match="parameter 0, but the model has parameter tensors none "):
        cac_manual_stops({"CAC_STOP_LAYER_NUM": "0", "CAC_STOP_LAYER_ITR": "0"}, 0)
