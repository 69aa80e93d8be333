"""Batching policy: when does an open batch close.

The caller passes the current monotonic time, or, to :meth:`Batcher.add`, None:
then the clock is read only when a batch opens (not once per record). A batch
closes when it holds ``max_records`` entries, when adding one more entry would
pass ``max_bytes`` (a single larger record still gets a batch of its own), or
when its oldest entry is ``max_age_s`` old.
"""

from __future__ import annotations

import time

from shipper.sinks.base import Batch


class Batcher:
    """Accumulates encoded records and hands out closed batches."""

    def __init__(self, *, max_records: int, max_bytes: int, max_age_s: float) -> None:
        if max_records < 1 or max_bytes < 1 or max_age_s <= 0:
            raise ValueError("batch limits must be positive")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._seq = 0
        self._open: Batch | None = None

    def add(self, entry: bytes, time_ns: int, now_mono: float | None = None
            ) -> tuple[Batch, ...]:
        """Add one entry; return the batches this addition closed (usually none).

        When the entry does not fit the open batch by bytes, the open batch is
        closed and the entry starts the next one. ``now_mono`` None: read the
        monotonic clock if a batch opens.
        """
        closed: tuple[Batch, ...] = ()
        b = self._open
        size = len(entry)
        if b is not None and b.nbytes + size > self.max_bytes:
            closed = (b,)
            b = None
        if b is None:
            self._seq += 1
            b = Batch(seq=self._seq,
                      opened_mono=time.monotonic() if now_mono is None else now_mono)
            self._open = b
        entries = b.entries
        entries.append(entry)
        b.times.append(time_ns)
        b.nbytes += size
        if len(entries) >= self.max_records:
            self._open = None
            return (*closed, b)
        return closed

    def due(self, now_mono: float) -> Batch | None:
        """Close and return the open batch if it is old enough."""
        b = self._open
        if b is not None and now_mono - b.opened_mono >= self.max_age_s:
            self._open = None
            return b
        return None

    def deadline(self) -> float | None:
        """Monotonic time at which the open batch becomes due, or None."""
        b = self._open
        return None if b is None else b.opened_mono + self.max_age_s

    def flush(self) -> Batch | None:
        """Close and return the open batch regardless of age (shutdown)."""
        b, self._open = self._open, None
        return b if b is not None and b.entries else None
