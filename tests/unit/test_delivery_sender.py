"""Sender: one batch to the sink, retries with backoff, and the accounting of its outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from shipper.delivery.sender import Sender
from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks.base import Batch, EntryFormat
from shipper.sinks.retry import RetryPolicy

FAST = RetryPolicy(initial_s=0.001, max_s=0.002)


class ScriptedSink:
    """``outcome(call)`` decides each deliver: an exception to raise, or what to return."""

    name = "scripted"
    entry_format: EntryFormat = "ndjson"
    acknowledged = True

    def __init__(self, outcome: Callable[[int], object] = lambda _n: None) -> None:
        self.outcome = outcome
        self.calls = 0
        self.aborts = 0

    def encode(self, record: dict[str, object], time_ns: int) -> bytes:  # pragma: no cover
        raise AssertionError("not used")

    def deliver(self, batch: Batch) -> Mapping[str, int] | None:
        self.calls += 1
        out = self.outcome(self.calls)
        if isinstance(out, BaseException):
            raise out
        return out  # type: ignore[return-value]

    def abort(self) -> None:
        self.aborts += 1

    def close(self) -> None:  # pragma: no cover
        pass


def _batch(n: int = 3) -> Batch:
    entries = [b"x\n"] * n
    return Batch(seq=1, entries=entries, times=[1] * n, nbytes=2 * n,
                 opened_mono=time.monotonic())


def _retriable(cause: BaseException) -> SinkError:
    try:
        raise SinkError("down", retriable=True) from cause
    except SinkError as exc:
        return exc


class TestAccounting:
    def test_delivered_batch_is_counted_shipped(self) -> None:
        """deliver returning None: every record shipped, one batch, one latency sample."""
        m = Metrics()
        assert Sender(ScriptedSink(), m, FAST).send(_batch(3)) is True
        assert m.value("shipper_records_shipped_total", "scripted") == 3
        assert m.value("shipper_batches_shipped_total", "scripted") == 1
        assert m.histogram_count("shipper_batch_latency_seconds", "scripted") == 1
        assert m.total("shipper_records_dropped_total") == 0

    def test_records_left_out_are_dropped_by_reason_and_the_rest_shipped(self) -> None:
        """Records the sink returns by reason are counted dropped with it, not shipped."""
        m = Metrics()
        sink = ScriptedSink(lambda _n: {"too_large": 2})
        assert Sender(sink, m, FAST).send(_batch(5)) is True
        assert m.value("shipper_records_dropped_total", "too_large") == 2
        assert m.value("shipper_records_shipped_total", "scripted") == 3

    def test_non_retriable_error_drops_as_rejected(self) -> None:
        """A non-retriable SinkError is not retried: dropped as rejected, error counted."""
        m = Metrics()
        sink = ScriptedSink(lambda _n: SinkError("bad", retriable=False))
        assert Sender(sink, m, FAST).send(_batch(3)) is True
        assert sink.calls == 1
        assert m.value("shipper_records_dropped_total", "rejected") == 3
        assert m.value("shipper_errors_total", "sink", "SinkError") == 1
        assert m.value("shipper_records_shipped_total", "scripted") == 0

    def test_unexpected_exception_drops_as_sink_error(self) -> None:
        """A sink bug (not a SinkError) drops the batch as sink_error instead of escaping."""
        m = Metrics()
        sink = ScriptedSink(lambda _n: RuntimeError("bug"))
        assert Sender(sink, m, FAST).send(_batch(3)) is True
        assert m.value("shipper_records_dropped_total", "sink_error") == 3
        assert m.value("shipper_errors_total", "sink", "RuntimeError") == 1


class TestRetries:
    def test_retry_counted_by_cause_type_then_shipped(self) -> None:
        """Retriable failures are retried and counted as retries labelled with the cause's
        type; never as drops."""
        m = Metrics()
        sink = ScriptedSink(lambda n: _retriable(ConnectionRefusedError()) if n <= 2 else None)
        assert Sender(sink, m, FAST).send(_batch(3)) is True
        assert sink.calls == 3
        assert m.value("shipper_delivery_retries_total", "scripted",
                       "ConnectionRefusedError") == 2
        assert m.value("shipper_records_retried_total", "scripted") == 6
        assert m.total("shipper_records_dropped_total") == 0
        assert m.value("shipper_records_shipped_total", "scripted") == 3

    def test_gives_up_after_max_retries(self) -> None:
        """Past the policy's max_retries the batch is dropped as retries_exhausted."""
        m = Metrics()
        sink = ScriptedSink(lambda _n: SinkError("down", retriable=True))
        sender = Sender(sink, m, RetryPolicy(0.001, 0.002, max_retries=1))
        assert sender.send(_batch(3)) is True
        assert sink.calls == 2
        assert m.value("shipper_records_dropped_total", "retries_exhausted") == 3

    def test_abort_ends_the_backoff_without_counting(self) -> None:
        """abort() during a backoff wait makes send return False at once; the batch is
        neither shipped nor dropped, and the sink's own abort was called."""
        m = Metrics()
        sink = ScriptedSink(lambda _n: SinkError("down", retriable=True))
        sender = Sender(sink, m, RetryPolicy(initial_s=60.0, max_s=60.0))
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(sender.send(_batch(3))))
        t.start()
        deadline = time.monotonic() + 5
        while sink.calls == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        sender.abort()
        t.join(5)
        assert result == [False]
        assert sink.aborts == 1
        assert m.total("shipper_records_dropped_total") == 0
        assert m.value("shipper_records_shipped_total", "scripted") == 0

    def test_failing_sink_abort_is_contained(self) -> None:
        """An exception from the sink's abort is logged, not raised; the sender is still
        aborted (a later retriable failure is not retried)."""
        sink = ScriptedSink(lambda _n: SinkError("down", retriable=True))

        def broken() -> None:
            raise OSError("already closed")

        sink.abort = broken  # type: ignore[method-assign]
        sender = Sender(sink, Metrics(), FAST)
        sender.abort()
        assert sender.send(_batch(1)) is False
        assert sink.calls == 1
