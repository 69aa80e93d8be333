"""Which pod, as of when: a flow's attribution time and the pod that owned its source then.

A flow is attributed to the pod that owned its source address when the flow
*started*: the kernel's start timestamp when it sent one
(``nf_conntrack_timestamp=1``), else the start remembered from the flow's
NEW/snapshot event (:class:`FlowStarts`, a bounded cache keyed by conntrack id
and source), else the time the event was read. :meth:`FlowStarts.when` gives
that time, :meth:`FlowStarts.attribute` the pod and the attribution status
(``PodIndex.attribute``) as of it.

The event path calls :meth:`FlowStarts.when` and ``PodIndex.attribute`` as two
steps, because a record that must wait for pod metadata (``shipper.enrich.hold``)
keeps its time and is looked up only when it leaves the wait.
"""

from __future__ import annotations

import logging

from shipper.enrich.pod_index import PodIndex
from shipper.record import (
    ACTION_DESTROY,
    ACTION_NEW,
    ACTION_SNAPSHOT,
    FlowEvent,
    IndexedPod,
)

log = logging.getLogger("shipper.pipeline")  # its log line keeps the logger name it had


_STARTS = frozenset((ACTION_NEW, ACTION_SNAPSHOT))  # the actions that start a flow


def start_key(ev: FlowEvent) -> int:
    """Key of a flow in the start-time cache: source address and conntrack id."""
    ct = ev.ct_id or 0
    return (ev.orig_src << 32 | ct) if ev.family == 4 else (ev.orig_src << 33 | ct << 1 | 1)


class FlowStarts:
    """The flow-start cache and the attribution time of each event.

    ``cache`` maps :func:`start_key` to the remembered start (ns), oldest first;
    at most ``max_entries`` (0: remember nothing). ``evicted`` counts what was
    dropped to stay within it since the owner last read and reset it.
    """

    def __init__(self, max_entries: int, index: PodIndex, *,
                 update_subscribed: bool = False) -> None:
        self.cache: dict[int, int] = {}
        self.max_entries = self._configured = max_entries
        self._update_subscribed = update_subscribed
        self.remember_new = True  # until size() knows better
        self.evicted = 0
        self.index = index

    def size(self, kernel_timestamps: bool, table_max: int | None) -> None:
        """Size the cache by what it must remember.

        A remembered start is used only by a later event of the flow that
        carries no kernel start timestamp. With ``nf_conntrack_timestamp=1``,
        DESTROY and dumped entries carry one; NEW and UPDATE never do. So a
        NEW's start is remembered only when UPDATE is subscribed or the kernel
        stamps nothing (a snapshot without a timestamp, a flow from before the
        sysctl was set, is always remembered). The table never holds more than
        ``nf_conntrack_max`` flows, so more entries than that are dead flows
        (a lost DESTROY, or no DESTROY subscribed): the cache holds at most
        that many, and what it evicts to stay there is counted
        (``shipper_flow_starts_evicted_total{reason="full"}``).
        """
        self.remember_new = not kernel_timestamps or self._update_subscribed
        limit = self._configured
        if table_max:
            limit = min(limit, table_max)
        self.max_entries = limit
        cache = self.cache
        while len(cache) > limit:
            del cache[next(iter(cache))]
            self.evicted += 1
        log.info("flow start cache", extra={"fields": {
            "max_entries": limit, "remember_new": self.remember_new,
            "nf_conntrack_max": table_max}})

    def when(self, ev: FlowEvent) -> tuple[int, int | None, int]:
        """``(key, remembered start or None, attribution time)`` of an event.

        NEW and snapshot events remember their flow's start (within the
        bound); DESTROY takes it out of the cache (the flow is over).
        """
        # Each field of the event is read once (a NamedTuple field costs an attribute
        # lookup), and start_key(ev) is inlined: one call less per event.
        action, ts_start, src, ct = ev.action, ev.ts_start, ev.orig_src, ev.ct_id or 0
        key = (src << 32 | ct) if ev.family == 4 else (src << 33 | ct << 1 | 1)
        starts = self.cache
        remembered: int | None
        if action in _STARTS:
            remembered = starts.get(key) if starts else None
            if remembered is None:
                # event_time(ev), inlined for the starting actions (never DESTROY)
                remembered = ts_start or ev.ts_event or ev.received_ns
                if self.max_entries and (
                    self.remember_new or (action == ACTION_SNAPSHOT and ts_start is None)
                ):
                    starts[key] = remembered
                    if len(starts) > self.max_entries:
                        del starts[next(iter(starts))]
                        self.evicted += 1
        elif action == ACTION_DESTROY:
            remembered = starts.pop(key, None) if starts else None
        else:
            remembered = starts.get(key)
        return key, remembered, ts_start or remembered or ev.received_ns

    def forget(self, ev: FlowEvent) -> None:
        """A flow the filter dropped ended (DESTROY): nothing to remember of it."""
        self.cache.pop(start_key(ev), None)

    def attribute(self, ev: FlowEvent) -> tuple[IndexedPod | None, str, int | None]:
        """Which pod owned the flow's source when it started, the attribution status
        (``resolved`` / ``uncertain`` / ``unresolved``) and the remembered start."""
        _, remembered, t_attr = self.when(ev)
        pod, status = self.index.attribute(ev.family, ev.orig_src, t_attr)
        return pod, status, remembered
