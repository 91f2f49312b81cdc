"""The ``edgepipe`` command: the demo, partitions (show, profile, plan), traffic, the link emulator, tokens, skip replay."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edgepipe.link_command import add_link_command
from edgepipe.plan_command import add_partition_commands
from edgepipe.skip_command import add_skip_command
from edgepipe.token_command import add_token_command

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["main"]


def _partition_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgepipe.tables import partition_table
    from pipeline.config import load_config
    from pipeline.models import build_configured
    from pipeline.partition import link_crossings, make_cuts, profile

    config = load_config(args.file)
    model = build_configured(config.model)
    cuts = make_cuts(len(model), config.partition.edge_head, config.partition.edge_tail)
    profiles = profile(model, config.model.input_shape, cuts)
    crossings = link_crossings(profiles, cuts, config.link, config.model.input_shape)
    Console(width=max(160, Console().width)).print(partition_table(profiles, cuts, crossings))
    return 0


def _traffic(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgepipe.plots import plot_traffic
    from edgepipe.tables import render_report
    from pipeline.runs import load_run

    run = load_run(args.run_dir)
    # The table is wide: keep it whole when piped into a file or a CI log.
    console = Console(highlight=False, width=max(160, Console().width))
    for renderable in render_report(run):
        console.print(renderable)
    if args.plot:
        plot_traffic(run, args.plot)
        console.print(f"wrote {args.plot}")
    if args.timeline:
        _timeline(args, console)
    return 0


def _timeline(args: argparse.Namespace, console: Console) -> None:
    from edgepipe.timeline_plot import plot_step_timeline
    from pipeline.timeline import TraceError, read_trace

    steps = read_trace(args.trace or Path(args.run_dir) / "trace.json")
    # By default the step of median length: a typical step, not the first (warm-up) one.
    by_length = sorted(steps, key=lambda s: max(span.end for span in steps[s]))
    step = by_length[len(by_length) // 2] if args.step is None else args.step
    if step not in steps:
        raise TraceError(f"the trace holds steps {min(steps)}..{max(steps)}, not step {step}")
    plot_step_timeline(steps[step], step, args.timeline)
    console.print(f"wrote {args.timeline} (step {step})")


def _demo(args: argparse.Namespace) -> int:
    from edgepipe.demo import run_demo

    return run_demo(Path(args.run_dir), epochs=args.epochs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepipe",
        description="Pipeline-parallel edge/cloud CNN training. Servers and workers are "
        "edgepipe-cloud and edgepipe-edge; this command runs the demo and inspects configs and runs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train the built-in example split across a local cloud server and edge worker",
        description="Start edgepipe-cloud and edgepipe-edge on 127.0.0.1 with a built-in configuration "
        "(MobileNetV2 on the digits, split 2 + 1 layers on the edge, 4 micro-batches), train, and print "
        "the validation accuracy per epoch and the link traffic. No download, no GPU.",
    )
    demo.add_argument("--epochs", type=int, default=None, help="epochs to train (default: the demo config's 6)")
    demo.add_argument("--run-dir", default="runs/demo", help="where config.toml, metrics.jsonl, summary.json and model.pt go (default %(default)s)")
    demo.set_defaults(run=_demo)

    partition = commands.add_parser("partition", help="inspect how a configuration splits its model")
    partition_commands = partition.add_subparsers(dest="partition_command", required=True, metavar="ACTION")
    show = partition_commands.add_parser(
        "show",
        help="print the layer table with the edge/cloud cuts",
        description="Print index, name, parameters, FLOPs, output bytes per sample and placement of every "
        "layer, and what crosses the link at each cut.",
    )
    show.add_argument("file", help="configuration file (TOML)")
    show.set_defaults(run=_partition_show)
    add_partition_commands(partition_commands)

    traffic = commands.add_parser(
        "traffic",
        help="print a run's link traffic per epoch and kind",
        description="Read RUN_DIR/metrics.jsonl and summary.json (an edge --run-dir) and print the traffic "
        "per direction, kind and epoch, the freeze events and what they saved.",
    )
    traffic.add_argument("run_dir", metavar="RUN_DIR", help="an edge run directory")
    traffic.add_argument("--plot", metavar="FILE.png", help="also draw bytes per step and cumulative bytes")
    traffic.add_argument("--timeline", metavar="FILE.png",
                         help="draw one step's timeline on both machines from the run's trace (edgepipe-edge --trace)")
    traffic.add_argument("--trace", metavar="FILE.json", help="the trace to draw (default RUN_DIR/trace.json)")
    traffic.add_argument("--step", type=int, default=None, help="which step to draw (default: the median-length one)")
    traffic.set_defaults(run=_traffic)
    add_link_command(commands)
    add_token_command(commands)
    add_skip_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``edgepipe``."""
    from edgepipe.plots import PlotError
    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.models import ModelError
    from pipeline.partition import PartitionError
    from pipeline.runs import RunFileError
    from pipeline.timeline import TraceError

    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (
        ConfigError, ModelError, PartitionError, DataError, RunFileError, PlotError, TraceError, RuntimeError, OSError
    ) as exc:
        print(f"edgepipe: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
