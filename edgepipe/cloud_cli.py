"""Command line of the cloud server: ``edgepipe-cloud --config FILE --listen HOST:PORT``."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from cloud_node.servicer import serve
from edgepipe.arguments import positive
from edgepipe.process import configure_process
from pipeline.config import ConfigError, load_config
from pipeline.trust import parse_address


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepipe-cloud",
        description="Serve the middle layers of a split CNN to edge workers over gRPC. "
        "Checks the whole configuration at start, prints 'edgepipe-cloud listening on HOST:PORT' once "
        "ready and serves until SIGTERM or Ctrl-C. Exit codes: 0 stopped, 2 bad configuration or address.",
    )
    parser.add_argument("--config", required=True, help="partition configuration file (TOML), the same the edges use")
    parser.add_argument("--listen", default="127.0.0.1:50051",
                        help="HOST:PORT to listen on; port 0 picks a free port (default %(default)s)")
    parser.add_argument("--max-sessions", type=positive(int), default=8, help="edge sessions served at once (default %(default)s)")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="torch threads (default: torch's choice; use 1 when edge and cloud share a small machine)")
    parser.add_argument("--verbose", action="store_true", help="log sessions and steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the cloud server until it is told to stop."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        parse_address(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    configure_process(args.threads, verbose=args.verbose)
    try:
        config = load_config(args.config)
        server, port, _ = serve(config, args.listen, max_sessions=args.max_sessions)
    except (ConfigError, OSError) as exc:
        print(f"edgepipe-cloud: {exc}", file=sys.stderr)
        return 2
    host = args.listen.rsplit(":", 1)[0]
    print(f"edgepipe-cloud listening on {host}:{port}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    print("edgepipe-cloud stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
