"""Command line of the edge worker: ``edgepipe-edge --config FILE --cloud HOST:PORT --run-dir DIR``."""
from __future__ import annotations

import argparse
import sys

from edge_node.link import LinkError
from edge_node.worker import train
from edgepipe.arguments import positive
from edgepipe.process import configure_process
from edgepipe.progress import TrainingProgress
from pipeline.config import ConfigError, load_config
from pipeline.data import DataError
from pipeline.trust import parse_address
from pipeline.wire import WireError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepipe-edge",
        description="Train a CNN split between this edge and an edgepipe cloud server "
        "(or, with --local, the same training in one process as a reference). "
        "Writes metrics.jsonl, summary.json and model.pt into --run-dir. "
        "Exit codes: 0 trained, 1 the cloud failed or refused, 2 bad configuration, data or run directory.",
    )
    parser.add_argument("--config", required=True, help="partition configuration file (TOML), the same the cloud uses")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cloud", metavar="HOST:PORT", help="address the cloud server printed when it started")
    where.add_argument("--local", action="store_true", help="train in this process with no network: the reference run")
    parser.add_argument("--run-dir", required=True, help="directory for metrics.jsonl, summary.json and model.pt")
    parser.add_argument("--epochs", type=positive(int), default=None, help="override train.epochs")
    parser.add_argument("--max-steps", type=positive(int), default=None, help="stop after this many optimizer steps")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="torch threads (use 1 when edge and cloud share a small machine)")
    parser.add_argument("--name", default="edge", help="name this edge reports to the cloud")
    parser.add_argument("--connect-timeout", type=positive(float), default=10.0, metavar="SECONDS",
                        help="how long to wait for the cloud to answer at start (default %(default)g)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (per-epoch lines are still printed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Train, exiting 0, or exit non-zero with a one-line reason."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cloud is not None:
        try:
            parse_address(args.cloud)
        except ValueError as exc:
            parser.error(f"--cloud: {exc}")
    configure_process(args.threads)
    try:
        config = load_config(args.config)
        with TrainingProgress(bar=not args.no_progress) as progress:
            summary = train(
                config,
                run_dir=args.run_dir,
                cloud=None if args.local else args.cloud,
                epochs=args.epochs,
                max_steps=args.max_steps,
                edge_name=args.name,
                connect_timeout=args.connect_timeout,
                on_step=progress.on_step,
                on_epoch=progress.on_epoch,
            )
    except (ConfigError, DataError) as exc:
        print(f"edgepipe-edge: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edgepipe-edge: cannot write run directory {args.run_dir}: {_os_reason(exc)}", file=sys.stderr)
        return 2
    except (LinkError, WireError) as exc:
        print(f"edgepipe-edge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgepipe-edge: interrupted; metrics.jsonl holds the steps done so far", file=sys.stderr)
        return 130
    print(
        f"edgepipe-edge: {summary['steps']} steps in {summary['wall_seconds']:.1f} s, "
        f"final val_accuracy {summary['final_val_accuracy']:.4f}; wrote {args.run_dir}/model.pt"
    )
    return 0


def _os_reason(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


if __name__ == "__main__":
    sys.exit(main())
