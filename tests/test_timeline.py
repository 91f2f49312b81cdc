"""edgepipe-edge --trace and edgepipe traffic --timeline: where a step's time goes, on both machines."""
from __future__ import annotations

import json
from pathlib import Path

from edge_node.worker import train
from edgepipe.cli import main as edgepipe_main
from pipeline.timeline import read_trace
from tests.conftest import make_config

STEPS, CHUNKS = 3, 4


def test_a_split_run_writes_a_trace_of_every_step_and_draws_one(cloud, tmp_path: Path, capsys) -> None:
    config = make_config(partition={"edge_head": 1, "edge_tail": 1, "chunks": CHUNKS})
    run_dir = tmp_path / "run"
    train(config, run_dir=run_dir, cloud=cloud(config), max_steps=STEPS, trace=run_dir / "trace.json")

    events = json.loads((run_dir / "trace.json").read_text())["traceEvents"]
    assert {e["args"]["name"] for e in events if e["ph"] == "M"} == {"edge", "cloud"}
    steps = read_trace(run_dir / "trace.json")
    assert sorted(steps) == list(range(STEPS))
    for spans in steps.values():
        edge = [s for s in spans if s.side == "edge"]
        for name in ("head forward", "tail forward", "tail backward", "head backward"):
            assert sorted(s.micro_batch for s in edge if s.name == name) == list(range(CHUNKS)), name
        assert all(s.end >= s.start >= 0 for s in spans)
        cloud_names = {s.name for s in spans if s.side == "cloud"}
        assert {"forward", "backward"} <= cloud_names, cloud_names

    picture = tmp_path / "step.png"
    assert edgepipe_main(["traffic", str(run_dir), "--timeline", str(picture)]) == 0
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "wrote" in capsys.readouterr().out


def test_a_bad_trace_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    train(make_config(), run_dir=tmp_path / "run", max_steps=1)
    (tmp_path / "trace.json").write_text('{"traceEvents": 3}')
    code = edgepipe_main(["traffic", str(tmp_path / "run"), "--timeline", str(tmp_path / "x.png"),
                          "--trace", str(tmp_path / "trace.json")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgepipe:") and "trace" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
