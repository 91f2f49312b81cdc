"""Mistakes a new user made, each answered with one line that names what to fix (and no traceback)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cloud_node.servicer import serve
from edgepipe.cloud_cli import main as cloud_main
from edgepipe.edge_cli import main as edge_main
from tests.conftest import SMALL_TOML, make_config


def _config(tmp_path: Path, extra: str = "", edge_head: int = 1) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(SMALL_TOML.format(edge_head=edge_head) + extra, encoding="utf-8")
    return path


def _one_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """The reason the command printed: its last line (a configuration error puts the file on the
    line above it, one line per problem), with every word of ``words`` in it."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("edgepipe") and len(lines) <= 2, f"expected one reason, got:\n{err}"
    message = lines[-1].strip()
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def _local(config: Path, run_dir: Path | str) -> list[str]:
    return ["--config", str(config), "--local", "--run-dir", str(run_dir), "--max-steps", "1", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_second_cloud_on_a_used_port_is_refused(tmp_path: Path, capsys) -> None:
    server, port, _ = serve(make_config(), "127.0.0.1:0")
    try:
        code = cloud_main(["--config", str(_config(tmp_path)), "--listen", f"127.0.0.1:{port}"])
    finally:
        server.stop(None)
    assert code == 2
    _one_line(capsys, "cannot listen", str(port))


@pytest.mark.parametrize("address", ["cloud.example", "127.0.0.1:port", "127.0.0.1:70000", ":5"])
def test_a_malformed_cloud_address_is_refused_at_once(tmp_path: Path, capsys, address: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        edge_main(["--config", str(_config(tmp_path)), "--cloud", address, "--run-dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "--cloud" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "nothing may be written for a bad address"


def test_an_unreachable_cloud_waits_only_the_connect_timeout(tmp_path: Path, capsys) -> None:
    argv = ["--config", str(_config(tmp_path)), "--cloud", f"127.0.0.1:{_free_port()}", "--run-dir",
            str(tmp_path / "r"), "--connect-timeout", "0.5", "--no-progress"]
    assert edge_main(argv) == 1
    _one_line(capsys, "cannot reach", "--connect-timeout")


def test_stop_layers_out_of_range_is_found_by_the_cloud_at_start(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, '\n[skip]\npolicy = "manual"\nstop_layers = [7]\nstop_steps = [1]\n')
    assert cloud_main(["--config", str(path), "--listen", "127.0.0.1:0"]) == 2
    _one_line(capsys, "skip.stop_layers", "7")


def test_a_bad_cac_variable_is_found_at_start(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CAC_VAR_SAMPLES", "many")
    path = _config(tmp_path, '\n[skip]\npolicy = "cac-auto"\n')
    assert cloud_main(["--config", str(path), "--listen", "127.0.0.1:0"]) == 2
    _one_line(capsys, "CAC_VAR_SAMPLES")
    assert edge_main(_local(path, tmp_path / "r")) == 2
    _one_line(capsys, "CAC_VAR_SAMPLES")


def test_c2_not_before_the_last_epoch_is_refused(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, '\n[skip]\npolicy = "schedule"\nc2 = 1\n')
    assert edge_main(_local(path, tmp_path / "r")) == 2
    _one_line(capsys, "skip.c2")


def test_a_factory_with_the_wrong_signature_is_named(tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.toml"
    path.write_text(SMALL_TOML.format(edge_head=1).replace('"tinycnn"', '"tests.user_models:needs_depth"'),
                    encoding="utf-8")
    assert edge_main(_local(path, tmp_path / "r")) == 2
    _one_line(capsys, "tests.user_models:needs_depth")


def test_a_config_that_is_not_utf8_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(SMALL_TOML.format(edge_head=1).replace("tinycnn", "tinycnn\xe9").encode("latin-1"))
    assert edge_main(_local(path, tmp_path / "r")) == 2
    _one_line(capsys, "UTF-8")


def test_a_run_dir_that_cannot_be_created_is_named(tmp_path: Path, capsys) -> None:
    # sysfs refuses new directories even to root: a run directory nobody may write.
    assert edge_main(_local(_config(tmp_path), "/sys/edgepipe-test-run")) == 2
    _one_line(capsys, "/sys/edgepipe-test-run")


def test_a_full_disk_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    assert edge_main(_local(_config(tmp_path), run_dir)) == 2
    _one_line(capsys, "No space left on device", str(run_dir))


@pytest.mark.parametrize("flag", ["--threads", "--max-sessions"])
def test_cloud_flags_must_be_positive(tmp_path: Path, capsys, flag: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cloud_main(["--config", str(_config(tmp_path)), flag, "0"])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_local_refuses_the_split_the_cloud_refuses(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, edge_head=5)  # tinycnn has 4 layers: nothing would be left for the cloud
    assert edge_main(_local(path, tmp_path / "r")) == 2
    local = _one_line(capsys, "partition.edge_head")
    assert cloud_main(["--config", str(path), "--listen", "127.0.0.1:0"]) == 2
    cloud = _one_line(capsys, "partition.edge_head")
    assert local.split(": ", 1)[1] == cloud.split(": ", 1)[1]
