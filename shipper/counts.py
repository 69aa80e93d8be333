"""The event path's counters: plain dict and int increments per event, folded into the
Prometheus metrics once a second (a labelled ``Counter.inc`` per event would cost more
than the rest of the event's bookkeeping).

The dicts hold every label the event path can count, from the start, at 0: the event
path then increments with ``d[label] += 1`` (no ``dict.get`` call per event), and
:meth:`EventCounts.fold` adds only what is not 0, so a label no event had stays out
of the metrics as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from shipper.filters.cidr import (
    REASON_DESTINATION_IN_CLUSTER,
    REASON_NOT_SNAT,
    REASON_SOURCE_NOT_POD,
)
from shipper.filters.nat_policy import REASON_NAT_POLICY_FORWARD
from shipper.metrics import Metrics
from shipper.record import ACTION_DESTROY, ACTION_GAP, ACTION_NEW, ACTION_SNAPSHOT, ACTION_UPDATE

ACTIONS = (ACTION_NEW, ACTION_UPDATE, ACTION_DESTROY, ACTION_SNAPSHOT)
REASONS = (REASON_SOURCE_NOT_POD, REASON_DESTINATION_IN_CLUSTER, REASON_NOT_SNAT,
           REASON_NAT_POLICY_FORWARD)


def fold(m: Metrics, labelled: Iterable[tuple[str, dict[str, int]]]) -> None:
    """Add each ``{label: n}`` to metric ``name`` and set it back to 0."""
    for name, counts in labelled:
        for label, n in counts.items():
            if n:
                m.inc(name, label, n=n)
                counts[label] = 0


class EventCounts:
    """What ``Pipeline.handle`` counts: events by action, filtered by reason, records by
    action (and gap notices), records shipped unresolved or uncertain."""

    def __init__(self) -> None:
        self.events: dict[str, int] = dict.fromkeys(ACTIONS, 0)
        self.filtered: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.records: dict[str, int] = dict.fromkeys((*ACTIONS, ACTION_GAP), 0)
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
