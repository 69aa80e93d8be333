"""Pipeline + shipper.enrich.waiting and .hold: records wait for pod metadata, bounded, in order.

The event path (``Pipeline.handle``) and the loop's once-per-iteration step
(``WaitStage.tick``, ``Pipeline.wait``) are driven directly with synthetic events and a
synthetic pod source state; time is explicit.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import orjson
import pytest

from shipper.config import Config
from shipper.enrich.hold import SourceState
from shipper.metrics import Metrics
from shipper.pipeline import Pipeline
from shipper.record import ACTION_DESTROY, ACTION_NEW, FlowEvent, PodMeta
from tests.fakes.sinks import BatcherSink

S = 1_000_000_000
T0 = 1_795_766_500 * S
POD = int(ipaddress.ip_address("10.16.0.5"))
REMOTE = int(ipaddress.ip_address("93.184.216.34"))
NODE = int(ipaddress.ip_address("192.168.1.10"))


def event(action: str, ct_id: int, start: int, received: int) -> FlowEvent:
    """A MASQUERADEd TCP flow event from POD (kernel start timestamp ``start``)."""
    return FlowEvent(
        action, 4, 6, POD, REMOTE, 40000 + ct_id, 443, REMOTE, NODE, 443, 61000 + ct_id,
        None, None, None, ct_id, None, None, None, None, None, None, None, None, None,
        start, received if action == ACTION_DESTROY else None, None, received,
    )


def pod(name: str, created: int) -> PodMeta:
    return PodMeta(namespace="ns", name=name, uid=f"uid-{name}", ips=((4, POD),),
                   phase="Running", created_ns=created).with_record_object()


def make(overflow: str = "block", **enrich: Any) -> tuple[Pipeline, Metrics, SourceState]:
    cfg = Config(filter={"pod_cidrs": ["10.16.0.0/16"]}, enrich=enrich,
                 queue={"overflow": overflow})
    m = Metrics()
    p = Pipeline(cfg, m, sink=BatcherSink("ndjson"))
    state = SourceState("pods", stale=False)
    p.wait.states.append(state)
    return p, m, state


def shipped(p: Pipeline) -> list[tuple[str, int, str, str | None]]:
    """(action, conntrack id, attribution, pod name) of every record batched so far."""
    b = p.batcher.flush()
    out = []
    for e in [] if b is None else b.entries:
        r = orjson.loads(e)
        out.append((r["event"]["action"], r["conntrack"]["id"], r["flowlog"]["attribution"],
                    r.get("kubernetes", {}).get("pod", {}).get("name")))
    return out


def tick(p: Pipeline, now: int) -> None:
    p.wait.tick(now, now / S)


class TestStaleHold:
    def test_outage_with_ip_reuse_names_each_flow_by_its_start(self) -> None:
        """While the source is stale, flows of A (before B existed) and of B (after B's
        creation) are held; after the re-list (A gone, B present) each names its pod, none is
        stale, and the counters say held = released."""
        p, m, state = make()
        p.index.update(pod("a", T0), T0)
        tick(p, T0 + S)
        state.mark_stale("watch cut", T0 + 10 * S)
        tick(p, T0 + 10 * S)
        p.handle(event(ACTION_NEW, 1, T0 + 11 * S, T0 + 11 * S))   # A's flow
        p.handle(event(ACTION_NEW, 2, T0 + 20 * S, T0 + 20 * S))   # B's flow
        p.handle(event(ACTION_DESTROY, 1, T0 + 11 * S, T0 + 21 * S))
        tick(p, T0 + 25 * S)
        assert shipped(p) == [] and len(p.hold) == 3
        # Recovery: the re-list has B (created at T0+15 s) and no longer A.
        p.index.reconcile([pod("b", T0 + 15 * S)], T0 + 30 * S)
        state.mark_fresh(T0 + 30 * S)
        tick(p, T0 + 30 * S)
        assert shipped(p) == [("new", 1, "resolved", "a"), ("new", 2, "resolved", "b"),
                              ("destroy", 1, "resolved", "a")]
        p._flush_counters()
        assert m.value("shipper_records_held_total") == 3
        assert m.value("shipper_records_released_total") == 3
        assert m.total("shipper_records_stale_total") == 0

    def test_past_the_time_bound_ships_stale_with_last_known_owner(self) -> None:
        """A record held longer than stale_hold_s ships flagged stale, naming the owner the
        stale view knows, counted with reason age; the younger one stays held."""
        p, m, state = make(stale_hold_s=10)
        p.index.update(pod("a", T0), T0)
        state.mark_stale("watch cut", T0 + S)
        tick(p, T0 + S)
        p.handle(event(ACTION_NEW, 1, T0 + 2 * S, T0 + 2 * S))
        p.handle(event(ACTION_NEW, 2, T0 + 8 * S, T0 + 8 * S))
        tick(p, T0 + 12 * S)
        assert shipped(p) == [("new", 1, "stale", "a")]
        assert len(p.hold) == 1
        p._flush_counters()
        assert m.value("shipper_records_stale_total", "age") == 1

    @pytest.mark.parametrize(("overflow", "first_out"), [("drop_oldest", 1), ("drop_newest", 3)])
    def test_past_the_record_bound_one_leaves_stale(self, overflow: str, first_out: int) -> None:
        """With the hold full, the record chosen by queue.overflow ships stale at once
        (counted as full); the rest are attributed after recovery: nothing is lost."""
        p, m, state = make(overflow, stale_hold_records=2)
        p.index.update(pod("a", T0), T0)
        state.mark_stale("watch cut", T0 + S)
        tick(p, T0 + S)
        for i in (1, 2, 3):
            p.handle(event(ACTION_NEW, i, T0 + (1 + i) * S, T0 + (1 + i) * S))
        assert shipped(p) == [("new", first_out, "stale", "a")]
        state.mark_fresh(T0 + 9 * S)
        tick(p, T0 + 9 * S)
        rest = shipped(p)
        assert sorted(r[1] for r in rest) == sorted({1, 2, 3} - {first_out})
        assert all(r[2] == "resolved" for r in rest)
        p._flush_counters()
        assert m.value("shipper_records_stale_total", "full") == 1

    def test_shutdown_ships_held_records_stale(self) -> None:
        """At shutdown with the source still stale, held records ship flagged stale."""
        p, m, state = make()
        state.mark_stale("pods file unreadable", T0)
        tick(p, T0)
        p.handle(event(ACTION_NEW, 1, T0 + S, T0 + S))
        p.wait.flush()
        assert shipped(p) == [("new", 1, "stale", None)]
        p._flush_counters()
        assert m.value("shipper_records_stale_total", "shutdown") == 1

    def test_steady_state_does_not_hold(self) -> None:
        """Source fresh and owner known: the record is batched at once, nothing held."""
        p, _, _ = make()
        p.index.update(pod("a", T0), T0)
        tick(p, T0)
        p.handle(event(ACTION_NEW, 1, T0 + S, T0 + S))
        assert not p.wait.holding and not p.waiting
        assert shipped(p) == [("new", 1, "resolved", "a")]


class TestResolveWait:
    def test_new_waits_for_its_pod_and_its_destroy_stays_behind(self) -> None:
        """A NEW from an address with no owner waits; its DESTROY queues behind it; another
        flow's record is not delayed; when the pod appears both leave, in order, named."""
        p, m, _ = make()
        tick(p, T0)
        p.handle(event(ACTION_NEW, 1, T0 + S, T0 + S))                  # unknown yet
        p.handle(event(ACTION_DESTROY, 1, T0 + S, T0 + S + S // 2))
        assert shipped(p) == []
        b = PodMeta(namespace="ns", name="b", uid="uid-b", ips=((4, POD + 1),),
                    phase="Running", created_ns=T0).with_record_object()
        p.index.update(b, T0)
        fresh = event(ACTION_NEW, 2, T0 + S, T0 + S)._replace(orig_src=POD + 1)
        p.handle(fresh)
        assert shipped(p) == [("new", 2, "resolved", "b")]  # not delayed
        # The pod's watch event arrives 0.5 s later.
        p.index.update(PodMeta(namespace="ns", name="late", uid="uid-late", ips=((4, POD),),
                               phase="Running", created_ns=T0).with_record_object(), T0 + S)
        tick(p, T0 + S + S // 2)
        assert shipped(p) == [("new", 1, "resolved", "late"), ("destroy", 1, "resolved", "late")]
        p._flush_counters()
        assert m.value("shipper_records_waited_total", "resolved") == 1
        assert m.value("shipper_records_unresolved_total") == 0

    def test_wait_ends_unresolved_after_resolve_wait_s(self) -> None:
        """No pod within resolve_wait_s: the record ships unresolved, counted as timeout."""
        p, m, _ = make(resolve_wait_s=2)
        tick(p, T0)
        p.handle(event(ACTION_NEW, 1, T0 + S, T0 + S))
        tick(p, T0 + 2 * S)
        assert shipped(p) == []
        tick(p, T0 + 3 * S)
        assert shipped(p) == [("new", 1, "unresolved", None)]
        p._flush_counters()
        assert m.value("shipper_records_waited_total", "timeout") == 1
        assert m.value("shipper_records_unresolved_total") == 1

    def test_zero_disables_waiting(self) -> None:
        """resolve_wait_s 0: an unresolved NEW ships at once."""
        p, _, _ = make(resolve_wait_s=0)
        p.handle(event(ACTION_NEW, 1, T0 + S, T0 + S))
        assert shipped(p) == [("new", 1, "unresolved", None)]

    def test_waiting_flow_moves_to_the_hold_when_the_source_goes_stale(self) -> None:
        """A wait that ends while the source is stale does not ship unresolved: the record
        is held and attributed after recovery."""
        p, _, state = make(resolve_wait_s=1)
        tick(p, T0)
        p.handle(event(ACTION_NEW, 1, T0 + S, T0 + S))
        state.mark_stale("watch cut", T0 + S)
        tick(p, T0 + 3 * S)
        assert shipped(p) == [] and len(p.hold) == 1
        p.index.reconcile([pod("late", T0)], T0 + 4 * S)
        state.mark_fresh(T0 + 4 * S)
        tick(p, T0 + 4 * S)
        assert shipped(p) == [("new", 1, "resolved", "late")]
