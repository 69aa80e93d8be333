"""The event path's counters: plain dict and int increments per event, folded into the
Prometheus metrics once a second (a labelled ``Counter.inc`` per event would cost more
than the rest of the event's bookkeeping)."""

from __future__ import annotations

from collections.abc import Iterable

from shipper.metrics import Metrics


def fold(m: Metrics, labelled: Iterable[tuple[str, dict[str, int]]]) -> None:
    """Add each ``{label: n}`` to metric ``name`` and empty it."""
    for name, counts in labelled:
        for label, n in counts.items():
            m.inc(name, label, n=n)
        counts.clear()


class EventCounts:
    """What ``Pipeline.handle`` counts: events by action, filtered by reason, records by
    action, records shipped unresolved or uncertain."""

    def __init__(self) -> None:
        self.events: dict[str, int] = {}
        self.filtered: dict[str, int] = {}
        self.records: dict[str, int] = {}
        self.unresolved = 0
        self.uncertain = 0

    def fold(self, m: Metrics) -> None:
        """Add the counts gathered since the last call to the metrics."""
        fold(m, (("shipper_events_total", self.events),
                 ("shipper_events_filtered_total", self.filtered),
                 ("shipper_records_total", self.records)))
        if self.unresolved:
            m.inc("shipper_records_unresolved_total", n=self.unresolved)
            self.unresolved = 0
        if self.uncertain:
            m.inc("shipper_records_uncertain_total", n=self.uncertain)
            self.uncertain = 0
