"""Tests for pipeline.report on real run directories: a local and a split run over loopback gRPC."""

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from cloud_node.servicer import serve
from edge_node.worker import train
from pipeline.config import parse_config
from pipeline.models import build_model
from pipeline.partition import make_cuts, profile
from pipeline.report import (
    ReportError,
    epoch_traffic,
    freeze_savings,
    load_run,
    plot_traffic,
    render_report,
    traffic_table,
)

MAX_STEPS = 12
FREEZE_STEP = 5


def _config(policy: str = "manual"):
    skip = {"policy": "manual", "stop_layers": [0], "stop_steps": [FREEZE_STEP]} if policy == "manual" else {}
    return parse_config(
        {
            "model": {"name": "tinycnn", "input_shape": [1, 8, 8]},
            "partition": {"edge_head": 1, "edge_tail": 1, "chunks": 4},
            "skip": skip,
            # 10 % of digits for training: 5 steps of 32 per epoch, so 12 steps span three epochs.
            "train": {"dataset": "digits", "batch_size": 32, "epochs": 3, "val_fraction": 0.9, "eval_batch_size": 64},
        }
    )


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    config = _config()
    server, port, _ = serve(config, "127.0.0.1:0")
    run_dir = tmp_path_factory.mktemp("split")
    try:
        train(config, run_dir=run_dir, cloud=f"127.0.0.1:{port}", progress=False, max_steps=MAX_STEPS)
    finally:
        server.stop(None)
    return run_dir


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local")
    train(_config(), run_dir=run_dir, progress=False, max_steps=MAX_STEPS)
    return run_dir


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _text(renderable) -> str:
    console = Console(record=True, width=240)
    console.print(renderable)
    return console.export_text()


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def test_one_row_per_epoch_and_the_total_is_the_summary(split_dir):
    records, summary = _records(split_dir), _summary(split_dir)
    rows = epoch_traffic(load_run(split_dir))

    assert [r.epoch for r in rows] == [0, 1, 2, None]
    assert [r.steps for r in rows] == [5, 5, 2, MAX_STEPS]
    total = rows[-1]
    traffic = summary["traffic"]
    assert (total.uplink_bytes, total.downlink_bytes) == (traffic["uplink_bytes"], traffic["downlink_bytes"])
    assert total.by_kind == traffic["by_kind"]
    assert total.uplink_bytes > 0 and total.downlink_bytes > 0
    # An epoch row is its steps plus its evaluation, counted here straight from the file.
    for row in rows[:-1]:
        mine = [r for r in records if r["epoch"] == row.epoch]
        assert row.uplink_bytes == sum(r["uplink_bytes"] for r in mine)
        assert row.by_kind["gradient"]["downlink_bytes"] == sum(
            r["by_kind"]["gradient"]["downlink_bytes"] for r in mine if "step" in r
        )
        assert row.val_accuracy == next(r["val_accuracy"] for r in mine if "step" not in r)
    # What no epoch holds (handshake, weight fetch) is small next to the training traffic.
    assert 0 <= total.downlink_bytes - sum(r.downlink_bytes for r in rows[:-1]) < total.downlink_bytes / 10

    table = traffic_table(load_run(split_dir))
    assert table.row_count == 4
    total_line = next(line for line in _text(table).splitlines() if "total" in line)
    assert f"{traffic['uplink_bytes'] / 2**20:.3f}" in total_line
    assert f"{traffic['downlink_bytes'] / 2**20:.3f}" in total_line


def test_the_row_where_the_head_froze_is_marked(split_dir):
    rows = epoch_traffic(load_run(split_dir))
    assert [r.notes for r in rows] == [(), (f"froze layer 0 at step {FREEZE_STEP}",), (), ()]
    lines = _text(traffic_table(load_run(split_dir))).splitlines()
    marked = [line for line in lines if "froze" in line]
    assert len(marked) == 1 and marked[0].split("│")[1].strip() == "1"


def test_freeze_savings_equal_an_independent_count(split_dir):
    steps = [r for r in _records(split_dir) if "step" in r]
    before = [r["by_kind"]["gradient"]["downlink_bytes"] for r in steps if r["step"] < FREEZE_STEP]
    after = [r["by_kind"]["gradient"]["downlink_bytes"] for r in steps if r["step"] >= FREEZE_STEP]
    assert min(before) > 0 and after == [0] * (MAX_STEPS - FREEZE_STEP)

    savings = freeze_savings(load_run(split_dir))
    assert savings["steps_frozen_head"] == len(after)
    assert savings["downlink_gradient_bytes_saved"] > 0
    assert abs(savings["downlink_gradient_bytes_saved"] - len(after) * sum(before) / len(before)) <= 1
    # The middle never froze, so the edge kept sending dL/dz.
    assert savings["uplink_gradient_bytes_saved"] == 0
    model = build_model("tinycnn", num_classes=10, input_shape=(1, 8, 8), width=1.0, seed=0)
    first_layer = profile(model, (1, 8, 8), make_cuts(len(model), 1, 1))[0].flops
    assert savings["backward_flops_saved"] == len(after) * 32 * 2 * first_layer > 0
    assert isinstance(savings["edge_backward_seconds_saved"], float)


def test_gradient_bytes_are_estimated_from_shapes_without_unfrozen_steps(split_dir, tmp_path):
    steps = [r for r in _records(split_dir) if "step" in r]
    measured = [r["by_kind"]["gradient"]["downlink_bytes"] for r in steps if r["boundary"] == 0]
    copy = _copy(split_dir, tmp_path)
    # The same run as if it had frozen from its first step: only the frozen steps remain.
    kept = [json.dumps(r) for r in _records(split_dir) if "step" not in r or r["boundary"] == 1]
    (copy / "metrics.jsonl").write_text("\n".join(kept) + "\n")

    savings = freeze_savings(load_run(copy))
    expected = (MAX_STEPS - FREEZE_STEP) * sum(measured) / len(measured)
    assert savings["downlink_gradient_bytes_saved"] == pytest.approx(expected, rel=0.01)
    assert savings["edge_backward_seconds_saved"] is None


def test_a_local_run_saves_compute_but_no_link_bytes(local_dir, split_dir):
    run = load_run(local_dir)
    rows = epoch_traffic(run)
    assert len(rows) == 4 and rows[-1].by_kind == _summary(local_dir)["traffic"]["by_kind"]
    assert rows[-1].uplink_bytes == rows[-1].downlink_bytes == 0
    savings = freeze_savings(run)
    assert savings["downlink_gradient_bytes_saved"] == savings["uplink_gradient_bytes_saved"] == 0
    assert savings["backward_flops_saved"] == freeze_savings(load_run(split_dir))["backward_flops_saved"]
    assert "local run: nothing crossed a link" in _text(traffic_table(run))


def test_nothing_frozen_saves_nothing(tmp_path):
    train(_config(policy="none"), run_dir=tmp_path, progress=False, max_steps=2)
    run = load_run(tmp_path)
    assert freeze_savings(run) == {
        "steps_frozen": 0,
        "steps_frozen_head": 0,
        "downlink_gradient_bytes_saved": 0,
        "uplink_gradient_bytes_saved": 0,
        "backward_flops_saved": 0,
        "edge_backward_seconds_saved": 0.0,
    }
    # No freeze: just the traffic table and the total line.
    assert len(render_report(run)) == 2


def test_render_report_has_the_table_the_savings_and_a_total_line(split_dir):
    parts = render_report(load_run(split_dir))
    assert len(parts) == 3
    traffic = _summary(split_dir)["traffic"]
    assert _text(parts[-1]).strip() == (
        f"link total: {traffic['uplink_bytes'] / 2**20:.2f} MiB up, "
        f"{traffic['downlink_bytes'] / 2**20:.2f} MiB down in {MAX_STEPS} steps"
    )
    assert "downlink gradient" in _text(parts[1])


def test_plot_traffic_writes_a_png_and_no_temporary_file(split_dir, tmp_path):
    target = tmp_path / "traffic.png"
    plot_traffic(load_run(split_dir), target)
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["traffic.png"]


def test_plot_traffic_into_a_missing_folder_says_so(split_dir, tmp_path):
    with pytest.raises(ReportError, match="existing, writable folder"):
        plot_traffic(load_run(split_dir), tmp_path / "nowhere" / "traffic.png")


def test_a_missing_run_dir_or_metrics_file_is_named(tmp_path):
    with pytest.raises(ReportError, match=r"run directory .*nope does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(ReportError, match=r"metrics\.jsonl not found"):
        load_run(tmp_path)


def test_garbage_metrics_name_the_file_and_line(split_dir, tmp_path):
    copy = _copy(split_dir, tmp_path)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join([lines[0], "not json at all", *lines[1:]]) + "\n")
    with pytest.raises(ReportError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        load_run(copy)
    (copy / "metrics.jsonl").write_text('{"step": 0, "epoch": 0}\n')
    with pytest.raises(ReportError, match=r"metrics\.jsonl, line 1: expected 'boundary' to be an integer"):
        load_run(copy)


def test_garbage_summary_is_named(split_dir, tmp_path):
    copy = _copy(split_dir, tmp_path)
    (copy / "summary.json").write_text("{")
    with pytest.raises(ReportError, match=r"summary\.json: not valid JSON"):
        load_run(copy)


def test_a_truncated_last_line_is_dropped_with_a_warning(split_dir, tmp_path):
    copy = _copy(split_dir, tmp_path)
    with (copy / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 12, "epoch": 2, "lo')
    with pytest.warns(UserWarning, match="truncated last line"):
        run = load_run(copy)
    assert len(run.steps) == MAX_STEPS


def test_a_run_without_summary_still_reports_its_epochs_and_freeze(split_dir, tmp_path):
    copy = _copy(split_dir, tmp_path)
    (copy / "summary.json").unlink()
    run = load_run(copy)
    rows = epoch_traffic(run)
    assert run.summary is None
    assert rows[-1].uplink_bytes == sum(r.uplink_bytes for r in rows[:-1])
    assert rows[1].notes == (f"froze layer 0 at step {FREEZE_STEP}",)
    with pytest.raises(ReportError, match=r"summary\.json not found"):
        freeze_savings(run)
    assert "freeze savings need summary.json" in _text(render_report(run)[1])
