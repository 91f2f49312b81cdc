"""Split-federated training: shards, FedAvg in name order, rounds, and 3 edge processes equal to the reference."""
from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
import torch

from cloud_node.servicer import serve
from edge_node.federation import FederatedLink, simulate
from edge_node.link import LinkError
from edge_node.recovery import RunDirError
from edge_node.worker import train
from edgepipe import edge_cli
from edgepipe.launch import edge_command, run_edge
from pipeline.blueprint import Blueprint
from pipeline.checkpoint import load_state
from pipeline.config import ConfigError, parse_config
from pipeline.data import DataError, Dataset, Shard, parse_shard, shard
from pipeline.federation import (
    Contribution, FederationError, check_federation, exchanged_keys, fedavg, load_record, round_ends,
)
from pipeline.skip import Decision
from pipeline.traffic import TrafficMeter
from protos import edgepipe_pb2 as pb
from tests.conftest import make_config

EDGES = 3
#: tinycnn, synthetic 8x8: 136 samples a shard, 4 steps an epoch, 8 steps; rounds end at steps 1, 3, 5, 7.
FEDERATION = {"edges": EDGES, "sync_every": 2, "round_timeout_seconds": 60}
#: Freezes layer 0 (the edge head) from step 3 on, which the group applies from the round after step 3.
MANUAL = {"policy": "manual", "stop_layers": [0], "stop_steps": [3]}


def _config(mode: str, skip: dict | None = None, **federation: object):
    return make_config(federation={"mode": mode, **FEDERATION, **federation}, skip=skip or {}, train={"epochs": 2})


# -- the rules -------------------------------------------------------------------------


def test_the_federation_section_is_checked_at_load():
    with pytest.raises(ConfigError, match=r"federation: key\(s\) edges are only read by a split-federated mode"):
        parse_config({"federation": {"edges": 3}})
    with pytest.raises(ConfigError, match=r"federation.mode: Input should be 'none', 'splitfed-v1' or 'splitfed-v2'"):
        parse_config({"federation": {"mode": "fedavg"}})
    with pytest.raises(ConfigError, match=r"federation.sync_every: Input should be greater than or equal to 1"):
        parse_config({"federation": {"mode": "splitfed-v1", "sync_every": 0}})
    auto = make_config(federation={"mode": "splitfed-v1", "sync_every": 3}, skip={"policy": "cac-auto", "samples": 10})
    with pytest.raises(ConfigError, match=r"skip.samples \(10\) must be a multiple of federation.sync_every \(3\)"):
        check_federation(auto)


def test_shards_are_equal_disjoint_and_the_same_on_every_edge():
    data = Dataset(torch.arange(101, dtype=torch.float32).view(-1, 1, 1, 1), torch.arange(101) % 10)
    parts = [shard(data, Shard(k, 3), seed=0) for k in (1, 2, 3)]
    values = [set(p.inputs.flatten().tolist()) for p in parts]
    assert [len(p) for p in parts] == [33, 33, 33]
    assert not (values[0] & values[1]) and not (values[1] & values[2]) and not (values[0] & values[2])
    assert torch.equal(shard(data, Shard(2, 3), seed=0).inputs, parts[1].inputs)
    assert not torch.equal(shard(data, Shard(2, 3), seed=1).inputs, parts[1].inputs)
    assert parse_shard("2/3") == Shard(2, 3)
    for bad, message in (("2", "write it as K/N"), ("4/3", "1 <= K <= N"), ("a/b", "write it as K/N")):
        with pytest.raises(DataError, match=message):
            parse_shard(bad)
    with pytest.raises(DataError, match="fewer than 200 parts"):
        shard(data, Shard(1, 200), seed=0)


def test_fedavg_weights_by_samples_and_sums_in_name_order():
    tensors = {name: torch.randn(50, generator=torch.Generator().manual_seed(i)) for i, name in enumerate("cab")}
    parts = [Contribution(name, samples, {"w": tensors[name], "n": torch.tensor(i)})
             for i, (name, samples) in enumerate((("c", 30), ("a", 10), ("b", 20)))]
    averaged = fedavg(parts)
    expected = torch.zeros(50)
    for name, samples in (("a", 10), ("b", 20), ("c", 30)):
        expected.add_(tensors[name], alpha=samples / 60)
    assert torch.equal(averaged["w"], expected)
    assert torch.equal(fedavg(list(reversed(parts)))["w"], averaged["w"]), "the order given must not matter"
    assert torch.allclose(averaged["w"], (10 * tensors["a"] + 20 * tensors["b"] + 30 * tensors["c"]) / 60)
    assert int(averaged["n"]) == 1, "integer tensors come from the first edge by name"


def test_frozen_layers_and_tensors_are_not_exchanged():
    model = Blueprint(make_config()).model
    edge = [0, len(model) - 1]
    assert exchanged_keys(model, edge, Decision(0)) == [
        "block1.0.weight", "block1.0.bias", "block1.1.weight", "block1.1.bias", "fc.weight", "fc.bias"]
    assert exchanged_keys(model, edge, Decision(1)) == ["fc.weight", "fc.bias"]
    # A partly frozen layer still exchanges its tensors that train.
    assert exchanged_keys(model, edge, Decision(0, frozen_parameters=2)) == [
        "block1.1.weight", "block1.1.bias", "fc.weight", "fc.bias"]


def test_rounds_end_every_sync_every_steps_at_epoch_ends_and_at_the_last_step():
    ends = [s for s in range(10) if round_ends(s, sync_every=3, steps_per_epoch=4, total_steps=10)]
    assert ends == [2, 3, 5, 7, 8, 9]


def test_a_broken_federation_file_is_named(tmp_path: Path):
    path = tmp_path / "federation.json"
    path.write_text('{"mode": "splitfed-v2", "sync_every": 1, "members": "a"}', encoding="utf-8")
    with pytest.raises(FederationError, match="is not a federation file"):
        load_record(path)
    with pytest.raises(FederationError, match="cannot read the federation file"):
        load_record(tmp_path / "missing.json")


# -- refusals ----------------------------------------------------------------------------


def test_a_federated_configuration_does_not_train_alone_or_resume(tmp_path: Path, cloud):
    config = _config("splitfed-v1")
    with pytest.raises(ConfigError, match=r"--local --edges 3"):
        train(config, run_dir=tmp_path / "alone")
    with pytest.raises(RunDirError, match="cannot be resumed"):
        train(config, run_dir=tmp_path / "again", cloud="127.0.0.1:1", resume=True)
    with pytest.raises(ValueError, match="cannot be checkpointed"):
        serve(config, "127.0.0.1:0", state_dir=tmp_path / "state")
    with pytest.raises(ValueError, match=r"federation.edges = 3 needs --max-sessions of at least 3"):
        serve(config, "127.0.0.1:0", max_sessions=2)


def test_a_round_names_the_edges_it_waits_for(tmp_path: Path, cloud):
    config = _config("splitfed-v1", round_timeout_seconds=1.0)
    address = cloud(config)
    # A second edge joins and never trains; the third never comes.
    idle = FederatedLink(address, config, Blueprint(config).model, TrafficMeter())
    try:
        idle.open("edge-2", total_steps=8, steps_per_epoch=4, run_id=uuid.uuid4().hex)
        with pytest.raises(LinkError, match=r"waited 1 s .*edge\(s\) edge-2 did not reach it; 1 of the 3 edges never joined"):
            train(config, run_dir=tmp_path / "one", cloud=address, edge_name="edge-1", shard=Shard(1, 3))
    finally:
        idle.close()


def test_names_are_unique_and_the_run_lengths_agree(cloud):
    config = _config("splitfed-v1")
    address = cloud(config)
    model = Blueprint(config).model
    links = [FederatedLink(address, config, model, TrafficMeter()) for _ in range(3)]
    try:
        links[0].open("edge-1", total_steps=8, steps_per_epoch=4, run_id=uuid.uuid4().hex)
        with pytest.raises(LinkError, match="an edge named 'edge-1' is already in this federation"):
            links[1].open("edge-1", total_steps=8, steps_per_epoch=4, run_id=uuid.uuid4().hex)
        with pytest.raises(LinkError, match="this edge runs 6 steps of 3 per epoch, the federation 8 of 4"):
            links[2].open("edge-3", total_steps=6, steps_per_epoch=3, run_id=uuid.uuid4().hex)
    finally:
        for link in links:
            link.close()


def test_a_sync_with_a_tensor_it_does_not_exchange_is_refused(cloud):
    config = _config("splitfed-v1")
    address = cloud(config)
    link = FederatedLink(address, config, Blueprint(config).model, TrafficMeter())
    try:
        link.open("edge-1", total_steps=8, steps_per_epoch=4, run_id=uuid.uuid4().hex)
        bogus = pb.NamedTensor(name="block2.0.weight", tensor=pb.Tensor(shape=[1], codec="raw", dtype="float32",
                                                                       data=b"\0" * 4))
        frames = [pb.SyncFrame(session=link.session, step=1, begin=pb.SyncBegin(samples=10)),
                  pb.SyncFrame(session=link.session, step=1, tensor=bogus)]
        with pytest.raises(LinkError, match="INVALID_ARGUMENT: a sync sent 'block2.0.weight', which is not a tensor"):
            list(link.sync(frames, timeout=10, traffic=TrafficMeter()))
    finally:
        link.close()


# -- three edge processes against the one-process reference -------------------------------


def _run_edges(config_path: Path, address: str, tmp_path: Path) -> list[Path]:
    run_dirs = [tmp_path / f"edge-{k}" for k in range(1, EDGES + 1)]
    codes: dict[int, int] = {}

    def edge(k: int) -> None:
        command = edge_command(config_path, cloud=address, run_dir=run_dirs[k - 1], name=f"edge-{k}", progress=False,
                               extra=["--shard", f"{k}/{EDGES}"])
        codes[k] = run_edge(command, log=tmp_path / f"edge-{k}.log", timeout=120)

    threads = [threading.Thread(target=edge, args=(k,)) for k in range(1, EDGES + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(1, EDGES + 1):
        assert codes.get(k) == 0, (tmp_path / f"edge-{k}.log").read_text()
    return run_dirs


@pytest.mark.parametrize("mode", ["splitfed-v1", "splitfed-v2"])
@pytest.mark.parametrize("skip", [None, MANUAL], ids=["no-freezing", "manual"])
def test_three_edge_processes_equal_the_one_process_reference(mode, skip, tmp_path: Path, cloud):
    config = _config(mode, skip)
    config_path = tmp_path / "config.toml"
    config_path.write_text(config.to_toml(), encoding="utf-8")
    run_dirs = _run_edges(config_path, cloud(config), tmp_path)
    records = [json.loads((d / "federation.json").read_text()) for d in run_dirs]
    assert all(r == records[0] for r in records) and records[0]["members"] == ["edge-1", "edge-2", "edge-3"]
    replay = ["--replay", str(run_dirs[0] / "federation.json")] if mode == "splitfed-v2" else []
    assert edge_cli.main(["--config", str(config_path), "--local", "--edges", str(EDGES), "--run-dir",
                          str(tmp_path / "reference"), *replay]) == 0
    reference = load_state(tmp_path / "reference" / "model.pt")
    initial = Blueprint(config).model.state_dict()
    assert any(not torch.equal(reference[k], initial[k]) for k in reference), "training must move the weights"
    for run_dir in run_dirs:
        model = load_state(run_dir / "model.pt")
        assert model.keys() == reference.keys()
        different = [k for k in model if not torch.equal(model[k], reference[k])]
        assert not different, f"{run_dir.name} differs from the reference in {different}"
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    total = summary["traffic"]["by_kind"]["sync"]
    assert total["uplink_bytes"] > 0 and total["downlink_bytes"] > 0 and total["messages"] > 0
    lines = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    sync = {r["step"]: r["by_kind"]["sync"]["uplink_bytes"] for r in lines if "sync" in r.get("by_kind", {})}
    assert sorted(sync) == [1, 3, 5, 7], "a round ends every 2 steps; only its last step syncs"
    if mode == "splitfed-v2":
        steps = sorted((a["edge"], a["step"]) for a in records[0]["admissions"])
        assert steps == sorted((f"edge-{k}", s) for k in range(1, EDGES + 1) for s in range(8))
    if skip is not None:
        # The freeze decided after step 3 holds from step 4 on every edge, and the frozen head is not exchanged.
        assert summary["freeze_events"] == [{"step": 4, "boundary": 1}]
        assert sync[1] == sync[3] > sync[5] == sync[7]
    else:
        assert summary["freeze_events"] == [] and len(set(sync.values())) == 1


def test_the_reference_of_v2_without_a_replay_runs_edges_in_name_order(tmp_path: Path):
    config = _config("splitfed-v2")
    summary = simulate(config, edges=EDGES, run_dir=tmp_path / "ref")
    record = json.loads((tmp_path / "ref" / "federation.json").read_text())
    assert summary["steps"] == 8 and summary["samples_per_edge"] == 136
    assert [a["edge"] for a in record["admissions"][:4]] == ["edge-1", "edge-2", "edge-3", "edge-1"]
    with pytest.raises(ConfigError, match="--edges 2 but federation.edges = 3"):
        simulate(config, edges=2, run_dir=tmp_path / "two")


def test_the_reference_flags_go_together(tmp_path: Path, capsys):
    config_path = tmp_path / "config.toml"
    config_path.write_text(_config("splitfed-v1").to_toml(), encoding="utf-8")
    base = ["--config", str(config_path), "--run-dir", str(tmp_path / "run")]
    for flags, message in (
        (["--cloud", "127.0.0.1:1", "--edges", "3"], "--edges trains a federation's one-process reference: it needs --local"),
        (["--local", "--edges", "3", "--shard", "1/3"], "--edges shards the data itself"),
        (["--local", "--replay", "f.json"], "--replay goes with --local --edges N"),
        (["--local", "--shard", "4/3"], "shard 4/3: K/N needs 1 <= K <= N"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            edge_cli.main(base + flags)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
