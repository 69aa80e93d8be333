"""shipper.enrich.attribute: which pod owned a flow's source, as of the flow's start."""

from __future__ import annotations

import ipaddress

from shipper.enrich.attribute import FlowStarts, start_key
from shipper.enrich.pod_index import PodIndex
from shipper.record import (
    ACTION_DESTROY,
    ACTION_NEW,
    ACTION_SNAPSHOT,
    ACTION_UPDATE,
    FlowEvent,
    PodMeta,
)

S = 1_000_000_000
T0 = 1_795_766_503 * S
POD = int(ipaddress.ip_address("10.16.0.5"))
REMOTE = int(ipaddress.ip_address("93.184.216.34"))
NODE = int(ipaddress.ip_address("192.168.1.10"))


def event(action: str, ct_id: int, read_ns: int, ts_start: int | None = None,
          family: int = 4, src: int = POD) -> FlowEvent:
    """An event of flow ``ct_id`` from ``src`` read at ``read_ns`` (kernel start optional)."""
    return FlowEvent(
        action, family, 6, src, REMOTE, 40000 + ct_id, 443, REMOTE, NODE, 443, 61000 + ct_id,
        None, None, None, ct_id, None, None, None, None, None, None, None, None, None,
        ts_start, None, None, read_ns,
    )


def pod(name: str, created_ns: int) -> PodMeta:
    return PodMeta(namespace="ns", name=name, uid=f"uid-{name}", ips=((4, POD),),
                   phase="Running", created_ns=created_ns).with_record_object()


def reused_address() -> PodIndex:
    """POD belonged to ``old`` from T0 until T0+10s, and to ``new`` from T0+20s."""
    index = PodIndex(retention_ns=3600 * S, max_tombstones=100, skew_ns=0)
    index.update(pod("old", T0), T0)
    index.delete("uid-old", T0 + 10 * S)
    index.update(pod("new", T0 + 20 * S), T0 + 20 * S)
    return index


class TestAsOfWhen:
    def test_kernel_start_decides(self) -> None:
        """A DESTROY read after the address moved on, with the kernel's start inside the old
        owner's time, names the old owner."""
        starts = FlowStarts(100, reused_address())
        p, status, _ = starts.attribute(event(ACTION_DESTROY, 1, T0 + 30 * S, ts_start=T0 + S))
        assert (p and p.name, status) == ("old", "resolved")

    def test_remembered_start_decides_without_kernel_timestamps(self) -> None:
        """Without kernel timestamps, the start remembered from the flow's NEW attributes its
        DESTROY to the pod of the NEW's time, and is handed back for the record."""
        starts = FlowStarts(100, reused_address())
        starts.attribute(event(ACTION_NEW, 1, T0 + 2 * S))
        p, status, remembered = starts.attribute(event(ACTION_DESTROY, 1, T0 + 30 * S))
        assert (p and p.name, status, remembered) == ("old", "resolved", T0 + 2 * S)

    def test_read_time_when_nothing_else_is_known(self) -> None:
        """An UPDATE of a flow never seen, without a kernel start, is attributed as of when
        it was read."""
        starts = FlowStarts(100, reused_address())
        p, status, remembered = starts.attribute(event(ACTION_UPDATE, 1, T0 + 25 * S))
        assert (p and p.name, status, remembered) == ("new", "resolved", None)

    def test_no_owner_at_that_time_is_unresolved(self) -> None:
        """A flow that started while nobody owned the address names no pod."""
        starts = FlowStarts(100, reused_address())
        p, status, _ = starts.attribute(event(ACTION_DESTROY, 1, T0 + 30 * S,
                                              ts_start=T0 + 15 * S))
        assert (p, status) == (None, "unresolved")


class TestWhen:
    def test_destroy_takes_the_start_out(self) -> None:
        """After its DESTROY, a flow's remembered start is gone from the cache."""
        starts = FlowStarts(100, reused_address())
        starts.when(event(ACTION_NEW, 1, T0 + S))
        assert len(starts.cache) == 1
        starts.when(event(ACTION_DESTROY, 1, T0 + 2 * S))
        assert starts.cache == {}

    def test_snapshot_remembers_kernel_start(self) -> None:
        """A snapshot remembers the kernel's start, and the attribution time is that start."""
        starts = FlowStarts(100, reused_address())
        key, remembered, t_attr = starts.when(event(ACTION_SNAPSHOT, 1, T0 + 9 * S,
                                                    ts_start=T0 + S))
        assert (remembered, t_attr, starts.cache) == (T0 + S, T0 + S, {key: T0 + S})

    def test_keys_of_families_and_ids_differ(self) -> None:
        """The same number as an IPv4 and an IPv6 source, or two conntrack ids, are two
        flows in the cache."""
        keys = {start_key(event(ACTION_NEW, 1, T0)), start_key(event(ACTION_NEW, 2, T0)),
                start_key(event(ACTION_NEW, 1, T0, family=6))}
        assert len(keys) == 3

    def test_forget_removes_a_filtered_flow(self) -> None:
        """forget() drops a flow's remembered start (a DESTROY the filter dropped)."""
        starts = FlowStarts(100, reused_address())
        starts.when(event(ACTION_NEW, 1, T0 + S))
        starts.forget(event(ACTION_DESTROY, 1, T0 + 2 * S))
        assert starts.cache == {}
