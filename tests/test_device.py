"""Device placement: names, the flag over the file, the clear error, the device path on the CPU, CUDA when present."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_node.worker import train
from edgepipe.arguments import with_device
from edgepipe.cloud_cli import main as cloud_main
from edgepipe.edge_cli import main as edge_main
from pipeline import codecs
from pipeline.blueprint import Blueprint
from pipeline.checkpoint import load_state
from pipeline.config import Config, ConfigError, load_config
from pipeline.devices import DeviceError, available_devices, best_device, resolve_device, to_host
from pipeline.handshake import fingerprint
from tests.conftest import SMALL_TOML, make_config

STEPS = 6
#: Present on no machine: the missing-device error without depending on what this one has.
MISSING = "cuda:99"
HAS_ACCELERATOR = len(available_devices()) > 1


def _models_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(SMALL_TOML.format(edge_head=1) + extra, encoding="utf-8")
    return path


# -- names and resolution ------------------------------------------------------------------


def test_cpu_and_auto_resolve_to_what_this_machine_has() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device(best_device())
    if not HAS_ACCELERATOR:
        assert best_device() == "cpu" and resolve_device("auto") == torch.device("cpu")


def test_a_missing_device_names_itself_and_what_is_available() -> None:
    with pytest.raises(DeviceError) as error:
        resolve_device(MISSING)
    assert MISSING in str(error.value)
    assert f"available devices: {', '.join(available_devices())}" in str(error.value)


def test_a_node_with_a_missing_device_fails_when_it_builds_its_blueprint() -> None:
    config = make_config(cloud={"device": MISSING})
    with pytest.raises(ConfigError, match=r"cloud\.device = 'cuda:99': device 'cuda:99' is not available"):
        Blueprint(config, side="cloud")
    # The other side does not compute on the cloud's device, so it does not need it.
    assert Blueprint(config, side="edge").device == torch.device("cpu")


def test_an_unknown_device_name_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"edge\.device: device 'gpu' is unknown; devices are cpu, cuda, cuda:N"):
        make_config(edge={"device": "gpu"})


def test_devices_are_not_part_of_the_handshake() -> None:
    cpu = make_config()
    elsewhere = make_config(cloud={"device": "cuda:1"}, edge={"device": "mps"})
    assert cpu.agreed() == elsewhere.agreed()
    assert fingerprint(cpu, Blueprint(cpu).model) == fingerprint(elsewhere, Blueprint(elsewhere).model)


def test_to_host_keeps_structure_and_leaves_cpu_tensors_alone() -> None:
    t = torch.arange(3.0)
    state = {"a": OrderedDict(w=t), "b": [t, (t, 1)], "c": "text"}
    host = to_host(state)
    assert type(host["a"]) is OrderedDict and host["a"]["w"] is t
    assert host["b"][0] is t and type(host["b"][1]) is tuple and host["b"][1][1] == 1
    assert host["c"] == "text"


# -- the flag over the file ------------------------------------------------------------------


def test_the_flag_wins_over_the_file(tmp_path: Path) -> None:
    config = load_config(_write_config(tmp_path, f'\n[edge]\ndevice = "{MISSING}"\n'))
    assert with_device(config, "edge", None).edge.device == MISSING
    assert with_device(config, "edge", "cpu").edge.device == "cpu"
    assert with_device(config, "cloud", "auto").edge.device == MISSING  # the other side's flag


def test_edge_cli_device_flag_overrides_a_missing_device_in_the_file(tmp_path: Path, capsys) -> None:
    path = _write_config(tmp_path, f'\n[edge]\ndevice = "{MISSING}"\n')
    run = ["--config", str(path), "--local", "--max-steps", "2", "--no-progress"]

    assert edge_main([*run, "--run-dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert f"edge.device = '{MISSING}'" in err and "available devices: cpu" in err
    assert not (tmp_path / "file").exists(), "a missing device must fail before the run directory is made"

    assert edge_main([*run, "--run-dir", str(tmp_path / "flag"), "--device", "cpu"]) == 0
    assert (tmp_path / "flag" / "model.pt").exists()


def test_cloud_cli_refuses_a_missing_device(tmp_path: Path, capsys) -> None:
    path = _write_config(tmp_path)
    assert cloud_main(["--config", str(path), "--listen", "127.0.0.1:0", "--device", MISSING]) == 2
    err = capsys.readouterr().err
    assert f"cloud.device = '{MISSING}'" in err and "available devices" in err


def test_a_bad_device_flag_is_a_usage_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cloud_main(["--config", str(_write_config(tmp_path)), "--device", "gpu"])
    assert exit_.value.code == 2
    assert "argument --device: device 'gpu' is unknown" in capsys.readouterr().err


# -- the device code path on the CPU -----------------------------------------------------------


def _on(config: Config, device: str) -> Config:
    return with_device(with_device(config, "cloud", device), "edge", device)


def test_a_split_run_with_device_cpu_equals_the_local_run(tmp_path: Path, cloud) -> None:
    config = _on(make_config(), "cpu")
    split = train(config, run_dir=tmp_path / "split", cloud=cloud(config), max_steps=STEPS)
    local = train(config, run_dir=tmp_path / "local", max_steps=STEPS)
    assert split["steps"] == local["steps"] == STEPS
    trained = load_state(tmp_path / "split" / "model.pt")
    assert not _models_equal(trained, Blueprint(config).model.state_dict()), "training must move the weights"
    assert _models_equal(trained, load_state(tmp_path / "local" / "model.pt"))


def test_a_run_resumes_under_another_device_setting(tmp_path: Path) -> None:
    """Checkpoints are device-neutral: the device is no part of what a resume must share."""
    config = make_config(checkpoint={"every_steps": 3})
    reference = train(config, run_dir=tmp_path / "reference", max_steps=STEPS)

    def stop_after(report: Any) -> None:
        if report.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_on(config, "cpu"), run_dir=tmp_path / "run", max_steps=STEPS, on_step=stop_after)
    resumed = train(_on(config, "auto"), run_dir=tmp_path / "run", max_steps=STEPS, resume=True)
    assert resumed["steps"] == reference["steps"]
    if not HAS_ACCELERATOR:  # auto is the CPU here: the same operations, the same bits
        assert _models_equal(load_state(tmp_path / "run" / "model.pt"), load_state(tmp_path / "reference" / "model.pt"))


# -- CUDA ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@cuda
@pytest.mark.parametrize("codec", ["fp32", "bf16", "fp16", "int8", "int4"])
@pytest.mark.parametrize("role", ["activation", "gradient"])
def test_cuda_encodes_and_decodes_the_bytes_the_cpu_does(codec: str, role: codecs.Role) -> None:
    x = torch.randn(8, 16, 9, 9, generator=torch.Generator().manual_seed(0))
    on_cpu, on_cuda = codecs.encode(x, codec, role), codecs.encode(x.cuda(), codec, role)
    assert on_cuda == on_cpu
    decoded = codecs.decode(on_cuda, "cuda")
    assert decoded.device.type == "cuda"
    assert torch.equal(decoded.cpu(), codecs.decode(on_cpu))


@cuda
def test_cuda_stochastic_rounding_draws_the_cpu_generator_s_numbers() -> None:
    x = torch.randn(4, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    on_cpu = codecs.encode(x, "int8-sr", "gradient", generator=torch.Generator().manual_seed(3))
    on_cuda = codecs.encode(x.cuda(), "int8-sr", "gradient", generator=torch.Generator().manual_seed(3))
    assert on_cuda == on_cpu


@cuda
def test_cuda_split_run_trains_close_to_cpu_and_saves_cpu_files(tmp_path: Path, cloud, cloud_server) -> None:
    base = make_config(link={"uplink": "int8", "gradients": "int8-sr"}, checkpoint={"every_steps": 3})
    config = _on(base, "cuda")
    address, _ = cloud_server(config, state_dir=tmp_path / "state")
    train(config, run_dir=tmp_path / "cuda", cloud=address, max_steps=STEPS)
    train(base, run_dir=tmp_path / "cpu", cloud=cloud(base), max_steps=STEPS)
    files = [tmp_path / "cuda" / "model.pt", *(tmp_path / "cuda").rglob("step-*.pt"),
             *(tmp_path / "state").rglob("step-*.pt")]
    assert len(files) >= 5, "the model and both sides' checkpoints"
    for path in files:
        saved = torch.load(path, weights_only=True)  # no map_location: where each tensor was saved from
        assert all(t.device.type == "cpu" for t in _tensors(saved)), path
    on_cuda, on_cpu = load_state(tmp_path / "cuda" / "model.pt"), load_state(tmp_path / "cpu" / "model.pt")
    # Not bit-equal (CUDA's kernels), but the same training.
    assert max((on_cuda[k].double() - on_cpu[k].double()).abs().max().item() for k in on_cpu) < 0.05


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []
