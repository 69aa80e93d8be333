"""Delivery: the bounded queue in front of a sink, the optional disk spool, and the worker.

The event path calls :meth:`Delivery.submit` with closed batches (from one
thread); one worker thread hands them to the sink in order, retrying retriable
failures with the shared :class:`~shipper.sinks.retry.RetryPolicy`. Counting
rules:

* a record is *shipped* only when ``sink.deliver`` returned (the sink's
  confirmation: written, or acknowledged by the receiver);
* a retry is counted as a retry, never as a drop;
* every record that was accepted and will never be delivered is counted in
  ``shipper_records_dropped_total`` with its reason: ``queue_full`` (the
  overflow policy dropped it), ``rejected`` (non-retriable sink error),
  ``retries_exhausted``, ``sink_error`` (the sink raised something other than
  SinkError), ``shutdown`` (memory-only and still queued when the grace period
  ended), ``spool_full`` (the spool's ``drop_oldest`` policy dropped it),
  ``spool_corrupt`` (a spooled batch could not be read back),
  ``spool_incompatible`` (counted by the spool: written for another sink), or a
  reason the sink gave for records it left out of a delivered batch (``deliver``
  returns them by reason; the syslog sink's ``too_large``).

With a spool (:class:`~shipper.sinks.spool.Spool`) every batch is appended to
disk (fsynced) before it is queued and committed only after it was shipped or
dropped-and-counted. The memory queue then never overflows: past
``max_batches`` batches in memory, new ones are kept on disk only ("spilled")
and read back in their turn. When the spool itself is full its own policy
applies: ``block`` (``submit`` waits) or ``drop_oldest`` (the oldest segment
is dropped, its records counted as ``spool_full``). At shutdown, spooled
batches that were not delivered within the grace period stay in the spool -
they are replayed at the next start, first and in order, and not counted as
dropped. A batch that cannot be spooled (larger than the whole spool, a disk
error, or shutdown while blocked on a full spool) is kept in memory only and
follows the memory rules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks.base import Batch, Sink
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.spool import Spool, SpoolRef, encode_frame

log = logging.getLogger("shipper.delivery")


@dataclass(slots=True)
class _Item:
    """One queued batch: in memory, on disk, or both."""

    batch: Batch | None  # None: spilled; read back from the spool when its turn comes
    ref: SpoolRef | None  # None: memory only
    records: int


class Delivery:
    """Queue (+ optional spool) + worker for one sink."""

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        *,
        max_batches: int,
        overflow: str,
        retry: RetryPolicy,
        spool: Spool | None = None,
    ) -> None:
        if overflow not in ("block", "drop_newest", "drop_oldest"):
            raise ValueError(f"unknown overflow policy {overflow!r}")
        self.sink = sink
        self.metrics = metrics
        self.max_batches = max_batches
        self.overflow = overflow
        self.retry = retry
        self.spool = spool
        self._q: deque[_Item] = deque()
        self._in_memory = 0  # queued items holding their batch in memory
        self._cond = threading.Condition()
        self._submit_lock = threading.Lock()  # keeps spool order == queue order
        self._closing = False  # no more submits; drain what is queued
        self._abort = threading.Event()  # grace period over: stop retrying
        self._thread = threading.Thread(target=self._run, name=f"deliver-{sink.name}", daemon=True)
        self._warned_too_large = False

    def start(self) -> None:
        """Recover the spool (its batches are delivered first, in order), start the worker.

        Raises SinkError (not retriable) if the spool directory cannot be used.
        """
        if self.spool is not None:
            try:
                refs = self.spool.recover()
            except OSError as exc:
                raise SinkError(f"cannot open the spool in {self.spool.dir}: "
                                f"{exc.strerror or exc}", retriable=False) from exc
            with self._cond:
                self._q.extendleft(_Item(None, r, r.records) for r in reversed(refs))
                self._gauge()
        self._thread.start()

    def pending_records(self) -> int:
        """Records queued (not counting the batch being delivered)."""
        with self._cond:
            return sum(i.records for i in self._q)

    # --- the event path ---------------------------------------------------------------

    def submit(self, batch: Batch, stop: threading.Event | None = None) -> None:
        """Queue a closed batch (spooling it first if there is a spool).

        Without a spool, a full queue applies the overflow policy. With ``block``
        (for the queue, or for a full spool) this waits for room: the caller stops
        reading, the kernel then drops events and that shows up as an overrun. It
        returns early only if ``stop`` is set, in which case the batch is still
        queued (in memory only, when the spool had no room).
        """
        if not batch.entries:
            return
        if self.spool is None:
            self._submit_memory(batch, stop)
            return
        with self._submit_lock:
            ref = self._spool_append(self.spool, batch, stop)
            if ref is None:
                self._submit_memory(batch, stop)
                return
            with self._cond:
                keep = self._in_memory < self.max_batches
                self._q.append(_Item(batch if keep else None, ref, len(batch)))
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
            if (stop is not None and stop.is_set()) or not self._thread.is_alive():
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
            kept: deque[_Item] = deque()
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
            self._count_drop(dropped, "spool_full")
        return True

    def _submit_memory(self, batch: Batch, stop: threading.Event | None) -> None:
        with self._cond:
            if self._in_memory >= self.max_batches:
                if self.overflow == "drop_newest":
                    self._count_drop(len(batch), "queue_full")
                    return
                if self.overflow == "drop_oldest":
                    self._drop_oldest_memory()
                else:
                    while self._in_memory >= self.max_batches and not (stop and stop.is_set()):
                        if not self._thread.is_alive():
                            break
                        self._cond.wait(0.05)
            self._q.append(_Item(batch, None, len(batch)))
            self._in_memory += 1
            self._gauge()
            self._cond.notify_all()

    def _drop_oldest_memory(self) -> None:
        for i, item in enumerate(self._q):
            if item.ref is None and item.batch is not None:
                del self._q[i]
                self._in_memory -= 1
                self._count_drop(item.records, "queue_full")
                return

    def _count_drop(self, records: int, reason: str) -> None:
        self.metrics.inc("shipper_records_dropped_total", reason, n=records)
        log.warning(
            "records dropped",
            extra={"fields": {"reason": reason, "records": records, "sink": self.sink.name}},
        )

    def _gauge(self) -> None:
        self.metrics.set("shipper_queue_batches", len(self._q))

    # --- the worker -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._closing:
                    self._cond.wait()
                if not self._q:
                    return
                item = self._q.popleft()
                self._in_memory -= item.batch is not None
                self._gauge()
                self._cond.notify_all()
            batch = item.batch
            if batch is None and item.ref is not None and self.spool is not None:
                try:
                    batch = self.spool.read(item.ref)
                    reason = "spool_full"  # None: its segment was dropped while in flight
                except ValueError as exc:
                    log.error("spooled batch lost", extra={"fields": {"error": str(exc)}})
                    reason = "spool_corrupt"
                if batch is None:
                    self._count_drop(item.records, reason)
                    self.spool.commit(item.ref)
                    continue
            assert batch is not None
            if self._deliver_one(batch):
                if item.ref is not None and self.spool is not None:
                    self.spool.commit(item.ref)
                    with self._cond:
                        self._cond.notify_all()  # space may have been freed
                continue
            # Grace period over: spooled batches stay for the next start, the rest is lost.
            with self._cond:
                left = [item, *self._q]
                self._q.clear()
                self._in_memory = 0
                self._gauge()
            self._leave(left)
            return

    def _leave(self, items: list[_Item]) -> None:
        lost = sum(i.records for i in items if i.ref is None)
        kept = sum(i.records for i in items if i.ref is not None)
        if lost:
            self._count_drop(lost, "shutdown")
        if kept:
            log.info("records left in the spool for the next start",
                     extra={"fields": {"records": kept, "sink": self.sink.name}})

    def _deliver_one(self, batch: Batch) -> bool:
        """Deliver with retries; True when done (shipped, or dropped and counted),
        False when the grace period ended first."""
        attempt = 0
        name = self.sink.name
        while True:
            try:
                left_out = self.sink.deliver(batch)
            except SinkError as exc:
                if not exc.retriable:
                    log.error("batch rejected by sink", extra={"fields": {
                        "sink": name, "error": str(exc), "records": len(batch)}})
                    self.metrics.inc("shipper_errors_total", "sink", type(exc).__name__)
                    self._count_drop(len(batch), "rejected")
                    return True
                attempt += 1
                if self.retry.gives_up(attempt):
                    self._count_drop(len(batch), "retries_exhausted")
                    return True
                if self._abort.is_set():
                    return False
                self.metrics.inc("shipper_delivery_retries_total", name, _short(exc))
                self.metrics.inc("shipper_records_retried_total", name, n=len(batch))
                delay = self.retry.delay(attempt)
                log.warning("delivery failed, will retry", extra={"fields": {
                    "sink": name, "error": str(exc), "attempt": attempt,
                    "retry_in_s": round(delay, 3)}})
                if self._abort.wait(delay):
                    return False
                continue
            except Exception as exc:  # a sink bug must not kill delivery silently
                log.exception("sink raised an unexpected error", extra={"fields": {"sink": name}})
                self.metrics.inc("shipper_errors_total", "sink", type(exc).__name__)
                self._count_drop(len(batch), "sink_error")
                return True
            n = len(batch)
            for reason, k in (left_out or {}).items():  # records the sink refused to send
                self._count_drop(k, reason)
                n -= k
            self.metrics.inc("shipper_records_shipped_total", name, n=n)
            self.metrics.inc("shipper_batches_shipped_total", name)
            self.metrics.observe(
                "shipper_batch_latency_seconds", time.monotonic() - batch.opened_mono, name
            )
            return True

    # --- shutdown ---------------------------------------------------------------------

    def close(self, grace_s: float) -> bool:
        """Deliver what is queued within ``grace_s``, then stop; True if all was delivered.

        Whatever is still queued when the grace period ends is counted as dropped
        with reason ``shutdown`` - except spooled batches, which stay in the spool.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(grace_s)
        clean = not self._thread.is_alive()
        if not clean:
            self._abort.set()
            try:  # interrupts a deliver blocked on the network
                self.sink.abort()
            except Exception:
                log.exception("aborting sink failed", extra={"fields": {"sink": self.sink.name}})
            self._thread.join(5.0)
        else:
            with self._cond:  # worker never started
                left = list(self._q)
                self._q.clear()
                self._in_memory = 0
            if left:
                self._leave(left)
                clean = False
        try:
            self.sink.close()
        except Exception:
            log.exception("closing sink failed", extra={"fields": {"sink": self.sink.name}})
        if self.spool is not None:
            try:
                self.spool.close()
            except OSError:
                log.exception("closing spool failed")
        return clean


def _short(exc: SinkError) -> str:
    """A low-cardinality label for an error (the exception's cause type, not its text)."""
    cause = exc.__cause__
    return type(cause).__name__ if cause is not None else type(exc).__name__
