"""The partition configuration file: what is accepted, and errors that name the key and what is allowed."""
from __future__ import annotations

import json
import tomllib
import typing
from pathlib import Path

import pytest

from pipeline.codecs import codec_names
from pipeline.config import Config, ConfigError, SkipPolicyName, load_config, parse_config
from pipeline.handshake import describe_differences
from tests.conftest import make_config

GOOD = """
[model]
name = "tinycnn"
num_classes = 10
input_shape = [1, 8, 8]
seed = 3

[partition]
edge_head = 1
edge_tail = 1
chunks = 4

[link]
uplink = "int8"
downlink = "fp16"
gradients = "int8-sr"

[skip]
policy = "cac-auto"
start_step = 10

[train]
dataset = "synthetic"
batch_size = 32
epochs = 2
lr = 0.1

[checkpoint]
every_steps = 20
keep = 3
"""


def _write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, "the error must name the file"
    return message


def test_good_file_loads(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, GOOD))
    assert config.model.input_shape == (1, 8, 8)
    assert config.model.seed == 3
    assert (config.partition.edge_head, config.partition.edge_tail, config.partition.chunks) == (1, 1, 4)
    assert (config.link.uplink, config.link.downlink, config.link.gradients) == ("int8", "fp16", "int8-sr")
    assert config.skip.policy == "cac-auto" and config.skip.start_step == 10
    assert config.skip.start_thr == 0.95  # CAC's default for what the file leaves out
    assert config.train.lr == 0.1 and config.train.batch_size == 32
    assert config.micro_batch_size == 8
    assert (config.checkpoint.every_steps, config.checkpoint.keep) == (20, 3)


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    assert config == Config()
    assert config.link.max_message_mib == 64
    assert (config.checkpoint.every_steps, config.checkpoint.keep) == (50, 2)
    assert config.link.reconnect_seconds == 120.0


def test_misspelled_key_names_it_and_the_allowed_keys(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("edge_head = 1", "edge_heads = 1"))
    assert "partition.edge_heads" in message
    assert "unknown key" in message
    for key in ("edge_head", "edge_tail", "chunks"):
        assert key in message.split("partition.edge_heads", 1)[1]


@pytest.mark.parametrize(
    ("old", "new", "wrong", "allowed"),
    [
        ("keep = 3", "kept = 3", "checkpoint.kept", ("every_steps", "keep")),
        ('gradients = "int8-sr"', 'gradients = "int8-sr"\nreconnect = 5',
         "link.reconnect", ("reconnect_seconds", "timeout_seconds", "uplink")),
    ],
)
def test_misspelled_new_keys_name_the_allowed_keys(
    tmp_path: Path, old: str, new: str, wrong: str, allowed: tuple[str, ...]
) -> None:
    message = _error(tmp_path, GOOD.replace(old, new))
    assert f"{wrong}: unknown key" in message
    for key in allowed:
        assert key in message.split(wrong, 1)[1]


def test_unknown_section_names_it_and_the_allowed_sections(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD + '\n[partitions]\nedge_head = 2\n')
    assert "[partitions]" in message
    assert "unknown section" in message
    for section in ("model", "partition", "link", "skip", "train", "checkpoint"):
        assert section in message


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        # wrong types
        ("chunks = 4", 'chunks = "4"', "partition.chunks"),
        ("lr = 0.1", 'lr = "fast"', "train.lr"),
        ("input_shape = [1, 8, 8]", "input_shape = [1, 8]", "model.input_shape"),
        ("seed = 3", "seed = 3.5", "model.seed"),
        ("edge_head = 1", "edge_head = true", "partition.edge_head"),
        # values out of range
        ("edge_head = 1", "edge_head = -1", "partition.edge_head"),
        ("chunks = 4", "chunks = 0", "partition.chunks"),
        ("batch_size = 32", "batch_size = 0", "train.batch_size"),
        ("lr = 0.1", "lr = 0.0", "train.lr"),
        ("input_shape = [1, 8, 8]", "input_shape = [1, 0, 8]", "model.input_shape"),
        ("num_classes = 10", "num_classes = 1", "model.num_classes"),
        ("seed = 3", "seed = 3\nwidth = 0.0", "model.width"),
        ("seed = 3", "seed = 3\nwidth = 4.5", "model.width"),
        ('dataset = "synthetic"', 'dataset = "imagenet"', "train.dataset"),
        ("every_steps = 20", "every_steps = 0", "checkpoint.every_steps"),
        ("every_steps = 20", "every_steps = 2.5", "checkpoint.every_steps"),
        ("keep = 3", "keep = 1", "checkpoint.keep"),
        ('gradients = "int8-sr"', 'gradients = "int8-sr"\nreconnect_seconds = -1.0', "link.reconnect_seconds"),
        ('gradients = "int8-sr"', 'gradients = "int8-sr"\nreconnect_seconds = "soon"', "link.reconnect_seconds"),
    ],
)
def test_a_bad_value_names_its_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in GOOD
    assert key in _error(tmp_path, GOOD.replace(old, new))


def test_string_chunks_shows_what_was_given(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("chunks = 4", 'chunks = "4"'))
    assert "partition.chunks" in message and "integer" in message and "'4'" in message


@pytest.mark.parametrize(("key", "role"), [("uplink", "activation"), ("downlink", "activation"),
                                           ("gradients", "gradient")])
def test_unknown_codec_names_the_allowed_ones(tmp_path: Path, key: str, role: str) -> None:
    text = GOOD.replace("[link]\n", f'[link]\n{key} = "int9"\n')
    text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} = ") or "int9" in line)
    message = _error(tmp_path, text)
    assert f"link.{key}" in message and "int9" in message
    # The codec registry is the list the configuration accepts.
    for codec in codec_names(role):
        assert f"'{codec}'" in message


def test_stochastic_rounding_is_for_gradients_only(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace('uplink = "int8"', 'uplink = "int8-sr"'))
    assert "link.uplink" in message


@pytest.mark.parametrize(
    ("policy", "stray"),
    [("none", "start_step = 10"), ("lars", "start_step = 10"), ("cac-auto", "alpha = 2.0"),
     ("manual", "c1 = 3"), ("schedule", "shift = 2")],
)
def test_skip_keys_not_used_by_the_policy_are_errors(tmp_path: Path, policy: str, stray: str) -> None:
    text = GOOD.replace('policy = "cac-auto"\nstart_step = 10', f'policy = "{policy}"\n{stray}')
    message = _error(tmp_path, text)
    key = stray.split(" =")[0]
    assert key in message
    assert f"policy {policy!r}" in message
    assert "policy" in message.split("reads:", 1)[1]  # and lists what the policy does read


def test_unknown_policy_names_the_allowed_ones(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace('policy = "cac-auto"\nstart_step = 10', 'policy = "cac"'))
    assert "skip.policy" in message
    for name in typing.get_args(SkipPolicyName):
        assert f"'{name}'" in message


def test_chunks_more_than_batch_size(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("chunks = 4", "chunks = 64"))
    assert "partition.chunks" in message and "train.batch_size" in message
    assert "64" in message and "32" in message
    # As many micro-batches as samples is fine.
    assert load_config(_write(tmp_path, GOOD.replace("chunks = 4", "chunks = 32"), "ok.toml")).partition.chunks == 32


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    message = _error(tmp_path, GOOD.replace("chunks = 4", "chunks = = 4"))
    assert "not valid TOML" in message


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(GOOD.replace("tinycnn", "tinycnn\xe9").encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not UTF-8 text") and "0xe9" in message
    assert "\n" not in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "config.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


# Non-default settings of every policy, so a round trip that dropped a key would show.
POLICY_SETTINGS = {
    "none": {"max_boundary": 2},
    "manual": {"stop_layers": [1, 2], "stop_steps": [5, 9], "braking_distance": 3},
    "cac-auto": {"start_step": 10, "start_thr": 0.9, "mt_count_thr": 2, "mt_thr": 0.93, "slope_thr": 0.97,
                 "samples": 4, "braking_distance": 2, "prefix": "freeze"},
    "lars": {"alpha": 2.5, "full_every": 3},
    "norm-ema": {"alpha": 0.2, "shift": 2, "ema": 0.8},
    "schedule": {"schedule": "linear", "c1": 3, "c2": 1},
}


def test_policy_settings_cover_every_policy() -> None:
    assert set(POLICY_SETTINGS) == set(typing.get_args(SkipPolicyName))


@pytest.mark.parametrize("policy", list(POLICY_SETTINGS))
def test_to_dict_round_trips_through_parse_config(policy: str) -> None:
    config = make_config(
        skip={"policy": policy, **POLICY_SETTINGS[policy]},
        link={"uplink": "int4", "gradients": "int8-sr", "max_message_mib": 16, "reconnect_seconds": 0.0},
        train={"lr_schedule": "cosine", "max_steps": 7, "epochs": 3},
        checkpoint={"every_steps": 5, "keep": 4},
    )
    data = config.to_dict()
    # As a run's summary.json stores it: through JSON.
    again = parse_config(json.loads(json.dumps(data)), "round trip")
    assert again == config
    assert again.to_dict() == data
    for key, value in POLICY_SETTINGS[policy].items():
        assert data["skip"][key] == value
    # Only the keys the policy reads are kept, so the dict is valid input.
    assert "start_step" not in data["skip"] or policy == "cac-auto"


@pytest.mark.parametrize("policy", ["none", "manual", "lars", "schedule"])
def test_to_toml_round_trips_through_parse_config(policy: str) -> None:
    config = make_config(
        model={"width": 0.5},
        skip={"policy": policy, **POLICY_SETTINGS[policy]},
        link={"uplink": "int8", "gradients": "int8-sr", "timeout_seconds": 30.0, "reconnect_seconds": 7.5},
        train={"lr_schedule": "cosine", "max_steps": 7, "weight_decay": 0.0, "epochs": 3},
        checkpoint={"every_steps": 9, "keep": 3},
    )
    text = config.to_toml()
    assert parse_config(tomllib.loads(text), "round trip") == config
    # Unset optional keys (None) are left out: TOML has no null.
    assert "eval_batch_size" not in text
    # The defaults round-trip too.
    assert parse_config(tomllib.loads(Config().to_toml())) == Config()


def test_describe_differences_names_only_the_differing_keys() -> None:
    cloud = make_config().agreed()
    edge = make_config(partition={"edge_head": 2}, link={"uplink": "int8"}).agreed()
    text = describe_differences(edge, cloud)
    assert "partition.edge_head: edge 2, cloud 1" in text
    assert "link.uplink: edge 'int8', cloud 'fp32'" in text
    assert "partition.edge_tail" not in text and "model.name" not in text
    # A key only one side has is named too.
    cloud_extra = make_config(skip={"policy": "lars", "alpha": 2.0}).agreed()
    assert "skip.alpha" in describe_differences(make_config().agreed(), cloud_extra)
    # Equal configurations: the difference must be in the architecture.
    assert "architecture" in describe_differences(cloud, make_config().agreed())


def test_agreed_leaves_out_where_the_data_lives() -> None:
    a = make_config(train={"dataset": "digits"}).agreed()
    b = make_config(train={"dataset": "synthetic"}).agreed()
    assert a == b
    assert "dataset" not in a["train"]


def test_agreed_leaves_out_how_long_the_edge_retries_but_keeps_the_checkpoint_cadence() -> None:
    patient = make_config(link={"reconnect_seconds": 600.0}).agreed()
    hasty = make_config(link={"reconnect_seconds": 0}).agreed()
    assert patient == hasty
    assert "reconnect_seconds" not in patient["link"]
    assert patient["checkpoint"] == {"every_steps": 50, "keep": 2}
    # Both sides must save at the same steps and keep as many: a difference is named.
    often = make_config(checkpoint={"every_steps": 10}).agreed()
    assert "checkpoint.every_steps: edge 10, cloud 50" in describe_differences(often, patient)
    assert "checkpoint.keep: edge 3, cloud 2" in describe_differences(
        make_config(checkpoint={"keep": 3}).agreed(), patient
    )
