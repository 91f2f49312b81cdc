"""Command line of the cloud server: ``edgepipe-cloud --config FILE --listen HOST:PORT``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from cloud_node.capacity import DEFAULT_MAX_SESSIONS
from cloud_node.servicer import DEFAULT_SESSION_IDLE_SECONDS, serve
from edgepipe.arguments import add_device_argument, positive, with_device
from edgepipe.process import configure_process
from pipeline.config import ConfigError, load_config
from pipeline.trust import is_loopback, load_edges, parse_address, server_credentials

#: Seconds running calls get to finish once told to stop; then they are cancelled.
_GRACE_SECONDS = 3.0
#: Seconds after the grace for the cancelled calls to unwind before the process exits anyway.
_UNWIND_SECONDS = 5.0
#: How often the main thread wakes while it waits for a signal (see main).
_SIGNAL_POLL_SECONDS = 0.25


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepipe-cloud",
        description="Serve the middle layers of a split CNN to edge workers over gRPC. "
        "Checks the whole configuration at start, prints 'edgepipe-cloud listening on HOST:PORT' once "
        "ready and serves until SIGTERM or Ctrl-C. Exit codes: 0 stopped, 2 bad configuration, address, "
        "credentials, edges file or state directory.",
    )
    parser.add_argument("--config", required=True, help="partition configuration file (TOML), the same the edges use")
    parser.add_argument("--listen", default="127.0.0.1:50051",
                        help="HOST:PORT to listen on; port 0 picks a free port (default %(default)s)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE",
                        help="the cloud's certificate chain (PEM); with --tls-key turns TLS on")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="the private key of --tls-cert (PEM, unencrypted)")
    parser.add_argument("--tls-client-ca", type=Path, metavar="FILE",
                        help="mutual TLS: edges must show a client certificate this CA (PEM) signed")
    parser.add_argument("--edges", type=Path, metavar="FILE",
                        help="edges file (TOML) naming the edges let in by token hash or certificate subject; "
                        "without it only loopback callers are served")
    parser.add_argument("--insecure", action="store_true",
                        help="allow clear text on an address other machines can reach (a trusted network or tunnel)")
    parser.add_argument("--max-sessions", type=positive(int), default=DEFAULT_MAX_SESSIONS,
                        help="edge sessions served at once (default %(default)s)")
    parser.add_argument("--workers", type=positive(int), default=None,
                        help="server threads (default: two per session plus a reserve for other calls)")
    parser.add_argument("--session-idle-seconds", type=positive(float), default=DEFAULT_SESSION_IDLE_SECONDS,
                        help="close a session no call has used for this long (default %(default)g)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="keep each run's checkpoints in DIR/<edge>/<run id>/, so that edges can resume runs, "
                        "also after this cloud restarts with the same DIR (without it checkpoint steps are refused)")
    parser.add_argument("--threads", type=positive(int), default=None,
                        help="torch threads (default: torch's choice; use 1 when edge and cloud share a small machine)")
    add_device_argument(parser, "cloud")
    parser.add_argument("--verbose", action="store_true", help="log sessions and steps")
    return parser


def _check_tls_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    if args.insecure and args.tls_cert is not None:
        parser.error("--insecure turns TLS off: give either --insecure or --tls-cert/--tls-key")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # Python runs a signal handler in the main thread only, when that thread next executes
    # bytecode. The kernel may deliver the signal to any of gRPC's or torch's threads, and
    # then nothing wakes a main thread blocked in an untimed wait: it wakes on its own instead.
    while not stop.wait(_SIGNAL_POLL_SECONDS):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the cloud server until it is told to stop."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        host, _ = parse_address(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    _check_tls_flags(parser, args)
    configure_process(args.threads, verbose=args.verbose)
    try:
        config = with_device(load_config(args.config), "cloud", args.device)
        credentials = (
            server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert is not None else None
        )
        edges = load_edges(args.edges) if args.edges is not None else None
        server, port, _ = serve(
            config, args.listen, credentials=credentials, edges=edges, max_sessions=args.max_sessions,
            workers=args.workers, session_idle_seconds=args.session_idle_seconds, allow_insecure=args.insecure,
            state_dir=args.state_dir,
        )
    except (ConfigError, ValueError, OSError) as exc:
        # ConfigError and TrustError are ValueErrors; so is a --workers too small for --max-sessions.
        print(f"edgepipe-cloud: {exc}", file=sys.stderr)
        return 2
    if edges is None and not is_loopback(host):
        print("edgepipe-cloud: no --edges: only callers on this machine will be let in", file=sys.stderr)
    print(f"edgepipe-cloud listening on {args.listen.rsplit(':', 1)[0]}:{port}", flush=True)
    _wait_for_signal()
    stopped = server.stop(grace=_GRACE_SECONDS).wait(_GRACE_SECONDS + _UNWIND_SECONDS)
    if not stopped:
        # A call that ignores cancellation must not keep the process alive: the server's worker
        # threads are joined at interpreter exit.
        print("edgepipe-cloud: calls still running after the grace period; exiting anyway", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    print("edgepipe-cloud stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
