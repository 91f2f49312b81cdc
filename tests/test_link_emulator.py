"""``edgepipe link``, the WAN emulator: timing against the ideal line, counts, order, backpressure, the command."""
from __future__ import annotations

import argparse
import json
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgepipe.link_command import add_link_command, link_settings
from edgepipe.link_emulator import PROFILES, RTO_FLOOR_SECONDS, LinkEmulator, LinkSettings

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", 0)
#: ``edgepipe link`` as a process, with the command registered the way edgepipe/cli.py does.
LINK_PROCESS = (
    "import argparse, sys\n"
    "from edgepipe.link_command import add_link_command\n"
    "parser = argparse.ArgumentParser(prog='edgepipe')\n"
    "add_link_command(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.run(args))\n"
)


class _Server:
    """A plain TCP server on 127.0.0.1 running ``serve(connection)`` on a thread per accepted connection."""

    def __init__(self, serve: Callable[[socket.socket], None], receive_buffer: int | None = None) -> None:
        self._listener = socket.create_server(LOOPBACK)
        if receive_buffer is not None:
            # Accepted sockets inherit it: a small one keeps the kernel from absorbing a slow reader's backlog.
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.address: tuple[str, int] = self._listener.getsockname()
        self._accepted = threading.Condition()
        self._serve = serve
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            thread = threading.Thread(target=self._handle, args=(connection,), daemon=True)
            thread.start()
            with self._accepted:
                self._threads.append(thread)
                self._accepted.notify_all()

    def wait_for_connections(self, count: int) -> None:
        """Return once ``count`` connections have been accepted (the emulator connects when a client does)."""
        with self._accepted:
            assert self._accepted.wait_for(lambda: len(self._threads) >= count, timeout=10), "too few connections"

    def _handle(self, connection: socket.socket) -> None:
        with connection:
            self._serve(connection)

    def close(self) -> None:
        """Stop accepting (shutdown wakes the blocked accept) and wait for every connection's thread."""
        self._listener.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=10)
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=10)


def _read_all(connection: socket.socket) -> tuple[bytes, float]:
    """Everything until end of stream, and the perf_counter time its last byte arrived."""
    parts, last_at = [], 0.0
    while data := connection.recv(1 << 20):
        parts.append(data)
        last_at = time.perf_counter()
    return b"".join(parts), last_at


def _echo(connection: socket.socket) -> None:
    while data := connection.recv(1 << 16):
        connection.sendall(data)
    connection.shutdown(socket.SHUT_WR)


def _echo_through(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` through an echo server at ``address`` while reading its echo back."""
    with socket.create_connection(address) as client:
        def send() -> None:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        echoed, _ = _read_all(client)
        sender.join()
    return echoed


def _ideal(settings: LinkSettings, mbps: float, size: int) -> float:
    return settings.delay_ms / 1e3 + 8 * size / (mbps * 1e6)


# -- timing ---------------------------------------------------------------------------------------

TIMED = LinkSettings(up_mbps=20, down_mbps=40, delay_ms=10)
MEGABYTE = 1_000_000
#: A busy machine only ever makes a delivery late: a late measurement is measured again, this many times at most.
ATTEMPTS = 3


def _assert_on_time(measure: Callable[[], float], ideal: float) -> None:
    """``measure()`` is never early and, at its best of ATTEMPTS, within 2 % of ``ideal``."""
    measured: list[float] = []
    while len(measured) < ATTEMPTS and (not measured or min(measured) - ideal > 0.02 * ideal):
        measured.append(measure())
        # Nothing can arrive before the ideal line delivers it; the sender's clock starts first.
        assert measured[-1] >= ideal, f"measured {measured[-1]:.4f} s, earlier than the ideal {ideal:.4f} s"
    assert min(measured) - ideal <= 0.02 * ideal, f"measured {measured} s, ideal {ideal:.4f} s"


def _upload(settings: LinkSettings, sizes: list[int]) -> float:
    """Seconds from the first send until the last byte of ``sizes`` (one connection each) reached the server."""
    finished: list[float] = []

    def sink(connection: socket.socket) -> None:
        finished.append(_read_all(connection)[1])

    server = _Server(sink)
    with LinkEmulator(LOOPBACK, server.address, settings) as emulator:
        clients = [socket.create_connection(emulator.address) for _ in sizes]
        server.wait_for_connections(len(sizes))
        started = time.perf_counter()
        for client, size in zip(clients, sizes):
            client.sendall(b"u" * size)
            client.shutdown(socket.SHUT_WR)
        server.close()
        for client in clients:
            client.close()
    assert len(finished) == len(sizes)
    return max(finished) - started


def _download(settings: LinkSettings, size: int) -> float:
    """Seconds from the server's first send until the last of its ``size`` bytes reached the client."""
    sent: dict[str, float] = {}

    def source(connection: socket.socket) -> None:
        sent["started"] = time.perf_counter()
        connection.sendall(b"d" * size)

    server = _Server(source)
    with (
        LinkEmulator(LOOPBACK, server.address, settings) as emulator,
        socket.create_connection(emulator.address) as client,
    ):
        data, last_at = _read_all(client)
        server.close()
    assert len(data) == size
    return last_at - sent["started"]


def test_an_upload_arrives_after_the_delay_plus_its_serialization_time() -> None:
    _assert_on_time(lambda: _upload(TIMED, [MEGABYTE]), _ideal(TIMED, TIMED.up_mbps, MEGABYTE))  # 0.41 s


def test_a_download_arrives_after_the_delay_plus_its_serialization_time() -> None:
    _assert_on_time(lambda: _download(TIMED, MEGABYTE), _ideal(TIMED, TIMED.down_mbps, MEGABYTE))  # 0.21 s


def test_connections_share_one_line_per_direction() -> None:
    # Two halves on one 20 Mbit/s line take as long as the whole megabyte on it.
    half = MEGABYTE // 2
    _assert_on_time(lambda: _upload(TIMED, [half, half]), _ideal(TIMED, TIMED.up_mbps, 2 * half))


def test_a_lost_segment_costs_one_retransmission_timeout() -> None:
    settings = LinkSettings(up_mbps=10, down_mbps=10, delay_ms=5, loss=1)  # every segment lost once
    ideal = _ideal(settings, settings.up_mbps, 1000) + 2 * settings.delay_ms / 1e3 + RTO_FLOOR_SECONDS  # 0.2158 s
    _assert_on_time(lambda: _upload(settings, [1000]), ideal)


# -- counts and order -----------------------------------------------------------------------------


def test_bytes_are_counted_each_way_over_concurrent_connections() -> None:
    server = _Server(_echo)
    sizes = [1, 100_000, 250_000]
    echoed: list[int] = []
    with LinkEmulator(LOOPBACK, server.address, LinkSettings(100, 100, 1)) as emulator:
        threads = [threading.Thread(target=lambda n=n: echoed.append(len(_echo_through(emulator.address, b"c" * n))))
                   for n in sizes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    server.close()
    assert sorted(echoed) == sizes
    assert emulator.bytes_up == emulator.bytes_down == sum(sizes)
    assert emulator.connections == 3 and emulator.refused == 0


def test_a_refused_target_closes_the_client_and_is_counted() -> None:
    with socket.socket() as closed_port:
        closed_port.bind(LOOPBACK)  # bound, never listening: connecting to it is refused
        with LinkEmulator(LOOPBACK, closed_port.getsockname(), LinkSettings(10, 10, 0)) as emulator:
            with socket.create_connection(emulator.address) as client:
                assert _read_all(client)[0] == b""
    assert (emulator.connections, emulator.refused) == (1, 1)


def test_jitter_never_reorders_the_bytes_of_a_connection() -> None:
    server = _Server(_echo)
    payload = random.Random(1).randbytes(2 * MEGABYTE)
    # Jitter of +-5 ms against 2.6 ms chunks would reorder them without the per-connection ordering.
    settings = LinkSettings(200, 200, delay_ms=5, jitter_ms=5)
    with LinkEmulator(LOOPBACK, server.address, settings) as emulator:
        echoed = _echo_through(emulator.address, payload)
    server.close()
    assert echoed == payload


# -- backpressure ---------------------------------------------------------------------------------


def test_a_slow_receiver_stops_the_reading_instead_of_growing_the_queue() -> None:
    may_read = threading.Event()
    received: dict[str, bytes] = {}

    def slow_sink(connection: socket.socket) -> None:
        assert may_read.wait(10)
        received["data"] = _read_all(connection)[0]

    server = _Server(slow_sink, receive_buffer=8192)
    payload = random.Random(2).randbytes(24 * MEGABYTE)  # far more than the kernel's buffers take (~8 MB here)
    with LinkEmulator(LOOPBACK, server.address, LinkSettings(1000, 1000, 1, queue_kib=64)) as emulator:
        line = emulator.up
        with socket.create_connection(emulator.address) as client:
            def send() -> None:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            deadline = time.monotonic() + 10
            # The emulator stops reading once one more chunk would not fit: wait for that moment.
            while line.peak_held + line.chunk_bytes <= line.hold_limit and time.monotonic() < deadline:
                time.sleep(0.002)
            assert line.peak_held + line.chunk_bytes > line.hold_limit, "the queue never filled"
            assert sender.is_alive(), "the sender finished while nothing was read: something buffered it all"
            may_read.set()
            sender.join()
            server.close()
    assert received["data"] == payload
    assert line.peak_held <= line.hold_limit < 300_000


# -- the command ----------------------------------------------------------------------------------


def _parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgepipe")
    add_link_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["link", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:50051", *flags])


def test_flags_override_a_profiles_values() -> None:
    settings = link_settings(_parse("--profile", "lte", "--up-mbps", "7", "--jitter-ms", "0"))
    lte = PROFILES["lte"].settings
    assert settings == LinkSettings(up_mbps=7, down_mbps=lte.down_mbps, delay_ms=lte.delay_ms, jitter_ms=0,
                                    profile="lte")
    explicit = link_settings(_parse("--up-mbps", "2", "--down-mbps", "3", "--delay-ms", "4", "--loss", "0.01"))
    assert explicit == LinkSettings(2, 3, 4, loss=0.01)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--up-mbps", "-5"], "argument --up-mbps: must be greater than 0, got '-5'"),
        (["--profile", "dialup"], "argument --profile: invalid choice: 'dialup'"),
        (["--delay-ms", "-1"], "argument --delay-ms: must be 0 or more, got '-1'"),
        (["--loss", "1.5"], "argument --loss: must be a fraction from 0 to 1, got '1.5'"),
        (["--listen", "nowhere"], "argument --listen: bad address 'nowhere'"),
    ],
    ids=["negative-rate", "unknown-profile", "negative-delay", "loss-above-1", "bad-address"],
)
def test_the_command_rejects_bad_values_with_one_line(capsys, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(*flags)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"edgepipe link: error: {message}")


def test_the_command_without_a_profile_needs_every_rate_and_the_delay(capsys) -> None:
    args = _parse("--up-mbps", "5")
    assert args.run(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("edgepipe link: give --profile or all of --up-mbps, --down-mbps and --delay-ms "
                   "(missing --down-mbps, --delay-ms)\n")


def test_the_help_names_every_profile_and_says_what_loss_can_be(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    for name, profile in PROFILES.items():
        assert name in text and profile.meaning in text
    assert "loss can only show as delay" in text


def test_the_command_forwards_until_sigterm_then_reports(tmp_path: Path) -> None:
    server = _Server(_echo)
    report_path = tmp_path / "link.json"
    target = f"{server.address[0]}:{server.address[1]}"
    process = subprocess.Popen(
        [sys.executable, "-c", LINK_PROCESS, "link", "--listen", "127.0.0.1:0", "--to", target,
         "--profile", "slow", "--delay-ms", "1", "--report", str(report_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(30), "edgepipe link printed nothing"
        line = process.stdout.readline()
        match = re.fullmatch(rf"edgepipe link listening on 127\.0\.0\.1:(\d+) -> {re.escape(target)}\n", line)
        assert match, line
        assert _echo_through(("127.0.0.1", int(match.group(1))), b"r" * 10_000) == b"r" * 10_000
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        server.close()
    assert process.returncode == 0, err
    assert out == "edgepipe link: 1 connections, 10,000 bytes up, 10,000 bytes down in " + out.split(" in ")[1]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["listen"] == f"127.0.0.1:{match.group(1)}" and report["target"] == target
    assert report["settings"] == {"up_mbps": 5, "down_mbps": 5, "delay_ms": 1.0, "jitter_ms": 0.0, "loss": 0.0,
                                  "queue_kib": 512, "seed": 0, "profile": "slow"}
    assert report["connections"] == 1 and report["refused_connections"] == 0
    assert report["up"]["bytes"] == report["down"]["bytes"] == 10_000
    assert report["up"]["peak_held_bytes"] <= report["up"]["hold_limit_bytes"]
