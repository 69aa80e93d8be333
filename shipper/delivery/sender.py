"""The delivery sender: hands one batch to the sink, retries, and accounts for it.

Vector's "service" half of a sink, Fluent Bit's engine-owned retry schedule: the
sink only says whether a failure is retriable (``SinkError.retriable``); the shared
:class:`~shipper.sinks.retry.RetryPolicy` decides how long to wait and when to give
up. Accounting (the counting rules of :mod:`shipper.delivery`):

* a record is *shipped* only when ``sink.deliver`` returned (the sink's
  confirmation: written, or acknowledged by the receiver when the sink declares
  ``acknowledged``); records the sink returns by reason (left out on purpose, the
  syslog sink's ``too_large``) are counted dropped with that reason instead;
* a retry is counted as a retry (``shipper_delivery_retries_total``,
  ``shipper_records_retried_total``), never as a drop;
* a batch that will never be delivered is counted dropped: ``rejected``
  (non-retriable ``SinkError``), ``retries_exhausted``, ``sink_error`` (the sink
  raised something other than ``SinkError``: a bug must not kill delivery silently).

:meth:`Sender.abort` ends a send in progress (shutdown grace over): the backoff wait
stops and the sink's own ``abort`` interrupts a ``deliver`` blocked on the network.
"""

from __future__ import annotations

import logging
import threading
import time

from shipper.delivery.drops import count_dropped
from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks.base import Batch, Sink
from shipper.sinks.retry import RetryPolicy

log = logging.getLogger("shipper.delivery")


class Sender:
    """Delivers batches to one sink with retries; called from one worker thread."""

    def __init__(self, sink: Sink, metrics: Metrics, retry: RetryPolicy) -> None:
        self.sink = sink
        self.metrics = metrics
        self.retry = retry
        self._abort = threading.Event()

    def send(self, batch: Batch) -> bool:
        """Deliver with retries; True when done (shipped, or dropped and counted),
        False when :meth:`abort` came first (the batch is neither shipped nor counted)."""
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
                    count_dropped(self.metrics, name, len(batch), "rejected")
                    return True
                attempt += 1
                if self.retry.gives_up(attempt):
                    count_dropped(self.metrics, name, len(batch), "retries_exhausted")
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
                count_dropped(self.metrics, name, len(batch), "sink_error")
                return True
            n = len(batch)
            for reason, k in (left_out or {}).items():  # records the sink refused to send
                count_dropped(self.metrics, name, k, reason)
                n -= k
            self.metrics.inc("shipper_records_shipped_total", name, n=n)
            self.metrics.inc("shipper_batches_shipped_total", name)
            self.metrics.observe(
                "shipper_batch_latency_seconds", time.monotonic() - batch.opened_mono, name
            )
            return True

    def abort(self) -> None:
        """Stop retrying and interrupt a ``deliver`` in progress (from another thread)."""
        self._abort.set()
        try:
            self.sink.abort()
        except Exception:
            log.exception("aborting sink failed", extra={"fields": {"sink": self.sink.name}})


def _short(exc: SinkError) -> str:
    """A low-cardinality label for an error (the exception's cause type, not its text)."""
    cause = exc.__cause__
    return type(cause).__name__ if cause is not None else type(exc).__name__
