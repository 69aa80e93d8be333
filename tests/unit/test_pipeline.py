"""Pipeline.handle: attribution status from the pod index into the record and metrics."""

from __future__ import annotations

import ipaddress
from typing import Any

import orjson
import pytest

from shipper.config import Config
from shipper.metrics import Metrics
from shipper.pipeline import Pipeline
from shipper.record import ACTION_NEW, FlowEvent, PodMeta
from tests.fakes.sinks import BatcherSink

S = 1_000_000_000
T0 = 1_795_766_503 * S
POD = int(ipaddress.ip_address("10.16.0.5"))
REMOTE = int(ipaddress.ip_address("93.184.216.34"))
NODE = int(ipaddress.ip_address("192.168.1.10"))


def flow(ts_start: int, sport: int) -> FlowEvent:
    """A NEW event of a MASQUERADEd TCP flow from the pod address started at ``ts_start``."""
    return FlowEvent(
        ACTION_NEW, 4, 6, POD, REMOTE, sport, 443, REMOTE, NODE, 443, 61000 + sport % 1000,
        None, None, None, sport, None, None, None, None, None, None, None, None, None,
        ts_start, None, None, T0 + 100 * S,
    )


def records(p: Pipeline) -> list[dict[str, Any]]:
    b = p.batcher.flush()
    return [] if b is None else [orjson.loads(e) for e in b.entries]


@pytest.mark.parametrize("ndjson", [True, False])
def test_each_status_reaches_record_and_metrics(ndjson: bool) -> None:
    """resolved, uncertain and unresolved come out in flowlog.attribution and are counted."""
    # resolve_wait_s 0: ship at once (waiting is tested in test_pipeline_hold.py).
    cfg = Config(filter={"pod_cidrs": ["10.16.0.0/16"]},
                 enrich={"clock_skew_s": 5, "resolve_wait_s": 0})
    m = Metrics()
    p = Pipeline(cfg, m, sink=BatcherSink("ndjson" if ndjson else "msgpack"))
    a = PodMeta(namespace="ns", name="a", uid="ua", ips=((4, POD),), phase="Running",
                created_ns=T0).with_record_object()
    p.index.update(a, T0 + 10 * S)
    p.handle(flow(T0 + S, 1001))       # inside a's interval
    p.handle(flow(T0 - 2 * S, 1002))   # within the skew before a, nothing earlier known
    p.handle(flow(T0 - 60 * S, 1003))  # long before a
    got = [(r["flowlog"]["attribution"], r.get("kubernetes", {}).get("pod", {}).get("name"))
           for r in records(p)]
    assert got == [("resolved", "a"), ("uncertain", "a"), ("unresolved", None)]
    p._flush_counters()
    assert m.value("shipper_records_uncertain_total") == 1
    assert m.value("shipper_records_unresolved_total") == 1


def test_nat_policy_forward_is_the_filters_decision() -> None:
    """A flow the filter's NAT policy forwards is dropped by handle and counted with the
    filter's reason nat_policy_forward; no Kubernetes source is involved."""
    from types import SimpleNamespace

    from shipper.cidrs import to_cidrs
    from shipper.filters.nat_policy import NatPolicy, NatRule

    cfg = Config(filter={"pod_cidrs": ["10.16.0.0/16"]}, enrich={"resolve_wait_s": 0})
    m = Metrics()
    p = Pipeline(cfg, m, sink=BatcherSink("ndjson"))
    rule = NatRule("forward", (), to_cidrs(["93.184.216.34"]))
    subnet = SimpleNamespace(cidrs=to_cidrs(["10.16.0.0/16"]), rules=(rule,))
    p.filter.set_cidrs(["10.16.0.0/16"], [], NatPolicy([subnet]))
    p.handle(flow(T0, 1001))
    assert records(p) == []
    p._flush_counters()
    assert m.value("shipper_events_filtered_total", "nat_policy_forward") == 1
