"""Tests for edgepipe.tables: the traffic report of real runs, the partition table and unit formatting."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from edge_node.worker import train
from edgepipe.cli import main as edgepipe_main
from edgepipe.tables import (
    format_bytes,
    format_count,
    format_mib,
    partition_table,
    phase_table,
    render_report,
    traffic_table,
)
from pipeline.config import LinkSection
from pipeline.models import build_model, layer_names
from pipeline.partition import link_crossings, make_cuts, profile
from pipeline.runs import load_run
from tests.conftest import SMALL_TOML
from tests.run_dirs import FREEZE_STEP, MAX_STEPS, copy_run, records, run_config, summary


def _text(renderable) -> str:
    console = Console(record=True, width=240)
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize(
    ("value", "bytes_text", "count_text"),
    [(0, "0 B", "0"), (999, "999 B", "999"), (1000, "1000 B", "1.0 K"), (32768, "32.0 KiB", "32.8 K"),
     (5 << 20, "5.0 MiB", "5.2 M"), (3 * 10**9, "2.8 GiB", "3.0 G")],
)
def test_units_are_formatted_in_one_place(value: int, bytes_text: str, count_text: str) -> None:
    assert format_bytes(value) == bytes_text
    assert format_count(value) == count_text


def test_mib_is_a_number_for_a_column_titled_mib() -> None:
    assert format_mib(3 << 19) == "1.500"
    assert format_mib(3 << 19, 2) == "1.50"


def test_the_table_has_a_row_per_epoch_and_the_summary_total(split_dir: Path) -> None:
    traffic = summary(split_dir)["traffic"]
    table = traffic_table(load_run(split_dir))
    assert table.row_count == 4
    lines = _text(table).splitlines()
    # Epochs as metrics.jsonl numbers them (from 0), under the header "epoch".
    assert any(line.split("┃")[1].strip() == "epoch" for line in lines if "┃" in line)
    assert [line.split("│")[1].strip() for line in lines if "│" in line and line.split("│")[1].strip().isdigit()] == [
        "0", "1", "2"
    ]
    total_line = next(line for line in lines if "total" in line)
    assert f"{traffic['uplink_bytes'] / 2**20:.3f}" in total_line
    assert f"{traffic['downlink_bytes'] / 2**20:.3f}" in total_line


def test_the_row_where_the_head_froze_is_marked(split_dir: Path) -> None:
    lines = _text(traffic_table(load_run(split_dir))).splitlines()
    marked = [line for line in lines if "froze" in line]
    assert len(marked) == 1 and marked[0].split("│")[1].strip() == "1"
    assert f"froze layer 0 at step {FREEZE_STEP}" in marked[0]


def test_a_local_table_says_nothing_crossed(local_dir: Path) -> None:
    assert "local run: nothing crossed a link" in _text(traffic_table(load_run(local_dir)))


def test_render_report_has_the_table_the_savings_the_phases_and_a_total_line(split_dir: Path) -> None:
    parts = render_report(load_run(split_dir))
    assert len(parts) == 4
    assert "by phase" in _text(parts[2])
    traffic = summary(split_dir)["traffic"]
    assert _text(parts[-1]).strip() == (
        f"link total: {traffic['uplink_bytes'] / 2**20:.2f} MiB up, "
        f"{traffic['downlink_bytes'] / 2**20:.2f} MiB down in {MAX_STEPS} steps"
    )
    assert "downlink gradient" in _text(parts[1])


def test_the_report_says_what_the_uplink_codec_saved(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    data = summary(split_dir)
    data["config"]["link"]["uplink"] = "int8"
    (copy / "summary.json").write_text(json.dumps(data))
    lines = records(split_dir)
    for line in lines:
        if "step" in line:
            line["uplink_activation_fp32_bytes"] = 4 * line["by_kind"]["activation"]["uplink_bytes"]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    sent = sum(r["by_kind"]["activation"]["uplink_bytes"] for r in lines if "step" in r)
    text = next(t for t in map(_text, render_report(load_run(copy))) if t.startswith("uplink activations"))
    assert text.strip() == (
        f"uplink activations (training): {sent / 2**20:.2f} MiB as int8, "
        f"{4 * sent / 2**20:.2f} MiB as fp32 would have cost: 0.250 of fp32"
    )


def test_nothing_frozen_shows_no_savings(tmp_path: Path) -> None:
    train(run_config(policy="none"), run_dir=tmp_path, max_steps=2)
    # No freeze: just the traffic table and the total line.
    assert len(render_report(load_run(tmp_path))) == 2


def test_a_run_without_summary_says_why_there_are_no_savings(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    (copy / "summary.json").unlink()
    assert "freeze savings need summary.json" in _text(render_report(load_run(copy))[1])


# -- the partition table ---------------------------------------------------------------------------


def _mobilenet(width: float = 1.0):
    return build_model("mobilenetv2", num_classes=10, input_shape=(3, 32, 32), width=width)


def _partition_text(model, input_shape, cuts, link: LinkSection | None = None, width: int = 160) -> str:
    profiles = profile(model, input_shape, cuts)
    crossings = link_crossings(profiles, cuts, link or LinkSection(), input_shape)
    console = Console(record=True, width=width)
    console.print(partition_table(profiles, cuts, crossings))
    return console.export_text()


def test_table_shows_layers_and_both_cut_markers() -> None:
    model = _mobilenet()
    cuts = make_cuts(len(model), 2, 1)
    text = _partition_text(model, (3, 32, 32), cuts)
    assert "── cut 1: uplink activation [16, 32, 32] = 64.0 KiB/sample ──" in text
    assert "── cut 2: downlink activation [1280] = 5.0 KiB/sample ──" in text
    assert text.index("block1") < text.index("cut 1") < text.index("block2")
    assert text.index("pool") < text.index("cut 2") < text.index(" fc ")
    for name in layer_names(model):
        assert name in text
    assert "2,236,682" not in text  # per-layer params, not the total, in the rows
    assert "12,810" in text  # fc params: 1280 * 10 + 10


def test_table_shows_the_bytes_of_the_configured_codecs_beside_fp32() -> None:
    model = _mobilenet()
    cuts = make_cuts(len(model), 2, 1)
    link = LinkSection(uplink="int8", downlink="fp16", gradients="int4")
    # Wide enough that no marker wraps (on a 160-column terminal the longest ones wrap in their cell).
    text = _partition_text(model, (3, 32, 32), cuts, link, width=240)
    assert "[link] codecs" in text
    # 16*32*32 elements: 1 byte each as int8, half a byte as int4; 1280 elements: 2 bytes as fp16.
    assert "── cut 1: uplink activation [16, 32, 32] = 16.0 KiB/sample int8 (64.0 KiB fp32) ──" in text
    assert "── cut 1: downlink gradient [16, 32, 32] = 8.0 KiB/sample int4 (64.0 KiB fp32), while the head trains" in text
    assert "── cut 2: downlink activation [1280] = 2.5 KiB/sample fp16 (5.0 KiB fp32) ──" in text
    assert "── cut 2: uplink gradient [1280] = 640 B/sample int4 (5.0 KiB fp32), while the cloud trains ──" in text
    fp32 = _partition_text(model, (3, 32, 32), cuts, width=240)
    assert "── cut 1: downlink gradient [16, 32, 32] = 64.0 KiB/sample, while the head trains ──" in fp32
    assert "── cut 2: uplink gradient [1280] = 5.0 KiB/sample, while the cloud trains ──" in fp32


def test_table_with_no_edge_tail_says_labels_cross_the_link() -> None:
    model = build_model("tinycnn", num_classes=3, input_shape=(1, 8, 8))
    text = _partition_text(model, (1, 8, 8), make_cuts(len(model), 0, 0))
    assert "cut 1: uplink raw input [1, 8, 8] = 256 B/sample" in text
    assert "loss is computed on the cloud" in text and "labels cross the link" in text
    assert "gradient" not in text  # no head to train, no tail to send dL/dz from


def test_partition_show_prints_the_link_bytes_of_the_configured_codecs(tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        SMALL_TOML.format(edge_head=1) + '\n[link]\nuplink = "int8"\ndownlink = "fp16"\ngradients = "fp32"\n',
        encoding="utf-8",
    )
    assert edgepipe_main(["partition", "show", str(path)]) == 0
    out = capsys.readouterr().out
    # tinycnn on 1x8x8: block1 gives [8, 8, 8] (512 elements), the middle ends in 256 features.
    assert "── cut 1: uplink activation [8, 8, 8] = 512 B/sample int8 (2.0 KiB fp32) ──" in out
    assert "── cut 1: downlink gradient [8, 8, 8] = 2.0 KiB/sample, while the head trains ──" in out
    assert "── cut 2: downlink activation [256] = 512 B/sample fp16 (1.0 KiB fp32) ──" in out
    assert "── cut 2: uplink gradient [256] = 1.0 KiB/sample, while the cloud trains ──" in out


def test_the_ledger_says_what_the_bytes_were_for(split_dir: Path) -> None:
    traffic = summary(split_dir)["traffic"]
    phases = traffic["by_phase"]
    assert set(phases) == {"handshake", "training", "evaluation", "weights"}
    for direction in ("uplink_bytes", "downlink_bytes"):
        assert sum(p[direction] for p in phases.values()) == traffic[direction]
        assert all(p[direction] > 0 for p in phases.values()), phases
    steps = records(split_dir)
    training = sum(r["uplink_bytes"] for r in steps if "step" in r)
    assert phases["training"]["uplink_bytes"] == training
    assert "evaluation" in _text(phase_table(load_run(split_dir)))
