"""Tests for pipeline.runs: reading a run directory back, and the errors a broken one gives."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.runs import ByKind, FreezeEvent, KindCounts, RunFileError, load_run
from pipeline.traffic import KINDS, SYNC
from tests.run_dirs import FREEZE_STEP, MAX_STEPS, copy_run, records, summary


def _rewrite_step(copy: Path, index: int, change) -> None:
    lines = records(copy)
    change(lines[index])
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_a_run_reads_back_as_its_files_say(split_dir: Path) -> None:
    run = load_run(split_dir)
    lines = records(split_dir)
    assert [r.step for r in run.steps] == list(range(MAX_STEPS))
    assert [r.model_dump(include={"step", "epoch", "boundary", "uplink_bytes"}) for r in run.steps] == [
        {k: r[k] for k in ("step", "epoch", "boundary", "uplink_bytes")} for r in lines if "step" in r
    ]
    assert [e.epoch for e in run.evals] == [0, 1, 2]
    assert run.steps[3].by_kind.model_dump(exclude_none=True) == next(r for r in lines if r.get("step") == 3)["by_kind"]
    assert run.summary is not None and run.summary.traffic.model_dump(exclude_none=True) == summary(split_dir)["traffic"]
    assert not run.is_local
    assert run.freeze_events() == [FreezeEvent(step=FREEZE_STEP, boundary=1)]


def test_the_kinds_of_the_schema_are_the_ledgers() -> None:
    assert tuple(ByKind.model_fields) == (*KINDS, SYNC)
    counts = KindCounts(uplink_bytes=3, downlink_bytes=5, messages=1)
    assert (counts.sent("uplink"), counts.sent("downlink")) == (3, 5)
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        counts.sent("sideways")


def test_a_missing_run_dir_or_metrics_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RunFileError, match=r"run directory .*nope does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(RunFileError, match=r"metrics\.jsonl not found"):
        load_run(tmp_path)


def test_garbage_metrics_name_the_file_and_line(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join([lines[0], "not json at all", *lines[1:]]) + "\n")
    with pytest.raises(RunFileError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        load_run(copy)
    (copy / "metrics.jsonl").write_text('{"step": 0, "epoch": 0}\n')
    with pytest.raises(RunFileError, match=r"metrics\.jsonl, line 1: expected 'boundary' to be an integer"):
        load_run(copy)
    (copy / "metrics.jsonl").write_text("[1, 2]\n")
    with pytest.raises(RunFileError, match=r"line 1: expected a JSON object, got list"):
        load_run(copy)
    (copy / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(RunFileError, match=r"line 1: neither a step record"):
        load_run(copy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(boundary=True), r"line 4: expected 'boundary' to be an integer, got True$"),
        (lambda r: r.update(uplink_bytes=1.5), r"line 4: expected 'uplink_bytes' to be an integer, got 1\.5$"),
        (
            lambda r: r["by_kind"]["gradient"].pop("messages"),
            r"line 4: expected 'by_kind\.gradient\.messages' to be an integer, but it is missing$",
        ),
        (
            lambda r: r["by_kind"].pop("control"),
            r"line 4: expected 'by_kind\.control' to be an object with uplink_bytes, downlink_bytes, messages",
        ),
        (lambda r: r.update(step_seconds="fast"), r"expected 'step_seconds' to be a number or null, got 'fast'$"),
    ],
    ids=["bool-is-no-integer", "float-is-no-integer", "nested-key", "missing-kind", "optional-number"],
)
def test_a_bad_value_in_a_step_line_names_the_line_and_the_key(split_dir, tmp_path, change, message) -> None:
    copy = copy_run(split_dir, tmp_path)
    _rewrite_step(copy, 3, change)  # line 4: the first lines are steps 0-4
    with pytest.raises(RunFileError, match=message):
        load_run(copy)


def test_several_problems_in_one_line_are_counted(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    _rewrite_step(copy, 0, lambda r: r.update(epoch="0", boundary=None, downlink_bytes=[]))
    with pytest.raises(RunFileError, match=r"line 1: expected 'epoch' to be an integer, got '0' \(and 2 more problems\)"):
        load_run(copy)


def test_unknown_keys_are_ignored(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    _rewrite_step(copy, 0, lambda r: r.update(from_a_newer_writer={"anything": [1]}))
    assert len(load_run(copy).steps) == MAX_STEPS


def test_garbage_summary_is_named(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    (copy / "summary.json").write_text("{")
    with pytest.raises(RunFileError, match=r"summary\.json: not valid JSON"):
        load_run(copy)
    bad = summary(split_dir)
    bad["traffic"]["by_kind"]["activation"]["uplink_bytes"] = "12"
    (copy / "summary.json").write_text(json.dumps(bad))
    with pytest.raises(RunFileError, match=r"summary\.json: expected 'traffic\.by_kind\.activation\.uplink_bytes' "
                                           r"to be an integer, got '12'"):
        load_run(copy)
    bad = summary(split_dir)
    bad["freeze_events"] = [{"step": 5}]
    (copy / "summary.json").write_text(json.dumps(bad))
    with pytest.raises(RunFileError, match=r"expected 'freeze_events\.0\.boundary' to be an integer, but it is missing"):
        load_run(copy)
    bad = summary(split_dir)
    bad["mode"] = "remote"
    (copy / "summary.json").write_text(json.dumps(bad))
    with pytest.raises(RunFileError, match=r"expected 'mode' to be one of 'split', 'local', got 'remote'"):
        load_run(copy)


def test_a_truncated_last_line_is_dropped_with_a_warning(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    with (copy / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 12, "epoch": 2, "lo')
    with pytest.warns(UserWarning, match="truncated last line"):
        run = load_run(copy)
    assert len(run.steps) == MAX_STEPS


def test_without_summary_the_freeze_events_come_from_the_steps(split_dir: Path, tmp_path: Path) -> None:
    copy = copy_run(split_dir, tmp_path)
    (copy / "summary.json").unlink()
    run = load_run(copy)
    assert run.summary is None and not run.is_local
    assert run.freeze_events() == load_run(split_dir).freeze_events() == [FreezeEvent(step=FREEZE_STEP, boundary=1)]
