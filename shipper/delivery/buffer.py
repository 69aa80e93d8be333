"""The delivery buffer: the bounded memory queue in front of a sink, the disk spool
spill, and the overflow policy, with the drops they cause counted.

The event path :meth:`DeliveryBuffer.put` closed batches (from one thread); one
consumer (the delivery worker) :meth:`~DeliveryBuffer.take` s them in order and
reports each as :meth:`~DeliveryBuffer.done` or, when the shutdown grace period
ended first, :meth:`~DeliveryBuffer.abandon` s it with everything behind it.

Without a spool a full memory queue (``max_batches``) applies the overflow policy:
``block`` (``put`` waits for room), ``drop_newest`` or ``drop_oldest`` (the batch is
dropped and counted as ``queue_full``).

With a spool (:class:`~shipper.sinks.spool.Spool`) every batch is appended to disk
(fsynced) before it is queued and committed only after it was shipped or
dropped-and-counted. The memory queue then never overflows: past ``max_batches``
batches in memory, new ones are kept on disk only ("spilled") and read back in their
turn. When the spool itself is full its own policy applies: ``block`` (``put``
waits) or ``drop_oldest`` (the oldest segment is dropped, its records counted as
``spool_full``). A spilled batch that cannot be read back is counted as
``spool_corrupt``. A batch that cannot be spooled (larger than the whole spool, a
disk error, or shutdown while blocked on a full spool) is kept in memory only and
follows the memory rules. At shutdown, batches left in memory only are counted as
``shutdown``; spooled ones stay in the spool for the next start (replayed first, in
order) and are not counted as dropped.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shipper.delivery.drops import count_dropped
from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks.base import Batch
from shipper.sinks.spool import Spool, SpoolRef, encode_frame

log = logging.getLogger("shipper.delivery")

OVERFLOW_POLICIES = ("block", "drop_newest", "drop_oldest")


@dataclass(slots=True)
class Item:
    """One queued batch: in memory, on disk, or both."""

    batch: Batch | None  # None: spilled; read back from the spool when its turn comes
    ref: SpoolRef | None  # None: memory only
    records: int


class DeliveryBuffer:
    """Memory queue (+ optional spool) for one sink; thread-safe.

    ``consumer_alive`` tells a blocked ``put`` whether waiting can help: once the
    consumer is gone (or before it started) nobody makes room, so it stops waiting.
    """

    def __init__(
        self,
        metrics: Metrics,
        sink_name: str,
        *,
        max_batches: int,
        overflow: str,
        spool: Spool | None = None,
        consumer_alive: Callable[[], bool] = lambda: True,
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"unknown overflow policy {overflow!r}")
        self.metrics = metrics
        self.sink_name = sink_name
        self.max_batches = max_batches
        self.overflow = overflow
        self.spool = spool
        self._consumer_alive = consumer_alive
        self._q: deque[Item] = deque()
        self._in_memory = 0  # queued items holding their batch in memory
        self._cond = threading.Condition()
        self._put_lock = threading.Lock()  # keeps spool order == queue order
        self._closing = False  # no more puts; the consumer drains what is queued
        self._warned_too_large = False

    def recover(self) -> None:
        """Queue the spool's undelivered batches first, in order (no-op without a spool).

        Raises SinkError (not retriable) if the spool directory cannot be used.
        """
        if self.spool is None:
            return
        try:
            refs = self.spool.recover()
        except OSError as exc:
            raise SinkError(f"cannot open the spool in {self.spool.dir}: "
                            f"{exc.strerror or exc}", retriable=False) from exc
        with self._cond:
            self._q.extendleft(Item(None, r, r.records) for r in reversed(refs))
            self._gauge()

    def pending_records(self) -> int:
        """Records queued (not counting the batch being delivered)."""
        with self._cond:
            return sum(i.records for i in self._q)

    # --- the producer -----------------------------------------------------------------

    def put(self, batch: Batch, stop: threading.Event | None = None) -> None:
        """Queue a closed batch (spooling it first if there is a spool).

        With ``block`` (for the queue, or for a full spool) this waits for room. It
        returns early only if ``stop`` is set, in which case the batch is still queued
        (in memory only, when the spool had no room).
        """
        if not batch.entries:
            return
        if self.spool is None:
            self._put_memory(batch, stop)
            return
        with self._put_lock:
            ref = self._spool_append(self.spool, batch, stop)
            if ref is None:
                self._put_memory(batch, stop)
                return
            with self._cond:
                keep = self._in_memory < self.max_batches
                self._q.append(Item(batch if keep else None, ref, len(batch)))
                self._in_memory += keep
                self._gauge()
                self._cond.notify_all()

    def _spool_append(self, spool: Spool, batch: Batch, stop: threading.Event | None
                      ) -> SpoolRef | None:
        frame = encode_frame(batch)
        if not spool.fits(len(frame)):
            if not self._warned_too_large:
                self._warned_too_large = True
                log.warning("batch larger than the whole spool, kept in memory only",
                            extra={"fields": {"bytes": len(frame), "max_bytes": spool.max_bytes}})
            return None
        while not spool.has_room(len(frame)):
            if spool.full_policy == "drop_oldest":
                if not self._drop_oldest_segment(spool):
                    return None
                continue
            if (stop is not None and stop.is_set()) or not self._consumer_alive():
                return None
            with self._cond:
                self._cond.wait(0.05)
        try:
            return spool.append(frame, len(batch))
        except OSError as exc:
            self.metrics.inc("shipper_errors_total", "spool", type(exc).__name__)
            log.error("spool write failed, batch kept in memory only", extra={"fields": {
                "error": str(exc), "records": len(batch)}})
            return None

    def _drop_oldest_segment(self, spool: Spool) -> bool:
        with self._cond:
            seg = spool.droppable_segment()
            if seg is None:
                return False
            kept: deque[Item] = deque()
            dropped = 0
            for item in self._q:
                if item.ref is not None and item.ref.seg == seg:
                    dropped += item.records
                    self._in_memory -= item.batch is not None
                else:
                    kept.append(item)
            self._q = kept
            spool.drop_segment(seg)
            self._gauge()
        if dropped:
            self._drop(dropped, "spool_full")
        return True

    def _put_memory(self, batch: Batch, stop: threading.Event | None) -> None:
        with self._cond:
            if self._in_memory >= self.max_batches:
                if self.overflow == "drop_newest":
                    self._drop(len(batch), "queue_full")
                    return
                if self.overflow == "drop_oldest":
                    self._drop_oldest_memory()
                else:
                    while self._in_memory >= self.max_batches and not (stop and stop.is_set()):
                        if not self._consumer_alive():
                            break
                        self._cond.wait(0.05)
            self._q.append(Item(batch, None, len(batch)))
            self._in_memory += 1
            self._gauge()
            self._cond.notify_all()

    def _drop_oldest_memory(self) -> None:
        for i, item in enumerate(self._q):
            if item.ref is None and item.batch is not None:
                del self._q[i]
                self._in_memory -= 1
                self._drop(item.records, "queue_full")
                return

    # --- the consumer -----------------------------------------------------------------

    def take(self) -> Item | None:
        """The next batch to deliver (its ``batch`` loaded, read back from the spool if it
        was spilled); waits for one. None once :meth:`close_input` was called and the
        queue is empty. A spilled batch that cannot be read back is counted and skipped.
        """
        while True:
            with self._cond:
                while not self._q and not self._closing:
                    self._cond.wait()
                if not self._q:
                    return None
                item = self._q.popleft()
                self._in_memory -= item.batch is not None
                self._gauge()
                self._cond.notify_all()
            if item.batch is not None or item.ref is None or self.spool is None:
                return item
            try:
                item.batch = self.spool.read(item.ref)
                reason = "spool_full"  # None: its segment was dropped while in flight
            except ValueError as exc:
                log.error("spooled batch lost", extra={"fields": {"error": str(exc)}})
                reason = "spool_corrupt"
            if item.batch is not None:
                return item
            self._drop(item.records, reason)
            self.spool.commit(item.ref)

    def done(self, item: Item) -> None:
        """``item`` was shipped or dropped-and-counted: remove it from the spool."""
        if item.ref is not None and self.spool is not None:
            self.spool.commit(item.ref)
            with self._cond:
                self._cond.notify_all()  # space may have been freed

    def close_input(self) -> None:
        """No more puts: :meth:`take` returns None once the queue is empty."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def abandon(self, in_flight: Item | None = None) -> bool:
        """Grace period over: give up ``in_flight`` and everything still queued. Memory-only
        batches are counted dropped (``shutdown``); spooled ones stay for the next start.
        True if anything was given up."""
        with self._cond:
            left = [*([in_flight] if in_flight is not None else []), *self._q]
            self._q.clear()
            self._in_memory = 0
            self._gauge()
        lost = sum(i.records for i in left if i.ref is None)
        kept = sum(i.records for i in left if i.ref is not None)
        if lost:
            self._drop(lost, "shutdown")
        if kept:
            log.info("records left in the spool for the next start",
                     extra={"fields": {"records": kept, "sink": self.sink_name}})
        return bool(left)

    def close(self) -> None:
        """Close the spool (after the consumer stopped)."""
        if self.spool is not None:
            try:
                self.spool.close()
            except OSError:
                log.exception("closing spool failed")

    def _drop(self, records: int, reason: str) -> None:
        count_dropped(self.metrics, self.sink_name, records, reason)

    def _gauge(self) -> None:
        self.metrics.set("shipper_queue_batches", len(self._q))
