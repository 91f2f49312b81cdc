"""Byte accounting of the link: serialized message bytes and counts per direction, kind and phase."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DIRECTIONS", "KINDS", "MIB", "PHASES", "SYNC", "TrafficCounts", "TrafficMeter"]

#: ``uplink`` is edge -> cloud, ``downlink`` cloud -> edge.
DIRECTIONS = ("uplink", "downlink")
#: Every frame is one of these: tensors going forward, gradients going back, or control.
KINDS = ("activation", "gradient", "control")
#: What the bytes were for: opening and closing the session, training steps, evaluation, the
#: final weight fetch.
PHASES = ("handshake", "training", "evaluation", "weights")
#: The kind, and the phase, of a split-federated run's weight exchange (heads and tails up, their
#: average down). Kept out of KINDS and PHASES, whose every member every run reports: a run
#: reports ``sync`` only when it exchanged weights, so runs without a federation read as before.
SYNC = "sync"
#: Bytes in a mebibyte: traffic is reported in MiB everywhere.
MIB = 1 << 20


@dataclass(frozen=True)
class TrafficCounts:
    """An immutable snapshot of a :class:`TrafficMeter` (or the difference of two)."""

    nbytes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    messages: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def total(self, direction: str, kind: str | None = None, *, phase: str | None = None) -> int:
        """Bytes in ``direction``, of one kind or of all, in one phase or in all."""
        return sum(
            n for (d, k, p), n in self.nbytes.items()
            if d == direction and kind in (None, k) and phase in (None, p)
        )

    def _messages(self, kind: str | None = None, phase: str | None = None) -> int:
        return sum(n for (_, k, p), n in self.messages.items() if kind in (None, k) and phase in (None, p))

    def __sub__(self, other: TrafficCounts) -> TrafficCounts:
        keys = set(self.nbytes) | set(other.nbytes)
        return TrafficCounts(
            {k: self.nbytes.get(k, 0) - other.nbytes.get(k, 0) for k in keys},
            {k: self.messages.get(k, 0) - other.messages.get(k, 0) for k in keys},
        )

    def to_json(self, *, by_phase: bool = False) -> dict[str, Any]:
        """The byte fields of a metrics line; with ``by_phase`` the ``traffic`` object of summary.json."""
        data: dict[str, Any] = {
            "uplink_bytes": self.total("uplink"),
            "downlink_bytes": self.total("downlink"),
            "by_kind": {
                kind: {
                    "uplink_bytes": self.total("uplink", kind),
                    "downlink_bytes": self.total("downlink", kind),
                    "messages": self._messages(kind=kind),
                }
                for kind in (*KINDS, SYNC) if kind != SYNC or self._messages(kind=SYNC)
            },
        }
        if by_phase:
            data["by_phase"] = {
                phase: {
                    "uplink_bytes": self.total("uplink", phase=phase),
                    "downlink_bytes": self.total("downlink", phase=phase),
                    "messages": self._messages(phase=phase),
                }
                for phase in (*PHASES, SYNC) if phase != SYNC or self._messages(phase=SYNC)
            }
        return data


class TrafficMeter:
    """The one counter every frame crossing the link goes through (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str, str], int] = {}
        self._messages: dict[tuple[str, str, str], int] = {}

    def count(self, direction: str, kind: str, nbytes: int, phase: str = "training") -> None:
        """Record one message of ``nbytes`` serialized bytes."""
        if direction not in DIRECTIONS or kind not in (*KINDS, SYNC) or phase not in (*PHASES, SYNC):
            raise ValueError(f"unknown traffic class {direction}/{kind}/{phase}")
        key = (direction, kind, phase)
        with self._lock:
            self._bytes[key] = self._bytes.get(key, 0) + nbytes
            self._messages[key] = self._messages.get(key, 0) + 1

    def snapshot(self) -> TrafficCounts:
        """The counts so far."""
        with self._lock:
            return TrafficCounts(dict(self._bytes), dict(self._messages))
