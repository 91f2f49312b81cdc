"""``edgepipe skip replay STATS CONFIG``: a skip policy's decisions on recorded statistics, without training."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_skip_command"]


def add_skip_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``skip replay STATS CONFIG [--out FILE]`` to the ``edgepipe`` subcommands."""
    skip = subparsers.add_parser("skip", help="tune the skip policy on recorded statistics")
    actions = skip.add_subparsers(dest="skip_command", required=True, metavar="ACTION")
    replay = actions.add_parser(
        "replay",
        help="print the decisions a policy takes on a run's recorded statistics",
        description="Replay the [skip] policy of CONFIG (and the CAC_* environment variables, as a run reads "
        "them) on STATS, the skip_stats.jsonl that a run with [skip] record = true wrote (the edge's run "
        "directory with --local, the cloud's state directory in a split run). Prints one JSON line per step "
        "with the step, frozen_parameters, boundary, and the lr_factors and lr_bases of the braking tensors "
        "(by index in model.parameters()). Change thresholds in CONFIG and replay again: no training needed.",
    )
    replay.add_argument("stats", type=Path, metavar="STATS", help="the statistics file (JSON lines)")
    replay.add_argument("config", type=Path, metavar="CONFIG", help="configuration file (TOML) of the run")
    replay.add_argument("--out", type=Path, metavar="FILE", help="write the lines to FILE instead of printing them")
    replay.set_defaults(run=_replay)


def _replay(args: argparse.Namespace) -> int:
    from pipeline.blueprint import Blueprint
    from pipeline.config import load_config
    from pipeline.skip.replay import StatsFileError, read_stats, replay

    blueprint = Blueprint(load_config(args.config))  # a bad config or CAC_* variable: ConfigError
    try:
        with args.stats.open(encoding="utf-8") as source:
            lines = [json.dumps(line) + "\n" for line in replay(blueprint.new_policy(),
                                                                read_stats(source, blueprint.param_layers))]
    except StatsFileError as exc:
        print(f"edgepipe skip replay: {args.stats}: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.writelines(lines)
    else:
        args.out.write_text("".join(lines), encoding="utf-8")
    return 0
