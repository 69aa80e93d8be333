"""DeliveryBuffer: memory queue, overflow policy, spool spill, and the drops they count."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shipper.delivery.buffer import DeliveryBuffer
from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks.base import Batch
from shipper.sinks.spool import Spool


def _batch(seq: int, n: int = 2) -> Batch:
    entries = [f"{seq}.{i}".encode() for i in range(n)]
    return Batch(seq=seq, entries=entries, times=[seq] * n, nbytes=sum(map(len, entries)))


def _buffer(m: Metrics, **kw: object) -> DeliveryBuffer:
    args: dict[str, object] = {"max_batches": 2, "overflow": "block"}
    args.update(kw)
    return DeliveryBuffer(m, "fake", **args)  # type: ignore[arg-type]


def _spool(d: Path, m: Metrics) -> Spool:
    return Spool(d, max_bytes=1 << 20, segment_bytes=4096, fsync=False, sink_name="fake",
                 metrics=m)


def _drain(buf: DeliveryBuffer) -> list[int]:
    """Seqs of everything queued, marking each done (close_input first so take ends)."""
    buf.close_input()
    seqs = []
    while (item := buf.take()) is not None:
        assert item.batch is not None
        seqs.append(item.batch.seq)
        buf.done(item)
    return seqs


class TestMemoryQueue:
    def test_take_returns_batches_in_put_order_then_none_when_closed(self) -> None:
        """Batches come out in put order; after close_input an empty queue yields None."""
        m = Metrics()
        buf = _buffer(m, max_batches=10)
        for i in range(5):
            buf.put(_batch(i))
        assert buf.pending_records() == 10
        assert m.value("shipper_queue_batches") == 5
        assert _drain(buf) == [0, 1, 2, 3, 4]
        assert m.value("shipper_queue_batches") == 0

    @pytest.mark.parametrize(("policy", "kept"), [("drop_newest", [0, 1]),
                                                  ("drop_oldest", [2, 3])])
    def test_full_queue_applies_the_drop_policy(self, policy: str, kept: list[int]) -> None:
        """Past max_batches the newest or the oldest batch is dropped as queue_full."""
        m = Metrics()
        buf = _buffer(m, overflow=policy)
        for i in range(4):
            buf.put(_batch(i))
        assert m.value("shipper_records_dropped_total", "queue_full") == 4
        assert _drain(buf) == kept

    def test_block_waits_for_the_consumer_and_stop_releases(self) -> None:
        """With block a full queue makes put wait while the consumer lives; a set stop
        event ends the wait and the batch is still queued."""
        buf = _buffer(Metrics(), max_batches=1)
        buf.put(_batch(0))
        stop = threading.Event()
        t = threading.Thread(target=buf.put, args=(_batch(1), stop))
        t.start()
        t.join(0.1)
        assert t.is_alive()
        stop.set()
        t.join(5)
        assert not t.is_alive()
        assert _drain(buf) == [0, 1]

    def test_block_does_not_wait_without_a_consumer(self) -> None:
        """With no live consumer nobody makes room, so a blocking put queues at once."""
        buf = _buffer(Metrics(), max_batches=1, consumer_alive=lambda: False)
        buf.put(_batch(0))
        buf.put(_batch(1))
        assert _drain(buf) == [0, 1]

    def test_abandon_counts_memory_batches_as_shutdown(self) -> None:
        """abandon drops the in-flight and queued memory batches as shutdown."""
        m = Metrics()
        buf = _buffer(m, max_batches=10)
        for i in range(3):
            buf.put(_batch(i))
        item = buf.take()
        assert buf.abandon(item) is True
        assert m.value("shipper_records_dropped_total", "shutdown") == 6
        assert buf.pending_records() == 0
        assert buf.abandon() is False

    def test_empty_batch_and_bad_policy(self) -> None:
        """An empty batch is not queued; an unknown overflow policy is refused."""
        buf = _buffer(Metrics())
        buf.put(Batch(seq=1))
        assert buf.pending_records() == 0
        with pytest.raises(ValueError, match="explode"):
            _buffer(Metrics(), overflow="explode")


class TestSpool:
    def test_spills_past_max_batches_and_reads_back_in_order(self, tmp_path: Path) -> None:
        """Past max_batches batches stay on disk only; take reads them back in order and
        done removes each from the spool."""
        m = Metrics()
        buf = _buffer(m, spool=_spool(tmp_path, m))
        buf.recover()
        for i in range(6):
            buf.put(_batch(i))
        assert m.value("shipper_spool_pending_batches") == 6
        assert _drain(buf) == list(range(6))
        assert m.value("shipper_spool_batches_total", "replayed") == 4
        assert m.value("shipper_spool_pending_batches") == 0
        assert m.total("shipper_records_dropped_total") == 0

    def test_abandon_keeps_spooled_batches_for_recover(self, tmp_path: Path) -> None:
        """Abandoned spooled batches are not dropped; the next buffer recovers them first."""
        m = Metrics()
        buf = _buffer(m, spool=_spool(tmp_path, m))
        buf.recover()
        for i in range(3):
            buf.put(_batch(i))
        assert buf.abandon(buf.take()) is True
        assert m.total("shipper_records_dropped_total") == 0
        buf.close()

        m2 = Metrics()
        buf2 = _buffer(m2, spool=_spool(tmp_path, m2))
        buf2.recover()
        buf2.put(_batch(9))
        assert _drain(buf2) == [0, 1, 2, 9]

    def test_unreadable_spilled_batch_is_counted_and_skipped(self, tmp_path: Path) -> None:
        """A spilled batch whose frame is damaged is dropped as spool_corrupt; take goes on."""
        m = Metrics()
        buf = _buffer(m, max_batches=1, spool=_spool(tmp_path, m))
        buf.recover()
        buf.put(_batch(0))  # in memory
        buf.put(_batch(1))  # spilled: disk only
        seg = sorted(tmp_path.glob("*.seg"))[-1]
        data = bytearray(seg.read_bytes())
        data[-1] ^= 0xFF
        seg.write_bytes(bytes(data))
        assert _drain(buf) == [0]
        assert m.value("shipper_records_dropped_total", "spool_corrupt") == 2

    def test_unusable_spool_dir_is_a_clear_error(self, tmp_path: Path) -> None:
        """recover on a spool directory that cannot be created raises a non-retriable
        SinkError naming the directory."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        m = Metrics()
        buf = _buffer(m, spool=_spool(blocker / "spool", m))
        with pytest.raises(SinkError, match="cannot open the spool in") as ei:
            buf.recover()
        assert not ei.value.retriable
