"""Every link codec trains over real gRPC, and the edge counts what the codec saved."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_node.worker import train
from pipeline.codecs import payload_bytes
from tests.conftest import make_config

STEPS = 24


def _step_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "step" in line]


@pytest.mark.parametrize(
    "uplink, gradients",
    [("fp16", "fp16"), ("bf16", "bf16"), ("int8", "int8"), ("int4", "fp32"), ("int8", "int8-sr"), ("int4", "int4")],
)
def test_split_training_learns_with_codec(uplink, gradients, tmp_path, cloud):
    config = make_config(
        link={"uplink": uplink, "downlink": uplink, "gradients": gradients},
        train={"lr": 0.2, "epochs": 3},
    )
    summary = train(config, run_dir=tmp_path / "run", cloud=cloud(config), max_steps=STEPS)
    losses = [line["loss"] for line in _step_lines(tmp_path / "run")]
    assert sum(losses[-4:]) < 0.85 * sum(losses[:4]), f"loss did not fall with {uplink}/{gradients}: {losses}"
    assert summary["final_val_accuracy"] > 0.25
    assert summary["edge_encode_seconds"] > 0 and summary["cloud_decode_seconds"] > 0


def test_int8_uplink_shrinks_activation_bytes(tmp_path, cloud):
    runs = {}
    for codec in ("fp32", "int8", "int4"):
        config = make_config(link={"uplink": codec})
        train(config, run_dir=tmp_path / codec, cloud=cloud(config), max_steps=3)
        runs[codec] = _step_lines(tmp_path / codec)
    fp32 = sum(line["by_kind"]["activation"]["uplink_bytes"] for line in runs["fp32"])
    for codec, bound in (("int8", 0.26), ("int4", 0.14)):
        sent = sum(line["by_kind"]["activation"]["uplink_bytes"] for line in runs[codec])
        assert sent <= bound * fp32, f"{codec} uplink is {sent / fp32:.3f} of fp32"
        # The edge's own estimate of the fp32 cost matches what fp32 really cost, to the frame overhead.
        estimate = sum(line["uplink_activation_fp32_bytes"] for line in runs[codec])
        assert abs(estimate - fp32) <= 0.02 * fp32
    # The payload of one int8 micro-batch is one byte per element.
    assert payload_bytes("int8", (8, 8, 8, 8)) == 8 * 8 * 8 * 8
