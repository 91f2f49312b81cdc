"""The traffic ledger against the wire: a split run through edgepipe link counts what TCP carried."""
from __future__ import annotations

from pathlib import Path

import torch

from edge_node.worker import train
from edgepipe.link_emulator import LinkEmulator, LinkSettings
from pipeline.checkpoint import load_state
from tests.conftest import make_config


def test_the_ledger_is_within_one_percent_of_the_tcp_bytes_each_way(cloud, tmp_path: Path) -> None:
    config = make_config(train={"epochs": 1, "max_steps": 6})
    host, port = cloud(config).rsplit(":", 1)
    settings = LinkSettings(up_mbps=400, down_mbps=400, delay_ms=1)
    with LinkEmulator(("127.0.0.1", 0), (host, int(port)), settings) as link:
        address = "{}:{}".format(*link.address)
        summary = train(config, run_dir=tmp_path / "wan", cloud=address)
        # Every call is over once train returns; stop the proxy so its counts are final.
        report = link.stop()
    traffic = summary["traffic"]
    for direction, wire in (("uplink_bytes", report["up"]["bytes"]), ("downlink_bytes", report["down"]["bytes"])):
        ledger = traffic[direction]
        assert ledger > 0
        assert ledger <= wire, f"{direction}: the ledger counted more than crossed the wire"
        assert wire / ledger < 1.01, f"{direction}: wire {wire} vs ledger {ledger}"

    # The emulated link changes nothing but time: the run equals a direct one bit for bit.
    direct = train(config, run_dir=tmp_path / "direct", cloud=f"{host}:{port}")
    assert direct["steps"] == summary["steps"] == 6
    a, b = load_state(tmp_path / "wan" / "model.pt"), load_state(tmp_path / "direct" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
