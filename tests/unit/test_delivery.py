"""Delivery: queue, worker, retries, counting rules, and the disk spool integration."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shipper.delivery import Delivery
from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks.base import Batch
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.spool import Spool

FAST = RetryPolicy(initial_s=0.005, max_s=0.02)


class FakeSink:
    """Records delivered batches; ``fail`` decides per call: None, or the SinkError to raise.
    ``gate`` (when cleared) makes deliver wait, like a slow receiver."""

    name = "fake"
    entry_format = "ndjson"
    acknowledged = True

    def __init__(self) -> None:
        self.delivered: list[Batch] = []
        self.calls = 0
        self.fail: Callable[[int], SinkError | None] = lambda _n: None
        self.gate = threading.Event()
        self.gate.set()
        self.closed = False
        self.aborted = False

    def encode(self, record: dict[str, object], time_ns: int) -> bytes:
        return repr(record).encode()

    def deliver(self, batch: Batch) -> None:
        self.calls += 1
        while not self.gate.wait(0.01):
            if self.aborted:
                raise SinkError("aborted", retriable=True)
        err = self.fail(self.calls)
        if err is not None:
            raise err
        self.delivered.append(batch)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def seqs(self) -> list[int]:
        return [b.seq for b in self.delivered]


def _batch(seq: int, n: int = 2) -> Batch:
    entries = [f"{seq}.{i}".encode() for i in range(n)]
    return Batch(seq=seq, entries=entries, times=[seq] * n, nbytes=sum(map(len, entries)),
                 opened_mono=time.monotonic())


def _wait(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def _delivery(sink: FakeSink, m: Metrics, **kw: object) -> Delivery:
    args: dict[str, object] = {"max_batches": 4, "overflow": "block", "retry": FAST}
    args.update(kw)
    return Delivery(sink, m, **args)  # type: ignore[arg-type]


def _spool(d: Path, m: Metrics, **kw: object) -> Spool:
    args: dict[str, object] = {"max_bytes": 1 << 20, "segment_bytes": 4096, "fsync": False,
                               "sink_name": "fake"}
    args.update(kw)
    return Spool(d, metrics=m, **args)  # type: ignore[arg-type]


class TestMemoryQueue:
    def test_delivers_in_order_and_counts_shipped(self) -> None:
        """Batches are delivered in submit order; records counted shipped after deliver."""
        sink, m = FakeSink(), Metrics()
        d = _delivery(sink, m)
        d.start()
        for i in range(10):
            d.submit(_batch(i))
        assert d.close(5) is True
        assert sink.seqs() == list(range(10)) and sink.closed
        assert m.value("shipper_records_shipped_total", "fake") == 20
        assert m.value("shipper_batches_shipped_total", "fake") == 10

    def test_retry_is_not_a_drop(self) -> None:
        """A retriable failure is retried and counted as a retry, not a drop."""
        sink, m = FakeSink(), Metrics()
        sink.fail = lambda n: SinkError("down", retriable=True) if n <= 3 else None
        d = _delivery(sink, m)
        d.start()
        d.submit(_batch(1))
        assert d.close(5)
        assert sink.seqs() == [1]
        assert m.value("shipper_delivery_retries_total", "fake", "SinkError") == 3
        assert m.value("shipper_records_retried_total", "fake") == 6
        assert m.total("shipper_records_dropped_total") == 0

    def test_non_retriable_is_dropped_as_rejected(self) -> None:
        """A non-retriable error drops the batch with reason rejected; the next goes on."""
        sink, m = FakeSink(), Metrics()
        sink.fail = lambda n: SinkError("bad", retriable=False) if n == 1 else None
        d = _delivery(sink, m)
        d.start()
        d.submit(_batch(1))
        d.submit(_batch(2))
        assert d.close(5)
        assert sink.seqs() == [2]
        assert m.value("shipper_records_dropped_total", "rejected") == 2

    def test_retries_exhausted(self) -> None:
        """Past max_retries the batch is dropped with reason retries_exhausted."""
        sink, m = FakeSink(), Metrics()
        sink.fail = lambda n: SinkError("down", retriable=True)
        d = _delivery(sink, m, retry=RetryPolicy(0.001, 0.002, max_retries=2))
        d.start()
        d.submit(_batch(1))
        assert d.close(5)
        assert sink.calls == 3
        assert m.value("shipper_records_dropped_total", "retries_exhausted") == 2

    def test_sink_bug_is_counted(self) -> None:
        """An unexpected exception from the sink drops the batch as sink_error."""
        sink, m = FakeSink(), Metrics()

        def boom(_n: int) -> SinkError | None:
            raise RuntimeError("bug")

        sink.fail = boom
        d = _delivery(sink, m)
        d.start()
        d.submit(_batch(1))
        assert d.close(5)
        assert m.value("shipper_records_dropped_total", "sink_error") == 2

    @pytest.mark.parametrize(("policy", "kept"), [("drop_newest", [0, 1, 2, 3, 4]),
                                                  ("drop_oldest", [0, 4, 5, 6, 7])])
    def test_overflow_drop_policies(self, policy: str, kept: list[int]) -> None:
        """A full queue drops the newest or the oldest batch and counts queue_full."""
        sink, m = FakeSink(), Metrics()
        sink.gate.clear()
        d = _delivery(sink, m, overflow=policy)
        d.start()
        d.submit(_batch(0))
        _wait(lambda: sink.calls == 1)  # batch 0 in flight
        for i in range(1, 8):
            d.submit(_batch(i))
        sink.gate.set()
        assert d.close(5)
        assert sink.seqs() == kept
        assert m.value("shipper_records_dropped_total", "queue_full") == 6

    def test_block_waits_and_stop_releases(self) -> None:
        """With block, submit waits for room; a set stop event lets it return (still queued)."""
        sink, m = FakeSink(), Metrics()
        sink.gate.clear()
        d = _delivery(sink, m, max_batches=1)
        d.start()
        d.submit(_batch(0))
        _wait(lambda: sink.calls == 1)
        d.submit(_batch(1))
        stop = threading.Event()
        t = threading.Thread(target=d.submit, args=(_batch(2), stop))
        t.start()
        t.join(0.1)
        assert t.is_alive()  # blocked
        stop.set()
        t.join(5)
        assert not t.is_alive()
        sink.gate.set()
        assert d.close(5)
        assert sink.seqs() == [0, 1, 2]

    def test_grace_over_drops_memory_batches(self) -> None:
        """Batches still queued when the grace period ends are dropped as shutdown; the sink is
        aborted and closed."""
        sink, m = FakeSink(), Metrics()
        sink.fail = lambda n: SinkError("down", retriable=True)
        d = _delivery(sink, m)
        d.start()
        for i in range(3):
            d.submit(_batch(i))
        assert d.close(0.1) is False
        assert m.value("shipper_records_dropped_total", "shutdown") == 6
        assert sink.aborted and sink.closed

    def test_close_without_start(self) -> None:
        """Closing a delivery whose worker never started drops what was queued."""
        sink, m = FakeSink(), Metrics()
        d = _delivery(sink, m)
        d.submit(_batch(1))
        assert d.close(0.1) is False
        assert m.value("shipper_records_dropped_total", "shutdown") == 2

    def test_empty_batch_ignored(self) -> None:
        """An empty batch is not queued."""
        d = _delivery(FakeSink(), Metrics())
        d.submit(Batch(seq=1))
        assert d.pending_records() == 0

    def test_bad_policy(self) -> None:
        """An unknown overflow policy is refused."""
        with pytest.raises(ValueError):
            _delivery(FakeSink(), Metrics(), overflow="explode")


class TestSpooled:
    def test_spooled_before_queued_and_removed_after_delivery(self, tmp_path: Path) -> None:
        """Each batch is in the spool before delivery and gone from it after."""
        sink, m = FakeSink(), Metrics()
        sink.gate.clear()
        d = _delivery(sink, m, spool=_spool(tmp_path, m))
        d.start()
        for i in range(3):
            d.submit(_batch(i))
        assert m.value("shipper_spool_pending_batches") == 3
        sink.gate.set()
        assert d.close(5)
        assert sink.seqs() == [0, 1, 2]
        assert m.value("shipper_spool_pending_batches") == 0
        assert m.value("shipper_spool_batches_total", "spooled") == 3
        assert m.value("shipper_spool_batches_total", "removed") == 3

    def test_spill_to_disk_keeps_order(self, tmp_path: Path) -> None:
        """Past max_batches in memory, batches wait on disk only and are read back in order."""
        sink, m = FakeSink(), Metrics()
        sink.gate.clear()
        d = _delivery(sink, m, max_batches=2, spool=_spool(tmp_path, m))
        d.start()
        for i in range(20):
            d.submit(_batch(i))  # never blocks: the spool has room
        assert m.value("shipper_spool_pending_batches") == 20
        sink.gate.set()
        assert d.close(10)
        assert sink.seqs() == list(range(20))
        assert m.value("shipper_spool_batches_total", "replayed") >= 16
        assert m.total("shipper_records_dropped_total") == 0

    def test_shutdown_leaves_batches_in_spool_and_restart_replays_first(
        self, tmp_path: Path
    ) -> None:
        """At grace end spooled batches stay (not dropped); the next start delivers them first,
        in order, before new batches."""
        sink, m = FakeSink(), Metrics()
        sink.fail = lambda n: SinkError("down", retriable=True)
        d = _delivery(sink, m, spool=_spool(tmp_path, m))
        d.start()
        for i in range(5):
            d.submit(_batch(i))
        assert d.close(0.1) is False
        assert m.total("shipper_records_dropped_total") == 0

        sink2, m2 = FakeSink(), Metrics()
        d2 = _delivery(sink2, m2, spool=_spool(tmp_path, m2))
        d2.start()
        d2.submit(_batch(100))
        assert d2.close(5)
        assert sink2.seqs() == [0, 1, 2, 3, 4, 100]
        assert m2.value("shipper_spool_batches_total", "replayed") == 5
        assert m2.value("shipper_spool_pending_batches") == 0

    def test_full_spool_blocks_until_space(self, tmp_path: Path) -> None:
        """With the block policy a full spool makes submit wait until delivery frees space."""
        sink, m = FakeSink(), Metrics()
        sink.gate.clear()
        sp = _spool(tmp_path, m, max_bytes=64 * 1024, segment_bytes=4096)
        d = _delivery(sink, m, spool=sp)
        d.start()
        big = [_batch(i, n=40) for i in range(200)]
        done = threading.Event()

        def produce() -> None:
            for b in big:
                d.submit(b)
            done.set()

        t = threading.Thread(target=produce)
        t.start()
        _wait(lambda: not sp.has_room(2000))
        assert not done.is_set()
        sink.gate.set()
        t.join(10)
        assert done.is_set()
        assert d.close(10)
        assert sink.seqs() == list(range(200))
        assert m.total("shipper_records_dropped_total") == 0

    def test_full_spool_blocked_then_stop_keeps_batch_in_memory(self, tmp_path: Path) -> None:
        """Blocked on a full spool, a set stop event queues the batch in memory only."""
        sink, m = FakeSink(), Metrics()
        sink.gate.clear()
        sp = _spool(tmp_path, m, max_bytes=64 * 1024, segment_bytes=4096)
        d = _delivery(sink, m, spool=sp)
        d.start()
        i = 0
        while sp.has_room(1000):
            d.submit(_batch(i, n=40))
            i += 1
        stop = threading.Event()
        stop.set()
        d.submit(_batch(i, n=40), stop)
        sink.gate.set()
        assert d.close(10)
        assert sink.seqs() == list(range(i + 1))

    def test_full_spool_drop_oldest_counts(self, tmp_path: Path) -> None:
        """With drop_oldest a full spool drops its oldest segment, counting spool_full; the
        rest is delivered in order."""
        sink, m = FakeSink(), Metrics()
        sink.gate.clear()
        sp = _spool(tmp_path, m, max_bytes=64 * 1024, segment_bytes=4096,
                    full_policy="drop_oldest")
        d = _delivery(sink, m, spool=sp)
        d.start()
        for i in range(200):
            d.submit(_batch(i, n=40))
        sink.gate.set()
        assert d.close(10)
        dropped = m.value("shipper_records_dropped_total", "spool_full")
        shipped = m.value("shipper_records_shipped_total", "fake")
        assert dropped > 0 and dropped + shipped == 200 * 40
        assert sink.seqs() == sorted(sink.seqs())
        assert sink.seqs()[-1] == 199

    def test_batch_larger_than_spool_goes_memory_only(self, tmp_path: Path) -> None:
        """A batch that could never fit the spool is delivered from memory."""
        sink, m = FakeSink(), Metrics()
        d = _delivery(sink, m, spool=_spool(tmp_path, m, max_bytes=64 * 1024))
        d.start()
        huge = Batch(seq=1, entries=[b"x" * 70000], times=[1], nbytes=70000)
        d.submit(huge)
        assert d.close(5)
        assert sink.seqs() == [1]
        assert m.value("shipper_spool_batches_total", "spooled") == 0

    def test_unreadable_spooled_batch_is_counted(self, tmp_path: Path) -> None:
        """A spilled batch that cannot be read back is dropped as spool_corrupt."""
        sink, m = FakeSink(), Metrics()
        sink.gate.clear()
        d = _delivery(sink, m, max_batches=1, spool=_spool(tmp_path, m))
        d.start()
        d.submit(_batch(0))
        _wait(lambda: sink.calls == 1)
        d.submit(_batch(1))  # in memory
        d.submit(_batch(2))  # spilled: disk only
        seg = sorted(tmp_path.glob("*.seg"))[-1]
        data = bytearray(seg.read_bytes())
        data[-1] ^= 0xFF
        seg.write_bytes(bytes(data))
        sink.gate.set()
        assert d.close(5)
        assert sink.seqs() == [0, 1]
        assert m.value("shipper_records_dropped_total", "spool_corrupt") == 2

    def test_unusable_spool_dir_is_a_clear_start_error(self, tmp_path: Path) -> None:
        """A spool directory that cannot be created fails start() with a non-retriable error."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        m = Metrics()
        d = _delivery(FakeSink(), m, spool=_spool(blocker / "spool", m))
        with pytest.raises(SinkError, match="cannot open the spool") as ei:
            d.start()
        assert not ei.value.retriable


class TestStartLog:
    def test_start_log_says_whether_shipped_means_acknowledged(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Starting delivery logs the sink and its declared acknowledged capability."""
        sink, m = FakeSink(), Metrics()
        d = _delivery(sink, m)
        with caplog.at_level("INFO", logger="shipper.delivery"):
            d.start()
        assert d.close(5)
        (rec,) = [r for r in caplog.records if r.getMessage() == "delivery started"]
        fields = rec.fields  # type: ignore[attr-defined]
        assert fields["sink"] == "fake" and fields["acknowledged"] is True
        assert fields["spool"] is None
