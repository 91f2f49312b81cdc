"""Each side's checkpoint store, generator states and metrics truncation: round trips, refusals, crashes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.checkpoint import count_lines, truncate_lines
from pipeline.checkpoints import (
    PAUSE_ENV,
    CheckpointError,
    CheckpointStore,
    committed_step,
    generator_state,
    restore_generator,
)

ROOT = Path(__file__).resolve().parent.parent

#: A child process that saves step 2 into the store in argv[1] (pausable through PAUSE_ENV).
SAVE_STEP_TWO = """
import sys
from pathlib import Path
import torch
from pipeline.checkpoints import CheckpointStore
CheckpointStore(Path(sys.argv[1])).save(2, {"w": torch.full((3,), 2.0)}, {"step": 2})
"""


class Smuggled:
    """A class a checkpoint must never unpickle."""


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def _files(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    """Poll ``condition`` until it holds; fail if the child exits first or 60 s pass."""
    deadline = time.monotonic() + 60
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the child exited ({process.returncode}) before {what}: {process.stderr.read().decode()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)  # poll interval only: the loop waits for the condition


def _start_paused_writer(store_dir: Path, pause_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, PAUSE_ENV: str(pause_dir)}
    return subprocess.Popen(
        [sys.executable, "-c", SAVE_STEP_TWO, str(store_dir)], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )


def test_round_trip_of_model_optimizer_and_meta(tmp_path: Path) -> None:
    model, optimizer = _trained()
    tensors = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr": 0.1, "name": "edge"}
    meta = {"epoch": 1, "boundary": 0, "metrics_lines": 7, "config_hash": "ab12"}
    store = CheckpointStore(tmp_path / "edge")
    record = store.save(50, tensors, meta)
    assert record == tmp_path / "edge" / "step-00000050.json" and record.exists()
    assert (tmp_path / "edge" / "step-00000050.pt").exists()
    assert store.steps() == [50] and store.latest() == 50

    loaded, loaded_meta = store.load(50)
    assert loaded_meta == meta
    assert loaded["lr"] == 0.1 and loaded["name"] == "edge"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value) and loaded["model"][key].dtype == value.dtype
    # The optimizer state (integer keys, lists, momentum buffers) goes back into a fresh optimizer.
    fresh_model, fresh_optimizer = _trained()
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    for index, buffer in optimizer.state_dict()["state"].items():
        assert torch.equal(fresh_optimizer.state_dict()["state"][index]["momentum_buffer"], buffer["momentum_buffer"])


def test_the_json_record_names_size_and_hash_of_the_tensors(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(3, {"w": torch.arange(4.0)}, {"k": "v"})
    record = json.loads((tmp_path / "step-00000003.json").read_text())
    blob = (tmp_path / "step-00000003.pt").read_bytes()
    assert record["step"] == 3 and record["tensors"] == "step-00000003.pt" and record["meta"] == {"k": "v"}
    assert record["tensors_bytes"] == len(blob)
    assert record["tensors_sha256"] == hashlib.sha256(blob).hexdigest()


@pytest.mark.parametrize(
    ("tensors", "named"),
    [
        ({"w": np.zeros(3)}, "tensors['w'] is a numpy.ndarray"),
        ({"model": {"layer": nn.Linear(2, 2)}}, "tensors['model']['layer'] is a torch.nn.modules.linear.Linear"),
        ({"rng": torch.Generator()}, "tensors['rng'] is a torch"),
        ({"x": [1, Smuggled()]}, "tensors['x'][1] is a tests.test_checkpoints.Smuggled"),
        ({"x": {(1, 2): torch.zeros(1)}}, "key (1, 2)"),
        ({"size": torch.Size([2, 3])}, "tensors['size'] is a torch.Size"),
    ],
)
def test_anything_but_tensors_numbers_and_strings_is_refused(tmp_path: Path, tensors: dict, named: str) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError) as info:
        store.save(1, tensors, {})
    message = str(info.value)
    assert named in message and "\n" not in message
    assert store.steps() == [] and not any(name.startswith("step-") for name in _files(tmp_path))


@pytest.mark.parametrize(
    ("meta", "named"),
    [({"s": {1, 2}}, "not JSON"), ({"loss": float("nan")}, "not JSON"), ({"shape": (1, 2)}, "tuples"),
     ({1: "a"}, "string keys"), ([1], "must be a dict")],
)
def test_meta_that_is_not_plain_json_is_refused(tmp_path: Path, meta: object, named: str) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match=named):
        store.save(1, {"w": torch.zeros(1)}, meta)  # type: ignore[arg-type]
    assert store.steps() == []


def test_refused_steps_and_keep(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="keep must be an integer >= 2"):
        CheckpointStore(tmp_path, keep=1)
    store = CheckpointStore(tmp_path)
    for bad in (-1, 1.0, True):
        with pytest.raises(CheckpointError, match="integer >= 0"):
            store.save(bad, {}, {})  # type: ignore[arg-type]
    store.save(10, {}, {})
    for old in (10, 5):
        with pytest.raises(CheckpointError, match=rf"step {old} is not newer than step 10.*discard_after\({old}\)"):
            store.save(old, {}, {})
    assert store.steps() == [10]


def test_prune_keeps_the_newest_and_discard_after_drops_the_uncommitted(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for step in (10, 20, 30, 40, 50):
        store.save(step, {"w": torch.tensor(float(step))}, {"step": step})
    assert store.prune() == [10, 20]
    assert store.steps() == [30, 40, 50]
    assert store.prune() == []
    assert store.discard_after(35) == [40, 50]
    assert store.steps() == [30] and store.latest() == 30
    assert _files(tmp_path) == {"step-00000030.pt", "step-00000030.json", ".lock"}
    # Resuming from 30, the run saves 40 again.
    store.save(40, {"w": torch.tensor(41.0)}, {"step": 40})
    assert store.load(40)[0]["w"].item() == 41.0 and store.load(30)[1] == {"step": 30}


def test_default_keep_is_two_and_the_newest_survives(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step in range(1, 6):
        store.save(step, {}, {})
        store.prune()
        assert store.steps() == list(range(max(1, step - 1), step + 1))


def test_committed_step_is_the_newest_both_sides_have() -> None:
    assert committed_step([50, 100, 150], [50, 100]) == 100
    assert committed_step([100, 150], [50]) is None
    assert committed_step([], [50]) is None


def test_leftovers_of_crashed_writes_are_ignored_and_removed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, {"w": torch.ones(1)}, {})
    (tmp_path / ".step-00000002.pt.k3j2h1").write_bytes(b"half a tensor file")
    (tmp_path / ".step-00000002.json.x9y8z7").write_bytes(b'{"step": 2')
    (tmp_path / "step-00000002.pt").write_bytes(b"tensors whose JSON never landed")
    (tmp_path / "notes.txt").write_text("not ours")
    assert store.steps() == [1]
    assert _files(tmp_path) == {"step-00000001.pt", "step-00000001.json", ".lock", "notes.txt"}


def _corrupt(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_corrupt_or_missing_files_give_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step in (1, 2, 3, 4):
        store.save(step, {"w": torch.arange(100.0)}, {"step": step})
    _corrupt(tmp_path / "step-00000001.pt")
    (tmp_path / "step-00000002.json").write_text('{"format": 1, "step": ')
    (tmp_path / "step-00000003.pt").unlink()
    (tmp_path / "step-00000004.json").write_text(json.dumps({"format": 1, "step": 9, "tensors": "x", "meta": {}}))
    expected = {
        1: ("step-00000001.pt", "corrupt"),
        2: ("step-00000002.json", "not JSON"),
        3: ("step-00000003.pt", "missing"),
        4: ("step-00000004.json", "not the checkpoint record of step 4"),
        7: ("step-00000007.json", "no checkpoint of step 7"),
    }
    for step, (name, problem) in expected.items():
        with pytest.raises(CheckpointError) as info:
            store.load(step)
        message = str(info.value)
        assert str(tmp_path / name) in message and problem in message and "\n" not in message


def test_a_smuggled_object_is_never_unpickled(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, {"w": torch.zeros(1)}, {})
    tensors, record_path = tmp_path / "step-00000001.pt", tmp_path / "step-00000001.json"
    torch.save({"w": Smuggled()}, tensors)
    # A record that matches the smuggled file, so only weights_only=True stands in the way.
    blob = tensors.read_bytes()
    record = json.loads(record_path.read_text())
    record.update(tensors_bytes=len(blob), tensors_sha256=hashlib.sha256(blob).hexdigest())
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError) as info:
        store.load(1)
    assert str(tensors) in str(info.value) and "cannot load" in str(info.value) and "\n" not in str(info.value)


def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    store_dir, pause_dir = tmp_path / "cloud", tmp_path / "pause"
    pause_dir.mkdir()
    store = CheckpointStore(store_dir)
    store.save(1, {"w": torch.full((3,), 1.0)}, {"step": 1})
    child = _start_paused_writer(store_dir, pause_dir)
    paused = pause_dir / f"paused-{child.pid}-2"
    _wait_for(paused.exists, child, "the write to pause")

    # Stopped before its last rename: the tensors are in place, the JSON is a temporary, and a
    # reader neither lists step 2 nor removes the files of the write under way.
    assert "step-00000002.pt" in _files(store_dir)
    assert any(name.startswith(".step-00000002.json.") for name in _files(store_dir))
    assert store.steps() == [1]
    assert any(name.startswith(".step-00000002.json.") for name in _files(store_dir))

    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert store.steps() == [1] and store.latest() == 1
    assert _files(store_dir) == {"step-00000001.pt", "step-00000001.json", ".lock"}
    tensors, meta = store.load(1)
    assert torch.equal(tensors["w"], torch.full((3,), 1.0)) and meta == {"step": 1}
    with pytest.raises(CheckpointError, match="no checkpoint of step 2"):
        store.load(2)
    # The restarted side writes step 2 again.
    store.save(2, {"w": torch.full((3,), 2.5)}, {"step": 2})
    assert store.steps() == [1, 2]


def test_a_paused_write_that_is_resumed_commits(tmp_path: Path) -> None:
    store_dir, pause_dir = tmp_path / "edge", tmp_path / "pause"
    pause_dir.mkdir()
    store = CheckpointStore(store_dir)
    store.save(1, {"w": torch.zeros(3)}, {"step": 1})
    child = _start_paused_writer(store_dir, pause_dir)
    _wait_for((pause_dir / f"paused-{child.pid}-2").exists, child, "the write to pause")
    assert store.steps() == [1]
    (pause_dir / "resume").touch()
    assert child.wait(timeout=60) == 0, child.stderr.read().decode()
    assert store.steps() == [1, 2]
    assert torch.equal(store.load(2)[0]["w"], torch.full((3,), 2.0))


def test_restored_generators_draw_the_same_numbers(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(7)
    torch.rand(5, generator=generator)
    store = CheckpointStore(tmp_path)
    store.save(1, {"rounding": generator_state(generator)}, {})
    expected = torch.rand(100, generator=generator)
    other = torch.Generator().manual_seed(123)
    restore_generator(other, store.load(1)[0]["rounding"])
    assert torch.equal(torch.rand(100, generator=other), expected)
    assert not torch.equal(torch.rand(100, generator=other), expected)


def test_the_global_generator_restores_too() -> None:
    with torch.random.fork_rng(devices=[]):
        state = generator_state(torch.default_generator)
        expected = torch.randn(50)
        torch.manual_seed(99)
        restore_generator(torch.default_generator, state)
        assert torch.equal(torch.randn(50), expected)


@pytest.mark.parametrize("state", [torch.zeros(3, dtype=torch.uint8), torch.zeros(5056), [1, 2]])
def test_a_wrong_generator_state_is_refused(state: object) -> None:
    generator = torch.Generator().manual_seed(1)
    before = generator_state(generator)
    with pytest.raises(CheckpointError) as info:
        restore_generator(generator, state)  # type: ignore[arg-type]
    assert "generator" in str(info.value) and "\n" not in str(info.value)
    assert torch.equal(generator_state(generator), before)


def _metrics(path: Path, complete: int, partial: str = "") -> list[str]:
    lines = [json.dumps({"step": step, "loss": 1.0 / (step + 1)}) + "\n" for step in range(complete)]
    path.write_text("".join(lines) + partial, encoding="utf-8")
    return lines


def test_truncate_lines_keeps_the_first_lines_and_drops_a_partial_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = _metrics(path, 6, partial='{"step": 6, "lo')
    os.chmod(path, 0o644)
    assert count_lines(path) == 6
    truncate_lines(path, 4)
    assert path.read_text(encoding="utf-8") == "".join(lines[:4])
    assert count_lines(path) == 4
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_truncate_lines_to_all_complete_lines_drops_only_the_partial_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = _metrics(path, 3, partial='{"ep')
    truncate_lines(path, 3)
    assert path.read_text(encoding="utf-8") == "".join(lines)
    truncate_lines(path, 0)
    assert path.read_bytes() == b""


def test_truncate_lines_refuses_to_keep_more_than_there_are(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _metrics(path, 2, partial='{"step": 2')
    with pytest.raises(ValueError, match=r"has 2 complete lines, fewer than the 3 to keep"):
        truncate_lines(path, 3)
    assert count_lines(path) == 2 and path.read_text().endswith('{"step": 2')
    assert count_lines(tmp_path / "nowhere.jsonl") == 0
    truncate_lines(tmp_path / "nowhere.jsonl", 0)
    assert not (tmp_path / "nowhere.jsonl").exists()
