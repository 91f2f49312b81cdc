"""``edgepipe token new NAME``: the token it makes gets that edge, and only that edge, into the cloud."""
from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest

from edgepipe.token_command import add_token_command
from pipeline import trust


def token_main(argv: list[str]) -> int:
    """Run ``edgepipe <argv>`` with the token command as its only subcommand."""
    parser = argparse.ArgumentParser(prog="edgepipe")
    add_token_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def _entry(out: str) -> str:
    return out[out.index("[[edge]]"):]


def test_the_printed_entry_lets_the_printed_token_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert token_main(["token", "new", "camera-1"]) == 0
    out = capsys.readouterr().out
    header, token = out.splitlines()[:2]
    assert header.startswith("token for camera-1")
    assert len(token) >= 43
    assert token not in _entry(out)  # the edges file holds the hash only

    edges = tmp_path / "edges.toml"
    edges.write_text(_entry(out), encoding="utf-8")
    registry = trust.load_edges(edges)
    assert registry.names == ("camera-1",)
    assert registry.identify(token, None) == "camera-1"
    assert registry.identify(trust.new_token(), None) is None


def test_every_token_is_new(capsys: pytest.CaptureFixture[str]) -> None:
    entries = set()
    for _ in range(3):
        assert token_main(["token", "new", "camera-1"]) == 0
        entries.add(_entry(capsys.readouterr().out))
    assert len(entries) == 3


def test_out_writes_the_token_owner_only_and_does_not_print_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "camera-2.token"
    assert token_main(["token", "new", "camera-2", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    token = path.read_text(encoding="utf-8").strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in out and str(path) in out

    edges = tmp_path / "edges.toml"
    edges.write_text(_entry(out), encoding="utf-8")
    assert trust.load_edges(edges).identify(token, None) == "camera-2"


def test_out_never_overwrites_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "in-use.token"
    path.write_text("a token in use\n", encoding="utf-8")
    assert token_main(["token", "new", "camera-2", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} already exists" in err and err.count("\n") == 1
    assert path.read_text(encoding="utf-8") == "a token in use\n"


def test_out_into_a_missing_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "no-such-dir" / "t.token"
    assert token_main(["token", "new", "camera-2", "--out", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {path}" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["", ".camera", "has space", "x" * 65, "caf\u00e9"])
def test_a_bad_name_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = tmp_path / "t.token"
    assert token_main(["token", "new", name, "--out", str(path)]) == 2
    captured = capsys.readouterr()
    assert "bad edge name" in captured.err and captured.out == ""
    assert not path.exists()
