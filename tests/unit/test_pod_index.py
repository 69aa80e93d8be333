"""Tests for shipper.enrich.pod_index: which pod owned an address at a given time."""

from __future__ import annotations

import ipaddress
import itertools
import threading
from dataclasses import replace
from typing import Any

import orjson
import pytest

from shipper.config import EnrichConfig
from shipper.enrich.pod_index import DEFAULT_RETENTION_NS, DEFAULT_SKEW_NS, PodIndex
from shipper.record import (
    ATTR_RESOLVED,
    ATTR_UNCERTAIN,
    ATTR_UNRESOLVED,
    FlowEvent,
    PodMeta,
    PodTombstone,
)

S = 1_000_000_000
T = 1_714_557_600 * S  # 2024-05-01T10:00:00Z


def ip(text: str) -> int:
    """Integer form of an address."""
    return int(ipaddress.ip_address(text))


X4 = ip("10.16.0.5")
X6 = ip("fd00:10:16::5")


def pod(uid: str, *addrs: str, created: int | None = None, **over: Any) -> PodMeta:
    """A running pod named after its uid owning ``addrs``."""
    ips = tuple((ipaddress.ip_address(a).version, ip(a)) for a in addrs)
    fields: dict[str, Any] = {
        "namespace": "ns", "name": f"pod-{uid}", "uid": uid, "ips": ips,
        "phase": "Running", "created_ns": created,
    }
    fields.update(over)
    return PodMeta(**fields).with_record_object()


def owner(index: PodIndex, addr: str, t: int) -> str | None:
    """uid of the owner of ``addr`` at ``t`` (None if nobody)."""
    meta = index.lookup(ipaddress.ip_address(addr).version, ip(addr), t)
    return None if meta is None else meta.uid


class TestLookup:
    def test_unknown_address(self) -> None:
        """An address nobody ever owned resolves to None."""
        assert PodIndex().lookup(4, X4, T) is None

    def test_owner_from_first_sighting(self) -> None:
        """A pod without creation time owns its address from when it was first seen, onwards."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5"), T)
        assert owner(idx, "10.16.0.5", T) == "a"
        assert owner(idx, "10.16.0.5", T + 10**6 * S) == "a"
        assert owner(idx, "10.16.0.6", T) is None

    def test_owner_from_creation_time(self) -> None:
        """A pod first seen after its creation owns the address since its creationTimestamp."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T - 3600 * S), T)
        assert owner(idx, "10.16.0.5", T - 3600 * S) == "a"
        assert owner(idx, "10.16.0.5", T - 1800 * S) == "a"
        assert idx.history(4, X4)[0][0] == T - 3600 * S

    def test_creation_in_the_future_starts_now(self) -> None:
        """A creationTimestamp ahead of our clock does not start the interval in the future."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T + 60 * S), T)
        assert idx.history(4, X4)[0][0] == T
        assert owner(idx, "10.16.0.5", T + S) == "a"

    def test_before_first_owner_beyond_skew(self) -> None:
        """A flow starting longer than the skew tolerance before the first owner is unresolved."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5"), T)
        assert owner(idx, "10.16.0.5", T - DEFAULT_SKEW_NS - 1) is None

    def test_deleted_pod_resolves_inside_its_lifetime(self) -> None:
        """After deletion the pod still owns its address for flows that started while it lived."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.delete("a", T + 100 * S)
        assert owner(idx, "10.16.0.5", T + 50 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 100 * S - 1) == "a"
        assert owner(idx, "10.16.0.5", T + 100 * S) is None  # the end is exclusive
        assert owner(idx, "10.16.0.5", T + 200 * S) is None
        assert idx.live_pods() == 0
        assert idx.tombstones() == 1

    def test_delete_unknown_uid_is_harmless(self) -> None:
        """Deleting a pod never seen changes nothing but the version."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5"), T)
        v = idx.version
        idx.delete("nope", T + S)
        assert owner(idx, "10.16.0.5", T + 2 * S) == "a"
        assert idx.version == v + 1

    def test_delete_before_creation_gives_empty_interval(self) -> None:
        """A deletion stamped before the interval's start never yields a negative interval."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5"), T)
        idx.delete("a", T - 10 * S)
        ((start, end, _),) = idx.history(4, X4)
        assert end is not None
        assert end >= start


class TestIpReuse:
    def test_old_pod_deleted_then_new_pod_gets_ip(self) -> None:
        """After A is deleted and B takes A's address, lookups before/after name A/B."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.delete("a", T + 100 * S)
        # B was created (by the API's clock) before A's deletion was seen.
        idx.update(pod("b", "10.16.0.5", created=T + 90 * S), T + 101 * S)
        assert owner(idx, "10.16.0.5", T + 10 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 99 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 100 * S) == "b"
        assert owner(idx, "10.16.0.5", T + 10_000 * S) == "b"

    def test_history_never_overlaps(self) -> None:
        """Successive owners' intervals are ordered and never overlap."""
        idx = PodIndex()
        t = T
        for n in range(5):
            idx.update(pod(f"p{n}", "10.16.0.5", created=t - 30 * S), t)
            idx.delete(f"p{n}", t + 10 * S)
            t += 20 * S
        hist = idx.history(4, X4)
        assert [m.uid for _, _, m in hist] == [f"p{n}" for n in range(5)]
        for (s1, e1, _), (s2, _e2, _) in itertools.pairwise(hist):
            assert e1 is not None
            assert s1 <= e1 <= s2

    def test_new_pod_claims_ip_before_old_deletion_seen(self) -> None:
        """B claiming A's address closes A's interval at that moment; A's later delete is moot."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.update(pod("b", "10.16.0.5", created=T + 190 * S), T + 200 * S)
        assert owner(idx, "10.16.0.5", T + 150 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 200 * S) == "b"
        assert idx.live_pods() == 1
        idx.delete("a", T + 300 * S)
        assert owner(idx, "10.16.0.5", T + 350 * S) == "b"
        assert owner(idx, "10.16.0.5", T + 150 * S) == "a"

    def test_claim_of_one_address_of_a_dual_stack_pod(self) -> None:
        """If B claims only A's v4 address, A keeps its v6 address (and stays live)."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", "fd00:10:16::5"), T)
        idx.update(pod("b", "10.16.0.5"), T + 10 * S)
        assert idx.live_pods() == 2
        assert owner(idx, "10.16.0.5", T + 20 * S) == "b"
        assert owner(idx, "fd00:10:16::5", T + 20 * S) == "a"
        idx.delete("a", T + 30 * S)
        assert owner(idx, "10.16.0.5", T + 40 * S) == "b"
        assert owner(idx, "fd00:10:16::5", T + 40 * S) is None
        assert owner(idx, "fd00:10:16::5", T + 25 * S) == "a"

    def test_lagging_update_of_old_pod_does_not_steal_address(self) -> None:
        """After B took A's address, a later update of A still listing it keeps B the owner."""
        idx = PodIndex()
        a = pod("a", "10.16.0.5", created=T)
        idx.update(a, T)
        idx.update(pod("b", "10.16.0.5", created=T + 190 * S), T + 200 * S)
        idx.update(replace(a, labels={"terminating": "yes"}).with_record_object(), T + 210 * S)
        assert owner(idx, "10.16.0.5", T + 300 * S) == "b"

    def test_contested_address_in_one_list_newer_pod_last(self) -> None:
        """Two pods listing one address (old one Terminating): the newer, listed last, owns it."""
        idx = PodIndex()
        pods = [pod("a", "10.16.0.5", created=T), pod("b", "10.16.0.5", created=T + 300 * S)]
        idx.reconcile(pods, T + 400 * S)
        assert owner(idx, "10.16.0.5", T + 450 * S) == "b"
        idx.reconcile(pods, T + 500 * S)
        assert owner(idx, "10.16.0.5", T + 550 * S) == "b"

    def test_contested_address_in_one_list_newer_pod_first(self) -> None:
        """Two pods listing one address: the newer pod (by creation time) owns it in any order."""
        idx = PodIndex()
        pods = [pod("b", "10.16.0.5", created=T + 300 * S), pod("a", "10.16.0.5", created=T)]
        idx.reconcile(pods, T + 400 * S)
        assert owner(idx, "10.16.0.5", T + 450 * S) == "b"

    def test_reconcile_unchanged_list_adds_no_tombstones(self) -> None:
        """Reconciling the same list again adds no closed intervals."""
        idx = PodIndex()
        pods = [pod("a", "10.16.0.5", created=T), pod("b", "10.16.0.5", created=T + 300 * S)]
        idx.reconcile(pods, T + 400 * S)
        before = idx.tombstones()
        idx.reconcile(pods, T + 500 * S)
        assert idx.tombstones() == before


    def test_new_owner_shares_equal_addresses(self) -> None:
        """A new pod on the address of a deleted pod with the same addresses holds the
        deleted pod's ips tuple (one tuple in memory), equal as before."""
        idx = PodIndex()
        a = pod("a", "10.16.0.5", "fd00:10:16::5", created=T)
        idx.update(a, T)
        idx.delete("a", T + 10 * S)
        b = pod("b", "10.16.0.5", "fd00:10:16::5", created=T + 20 * S)
        ips = b.ips
        idx.update(b, T + 20 * S)
        assert b.ips is a.ips and b.ips == ips
        assert owner(idx, "fd00:10:16::5", T + 30 * S) == "b"


class TestOwnership:
    @pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
    def test_terminal_phase_owns_nothing(self, phase: str) -> None:
        """A finished pod owns no address; a running pod that finishes releases it then."""
        idx = PodIndex()
        idx.update(pod("done", "10.16.0.7", phase=phase), T)
        assert owner(idx, "10.16.0.7", T + S) is None
        assert idx.live_pods() == 0
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.update(pod("a", "10.16.0.5", created=T, phase=phase), T + 60 * S)
        assert owner(idx, "10.16.0.5", T + 30 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 61 * S) is None
        assert idx.live_pods() == 0

    def test_pending_pod_owns_nothing(self) -> None:
        """A pod without an address (Pending) owns nothing and is not live."""
        idx = PodIndex()
        idx.update(pod("p", phase="Pending"), T)
        assert idx.live_pods() == 0
        assert idx.addresses() == 0

    def test_host_network_owns_nothing(self) -> None:
        """A hostNetwork pod (its IP is the node's) never owns its address."""
        idx = PodIndex()
        idx.update(pod("h", "192.168.1.10", host_network=True), T)
        assert owner(idx, "192.168.1.10", T + S) is None
        assert idx.live_pods() == 0
        assert idx.addresses() == 0

    def test_dual_stack(self) -> None:
        """A dual-stack pod owns both its v4 and v6 addresses."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", "fd00:10:16::5"), T)
        assert owner(idx, "10.16.0.5", T + S) == "a"
        assert owner(idx, "fd00:10:16::5", T + S) == "a"
        assert idx.addresses() == 2
        assert idx.live_pods() == 1

    def test_families_do_not_collide(self) -> None:
        """v4 10.16.0.5 and the v6 address with the same integer value are different keys."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5"), T)
        assert idx.lookup(6, X4, T + S) is None
        idx.update(pod("b", str(ipaddress.IPv6Address(X4))), T)
        assert owner(idx, "10.16.0.5", T + S) == "a"
        assert idx.lookup(6, X4, T + S).uid == "b"  # type: ignore[union-attr]

    def test_label_change_updates_metadata(self) -> None:
        """A label change replaces the metadata without starting a new interval."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", labels={"v": "1"}), T)
        idx.update(pod("a", "10.16.0.5", labels={"v": "2"}), T + 10 * S)
        meta = idx.lookup(4, X4, T + 20 * S)
        assert meta is not None
        assert meta.labels == {"v": "2"}
        assert meta.kubernetes["labels"] == {"v": "2"}
        ((start, end, _),) = idx.history(4, X4)
        assert (start, end) == (T, None)

    def test_address_change_of_one_pod(self) -> None:
        """A pod whose address changes releases the old one and owns the new one from then."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.update(pod("a", "10.16.0.6", created=T), T + 10 * S)
        assert owner(idx, "10.16.0.5", T + 5 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 11 * S) is None
        assert owner(idx, "10.16.0.6", T + 11 * S) == "a"
        assert idx.history(4, ip("10.16.0.6"))[0][0] == T + 10 * S

    def test_version_increases_on_every_write(self) -> None:
        """Each update, delete, reconcile and effective prune bumps the version."""
        idx = PodIndex(retention_ns=S)
        versions = [idx.version]
        idx.update(pod("a", "10.16.0.5"), T)
        versions.append(idx.version)
        idx.delete("a", T + S)
        versions.append(idx.version)
        idx.reconcile([], T + 2 * S)
        versions.append(idx.version)
        assert idx.prune(T + 10 * S) == 1
        versions.append(idx.version)
        assert versions == sorted(set(versions))


class TestReconcile:
    def test_missing_pods_are_deleted(self) -> None:
        """Pods absent from a full list are closed at the reconcile time; present ones stay."""
        idx = PodIndex()
        idx.reconcile([pod("a", "10.16.0.5", created=T), pod("b", "10.16.0.6", created=T)],
                      T + S)
        assert idx.live_pods() == 2
        idx.reconcile([pod("b", "10.16.0.6", created=T), pod("c", "10.16.0.7")], T + 100 * S)
        assert idx.live_pods() == 2
        assert owner(idx, "10.16.0.5", T + 50 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 100 * S) is None
        assert owner(idx, "10.16.0.6", T + 200 * S) == "b"
        assert owner(idx, "10.16.0.7", T + 200 * S) == "c"

    def test_empty_list_deletes_all(self) -> None:
        """Reconciling an empty list releases every address."""
        idx = PodIndex()
        idx.reconcile([pod("a", "10.16.0.5"), pod("b", "fd00:10:16::5")], T)
        idx.reconcile([], T + S)
        assert idx.live_pods() == 0
        assert owner(idx, "10.16.0.5", T + 2 * S) is None
        assert owner(idx, "fd00:10:16::5", T + 2 * S) is None
        assert idx.tombstones() == 2

    def test_reconcile_frees_address_for_next_owner(self) -> None:
        """A pod removed by reconcile and a new owner of its address later: both attributed."""
        idx = PodIndex()
        idx.reconcile([pod("a", "10.16.0.5", created=T)], T)
        idx.reconcile([], T + 100 * S)
        idx.reconcile([pod("b", "10.16.0.5", created=T + 150 * S)], T + 200 * S)
        assert owner(idx, "10.16.0.5", T + 50 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 120 * S) is None
        assert owner(idx, "10.16.0.5", T + 160 * S) == "b"


class TestAttribute:
    """attribute() returns the owner and how it was matched."""

    def test_resolved_inside_interval(self) -> None:
        """A flow starting inside an owner's interval is resolved to that owner."""
        idx = PodIndex(skew_ns=5 * S)
        a = pod("a", "10.16.0.5", "fd00:10:16::5", created=T)
        idx.update(a, T + 60 * S)
        assert idx.attribute(4, X4, T + S) == (a, ATTR_RESOLVED)
        assert idx.attribute(6, X6, T) == (a, ATTR_RESOLVED)

    def test_uncertain_within_skew_before_only_owner(self) -> None:
        """A flow starting within the skew before the only known owner's interval is uncertain."""
        idx = PodIndex(skew_ns=5 * S)
        a = pod("a", "10.16.0.5", "fd00:10:16::5", created=T)
        idx.update(a, T + 60 * S)
        assert idx.attribute(4, X4, T - 1) == (a, ATTR_UNCERTAIN)
        assert idx.attribute(6, X6, T - 5 * S) == (a, ATTR_UNCERTAIN)

    def test_unresolved_beyond_skew_and_unknown(self) -> None:
        """Beyond the skew, or for an unknown address, nobody is named: unresolved."""
        idx = PodIndex(skew_ns=5 * S)
        idx.update(pod("a", "10.16.0.5", created=T), T + 60 * S)
        assert idx.attribute(4, X4, T - 5 * S - 1) == (None, ATTR_UNRESOLVED)
        assert idx.attribute(4, ip("10.16.0.6"), T) == (None, ATTR_UNRESOLVED)

    def test_earlier_history_gives_the_earlier_owner_resolved(self) -> None:
        """With the previous owner's tombstone known, a flow just before the new owner is the
        old owner's, resolved: the skew never applies when earlier history exists."""
        idx = PodIndex(skew_ns=5 * S)
        a = pod("a", "10.16.0.5", created=T)
        idx.update(a, T)
        b = pod("b", "10.16.0.5", created=T + 100 * S)
        idx.update(b, T + 200 * S)  # a's deletion was missed: b's arrival cuts a
        assert idx.attribute(4, X4, T + 99 * S) == (PodTombstone(a), ATTR_RESOLVED)
        assert idx.attribute(4, X4, T + 102 * S) == (b, ATTR_RESOLVED)

    def test_gap_between_owners_is_unresolved(self) -> None:
        """A flow starting between one owner's release and the next owner is unresolved."""
        idx = PodIndex(skew_ns=5 * S)
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.delete("a", T + 100 * S)
        idx.update(pod("b", "10.16.0.5"), T + 102 * S)
        assert idx.attribute(4, X4, T + 101 * S) == (None, ATTR_UNRESOLVED)

    def test_lookup_returns_the_attributed_pod(self) -> None:
        """lookup() is attribute()'s pod: resolved and uncertain owners alike."""
        idx = PodIndex(skew_ns=5 * S)
        a = pod("a", "10.16.0.5", created=T)
        idx.update(a, T)
        assert idx.lookup(4, X4, T - S) is a
        assert idx.lookup(4, X4, T + S) is a
        assert idx.lookup(4, X4, T - 6 * S) is None


class TestSkew:
    def test_flow_slightly_before_first_owner(self) -> None:
        """A flow starting within skew_ns before the first owner's interval is attributed to it."""
        idx = PodIndex(skew_ns=5 * S)
        idx.update(pod("a", "10.16.0.5", created=T), T + 60 * S)
        assert owner(idx, "10.16.0.5", T - 5 * S) == "a"
        assert owner(idx, "10.16.0.5", T - 5 * S - 1) is None

    def test_zero_skew(self) -> None:
        """With skew_ns 0 only flows from the interval start on are attributed."""
        idx = PodIndex(skew_ns=0)
        idx.update(pod("a", "10.16.0.5"), T)
        assert owner(idx, "10.16.0.5", T) == "a"
        assert owner(idx, "10.16.0.5", T - 1) is None

    def test_skew_never_reaches_into_a_previous_owner(self) -> None:
        """Skew tolerance does not move a flow from the previous owner to the next one."""
        idx = PodIndex(skew_ns=5 * S)
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.delete("a", T + 100 * S)
        idx.update(pod("b", "10.16.0.5"), T + 200 * S)
        assert owner(idx, "10.16.0.5", T + 99 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 198 * S) is None
        assert owner(idx, "10.16.0.5", T + 200 * S) == "b"

    def test_defaults(self) -> None:
        """Defaults: five days of retention, five seconds of skew."""
        idx = PodIndex()
        assert idx.retention_ns == DEFAULT_RETENTION_NS == 5 * 86_400 * S
        assert idx.skew_ns == DEFAULT_SKEW_NS == 5 * S


class TestPrune:
    def test_retention(self) -> None:
        """Closed intervals older than the retention are forgotten; younger ones kept."""
        idx = PodIndex(retention_ns=100 * S)
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.delete("a", T + 10 * S)
        assert idx.prune(T + 109 * S) == 0
        assert owner(idx, "10.16.0.5", T + 5 * S) == "a"
        assert idx.prune(T + 111 * S) == 1
        assert owner(idx, "10.16.0.5", T + 5 * S) is None
        assert idx.tombstones() == 0
        assert idx.addresses() == 0
        assert idx.evicted_total == 0  # expired, not evicted

    def test_live_pods_are_never_pruned(self) -> None:
        """Open intervals survive any prune."""
        idx = PodIndex(retention_ns=S, max_tombstones=0)
        idx.update(pod("a", "10.16.0.5", created=T), T)
        assert idx.prune(T + 10**6 * S) == 0
        assert owner(idx, "10.16.0.5", T + 10**6 * S) == "a"

    def test_prune_keeps_next_owner(self) -> None:
        """Pruning a reused address's old owner keeps the current owner's interval."""
        idx = PodIndex(retention_ns=100 * S, skew_ns=0)
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.delete("a", T + 10 * S)
        idx.update(pod("b", "10.16.0.5"), T + 20 * S)
        assert idx.prune(T + 200 * S) == 1
        assert [m.uid for _, _, m in idx.history(4, X4)] == ["b"]
        assert owner(idx, "10.16.0.5", T + 300 * S) == "b"
        assert owner(idx, "10.16.0.5", T + 5 * S) is None

    def test_max_tombstones_cap_evicts_oldest(self) -> None:
        """Beyond max_tombstones the oldest closed intervals go first and are counted evicted."""
        idx = PodIndex(max_tombstones=2)
        for n in range(5):
            idx.update(pod(f"p{n}", f"10.16.0.{n + 1}", created=T), T)
            idx.delete(f"p{n}", T + (n + 1) * S)
        assert idx.tombstones() == 5
        assert idx.prune(T + 10 * S) == 3
        assert idx.tombstones() == 2
        assert idx.evicted_total == 3
        for n in range(3):
            assert owner(idx, f"10.16.0.{n + 1}", T) is None
        for n in (3, 4):
            assert owner(idx, f"10.16.0.{n + 1}", T) == f"p{n}"

    def test_cap_and_retention_together(self) -> None:
        """Expired intervals are not counted as evictions even when the cap also applies."""
        idx = PodIndex(retention_ns=100 * S, max_tombstones=1)
        for n in range(3):
            idx.update(pod(f"p{n}", f"10.16.0.{n + 1}", created=T), T)
        idx.delete("p0", T + S)  # expires by retention
        idx.delete("p1", T + 150 * S)  # evicted by the cap
        idx.delete("p2", T + 160 * S)  # kept
        assert idx.prune(T + 190 * S) == 2
        assert idx.evicted_total == 1
        assert idx.tombstones() == 1
        assert owner(idx, "10.16.0.3", T + 100 * S) == "p2"

    def test_prune_nothing(self) -> None:
        """Pruning an empty index removes nothing and leaves the version."""
        idx = PodIndex()
        v = idx.version
        assert idx.prune(T) == 0
        assert idx.version == v

    def test_dual_stack_tombstones_pruned_per_address(self) -> None:
        """A deleted dual-stack pod leaves one tombstone per address; each goes on its own."""
        idx = PodIndex(max_tombstones=1)
        idx.update(pod("a", "10.16.0.5", "fd00::5", created=T), T)
        idx.delete("a", T + S)
        assert idx.tombstones() == 2
        assert idx.prune(T + 2 * S) == 1
        assert owner(idx, "10.16.0.5", T) is None
        assert idx.lookup(6, int(ipaddress.IPv6Address("fd00::5")), T) is not None
        assert idx.tombstones() == 1

    def test_tombstone_keeps_its_record_object(self) -> None:
        """A deleted pod found by a late lookup still carries its finished record object."""
        idx = PodIndex()
        a = pod("a", "10.16.0.5", created=T)
        idx.update(a, T)
        built = a.kubernetes_for(X4, "10.16.0.5")  # a record while the pod lived
        idx.delete("a", T + S)
        meta = idx.lookup(4, X4, T)
        assert meta == PodTombstone(a)  # the pod's tombstone (see TestTombstones)
        assert meta is not None and meta.record_objects[X4] is built
        assert meta.kubernetes_by_ip[X4]["pod"]["ip"] == "10.16.0.5"

    def test_default_cap_is_the_config_default(self) -> None:
        """PodIndex's default tombstone cap is EnrichConfig's (the documented sizing)."""
        assert PodIndex().max_tombstones == EnrichConfig().max_tombstones


class TestConcurrency:
    def test_reader_during_writes_never_fails(self) -> None:
        """A reader thread looking up while a writer updates, deletes and prunes never raises."""
        idx = PodIndex(retention_ns=50 * S, max_tombstones=200)
        addrs = [ip(f"10.16.{i // 250}.{i % 250 + 1}") for i in range(500)]
        errors: list[BaseException] = []
        lookups = [0]
        stop = threading.Event()

        def reader() -> None:
            try:
                n = 0
                while not stop.is_set():
                    for a in addrs:
                        res = idx.lookup(4, a, T + (n % 400) * S)
                        assert res is None or isinstance(res, PodMeta | PodTombstone)
                        n += 1
                    idx.history(4, addrs[n % len(addrs)])
                    idx.live_pods()
                    idx.tombstones()
                lookups[0] = n
            except BaseException as exc:
                errors.append(exc)

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        try:
            t = T
            for round_ in range(40):
                live = []
                for i, a in enumerate(addrs):
                    if (i + round_) % 3 == 0:
                        text = str(ipaddress.IPv4Address(a))
                        p = pod(f"u{round_}-{i}", text, created=t - S)
                        idx.update(p, t)
                        live.append(p)
                idx.reconcile(live[::2], t + S)
                for p in live[1::4]:
                    idx.delete(p.uid, t + 2 * S)
                idx.prune(t + 3 * S)
                t += 10 * S
        finally:
            stop.set()
            th.join(10.0)
        assert not th.is_alive()
        assert errors == []
        assert lookups[0] > 0


class TestMissedDeletion:
    """The old owner's deletion was never seen (API outage): the new pod's creation cuts."""

    def test_new_pod_owns_from_its_creation_not_from_when_we_learned(self) -> None:
        """B (created T+100) claims A's address at T+1000: flows after T+100 are B's."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.update(pod("b", "10.16.0.5", created=T + 100 * S), T + 1000 * S)
        assert owner(idx, "10.16.0.5", T + 50 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 100 * S + S // 2) == "a"  # within the rounding
        assert owner(idx, "10.16.0.5", T + 102 * S) == "b"
        assert owner(idx, "10.16.0.5", T + 500 * S) == "b"
        assert owner(idx, "10.16.0.5", T + 1500 * S) == "b"

    def test_second_after_new_pods_creation_is_uncertain(self) -> None:
        """A flow in the second between B's truncated creation time and the cut is uncertain.

        Either pod may have used the address then, so the record must not claim A
        (or B) as resolved; before and after that second the answer stays resolved.
        """
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", "fd00:10:16::5", created=T), T)
        idx.update(pod("b", "10.16.0.5", "fd00:10:16::5", created=T + 100 * S), T + 1000 * S)
        for fam, addr in ((4, X4), (6, X6)):
            assert idx.attribute(fam, addr, T + 99 * S)[1] == ATTR_RESOLVED
            meta, status = idx.attribute(fam, addr, T + 100 * S)
            assert (meta.uid if meta else None, status) == ("a", ATTR_UNCERTAIN)
            meta, status = idx.attribute(fam, addr, T + 100 * S + S - 1)
            assert (meta.uid if meta else None, status) == ("a", ATTR_UNCERTAIN)
            meta, status = idx.attribute(fam, addr, T + 101 * S)
            assert (meta.uid if meta else None, status) == ("b", ATTR_RESOLVED)

    def test_seen_deletion_leaves_no_uncertain_window(self) -> None:
        """When A's deletion was seen, the handover is exact: nothing is uncertain."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.delete("a", T + 99 * S)
        idx.update(pod("b", "10.16.0.5", created=T + 100 * S), T + 100 * S)
        assert idx.attribute(4, X4, T + 98 * S) == (idx.attribute(4, X4, T)[0], ATTR_RESOLVED)
        assert idx.attribute(4, X4, T + 100 * S + S // 2)[1] == ATTR_RESOLVED

    def test_handover_windows_are_pruned_with_their_tombstones(self) -> None:
        """Pruning past the retention forgets the window along with A's interval."""
        idx = PodIndex(retention_ns=3600 * S)
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.update(pod("b", "10.16.0.5", created=T + 100 * S), T + 1000 * S)
        assert idx._handovers
        idx.prune(T + 2 * 3600 * S)
        assert not idx._handovers
        meta, status = idx.attribute(4, X4, T + 100 * S)  # A is forgotten: only skew is left
        assert (meta.uid if meta else None, status) == ("b", ATTR_UNCERTAIN)

    def test_unknown_creation_time_cuts_now(self) -> None:
        """Without a creation time the handover happens when we learn of it."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.update(pod("b", "10.16.0.5", created=None), T + 1000 * S)
        assert owner(idx, "10.16.0.5", T + 500 * S) == "a"
        assert owner(idx, "10.16.0.5", T + 1001 * S) == "b"


UID_A = "0c6f3d0e-8b1a-4c2e-9f4d-2a7b5e1c9d30"


def metas(idx: PodIndex, addr: int, fam: int = 4) -> list[Any]:
    """The pod of each interval of ``addr``, oldest first."""
    return [m for _, _, m in idx.history(fam, addr)]


class TestTombstones:
    """A closed interval keeps its pod as a PodTombstone (records unchanged)."""

    def full(self, uid: str = UID_A, **over: Any) -> PodMeta:
        fields: dict[str, Any] = {
            "node": "node-1", "labels": {"app": "web"}, "annotations": {"k": "v"},
            "owner_kind": "Deployment", "owner_name": "web", "logical_switch": "ovn-default",
            "ip_sources": ("status", "kube-ovn+status"), **over}
        return pod(uid, "10.16.0.5", "fd00:10:16::5", created=T, **fields)

    def test_deleted_pod_becomes_its_tombstone(self) -> None:
        """After delete, both addresses' intervals hold one tombstone equal to the pod's, and
        a late flow's record is byte for byte the one the live pod gave."""
        from shipper import ecs

        idx = PodIndex()
        a = self.full()
        idx.update(a, T)
        events = [(fam, addr, TestTombstones.event(fam, addr)) for fam, addr in ((4, X4), (6, X6))]
        before = [orjson.dumps(ecs.build_record(ev, idx.lookup(fam, addr, T + S), "n"))
                  for fam, addr, ev in events]
        idx.delete(UID_A, T + 10 * S)
        (t4,), (t6,) = metas(idx, X4), metas(idx, X6, 6)
        assert isinstance(t4, PodTombstone) and t4 is t6 and t4 == PodTombstone(a)
        after = [orjson.dumps(ecs.build_record(ev, idx.lookup(fam, addr, T + S), "n"))
                 for fam, addr, ev in events]
        assert after == before

    @staticmethod
    def event(fam: int, addr: int) -> FlowEvent:
        return FlowEvent(
            action="destroy", family=fam, proto=17, orig_src=addr, orig_dst=addr + 1,
            orig_sport=1, orig_dport=53, reply_src=addr + 1, reply_dst=addr, reply_sport=53,
            reply_dport=1, icmp_type=None, icmp_code=None, icmp_id=None, ct_id=9, status=None,
            tcp_state=None, mark=None, zone=None, timeout=None, orig_packets=1, orig_bytes=60,
            reply_packets=1, reply_bytes=90, ts_start=T + S, ts_stop=T + 2 * S, ts_event=None,
            received_ns=T + 3600 * S)

    def test_reconcile_finished_and_displaced_pods_become_tombstones(self) -> None:
        """A pod missing from a full list, a pod that finished, and a pod whose one address a
        newer pod took (deletion missed) are all kept as tombstones; live pods are not."""
        idx = PodIndex()
        idx.update(pod("gone", "10.16.0.1", created=T), T)
        idx.update(pod("done", "10.16.0.2", created=T), T)
        idx.update(pod("old", "10.16.0.3", created=T), T)
        idx.update(pod("keep", "10.16.0.4", created=T), T)
        idx.update(pod("done", "10.16.0.2", created=T, phase="Succeeded"), T + S)
        idx.update(pod("new", "10.16.0.3", created=T + 5 * S), T + 6 * S)
        idx.reconcile([pod("keep", "10.16.0.4", created=T), pod("new", "10.16.0.3",
                                                                created=T + 5 * S)], T + 7 * S)
        for addr, uid in (("10.16.0.1", "gone"), ("10.16.0.2", "done"), ("10.16.0.3", "old")):
            first = metas(idx, ip(addr))[0]
            assert isinstance(first, PodTombstone) and first.uid == uid, addr
        assert type(metas(idx, ip("10.16.0.3"))[1]) is PodMeta  # "new" lives
        assert type(metas(idx, ip("10.16.0.4"))[0]) is PodMeta
        assert idx.live_pods() == 2

    def test_closed_interval_of_a_live_pod_is_a_tombstone(self) -> None:
        """A dual-stack pod that lost one address to a newer pod lives on: the closed interval
        keeps its tombstone, the open one its PodMeta; deleted, both are its tombstone."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", "fd00:10:16::5", created=T), T)
        idx.update(pod("b", "10.16.0.5", created=T + 5 * S), T + 6 * S)
        a4, b4 = metas(idx, X4)
        assert isinstance(a4, PodTombstone) and a4.uid == "a" and type(b4) is PodMeta
        assert type(metas(idx, X6, 6)[0]) is PodMeta and idx.live_pods() == 2
        idx.delete("a", T + 9 * S)
        (a6,) = metas(idx, X6, 6)
        assert isinstance(a6, PodTombstone) and a6 == a4
        assert owner(idx, "10.16.0.5", T + S) == "a" and owner(idx, "10.16.0.5", T + 7 * S) == "b"

    def test_each_version_keeps_its_own_values(self) -> None:
        """A pod that changed address and labels: every interval, also on the address it no
        longer lists, becomes the tombstone of the version it held."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T, labels={"v": "1"}), T)
        idx.update(pod("a", "10.16.0.6", created=T, labels={"v": "1"}), T + 10 * S)
        idx.update(pod("a", "10.16.0.5", created=T, labels={"v": "2"}), T + 20 * S)
        idx.update(pod("a", "10.16.0.7", created=T, labels={"v": "3"}), T + 25 * S)
        idx.delete("a", T + 30 * S)
        old, new = metas(idx, X4)
        (six,), (seven,) = metas(idx, ip("10.16.0.6")), metas(idx, ip("10.16.0.7"))
        assert [m.labels for m in (old, six, new, seven)] == [
            {"v": "1"}, {"v": "1"}, {"v": "2"}, {"v": "3"}]
        assert all(isinstance(m, PodTombstone) for m in (old, six, new, seven))
        assert owner(idx, "10.16.0.6", T + 15 * S) == "a"

    def test_lookups_and_restarts_of_the_same_uid(self) -> None:
        """A pod reported again after its deletion (a stale list) is a new live owner; its
        tombstone stays in the earlier interval."""
        idx = PodIndex()
        idx.update(pod("a", "10.16.0.5", created=T), T)
        idx.delete("a", T + 10 * S)
        idx.update(pod("a", "10.16.0.5", created=T), T + 20 * S)
        first, second = metas(idx, X4)
        assert isinstance(first, PodTombstone) and type(second) is PodMeta
        assert owner(idx, "10.16.0.5", T + 5 * S) == "a"
        assert type(idx.lookup(4, X4, T + 15 * S)) is PodMeta  # from the deletion on
