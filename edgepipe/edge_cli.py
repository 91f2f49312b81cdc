"""Command line of the edge worker: ``edgepipe-edge --config FILE --cloud HOST:PORT --run-dir DIR``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from edge_node.link import LinkError, LinkSecurity
from edge_node.recovery import RunDirError
from edge_node.federation import simulate
from edge_node.worker import train
from edgepipe.arguments import add_device_argument, positive, with_device
from edgepipe.process import configure_process
from edgepipe.progress import TrainingProgress
from pipeline.config import Config, ConfigError, load_config
from pipeline.data import DataError, Shard, parse_shard
from pipeline.federation import FederationError
from pipeline.trust import TrustError, parse_address
from pipeline.wire import WireError

#: Where the edge token comes from when --token-file is not given.
TOKEN_ENV = "EDGEPIPE_TOKEN"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepipe-edge",
        description="Train a CNN split between this edge and an edgepipe cloud server "
        "(or, with --local, the same training in one process as a reference). "
        "Writes metrics.jsonl, checkpoints/, summary.json and model.pt into --run-dir; a run stopped "
        "by a crash, Ctrl-C or SIGTERM continues from its latest checkpoint with --resume, and a cloud lost "
        "in mid-run is reconnected to for up to [link] reconnect_seconds. "
        "Exit codes: 0 trained, 1 the cloud failed or refused, 2 bad configuration, security flags, data or "
        "run directory, 130 interrupted.",
    )
    parser.add_argument("--config", required=True, help="partition configuration file (TOML), the same the cloud uses")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cloud", metavar="HOST:PORT", help="address the cloud server printed when it started")
    where.add_argument("--local", action="store_true", help="train in this process with no network: the reference run")
    parser.add_argument("--run-dir", required=True,
                        help="directory for metrics.jsonl, checkpoints/, summary.json and model.pt")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --run-dir from its latest checkpoint (same configuration and flags)")
    again.add_argument("--overwrite", action="store_true",
                       help="remove the run already in --run-dir (metrics, summary, model, checkpoints, trace) first")
    parser.add_argument("--epochs", type=positive(int), default=None, help="override train.epochs")
    parser.add_argument("--max-steps", type=positive(int), default=None, help="stop after this many optimizer steps")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="torch threads (use 1 when edge and cloud share a small machine)")
    add_device_argument(parser, "edge")
    parser.add_argument("--name", default="edge",
                        help="name this edge reports to the cloud (with --edges: the prefix of the edges' names)")
    federation = parser.add_argument_group(
        "many edges", "A [federation] configuration trains a group of edges, each on its own data, with one cloud.")
    federation.add_argument("--shard", type=_shard, metavar="K/N", default=None,
                            help="train on part K of N equal parts of the training data (each edge its own K)")
    federation.add_argument("--edges", type=positive(int), metavar="N", default=None,
                            help="with --local: train the whole federation of N edges in this process, the exact "
                            "reference of a split-federated run (edge NAME-K on shard K/N)")
    federation.add_argument("--replay", type=Path, metavar="FILE", default=None,
                            help="with --edges, splitfed-v2: replay the admission order in FILE (federation.json "
                            "of an edge of the run)")
    parser.add_argument("--connect-timeout", type=positive(float), default=10.0, metavar="SECONDS",
                        help="how long to wait for the cloud to answer at start (default %(default)g)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (per-epoch lines are still printed)")
    parser.add_argument("--trace", metavar="FILE.json", default=None,
                        help="write a Chrome/Perfetto trace of every split step (edge and cloud spans per "
                        "micro-batch); RUN_DIR/trace.json is where `edgepipe traffic --timeline` looks")
    _add_security_arguments(parser)
    return parser


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    security = parser.add_argument_group(
        "security",
        "TLS is on when --tls-ca, --tls-cert or --tls-key is given. Without TLS the edge talks only to "
        "a loopback cloud unless --insecure. The token is sent on every call, over TLS or to loopback only.",
    )
    security.add_argument("--tls-ca", type=Path, metavar="FILE",
                          help="CA certificate(s) that signed the cloud's certificate (PEM)")
    security.add_argument("--tls-server-name", metavar="NAME",
                          help="name the cloud's certificate must hold when it is not the --cloud host (tunnels)")
    security.add_argument("--tls-cert", type=Path, metavar="FILE",
                          help="this edge's client certificate for mutual TLS (PEM)")
    security.add_argument("--tls-key", type=Path, metavar="FILE",
                          help="the private key of --tls-cert (PEM, unencrypted)")
    security.add_argument("--token-file", type=Path, metavar="FILE",
                          help=f"file holding this edge's token (edgepipe token new); default: ${TOKEN_ENV}")
    security.add_argument("--insecure", action="store_true",
                          help="allow clear text to a cloud on another machine (trusted network or tunnel only; "
                          "never with a token)")


def _token(path: Path | None) -> str | None:
    """The token from ``path``, else from $EDGEPIPE_TOKEN, else None; surrounding whitespace is dropped."""
    if path is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise TrustError(f"cannot read the token file {path} (--token-file): {reason}") from None
    if not token:
        raise TrustError(f"the token file {path} (--token-file) is empty; put the token edgepipe token new made in it")
    return token


def _security(args: argparse.Namespace) -> LinkSecurity:
    """The link settings of the flags, checked against --cloud before anything connects."""
    security = LinkSecurity(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                            server_name=args.tls_server_name, token=_token(args.token_file), insecure=args.insecure)
    security.check(args.cloud)
    return security


def _shard(text: str) -> Shard:
    try:
        return parse_shard(text)
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """Train, exiting 0, or exit non-zero with a one-line reason."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.edges is not None and not args.local:
        parser.error("--edges trains a federation's one-process reference: it needs --local")
    if args.edges is not None and (args.shard is not None or args.resume or args.trace):
        parser.error("--edges shards the data itself and keeps no checkpoints or trace: drop --shard, --resume, --trace")
    if args.replay is not None and args.edges is None:
        parser.error("--replay goes with --local --edges N")
    security = None
    if args.cloud is not None:
        try:
            parse_address(args.cloud)
        except ValueError as exc:
            parser.error(f"--cloud: {exc}")
        try:
            security = _security(args)
        except TrustError as exc:
            print(f"edgepipe-edge: {exc}", file=sys.stderr)
            return 2
    configure_process(args.threads)
    # SIGTERM stops the run as Ctrl-C does, so that its summary says it was interrupted.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _train(args, security)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(args: argparse.Namespace, security: LinkSecurity | None) -> int:
    try:
        config = with_device(load_config(args.config), "edge", args.device)
        if args.edges is not None:
            return _simulate(args, config)
        with TrainingProgress(bar=not args.no_progress) as progress:
            summary = train(
                config,
                run_dir=args.run_dir,
                cloud=None if args.local else args.cloud,
                epochs=args.epochs,
                max_steps=args.max_steps,
                edge_name=args.name,
                connect_timeout=args.connect_timeout,
                security=security,
                on_step=progress.on_step,
                on_epoch=progress.on_epoch,
                trace=args.trace,
                resume=args.resume,
                overwrite=args.overwrite,
                on_link=_report,
                shard=args.shard,
            )
    except (ConfigError, DataError, TrustError, RunDirError, FederationError) as exc:
        print(f"edgepipe-edge: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edgepipe-edge: cannot write run directory {args.run_dir}: {_os_reason(exc)}", file=sys.stderr)
        return 2
    except (LinkError, WireError) as exc:
        print(f"edgepipe-edge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgepipe-edge: interrupted; run it again with --resume to continue from the latest checkpoint",
              file=sys.stderr)
        return 130
    print(
        f"edgepipe-edge: {summary['steps']} steps in {summary['wall_seconds']:.1f} s, "
        f"final val_accuracy {summary['final_val_accuracy']:.4f}; wrote {args.run_dir}/model.pt"
    )
    return 0


def _simulate(args: argparse.Namespace, config: Config) -> int:
    """The one-process reference of a federation (errors are reported by the caller)."""
    summary = simulate(config, edges=args.edges, run_dir=args.run_dir, name=args.name, epochs=args.epochs,
                       max_steps=args.max_steps, replay=args.replay)
    print(
        f"edgepipe-edge: reference of {args.edges} edges ({config.federation.mode}), {summary['steps']} steps in "
        f"{summary['wall_seconds']:.1f} s, final val_accuracy {summary['final_val_accuracy']:.4f}; "
        f"wrote {args.run_dir}/model.pt"
    )
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _report(message: str) -> None:
    """Print what happened to the run or the link (a progress bar, if any, stays below it)."""
    print(f"edgepipe-edge: {message}", file=sys.stderr, flush=True)


def _os_reason(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


if __name__ == "__main__":
    sys.exit(main())
