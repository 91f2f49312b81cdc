"""``edgepipe link``: run the WAN emulator between an edge and its cloud until stopped, then report."""
from __future__ import annotations

import argparse
import math
import signal
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgepipe.arguments import positive
from edgepipe.link_emulator import (
    DEFAULT_QUEUE_KIB,
    PROFILES,
    RTO_FLOOR_SECONDS,
    SEGMENT_BYTES,
    LinkEmulator,
    LinkSettings,
)
from pipeline.trust import parse_address

__all__ = ["add_link_command", "link_settings", "summary_line"]

#: The flags a profile fills in, each with the LinkSettings field it sets.
_OVERRIDES = {"up_mbps": "--up-mbps", "down_mbps": "--down-mbps", "delay_ms": "--delay-ms",
              "jitter_ms": "--jitter-ms", "loss": "--loss", "queue_kib": "--queue-kib"}


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _at_least_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _at_least_zero(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, got {text!r}")
    return value


def link_settings(args: argparse.Namespace) -> LinkSettings:
    """The settings ``edgepipe link`` runs with: the profile's, with every flag given overriding its value."""
    given = {field: getattr(args, field) for field in _OVERRIDES if getattr(args, field) is not None}
    if args.profile is not None:
        return replace(PROFILES[args.profile].settings, seed=args.seed, **given)
    missing = [_OVERRIDES[field] for field in ("up_mbps", "down_mbps", "delay_ms") if field not in given]
    if missing:
        raise ValueError("give --profile or all of --up-mbps, --down-mbps and --delay-ms "
                         f"(missing {', '.join(missing)})")
    return LinkSettings(seed=args.seed, **given)


def summary_line(report: dict[str, Any]) -> str:
    """One line for the terminal: connections, bytes each way and seconds served."""
    return (f"edgepipe link: {report['connections']} connections, {report['up']['bytes']:,} bytes up, "
            f"{report['down']['bytes']:,} bytes down in {report['seconds']:.1f} s")


def _run(args: argparse.Namespace) -> int:
    try:
        settings = link_settings(args)
    except ValueError as exc:
        print(f"edgepipe link: {exc}", file=sys.stderr)
        return 2
    emulator = LinkEmulator(args.listen, args.to, settings, report_path=args.report)
    try:
        emulator.start()
    except OSError as exc:
        print(f"edgepipe link: cannot listen on {emulator.report()['listen']}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    # Handlers before the ready line: whoever reads that line may signal at once.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    report = emulator.report()
    print(f"edgepipe link listening on {report['listen']} -> {report['target']}", flush=True)
    stop.wait(args.duration)
    try:
        emulator.stop()
    except OSError as exc:  # only the report can fail here; the counts still get their line
        print(f"edgepipe link: cannot write the report: {exc}", file=sys.stderr)
        return 2
    finally:
        print(summary_line(emulator.report()), flush=True)
    return 0


_DESCRIPTION = (
    "A TCP proxy to put between edgepipe-edge and edgepipe-cloud: it delays and rate-limits each direction "
    "(up = edge to cloud) and counts the TCP bytes. Prints 'edgepipe link listening on HOST:PORT -> HOST:PORT' "
    "once ready, runs until SIGTERM, Ctrl-C or --duration, then prints a summary and writes --report. "
    "Exit codes: 0 stopped, 2 bad settings or address."
)

_MODEL = (
    "Each direction is one serial line shared by all connections, like a real access link: bytes leave at the "
    "rate in order of arrival, then travel the delay. Each connection may hold --queue-kib per direction waiting "
    "for the line on top of what is in flight; when that is full the proxy stops reading, so TCP backpressure "
    "slows the sender (nothing is dropped). The bytes are forwarded, never parsed."
)


def _epilog() -> str:
    profiles = "\n".join(
        f"  {name:<10} up {p.settings.up_mbps:g} / down {p.settings.down_mbps:g} Mbit/s, {p.settings.delay_ms:g} ms"
        f"{f' +-{p.settings.jitter_ms:g} ms' if p.settings.jitter_ms else ''}: {p.meaning}"
        for name, p in PROFILES.items()
    )
    return f"profiles (one-way delays; flags given override a profile's values):\n{profiles}\n\n{textwrap.fill(_MODEL)}"


def add_link_command(subparsers: Any) -> None:
    """Register ``link`` (the WAN emulator) on an argparse subparsers object."""
    link = subparsers.add_parser(
        "link",
        help="emulate a WAN link between an edge and its cloud and count the bytes",
        description=textwrap.fill(_DESCRIPTION),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    link.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT",
                      help="where the edge connects; port 0 picks a free port")
    link.add_argument("--to", type=_address, required=True, metavar="HOST:PORT", help="the cloud server's address")
    link.add_argument("--profile", choices=sorted(PROFILES), help="start from a named link (see below)")
    link.add_argument("--up-mbps", type=positive(float), metavar="MBPS", help="edge-to-cloud rate, Mbit/s")
    link.add_argument("--down-mbps", type=positive(float), metavar="MBPS", help="cloud-to-edge rate, Mbit/s")
    link.add_argument("--delay-ms", type=_at_least_zero, metavar="MS", help="one-way propagation delay, each direction")
    link.add_argument("--jitter-ms", type=_at_least_zero, metavar="MS",
                      help="each chunk's delay varies uniformly by up to this much either way, never below 0; "
                      "bytes of a connection still arrive in order (default 0)")
    link.add_argument("--loss", type=_fraction, metavar="P",
                      help="fraction of TCP segments lost (default 0). A proxy relays TCP, which retransmits, so "
                      f"loss can only show as delay: a chunk holding a lost {SEGMENT_BYTES}-byte segment arrives one "
                      f"retransmission timeout (2 x delay + {RTO_FLOOR_SECONDS * 1e3:g} ms) late. Congestion-control "
                      "slow-down and the retransmitted bytes are not modelled")
    link.add_argument("--queue-kib", type=positive(int), metavar="KIB",
                      help="KiB one connection may hold per direction waiting for the line, beyond what is in "
                      f"flight; when full the proxy stops reading (default {DEFAULT_QUEUE_KIB})")
    link.add_argument("--seed", type=int, default=0, help="seed of the jitter and loss draws (default %(default)s)")
    link.add_argument("--duration", type=positive(float), metavar="SECONDS", help="stop after this long")
    link.add_argument("--report", type=Path, metavar="FILE.json",
                      help="on exit, write the settings, connections and bytes each way as JSON")
    link.set_defaults(run=_run)
