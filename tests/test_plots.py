"""Tests for edgepipe.plots: the traffic figure of real runs, and ``edgepipe traffic --plot``."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from edgepipe.cli import main as edgepipe_main
from edgepipe.plots import PlotError, plot_traffic, traffic_figure
from pipeline.accounting import epoch_traffic
from pipeline.runs import load_run
from tests.run_dirs import FREEZE_STEP


@pytest.fixture(scope="module")
def figure(split_dir: Path):
    fig = traffic_figure(load_run(split_dir))
    fig.canvas.draw()  # lays the figure out, so pixel positions are final
    return fig


def _panels(fig):
    # The three data panels; the epoch axis on top is a child of the first.
    return [axes for axes in fig.axes if axes.get_ylabel()]


def test_plot_traffic_writes_a_png_and_no_temporary_file(split_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "traffic.png"
    plot_traffic(load_run(split_dir), target)
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["traffic.png"]


def test_plot_traffic_into_a_missing_folder_says_so(split_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PlotError, match="existing, writable folder"):
        plot_traffic(load_run(split_dir), tmp_path / "nowhere" / "traffic.png")


def test_a_local_run_has_nothing_to_plot(local_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PlotError, match=r"nothing to plot: .* is a --local run \(no link traffic\)"):
        plot_traffic(load_run(local_dir), tmp_path / "traffic.png")
    assert not (tmp_path / "traffic.png").exists()


def test_the_command_refuses_to_plot_a_local_run(local_dir: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "traffic.png"
    assert edgepipe_main(["traffic", str(local_dir), "--plot", str(target)]) == 2
    out, err = capsys.readouterr()
    assert "link traffic of" in out  # the table still comes first
    assert err.strip() == f"edgepipe: nothing to plot: {local_dir} is a --local run (no link traffic)"
    assert not target.exists()


def test_the_command_plots_a_split_run(split_dir: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "traffic.png"
    assert edgepipe_main(["traffic", str(split_dir), "--plot", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_the_cumulative_panel_ends_at_the_table_total(figure, split_dir: Path) -> None:
    total = epoch_traffic(load_run(split_dir))[-1]
    cumulative = _panels(figure)[2]
    ends = {line.get_label(): line.get_ydata()[-1] for line in cumulative.get_lines() if not line.get_gid()}
    assert ends == pytest.approx({"uplink": total.uplink_bytes / 2**20, "downlink": total.downlink_bytes / 2**20})
    # Evaluation counts: the line rises at each epoch's end beyond what the steps sent.
    steps_only = sum(r.uplink_bytes for r in load_run(split_dir).steps) / 2**20
    assert ends["uplink"] > steps_only


def test_no_two_lines_of_a_panel_look_alike(figure) -> None:
    for axes in _panels(figure):
        data = [line for line in axes.get_lines() if not line.get_gid()]
        assert len(data) >= 2
        for a, b in itertools.combinations(data, 2):
            assert a.get_linestyle() != b.get_linestyle(), (axes.get_ylabel(), a.get_label(), b.get_label())
            assert a.get_color() != b.get_color()


def test_epoch_starts_are_marked_and_numbered_from_0(figure, split_dir: Path) -> None:
    starts = {}
    for record in load_run(split_dir).steps:
        starts.setdefault(record.epoch, record.step)
    assert starts == {0: 0, 1: 5, 2: 10}
    top = _panels(figure)[0].child_axes[0]
    assert list(top.get_xticks()) == list(starts.values())
    assert [t.get_text() for t in top.get_xticklabels()] == ["0", "1", "2"]
    assert top.get_xlabel() == "epoch"
    for axes in _panels(figure):
        marks = [line.get_xdata()[0] for line in axes.get_lines() if line.get_gid() == "epoch-start"]
        assert marks == list(starts.values())


def test_the_boundary_label_sits_beside_its_line(figure) -> None:
    panel = _panels(figure)[0]
    renderer = figure.canvas.get_renderer()
    (freeze,) = [line for line in panel.get_lines() if line.get_gid() == "freeze"]
    assert freeze.get_xdata()[0] == FREEZE_STEP
    (label,) = [text for text in panel.texts if text.get_gid() == "boundary-label"]
    assert label.get_text() == "boundary 1"
    line_x = panel.transData.transform((FREEZE_STEP, 0))[0]
    box = label.get_window_extent(renderer)
    assert box.x1 < line_x - 1  # left of the line, not across it
    # ... and above the data: the highest per-step value stays below the label.
    top_of_data = max(max(line.get_ydata()) for line in panel.get_lines() if not line.get_gid())
    assert panel.transData.transform((0, top_of_data))[1] < box.y0
