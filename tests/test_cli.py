"""The commands as a user runs them: ``edgepipe``, ``edgepipe-edge`` and ``edgepipe-cloud``."""
from __future__ import annotations

import json
import re
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgepipe.cloud_cli import main as cloud_main
from edgepipe.edge_cli import main as edge_main
from edge_node.worker import train
from edgepipe.cli import main as edgepipe_main
from pipeline.config import load_config
from pipeline.models import build_configured, layer_names
from tests.conftest import SMALL_TOML, make_config

ROOT = Path(__file__).resolve().parents[1]



def _config_file(tmp_path: Path, edge_head: int = 1, name: str = "config.toml", text: str | None = None) -> Path:
    path = tmp_path / name
    path.write_text(SMALL_TOML.format(edge_head=edge_head) if text is None else text, encoding="utf-8")
    return path


def _model(path: Path) -> torch.nn.Sequential:
    config = load_config(path)
    return build_configured(config.model)


# -- edgepipe partition show ---------------------------------------------------------------------


def test_partition_show_prints_every_layer_and_both_cuts(tmp_path: Path, capsys) -> None:
    path = _config_file(tmp_path)
    code = edgepipe_main(["partition", "show", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    names = layer_names(_model(path))
    assert names == ["block1", "block2", "pool", "fc"]
    for name in names:
        assert re.search(rf"\b{name}\b", out), f"layer {name} missing from:\n{out}"
    assert "cut 1" in out and "cut 2" in out
    assert "uplink" in out and "downlink" in out
    # The cuts sit where the config puts them: after block1, and before fc.
    assert out.index("block1") < out.index("cut 1") < out.index("block2")
    assert out.index("pool") < out.index("cut 2") < out.index("fc")
    assert "edge" in out and "cloud" in out


def test_partition_show_follows_the_config(tmp_path: Path, capsys) -> None:
    path = _config_file(tmp_path, edge_head=2)
    assert edgepipe_main(["partition", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.index("block2") < out.index("cut 1") < out.index("pool")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (SMALL_TOML.format(edge_head=1).replace("edge_head = 1", "edge_heads = 1"), ["partition.edge_heads", "edge_head"]),
        (SMALL_TOML.format(edge_head=3), ["partition.edge_head", "partition.edge_tail"]),
        ("[model\nname = 1", ["not valid TOML"]),
    ],
    ids=["unknown-key", "no-layer-for-the-cloud", "bad-toml"],
)
def test_partition_show_on_a_bad_config_exits_2(tmp_path: Path, capsys, text: str, words: list[str]) -> None:
    path = _config_file(tmp_path, text=text)
    code = edgepipe_main(["partition", "show", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith("edgepipe: ")
    for word in words:
        assert word in err
    assert "Traceback" not in err


def test_partition_show_on_a_missing_file_exits_2(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.toml"
    assert edgepipe_main(["partition", "show", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


# -- edgepipe traffic ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("local-run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(make_config(), run_dir=run_dir, max_steps=4)
    finally:
        torch.set_num_threads(threads)
    assert summary["steps"] == 4
    return run_dir


def test_traffic_of_a_local_run_prints_the_table_and_says_there_is_nothing_to_plot(
    local_run: Path, tmp_path: Path, capsys
) -> None:
    plot = tmp_path / "out.png"
    code = edgepipe_main(["traffic", str(local_run), "--plot", str(plot)])
    out, err = capsys.readouterr()
    assert code == 2
    assert f"link traffic of {local_run.name}" in out
    assert "total" in out
    assert "in 4 steps" in out
    assert "nothing to plot" in err and "--local" in err
    assert not plot.exists()


def test_traffic_of_a_split_run_counts_bytes(cloud, tmp_path: Path, capsys) -> None:
    config = make_config()
    run_dir = tmp_path / "split-run"
    train(config, run_dir=run_dir, cloud=cloud(config), max_steps=3)
    summary = json.loads((run_dir / "summary.json").read_text())
    up = summary["traffic"]["uplink_bytes"]
    assert up > 0
    assert edgepipe_main(["traffic", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{up / 2**20:.2f} MiB up" in out
    assert "in 3 steps" in out


def test_traffic_table_is_readable_when_piped(local_run: Path, capsys, monkeypatch) -> None:
    # Output captured or piped to a file (CI logs, `> report.txt`): Rich falls back to 80
    # columns, which must not squeeze the headers into ellipses.
    monkeypatch.delenv("COLUMNS", raising=False)
    assert edgepipe_main(["traffic", str(local_run)]) == 0
    out = capsys.readouterr().out
    for header in ("epoch", "steps", "val acc"):
        assert header in out, f"header {header!r} was truncated:\n{out}"


def test_traffic_on_a_missing_dir_exits_2(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-run"
    assert edgepipe_main(["traffic", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert str(missing) in err
    assert out == ""


def test_traffic_on_a_dir_that_is_no_run_exits_2(tmp_path: Path, capsys) -> None:
    assert edgepipe_main(["traffic", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


# -- edgepipe-cloud as a real process -------------------------------------------------------------


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The process's first stdout line, waiting at most ``timeout`` seconds for it."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"edgepipe-cloud printed nothing within {timeout} s")
    return proc.stdout.readline()


def test_cloud_cli_serves_a_training_run_and_stops_on_sigterm(tmp_path: Path) -> None:
    path = _config_file(tmp_path)
    stderr_path = tmp_path / "cloud.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgepipe.cloud_cli", "--config", str(path), "--listen", "127.0.0.1:0", "--threads", "1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        line = _first_line(proc, timeout=60)
        match = re.fullmatch(r"edgepipe-cloud listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, f"unexpected first line {line!r}; stderr:\n{stderr_path.read_text()}"
        port = int(match.group(1))
        assert port > 0

        summary = train(load_config(path), run_dir=tmp_path / "run", cloud=f"127.0.0.1:{port}", max_steps=2)
        assert summary["steps"] == 2
        assert summary["mode"] == "split"
        assert summary["traffic"]["uplink_bytes"] > 0

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, stderr_path.read_text()
        assert "edgepipe-cloud stopped" in stderr_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()


def test_cloud_cli_on_a_bad_config_exits_2(tmp_path: Path, capsys) -> None:
    path = _config_file(tmp_path, text=SMALL_TOML.format(edge_head=1).replace("chunks = 4", 'chunks = "4"'))
    assert cloud_main(["--config", str(path), "--listen", "127.0.0.1:0"]) == 2
    out, err = capsys.readouterr()
    assert "listening" not in out
    assert "partition.chunks" in err


# -- edgepipe-edge --local ------------------------------------------------------------------------


def test_edge_cli_local_run_leaves_metrics_summary_and_model(tmp_path: Path, capsys) -> None:
    path = _config_file(tmp_path)
    run_dir = tmp_path / "run"
    code = edge_main(["--config", str(path), "--local", "--run-dir", str(run_dir), "--max-steps", "3", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "3 steps" in out

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    for r in steps:
        for key in ("epoch", "loss", "lr", "boundary", "step_seconds", "uplink_bytes", "downlink_bytes"):
            assert key in r, key
    assert any("val_accuracy" in r for r in records)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    for key in ("epochs", "wall_seconds", "final_val_accuracy", "traffic", "freeze_events", "config"):
        assert key in summary, key
    assert set(summary["traffic"]["by_kind"]) >= {"activation", "gradient", "control"}

    state = torch.load(run_dir / "model.pt", weights_only=True)
    model = _model(path)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items()), "model.pt is untrained"


def test_edge_cli_refuses_a_bad_flag_value(tmp_path: Path, capsys) -> None:
    path = _config_file(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        edge_main(["--config", str(path), "--local", "--run-dir", str(tmp_path / "r"), "--max-steps", "0"])
    assert exit_info.value.code == 2
    assert "--max-steps" in capsys.readouterr().err
    assert not (tmp_path / "r" / "model.pt").exists()
