"""Tests for pipeline.accounting on real run directories: traffic per epoch, freeze and codec savings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_node.worker import train
from pipeline.accounting import epoch_traffic, freeze_savings, uplink_codec_use
from pipeline.models import build_model
from pipeline.partition import make_cuts, profile
from pipeline.runs import RunFileError, load_run
from tests.run_dirs import FREEZE_STEP, MAX_STEPS, copy_run, records, run_config, summary


def test_one_row_per_epoch_and_the_total_is_the_summary(split_dir: Path) -> None:
    lines, traffic = records(split_dir), summary(split_dir)["traffic"]
    rows = epoch_traffic(load_run(split_dir))

    # Epochs are numbered as in metrics.jsonl: from 0.
    assert [r.epoch for r in rows] == [0, 1, 2, None]
    assert [r.steps for r in rows] == [5, 5, 2, MAX_STEPS]
    total = rows[-1]
    assert (total.uplink_bytes, total.downlink_bytes) == (traffic["uplink_bytes"], traffic["downlink_bytes"])
    assert total.by_kind == traffic["by_kind"]
    assert total.uplink_bytes > 0 and total.downlink_bytes > 0
    # An epoch row is its steps plus its evaluation, counted here straight from the file.
    for row in rows[:-1]:
        mine = [r for r in lines if r["epoch"] == row.epoch]
        assert row.uplink_bytes == sum(r["uplink_bytes"] for r in mine)
        assert row.by_kind["gradient"]["downlink_bytes"] == sum(
            r["by_kind"]["gradient"]["downlink_bytes"] for r in mine if "step" in r
        )
        assert row.val_accuracy == next(r["val_accuracy"] for r in mine if "step" not in r)
    # What no epoch holds (handshake, weight fetch) is small next to the training traffic.
    assert 0 <= total.downlink_bytes - sum(r.downlink_bytes for r in rows[:-1]) < total.downlink_bytes / 10


def test_the_epoch_where_the_head_froze_has_a_note(split_dir: Path) -> None:
    rows = epoch_traffic(load_run(split_dir))
    assert [r.notes for r in rows] == [(), (f"froze layer 0 at step {FREEZE_STEP}",), (), ()]


def test_freeze_savings_equal_an_independent_count(split_dir: Path) -> None:
    steps = [r for r in records(split_dir) if "step" in r]
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


def test_gradient_bytes_are_estimated_from_shapes_without_unfrozen_steps(split_dir: Path, tmp_path: Path) -> None:
    steps = [r for r in records(split_dir) if "step" in r]
    measured = [r["by_kind"]["gradient"]["downlink_bytes"] for r in steps if r["boundary"] == 0]
    copy = copy_run(split_dir, tmp_path)
    # The same run as if it had frozen from its first step: only the frozen steps remain.
    kept = [json.dumps(r) for r in records(split_dir) if "step" not in r or r["boundary"] == 1]
    (copy / "metrics.jsonl").write_text("\n".join(kept) + "\n")

    savings = freeze_savings(load_run(copy))
    expected = (MAX_STEPS - FREEZE_STEP) * sum(measured) / len(measured)
    assert savings["downlink_gradient_bytes_saved"] == pytest.approx(expected, rel=0.01)
    assert savings["edge_backward_seconds_saved"] is None


def test_a_local_run_saves_compute_but_no_link_bytes(local_dir: Path, split_dir: Path) -> None:
    run = load_run(local_dir)
    rows = epoch_traffic(run)
    assert run.is_local
    assert len(rows) == 4 and rows[-1].by_kind == summary(local_dir)["traffic"]["by_kind"]
    assert rows[-1].uplink_bytes == rows[-1].downlink_bytes == 0
    savings = freeze_savings(run)
    assert savings["downlink_gradient_bytes_saved"] == savings["uplink_gradient_bytes_saved"] == 0
    assert savings["backward_flops_saved"] == freeze_savings(load_run(split_dir))["backward_flops_saved"]
    assert uplink_codec_use(run) is None


def test_nothing_frozen_saves_nothing(tmp_path: Path) -> None:
    train(run_config(policy="none"), run_dir=tmp_path, max_steps=2)
    assert freeze_savings(load_run(tmp_path)) == {
        "steps_frozen": 0,
        "steps_frozen_head": 0,
        "downlink_gradient_bytes_saved": 0,
        "uplink_gradient_bytes_saved": 0,
        "backward_flops_saved": 0,
        "edge_backward_seconds_saved": 0.0,
    }


def test_a_run_without_summary_sums_its_epochs_and_cannot_price_freezing(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    (copy / "summary.json").unlink()
    run = load_run(copy)
    rows = epoch_traffic(run)
    assert rows[-1].uplink_bytes == sum(r.uplink_bytes for r in rows[:-1])
    assert rows[-1].val_accuracy == rows[-2].val_accuracy is not None
    assert rows[1].notes == (f"froze layer 0 at step {FREEZE_STEP}",)
    with pytest.raises(RunFileError, match=r"summary\.json not found"):
        freeze_savings(run)


def test_a_summary_without_config_is_named(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    data = summary(split_dir)
    del data["config"]
    (copy / "summary.json").write_text(json.dumps(data))
    with pytest.raises(RunFileError, match=r"summary\.json: expected a \"config\" object"):
        freeze_savings(load_run(copy))


def test_the_uplink_codec_line_compares_with_fp32(split_dir: Path, tmp_path: Path) -> None:
    # The fp32 run saved nothing; pretend its activations went as a quarter of the bytes (int8).
    assert uplink_codec_use(load_run(split_dir)) is None
    copy = copy_run(split_dir, tmp_path)
    lines = records(split_dir)
    for line in lines:
        if "step" in line:
            line["uplink_activation_fp32_bytes"] = 4 * line["by_kind"]["activation"]["uplink_bytes"]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    use = uplink_codec_use(load_run(copy))
    sent = sum(r["by_kind"]["activation"]["uplink_bytes"] for r in lines if "step" in r)
    assert use is not None and (use.codec, use.sent_bytes, use.fp32_bytes) == ("fp32", sent, 4 * sent)
