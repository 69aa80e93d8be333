"""Tests for shipper.enrich.hold: source freshness, the stale hold, the resolve wait."""

from __future__ import annotations

import pytest

from shipper.enrich.hold import ResolveWait, SourceState, StaleHold

S = 1_000_000_000


class TestSourceState:
    def test_starts_stale_until_first_load(self) -> None:
        """A new source is stale (nothing loaded) since its creation time."""
        st = SourceState("pods", now_ns=5)
        assert st.stale and st.stale_since_ns == 5 and st.recovered_ns is None

    def test_transitions_record_times_and_reason(self) -> None:
        """mark_stale keeps the first time of an outage; mark_fresh records the recovery."""
        st = SourceState("pods", now_ns=0)
        assert st.mark_fresh(10) is True
        assert not st.stale and st.recovered_ns == 10 and st.recoveries == 1
        assert st.mark_stale("watch cut", 20) is True
        assert st.mark_stale("connection refused", 30) is False  # same outage
        assert st.stale_since_ns == 20 and st.reason == "connection refused"
        assert st.info() == {"stale": True, "stale_since_ns": 20,
                             "reason": "connection refused", "recovered_ns": 10}
        assert st.mark_fresh(40) is True and st.mark_fresh(50) is False
        assert st.info() == {"stale": False, "stale_since_ns": None, "reason": None,
                             "recovered_ns": 40}


class TestStaleHold:
    def test_holds_in_order_and_releases_in_chunks(self) -> None:
        """Items leave in arrival order, at most ``limit`` per release."""
        h = StaleHold(60 * S, 100)
        for i in range(5):
            assert h.add(i, i) is None
        assert len(h) == 5 and h.oldest_ns() == 0
        assert h.release(2) == [0, 1]
        assert h.release(10) == [2, 3, 4]
        assert not h

    def test_time_bound(self) -> None:
        """Items held longer than max_age leave (oldest first); younger ones stay."""
        h = StaleHold(10 * S, 100)
        for i in range(4):
            h.add(i, i * S * 5)  # held at 0, 5, 10, 15 s
        assert list(h.expired(20 * S)) == [0, 1, 2]
        assert len(h) == 1

    @pytest.mark.parametrize(("overflow", "leaves"), [
        ("block", 0), ("drop_oldest", 0), ("drop_newest", "new"),
    ])
    def test_record_bound_follows_overflow_policy(self, overflow: str, leaves: object) -> None:
        """A full hold lets the oldest item go (block, drop_oldest) or the arriving one
        (drop_newest); nothing is lost and the size stays at the bound."""
        h = StaleHold(60 * S, 3, overflow)
        for i in range(3):
            h.add(i, i)
        assert h.add("new", 9) == leaves
        assert len(h) == 3
        kept = h.release(3)
        assert kept == ([1, 2, "new"] if leaves == 0 else [0, 1, 2])

    def test_disabled_hold_returns_every_item(self) -> None:
        """stale_hold_s 0 or stale_hold_records 0: nothing is held."""
        for h in (StaleHold(0, 10), StaleHold(10 * S, 0)):
            assert not h.enabled
            assert h.add("x", 0) == "x" and len(h) == 0

    def test_unknown_policy_rejected(self) -> None:
        """An unknown overflow policy is a ValueError naming it."""
        with pytest.raises(ValueError, match="bogus"):
            StaleHold(S, 1, "bogus")


class TestResolveWait:
    def test_later_events_of_a_flow_queue_behind_its_new(self) -> None:
        """follow() queues an event behind its waiting flow; pop() returns them in order."""
        w = ResolveWait(2 * S, 10)
        assert w.start(1, "new-1", 0)
        assert w.follow(1, "destroy-1")
        assert not w.follow(2, "destroy-2")  # not waiting: ships now
        assert list(w.first()) == [(1, "new-1")]
        assert w.pop(1) == ["new-1", "destroy-1"]
        assert not w

    def test_due_after_the_wait(self) -> None:
        """Flows leave when their wait is over, oldest first; others keep waiting."""
        w = ResolveWait(2 * S, 10)
        w.start(1, "a", 0)
        w.start(2, "b", S)
        assert w.next_deadline() == 2 * S
        assert list(w.due(2 * S - 1)) == []
        assert list(w.due(2 * S)) == [(1, ["a"])]
        assert list(w.due(10 * S)) == [(2, ["b"])]

    def test_bounds(self) -> None:
        """Waiting disabled (0 s), a full wait list, and a flow already waiting all refuse."""
        assert not ResolveWait(0, 10).start(1, "a", 0)
        w = ResolveWait(S, 1)
        assert w.start(1, "a", 0)
        assert not w.start(1, "again", 0)
        assert not w.start(2, "b", 0)

    def test_drain_empties(self) -> None:
        """drain() hands back every waiting flow with its items."""
        w = ResolveWait(S, 10)
        w.start(1, "a", 0)
        w.follow(1, "a2")
        w.start(2, "b", 0)
        assert list(w.drain()) == [(1, ["a", "a2"]), (2, ["b"])]
        assert len(w) == 0
