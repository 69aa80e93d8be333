"""Pure: holding records while pod metadata lags, and waiting briefly for a new owner.

Two buffers sit between attribution and encoding (``shipper.enrich.waiting`` drives
them from the event loop; nothing here does I/O, takes locks or reads a clock):

* :class:`SourceState` - the freshness of one pod source (the Kubernetes pods
  watch, the pods file). The source's own thread marks it stale (watch cut or
  erroring, list failing, file unreadable or unparsable) and fresh again only
  once a complete view was applied (a re-list reconciled into the index, a
  file loaded). The event loop reads :attr:`SourceState.stale`, one attribute.
* :class:`StaleHold` - a bounded FIFO of records that arrived while a source
  was stale. They are attributed when the source is fresh again, by each
  flow's start time, so the pod index's rules decide (a pod created after the
  outage began owns the flows that started after its creation; a deletion
  missed during the outage ends the old owner's claim at the new owner's
  creation). Bounded in time (``max_age_ns``: the oldest record leaves then)
  and in records (``max_records``); a record that leaves because of a bound is
  shipped flagged ``stale`` with the last known owner. Which record leaves
  when the hold is full follows ``queue.overflow``: ``drop_newest`` lets the
  arriving record go, ``drop_oldest`` and ``block`` the oldest one (the event
  loop never blocks on the hold, and the oldest is the one nearest its time
  bound anyway). Nothing is dropped here: every record leaves either
  attributed or flagged.
* :class:`ResolveWait` - records of flows whose source had no (or only an
  ``uncertain``) owner when a NEW/snapshot event came, waiting up to
  ``wait_ns`` for the pod's watch event. Keyed by flow, so later events of the
  same flow (an UPDATE, a DESTROY) queue behind their NEW and leave with it, in
  order and with the same attribution; records of other flows are not delayed.

Items are opaque to these classes (the pipeline stores ``(event, flow start,
attribution time)``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

OVERFLOW_POLICIES = ("block", "drop_newest", "drop_oldest")


class SourceState:
    """Freshness of one pod source: written by its thread, read by the event loop.

    Plain attributes, each written with one assignment: a reader may see the
    flag flip a moment before the times, never a half-written value.
    """

    def __init__(self, name: str, *, stale: bool = True, now_ns: int = 0) -> None:
        """A source starts stale (nothing loaded yet) unless told otherwise."""
        self.name = name
        self.stale = stale
        self.stale_since_ns: int | None = now_ns if stale else None
        self.recovered_ns: int | None = None
        self.reason = "not loaded yet" if stale else ""
        self.recoveries = 0

    def mark_stale(self, reason: str, now_ns: int) -> bool:
        """The source's view may be behind reality from ``now_ns``; True if this is news."""
        self.reason = reason
        if self.stale:
            return False
        self.stale_since_ns = now_ns
        self.stale = True
        return True

    def mark_fresh(self, now_ns: int) -> bool:
        """A complete view was applied at ``now_ns``; True if the source was stale."""
        if not self.stale:
            return False
        self.recovered_ns = now_ns
        self.recoveries += 1
        self.reason = ""
        self.stale = False
        return True

    def info(self) -> dict[str, Any]:
        """JSON-able summary (for /readyz)."""
        return {
            "stale": self.stale,
            "stale_since_ns": self.stale_since_ns if self.stale else None,
            "reason": self.reason or None,
            "recovered_ns": self.recovered_ns,
        }


class StaleHold:
    """Bounded FIFO of items held while the pod source is stale."""

    def __init__(self, max_age_ns: int, max_records: int, overflow: str = "block") -> None:
        """``max_age_ns`` 0 or ``max_records`` 0 means nothing is held (items leave at once)."""
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"unknown overflow policy {overflow!r}")
        self.max_age_ns = max_age_ns
        self.max_records = max_records
        self.overflow = overflow
        self._q: deque[tuple[int, Any]] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return bool(self._q)

    @property
    def enabled(self) -> bool:
        """False when either bound is 0: records are never held."""
        return self.max_age_ns > 0 and self.max_records > 0

    def add(self, item: Any, now_ns: int) -> Any | None:
        """Hold ``item``; return an item that must leave now (flagged stale), or None.

        That is ``item`` itself when holding is disabled or when the hold is
        full under ``drop_newest``, else (full) the oldest held item.
        """
        if not self.enabled:
            return item
        q = self._q
        if len(q) < self.max_records:
            q.append((now_ns, item))
            return None
        if self.overflow == "drop_newest":
            return item
        out = q.popleft()[1]
        q.append((now_ns, item))
        return out

    def expired(self, now_ns: int) -> Iterator[Any]:
        """Remove and yield, oldest first, the items held longer than ``max_age_ns``."""
        q = self._q
        horizon = now_ns - self.max_age_ns
        while q and q[0][0] <= horizon:
            yield q.popleft()[1]

    def release(self, limit: int) -> list[Any]:
        """Remove and return up to ``limit`` items, oldest first."""
        q = self._q
        n = min(limit, len(q))
        return [q.popleft()[1] for _ in range(n)]

    def oldest_ns(self) -> int | None:
        """When the oldest held item was held (None if empty)."""
        return self._q[0][0] if self._q else None


class ResolveWait:
    """Flows waiting (bounded) for an owner to appear; later events of a flow queue behind it."""

    def __init__(self, wait_ns: int, max_flows: int) -> None:
        """``wait_ns`` 0 disables waiting; at most ``max_flows`` flows wait at once."""
        self.wait_ns = wait_ns
        self.max_flows = max_flows
        # flow key -> [deadline, items...]; insertion order is deadline order
        # (every flow waits the same time), so the first entry expires first.
        # Public so that the event path can test "anything waiting?" and "is this
        # flow waiting?" with plain dict operations (no method call per event).
        # Never rebound: callers may keep a reference.
        self.flows: dict[int, list[Any]] = {}

    def __len__(self) -> int:
        return len(self.flows)

    def __bool__(self) -> bool:
        return bool(self.flows)

    def __contains__(self, key: int) -> bool:
        return key in self.flows

    def start(self, key: int, item: Any, now_ns: int) -> bool:
        """Let ``item`` (a NEW/snapshot of flow ``key``) wait; False if it cannot (ship it now).

        It cannot when waiting is disabled, the flow already waits (a repeated
        snapshot: the caller queues it with :meth:`follow`), or ``max_flows``
        flows already wait.
        """
        if not self.wait_ns or key in self.flows or len(self.flows) >= self.max_flows:
            return False
        self.flows[key] = [now_ns + self.wait_ns, item]
        return True

    def follow(self, key: int, item: Any) -> bool:
        """Queue ``item`` behind flow ``key``'s records; False if that flow is not waiting."""
        entry = self.flows.get(key)
        if entry is None:
            return False
        entry.append(item)
        return True

    def first(self) -> Iterator[tuple[int, Any]]:
        """``(key, first item)`` of every waiting flow, oldest first (a snapshot: safe to pop)."""
        return iter([(k, v[1]) for k, v in self.flows.items()])

    def pop(self, key: int) -> list[Any]:
        """Stop waiting for flow ``key``; return its items in arrival order."""
        entry = self.flows.pop(key)
        return entry[1:]

    def due(self, now_ns: int) -> Iterator[tuple[int, list[Any]]]:
        """Remove and yield ``(key, items)`` of the flows whose wait is over, oldest first."""
        flows = self.flows
        while flows:
            key = next(iter(flows))
            entry = flows[key]
            if entry[0] > now_ns:
                return
            del flows[key]
            yield key, entry[1:]

    def next_deadline(self) -> int | None:
        """When the oldest wait ends (None if nothing waits)."""
        for entry in self.flows.values():
            return int(entry[0])
        return None

    def drain(self) -> Iterator[tuple[int, list[Any]]]:
        """Remove and yield every waiting flow (at shutdown)."""
        flows = self.flows
        while flows:
            key = next(iter(flows))
            yield key, flows.pop(key)[1:]
