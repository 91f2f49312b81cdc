"""A WAN emulator between an edge and its cloud: a TCP proxy with a rate, a delay and a byte count per direction."""
from __future__ import annotations

import asyncio
import json
import math
import random
import selectors
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_QUEUE_KIB", "PROFILES", "LinkDirection", "LinkEmulator", "LinkSettings", "Profile", "write_report"]

#: What one connection may hold per direction waiting for the line, by default.
DEFAULT_QUEUE_KIB = 512
#: Linux's floor on the retransmission timeout; a lost segment costs one RTO = RTT + this.
RTO_FLOOR_SECONDS = 0.2
#: A TCP segment on an Ethernet-sized path: the unit the loss probability applies to.
SEGMENT_BYTES = 1460
#: Chunks are about this long on the line, so a chunk delivered whole at its end (store and
#: forward) is never much later than a byte-by-byte line would deliver its first byte...
_CHUNK_SECONDS = 0.005
#: ... within these bounds: small enough chunks cost Python time, big ones add latency.
_MIN_CHUNK_BYTES = 4 << 10
_MAX_CHUNK_BYTES = 64 << 10


@dataclass(frozen=True)
class LinkSettings:
    """What the emulated access link does: a rate per direction, a one-way delay, jitter and loss."""

    up_mbps: float
    down_mbps: float
    delay_ms: float
    jitter_ms: float = 0.0
    loss: float = 0.0
    queue_kib: int = DEFAULT_QUEUE_KIB
    seed: int = 0
    profile: str | None = None

    def __post_init__(self) -> None:
        for name in ("up_mbps", "down_mbps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be greater than 0, got {value}")
        for name in ("delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name.replace('_', '-')} must be 0 or more, got {value}")
        if not 0 <= self.loss <= 1:
            raise ValueError(f"loss must be a fraction from 0 to 1, got {self.loss}")
        if self.queue_kib < 1:
            raise ValueError(f"queue-kib must be at least 1, got {self.queue_kib}")


@dataclass(frozen=True)
class Profile:
    """A named link and what real connection its figures stand for."""

    settings: LinkSettings
    meaning: str


#: Up is edge to cloud. Delays are one way (the round trip is twice as long).
PROFILES: dict[str, Profile] = {
    "broadband": Profile(LinkSettings(10, 50, 15, profile="broadband"),
                         "a cable/VDSL home line to a nearby cloud region (30 ms round trip)"),
    "lte": Profile(LinkSettings(10, 30, 35, jitter_ms=10, profile="lte"),
                   "a good 4G/LTE cell (70 ms round trip)"),
    "satellite": Profile(LinkSettings(3, 25, 300, profile="satellite"),
                         "a geostationary satellite service (600 ms round trip)"),
    "slow": Profile(LinkSettings(5, 5, 10, profile="slow"),
                    "a congested shared line: busy office Wi-Fi, a small site's VPN (20 ms round trip)"),
}


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write a report as indented JSON, whole or not at all (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)


class LinkDirection:
    """One direction of the access link: a serial line every connection shares, then a propagation delay."""

    def __init__(self, mbps: float, settings: LinkSettings, rng: random.Random) -> None:
        self.mbps = mbps
        self.bytes_per_second = mbps * 1e6 / 8
        self.chunk_bytes = int(min(max(self.bytes_per_second * _CHUNK_SECONDS, _MIN_CHUNK_BYTES), _MAX_CHUNK_BYTES))
        self._delay = settings.delay_ms / 1e3
        self._jitter = settings.jitter_ms / 1e3
        self._loss = settings.loss
        self._rto = 2 * self._delay + RTO_FLOOR_SECONDS
        self._rng = rng
        self._free_at = 0.0
        # A connection may hold its queue plus what is legitimately in flight (the bandwidth-delay
        # product at the worst delay) plus the chunk being read; more would only be queueing.
        worst_delay = self._delay + self._jitter + (self._rto if self._loss else 0.0)
        self.hold_limit = settings.queue_kib * 1024 + self.chunk_bytes + math.ceil(self.bytes_per_second * worst_delay)
        #: Bytes handed to the receiving socket, over all connections.
        self.bytes = 0
        #: The most bytes one connection held at once in this direction (read, not yet written on).
        self.peak_held = 0

    def send(self, size: int, now: float) -> float:
        """Put ``size`` bytes on the line at ``now`` (loop time); when their last byte reaches the far end."""
        departure = max(now, self._free_at)
        self._free_at = departure + size / self.bytes_per_second
        delay = self._delay
        if self._jitter:
            delay = max(0.0, delay + self._rng.uniform(-self._jitter, self._jitter))
        segments = math.ceil(size / SEGMENT_BYTES)
        if self._loss and self._rng.random() < 1 - (1 - self._loss) ** segments:
            delay += self._rto
        return self._free_at + delay

    def summary(self) -> dict[str, Any]:
        """The counters of this direction, for the report."""
        return {"bytes": self.bytes, "peak_held_bytes": self.peak_held, "hold_limit_bytes": self.hold_limit,
                "chunk_bytes": self.chunk_bytes}


class _Stream:
    """One direction of one connection: read, take a turn on the line, deliver in order on arrival."""

    def __init__(self, line: LinkDirection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._line = line
        self._reader = reader
        self._writer = writer
        self._held = 0
        self._space = asyncio.Event()
        self._pending: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def run(self) -> None:
        """Forward until end of stream (then pass the half-close on) or until either socket fails."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._read())
            group.create_task(self._deliver())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        line = self._line
        arrival = 0.0
        while True:
            # A full queue stops the reading, so TCP's window closes on the sender: nothing is dropped.
            while self._held + line.chunk_bytes > line.hold_limit:
                self._space.clear()
                await self._space.wait()
            data = await self._reader.read(line.chunk_bytes)
            # Jitter never reorders: a chunk arrives no earlier than the one before it on this connection.
            arrival = max(arrival, line.send(len(data), loop.time()))
            if not data:
                self._pending.put_nowait((arrival, None))
                return
            self._held += len(data)
            line.peak_held = max(line.peak_held, self._held)
            self._pending.put_nowait((arrival, data))

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            arrival, data = await self._pending.get()
            # An absolute deadline per chunk: a late wake-up never accumulates into later chunks.
            await asyncio.sleep(max(0.0, arrival - loop.time()))
            if data is None:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            self._line.bytes += len(data)
            self._writer.write(data)
            await self._writer.drain()
            self._held -= len(data)
            self._space.set()


class LinkEmulator:
    """A TCP proxy from ``listen`` to ``target`` through an emulated link, its event loop on a background thread.

    Every connection shares the one line of each direction, as they would share a real access link:
    a bulk transfer queues a small message of another connection behind it. About 500 connections
    at once at most (the event loop uses select()). ``stop()`` (or leaving
    the ``with`` block) closes every connection and returns the report, also written to ``report_path``.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], settings: LinkSettings,
                 report_path: Path | None = None) -> None:
        self.settings = settings
        self.up = LinkDirection(settings.up_mbps, settings, random.Random(f"{settings.seed}-up"))
        self.down = LinkDirection(settings.down_mbps, settings, random.Random(f"{settings.seed}-down"))
        #: Connections accepted, and those of them the target refused.
        self.connections = 0
        self.refused = 0
        self._listen = listen
        self._target = target
        self._report_path = report_path
        self._address: tuple[str, int] | None = None
        # select() wakes within microseconds of a deadline; epoll, asyncio's default, rounds every
        # timeout up to the next millisecond (measured: 0.4 ms instead of 1.2 ms late per delivery).
        # Its price, descriptors below 1024, bounds the proxy to about 500 connections at once.
        self._loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgepipe-link", daemon=True)
        self._server: asyncio.Server | None = None
        self._forwarders: set[asyncio.Task[None]] = set()
        self._started_at = 0.0
        self._seconds = 0.0

    @property
    def bytes_up(self) -> int:
        """Bytes delivered to the target so far (edge to cloud)."""
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        """Bytes delivered back to the clients so far (cloud to edge)."""
        return self.down.bytes

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the proxy listens on (port 0 resolved); only after ``start()``."""
        if self._address is None:
            raise RuntimeError("the link emulator is not started")
        return self._address

    def start(self) -> tuple[str, int]:
        """Bind and start forwarding; return the bound (host, port). Raises OSError if it cannot bind."""
        self._thread.start()
        try:
            self._address = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()
        except BaseException:
            self._halt_loop()
            raise
        self._started_at = time.monotonic()
        return self._address

    def stop(self) -> dict[str, Any]:
        """Close the listener and every connection, stop the loop; return (and write) the report."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()
            self._seconds = time.monotonic() - self._started_at
            self._halt_loop()
        report = self.report()
        if self._report_path is not None:
            write_report(self._report_path, report)
        return report

    def report(self) -> dict[str, Any]:
        """Settings, connections, seconds served and the counters of both directions."""
        seconds = time.monotonic() - self._started_at if self._thread.is_alive() else self._seconds
        return {
            "listen": _joined(self._address or self._listen),
            "target": _joined(self._target),
            "settings": asdict(self.settings),
            "connections": self.connections,
            "refused_connections": self.refused,
            "seconds": round(seconds, 3),
            "up": self.up.summary(),
            "down": self.down.summary(),
        }

    def __enter__(self) -> LinkEmulator:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _halt_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _open(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, *self._listen)
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        handlers = list(self._forwarders)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # The connection runs in a task of its own, not in the server's callback task: stop() cancels
        # it, and asyncio 3.11 logs a cancelled callback task as an error.
        self.connections += 1
        task = asyncio.create_task(self._forward(client_reader, client_writer))
        self._forwarders.add(task)
        task.add_done_callback(self._forwarders.discard)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(*self._target)
            except OSError:
                self.refused += 1
                return
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(_Stream(self.up, client_reader, server_writer).run())
                    group.create_task(_Stream(self.down, server_reader, client_writer).run())
            except* OSError:
                pass  # a reset on one side ends the connection; the other side is closed below
            finally:
                server_writer.close()
        finally:
            client_writer.close()


def _joined(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
