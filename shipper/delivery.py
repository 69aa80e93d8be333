"""Delivery: the bounded queue in front of a sink, and the worker that drains it.

The event path calls :meth:`Delivery.submit` with closed batches; one worker
thread hands them to the sink in order, retrying retriable failures with the
shared :class:`~shipper.sinks.retry.RetryPolicy`. Counting rules:

* a record is *shipped* only when ``sink.deliver`` returned (the sink's
  confirmation: written, or acknowledged by the receiver);
* a retry is counted as a retry, never as a drop;
* every record that was accepted and will never be delivered is counted in
  ``shipper_records_dropped_total`` with its reason: ``queue_full`` (the
  overflow policy dropped it), ``rejected`` (non-retriable sink error),
  ``retries_exhausted``, ``shutdown`` (still queued when the grace period
  ended).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks.base import Batch, Sink
from shipper.sinks.retry import RetryPolicy

log = logging.getLogger("shipper.delivery")


class Delivery:
    """Queue + worker for one sink."""

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        *,
        max_batches: int,
        overflow: str,
        retry: RetryPolicy,
    ) -> None:
        if overflow not in ("block", "drop_newest", "drop_oldest"):
            raise ValueError(f"unknown overflow policy {overflow!r}")
        self.sink = sink
        self.metrics = metrics
        self.max_batches = max_batches
        self.overflow = overflow
        self.retry = retry
        self._q: deque[Batch] = deque()
        self._cond = threading.Condition()
        self._closing = False  # no more submits; drain what is queued
        self._abort = threading.Event()  # grace period over: stop retrying
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=f"deliver-{sink.name}", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def pending_records(self) -> int:
        """Records queued (not counting the batch being delivered)."""
        with self._cond:
            return sum(len(b) for b in self._q)

    def submit(self, batch: Batch, stop: threading.Event | None = None) -> None:
        """Queue a closed batch; apply the overflow policy when the queue is full.

        With ``block`` this waits for room (the caller stops reading; the kernel
        then drops events and that shows up as an overrun), returning early
        only if ``stop`` is set, in which case the batch is still queued.
        """
        if not batch.entries:
            return
        with self._cond:
            if len(self._q) >= self.max_batches:
                if self.overflow == "drop_newest":
                    self._drop(batch, "queue_full")
                    return
                if self.overflow == "drop_oldest":
                    self._drop(self._q.popleft(), "queue_full")
                else:
                    while len(self._q) >= self.max_batches and not (stop and stop.is_set()):
                        if not self._thread.is_alive():
                            break
                        self._cond.wait(0.05)
            self._q.append(batch)
            self.metrics.set("shipper_queue_batches", len(self._q))
            self._cond.notify_all()

    def _drop(self, batch: Batch, reason: str) -> None:
        self.metrics.inc("shipper_records_dropped_total", reason, n=len(batch))
        log.warning(
            "records dropped",
            extra={"fields": {"reason": reason, "records": len(batch), "sink": self.sink.name}},
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._closing:
                    self._cond.wait()
                if not self._q:
                    return
                batch = self._q[0]
                self._busy = True
            delivered = self._deliver_one(batch)
            with self._cond:
                if self._q and self._q[0] is batch:
                    self._q.popleft()
                self._busy = False
                self.metrics.set("shipper_queue_batches", len(self._q))
                self._cond.notify_all()
                if not delivered and self._abort.is_set():
                    # Grace period over: everything still queued is lost.
                    self._drop(batch, "shutdown")
                    while self._q:
                        self._drop(self._q.popleft(), "shutdown")
                    return

    def _deliver_one(self, batch: Batch) -> bool:
        attempt = 0
        name = self.sink.name
        while True:
            try:
                self.sink.deliver(batch)
            except SinkError as exc:
                if not exc.retriable:
                    log.error("batch rejected by sink", extra={"fields": {
                        "sink": name, "error": str(exc), "records": len(batch)}})
                    self.metrics.inc("shipper_errors_total", "sink", type(exc).__name__)
                    self._drop(batch, "rejected")
                    return True
                attempt += 1
                if self.retry.gives_up(attempt):
                    self._drop(batch, "retries_exhausted")
                    return True
                if self._abort.is_set():
                    return False
                self.metrics.inc("shipper_delivery_retries_total", name, _short(exc))
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
                self._drop(batch, "sink_error")
                return True
            n = len(batch)
            self.metrics.inc("shipper_records_shipped_total", name, n=n)
            self.metrics.inc("shipper_batches_shipped_total", name)
            self.metrics.observe(
                "shipper_batch_latency_seconds", time.monotonic() - batch.opened_mono, name
            )
            return True

    def close(self, grace_s: float) -> bool:
        """Deliver what is queued within ``grace_s``, then stop; True if all was delivered.

        Whatever is still queued when the grace period ends is counted as
        dropped with reason ``shutdown``.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(grace_s)
        clean = not self._thread.is_alive()
        if not clean:
            self._abort.set()
            self._thread.join(5.0)
        else:
            with self._cond:
                while self._q:  # worker never started
                    self._drop(self._q.popleft(), "shutdown")
                    clean = False
        try:
            self.sink.close()
        except Exception:
            log.exception("closing sink failed", extra={"fields": {"sink": self.sink.name}})
        return clean


def _short(exc: SinkError) -> str:
    """A low-cardinality label for an error (the exception's cause type, not its text)."""
    cause = exc.__cause__
    return type(cause).__name__ if cause is not None else type(exc).__name__
