"""Byte accounting of the link: serialized message bytes and counts per direction and kind."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DIRECTIONS", "KINDS", "MIB", "TrafficCounts", "TrafficMeter"]

#: ``uplink`` is edge -> cloud, ``downlink`` cloud -> edge.
DIRECTIONS = ("uplink", "downlink")
#: Every frame is one of these: tensors going forward, gradients going back, or control.
KINDS = ("activation", "gradient", "control")
#: Bytes in a mebibyte: traffic is reported in MiB everywhere.
MIB = 1 << 20


@dataclass(frozen=True)
class TrafficCounts:
    """An immutable snapshot of a :class:`TrafficMeter` (or the difference of two)."""

    nbytes: dict[tuple[str, str], int] = field(default_factory=dict)
    messages: dict[tuple[str, str], int] = field(default_factory=dict)

    def total(self, direction: str, kind: str | None = None) -> int:
        """Bytes in ``direction``, of one kind or of all kinds."""
        kinds = KINDS if kind is None else (kind,)
        return sum(self.nbytes.get((direction, k), 0) for k in kinds)

    def __sub__(self, other: TrafficCounts) -> TrafficCounts:
        keys = set(self.nbytes) | set(other.nbytes)
        return TrafficCounts(
            {k: self.nbytes.get(k, 0) - other.nbytes.get(k, 0) for k in keys},
            {k: self.messages.get(k, 0) - other.messages.get(k, 0) for k in keys},
        )

    def to_json(self) -> dict[str, Any]:
        """The ``traffic`` object of summary.json (also the byte fields of a metrics line)."""
        return {
            "uplink_bytes": self.total("uplink"),
            "downlink_bytes": self.total("downlink"),
            "by_kind": {
                kind: {
                    "uplink_bytes": self.nbytes.get(("uplink", kind), 0),
                    "downlink_bytes": self.nbytes.get(("downlink", kind), 0),
                    "messages": self.messages.get(("uplink", kind), 0)
                    + self.messages.get(("downlink", kind), 0),
                }
                for kind in KINDS
            },
        }


class TrafficMeter:
    """The one counter every frame crossing the link goes through (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str], int] = {}
        self._messages: dict[tuple[str, str], int] = {}

    def count(self, direction: str, kind: str, nbytes: int) -> None:
        """Record one message of ``nbytes`` serialized bytes."""
        if direction not in DIRECTIONS or kind not in KINDS:
            raise ValueError(f"unknown traffic class {direction}/{kind}")
        key = (direction, kind)
        with self._lock:
            self._bytes[key] = self._bytes.get(key, 0) + nbytes
            self._messages[key] = self._messages.get(key, 0) + 1

    def snapshot(self) -> TrafficCounts:
        """The counts so far."""
        with self._lock:
            return TrafficCounts(dict(self._bytes), dict(self._messages))
