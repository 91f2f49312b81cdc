"""The rows of frozen-head activations a session keeps by sample index: in memory up to a bound, then on disk."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

__all__ = ["ActivationCache"]


class ActivationCache:
    """Each training sample's encoded activation row, as it arrived, keyed by its index.

    Rows go to memory until ``memory_bytes`` are held, then to an unnamed file in ``spill_dir``
    (the system's temporary directory when None) that disappears with the cache. Only the rows
    of encodings where every value is encoded on its own can be cut out of a micro-batch this
    way (``pipeline.config.CACHEABLE_CODECS``).
    """

    def __init__(self, memory_bytes: int, spill_dir: str | Path | None = None) -> None:
        self.memory_bytes = memory_bytes
        self.spill_dir = spill_dir
        self._memory: dict[int, bytes] = {}
        self._held = 0
        self._spilled: dict[int, tuple[int, int]] = {}
        self._file: BinaryIO | None = None
        self._end = 0

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def __contains__(self, sample: int) -> bool:
        return sample in self._memory or sample in self._spilled

    @property
    def spilled(self) -> int:
        """How many rows are on disk."""
        return len(self._spilled)

    def put(self, sample: int, row: bytes) -> None:
        """Keep ``row`` for ``sample``; a sample already held keeps its first row (they are equal)."""
        if sample in self:
            return
        if self._held + len(row) <= self.memory_bytes:
            self._memory[sample] = row
            self._held += len(row)
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir)
        os.pwrite(self._file.fileno(), row, self._end)
        self._spilled[sample] = (self._end, len(row))
        self._end += len(row)

    def get(self, sample: int) -> bytes:
        """The row kept for ``sample`` (KeyError when none is)."""
        row = self._memory.get(sample)
        if row is not None:
            return row
        offset, length = self._spilled[sample]
        return os.pread(self._file.fileno(), length, offset)

    def clear(self) -> None:
        """Forget every row (the boundary moved: the activations change) and delete the spill file."""
        self._memory.clear()
        self._spilled.clear()
        self._held = self._end = 0
        if self._file is not None:
            self._file.close()
            self._file = None
