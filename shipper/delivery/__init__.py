"""Delivery: a buffer and a sender for one sink, joined by one worker thread.

The event path calls :meth:`Delivery.submit` with closed batches (from one thread);
they go into the :class:`~shipper.delivery.buffer.DeliveryBuffer` (memory queue,
spool spill, overflow policy). One worker thread takes them out in order and hands
each to the :class:`~shipper.delivery.sender.Sender` (retries with backoff, the
sink's confirmation, accounting). This module only joins the two and owns the
worker's life: start, and shutdown within a grace period.

Counting rules: a record is *shipped* only when ``sink.deliver`` returned; a retry
is counted as a retry, never as a drop; every record that was accepted and will
never be delivered is counted in ``shipper_records_dropped_total`` with its reason:

* by the buffer: ``queue_full`` (the overflow policy dropped it), ``spool_full``
  (the spool's ``drop_oldest`` policy dropped it), ``spool_corrupt`` (a spooled
  batch could not be read back), ``shutdown`` (memory-only and still queued when
  the grace period ended);
* by the sender: ``rejected`` (non-retriable sink error), ``retries_exhausted``,
  ``sink_error`` (the sink raised something other than SinkError), or a reason the
  sink gave for records it left out of a delivered batch (``deliver`` returns them
  by reason; the syslog sink's ``too_large``);
* by the spool itself: ``spool_incompatible`` (written for another sink).

With a spool, batches not delivered within the grace period stay in it: they are
replayed at the next start, first and in order, and not counted as dropped.
"""

from __future__ import annotations

import logging
import threading

from shipper.delivery.buffer import DeliveryBuffer
from shipper.delivery.sender import Sender
from shipper.metrics import Metrics
from shipper.sinks.base import Batch, Sink
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.spool import Spool

__all__ = ["Delivery", "DeliveryBuffer", "Sender"]

log = logging.getLogger("shipper.delivery")


class Delivery:
    """Buffer (+ optional spool) + sender + worker thread for one sink."""

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
        self.sink = sink
        self.metrics = metrics
        self._thread = threading.Thread(target=self._run, name=f"deliver-{sink.name}",
                                        daemon=True)
        # A blocked submit stops waiting once the worker is gone: nobody makes room then.
        self.buffer = DeliveryBuffer(metrics, sink.name, max_batches=max_batches,
                                     overflow=overflow, spool=spool,
                                     consumer_alive=self._thread.is_alive)
        self.sender = Sender(sink, metrics, retry)

    def start(self) -> None:
        """Recover the spool (its batches are delivered first, in order), start the worker.

        Raises SinkError (not retriable) if the spool directory cannot be used.
        """
        self.buffer.recover()
        self._thread.start()
        spool = self.buffer.spool
        # What "shipped" will mean here: confirmed by the receiver, or handed to the OS.
        log.info("delivery started", extra={"fields": {
            "sink": self.sink.name, "acknowledged": self.sink.acknowledged,
            "spool": str(spool.dir) if spool is not None else None,
            "queue_max_batches": self.buffer.max_batches, "overflow": self.buffer.overflow}})

    def pending_records(self) -> int:
        """Records queued (not counting the batch being delivered)."""
        return self.buffer.pending_records()

    def submit(self, batch: Batch, stop: threading.Event | None = None) -> None:
        """Queue a closed batch (spooling it first if there is a spool).

        Without a spool, a full queue applies the overflow policy. With ``block``
        (for the queue, or for a full spool) this waits for room: the caller stops
        reading, the kernel then drops events and that shows up as an overrun. It
        returns early only if ``stop`` is set, in which case the batch is still
        queued (in memory only, when the spool had no room).
        """
        self.buffer.put(batch, stop)

    def _run(self) -> None:
        while (item := self.buffer.take()) is not None:
            assert item.batch is not None
            if not self.sender.send(item.batch):
                self.buffer.abandon(item)  # grace period over
                return
            self.buffer.done(item)

    def close(self, grace_s: float) -> bool:
        """Deliver what is queued within ``grace_s``, then stop; True if all was delivered.

        Whatever is still queued when the grace period ends is counted as dropped
        with reason ``shutdown`` - except spooled batches, which stay in the spool.
        """
        self.buffer.close_input()
        if self._thread.is_alive():
            self._thread.join(grace_s)
        clean = not self._thread.is_alive()
        if not clean:
            self.sender.abort()  # stops the backoff; the sink interrupts a blocked deliver
            self._thread.join(5.0)
        elif self.buffer.abandon():  # the worker never started: nothing was delivered
            clean = False
        try:
            self.sink.close()
        except Exception:
            log.exception("closing sink failed", extra={"fields": {"sink": self.sink.name}})
        self.buffer.close()
        return clean
