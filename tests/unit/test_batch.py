"""Tests for shipper.batch: when an open batch closes."""

from __future__ import annotations

import pytest

from shipper.batch import Batcher
from shipper.sinks.base import Batch


def rec(n: int, size: int = 10) -> bytes:
    """An encoded record of ``size`` bytes, numbered ``n``."""
    head = f"{n}:".encode()
    return head + b"x" * (size - len(head))


class TestLimits:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"max_records": 0, "max_bytes": 10, "max_age_s": 1.0},
            {"max_records": 1, "max_bytes": 0, "max_age_s": 1.0},
            {"max_records": 1, "max_bytes": 10, "max_age_s": 0.0},
            {"max_records": 1, "max_bytes": 10, "max_age_s": -1.0},
        ],
    )
    def test_non_positive_limits_rejected(self, kwargs: dict[str, float]) -> None:
        """Every limit must be positive."""
        with pytest.raises(ValueError, match="positive"):
            Batcher(**kwargs)  # type: ignore[arg-type]


class TestCount:
    def test_closes_at_max_records(self) -> None:
        """The entry that reaches max_records closes the batch and it is returned at once."""
        b = Batcher(max_records=3, max_bytes=10_000, max_age_s=60)
        assert b.add(rec(1), 101, 0.0) == ()
        assert b.add(rec(2), 102, 0.1) == ()
        (batch,) = b.add(rec(3), 103, 0.2)
        assert batch.entries == [rec(1), rec(2), rec(3)]
        assert batch.times == [101, 102, 103]
        assert batch.nbytes == 30
        assert len(batch) == 3
        assert b.flush() is None
        assert b.deadline() is None

    def test_max_records_one(self) -> None:
        """With max_records 1 every entry is its own closed batch."""
        b = Batcher(max_records=1, max_bytes=10_000, max_age_s=60)
        out = [b.add(rec(i), i, 0.0) for i in range(3)]
        assert [[x.entries for x in o] for o in out] == [[[rec(i)]] for i in range(3)]

    def test_sequence_numbers_follow_closing_order(self) -> None:
        """Batches are numbered 1, 2, 3... in the order they were opened/closed."""
        b = Batcher(max_records=2, max_bytes=10_000, max_age_s=60)
        seqs = [x.seq for i in range(6) for x in b.add(rec(i), i, 0.0)]
        assert seqs == [1, 2, 3]


class TestBytes:
    def test_entry_that_would_pass_max_bytes_starts_next_batch(self) -> None:
        """An entry that does not fit closes the open batch and opens the next one."""
        b = Batcher(max_records=100, max_bytes=25, max_age_s=60)
        assert b.add(rec(1), 1, 0.0) == ()
        assert b.add(rec(2), 2, 0.0) == ()  # 20 bytes
        (closed,) = b.add(rec(3), 3, 0.5)  # 30 > 25
        assert closed.entries == [rec(1), rec(2)]
        assert closed.nbytes == 20
        rest = b.flush()
        assert rest is not None
        assert rest.entries == [rec(3)]
        assert rest.opened_mono == 0.5
        assert rest.seq == closed.seq + 1

    def test_exactly_max_bytes_fits(self) -> None:
        """Entries adding up to exactly max_bytes stay in one batch."""
        b = Batcher(max_records=100, max_bytes=30, max_age_s=60)
        for i in range(3):
            assert b.add(rec(i), i, 0.0) == ()
        batch = b.flush()
        assert batch is not None
        assert batch.nbytes == 30
        assert len(batch) == 3

    def test_no_batch_passes_max_bytes_with_several_entries(self) -> None:
        """Whatever the entry sizes, a batch of 2+ entries never exceeds max_bytes."""
        b = Batcher(max_records=1000, max_bytes=100, max_age_s=60)
        batches: list[Batch] = []
        for i in range(200):
            batches.extend(b.add(rec(i, 5 + (i * 7) % 40), i, 0.0))
        last = b.flush()
        if last is not None:
            batches.append(last)
        for batch in batches:
            assert batch.nbytes == sum(len(e) for e in batch.entries)
            if len(batch) > 1:
                assert batch.nbytes <= 100
        assert sum(len(x) for x in batches) == 200
        assert [t for x in batches for t in x.times] == list(range(200))

    def test_oversize_record_gets_its_own_batch(self) -> None:
        """A single record larger than max_bytes is never merged with another record."""
        b = Batcher(max_records=100, max_bytes=50, max_age_s=60)
        assert b.add(rec(1), 1, 0.0) == ()
        (before,) = b.add(rec(2, 500), 2, 0.0)
        assert before.entries == [rec(1)]
        (big,) = b.add(rec(3), 3, 0.0)
        assert big.entries == [rec(2, 500)]
        assert big.nbytes == 500
        rest = b.flush()
        assert rest is not None
        assert rest.entries == [rec(3)]

    def test_oversize_first_record(self) -> None:
        """An oversize record into an empty batcher is kept (not dropped) and flushable."""
        b = Batcher(max_records=100, max_bytes=50, max_age_s=60)
        assert b.add(rec(1, 500), 1, 0.0) == ()
        big = b.flush()
        assert big is not None
        assert big.entries == [rec(1, 500)]

    def test_oversize_record_with_max_records_one(self) -> None:
        """With max_records 1 an oversize record is closed and returned by its own add."""
        b = Batcher(max_records=1, max_bytes=15, max_age_s=60)
        (big,) = b.add(rec(1, 20), 1, 0.0)
        assert big.entries == [rec(1, 20)]
        assert b.flush() is None


class TestAge:
    def test_not_due_before_max_age(self) -> None:
        """The open batch is not due before it is max_age_s old."""
        b = Batcher(max_records=100, max_bytes=10_000, max_age_s=1.0)
        b.add(rec(1), 1, 10.0)
        assert b.due(10.999) is None
        assert b.deadline() == 11.0

    def test_due_at_max_age(self) -> None:
        """At max_age_s the open batch is closed and returned once."""
        b = Batcher(max_records=100, max_bytes=10_000, max_age_s=1.0)
        b.add(rec(1), 1, 10.0)
        b.add(rec(2), 2, 10.5)
        batch = b.due(11.0)
        assert batch is not None
        assert batch.entries == [rec(1), rec(2)]
        assert b.due(100.0) is None
        assert b.deadline() is None

    def test_age_counts_from_first_entry(self) -> None:
        """Later entries do not extend the deadline of the open batch."""
        b = Batcher(max_records=100, max_bytes=10_000, max_age_s=2.0)
        b.add(rec(1), 1, 5.0)
        b.add(rec(2), 2, 6.9)
        assert b.deadline() == 7.0
        assert b.due(7.0) is not None

    def test_nothing_due_when_empty(self) -> None:
        """With no open batch nothing is due and there is no deadline."""
        b = Batcher(max_records=10, max_bytes=10_000, max_age_s=1.0)
        assert b.due(1e9) is None
        assert b.deadline() is None

    def test_new_batch_after_due_has_new_deadline(self) -> None:
        """After a due close, the next entry opens a batch with its own deadline."""
        b = Batcher(max_records=10, max_bytes=10_000, max_age_s=1.0)
        b.add(rec(1), 1, 0.0)
        first = b.due(1.0)
        b.add(rec(2), 2, 3.0)
        assert b.deadline() == 4.0
        second = b.flush()
        assert first is not None and second is not None
        assert second.seq == first.seq + 1


class TestFlush:
    def test_flush_returns_open_batch(self) -> None:
        """flush closes and returns the open batch regardless of age."""
        b = Batcher(max_records=10, max_bytes=10_000, max_age_s=60)
        b.add(rec(1), 1, 0.0)
        batch = b.flush()
        assert batch is not None
        assert batch.entries == [rec(1)]
        assert b.flush() is None
        assert b.deadline() is None

    def test_flush_empty(self) -> None:
        """flush with nothing open returns None."""
        assert Batcher(max_records=10, max_bytes=10_000, max_age_s=60).flush() is None
