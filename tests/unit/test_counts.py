"""EventCounts: the event path's counters, folded into the metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from shipper.counts import EventCounts
from shipper.metrics import Metrics


def test_fold_adds_counts_once_and_exports_no_label_that_never_counted() -> None:
    """Every label is counted with ``d[label] += 1``; fold adds what was counted since
    the last fold, and a label that never counted gets no series (not even 0)."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    c = EventCounts()
    c.events["new"] += 1
    c.events["new"] += 1
    c.filtered["not_snat"] += 1
    c.records["new"] += 1
    c.unresolved += 1
    c.fold(m)
    c.events["new"] += 1
    c.events["destroy"] += 1
    c.fold(m)
    c.fold(m)  # nothing new: adds nothing
    assert reg.get_sample_value("shipper_events_total", {"type": "new"}) == 3.0
    assert reg.get_sample_value("shipper_events_total", {"type": "destroy"}) == 1.0
    assert reg.get_sample_value("shipper_events_total", {"type": "update"}) is None
    assert reg.get_sample_value("shipper_events_total", {"type": "snapshot"}) is None
    assert reg.get_sample_value("shipper_events_filtered_total", {"reason": "not_snat"}) == 1.0
    assert reg.get_sample_value("shipper_events_filtered_total",
                                {"reason": "source_not_pod"}) is None
    assert reg.get_sample_value("shipper_records_total", {"action": "new"}) == 1.0
    assert reg.get_sample_value("shipper_records_total", {"action": "gap"}) is None
    assert m.value("shipper_records_unresolved_total") == 1.0
    assert all(n == 0 for d in (c.events, c.filtered, c.records) for n in d.values())


def test_every_action_and_filter_reason_has_its_counter() -> None:
    """The counters are pre-registered (the event path does ``d[label] += 1``): every
    action and every reason the filter modules define has its key, so a new one cannot
    turn into a KeyError on the event path."""
    import shipper.filters.cidr as cidr
    import shipper.filters.nat_policy as nat_policy
    import shipper.record as record

    c = EventCounts()
    reasons = {v for mod in (cidr, nat_policy) for k, v in vars(mod).items()
               if k.startswith("REASON_") and isinstance(v, str)}
    actions = {v for k, v in vars(record).items() if k.startswith("ACTION_")
               and isinstance(v, str)}
    assert reasons and reasons <= set(c.filtered)
    assert actions - {"gap"} <= set(c.events)
    assert actions <= set(c.records)
