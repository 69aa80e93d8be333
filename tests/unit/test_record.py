"""Tests for shipper.record: PodMeta's record objects and the sharing behind them."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import orjson
import pytest

from shipper import ecs, record
from shipper.ecs_json import JsonLineEncoder
from shipper.record import (
    ACTION_DESTROY,
    ACTION_NEW,
    IP_SOURCE_BOTH,
    IP_SOURCE_KUBE_OVN,
    FlowEvent,
    PodMeta,
    PodTombstone,
    ip_key,
    ip_to_str,
    parse_ip,
)

V4 = "10.16.0.5"
V6 = "fd00:10:16::5"
T0 = 1_714_557_600 * 1_000_000_000


def fresh(text: str) -> str:
    """An equal string that is a different object (as decoded from JSON)."""
    return "".join(list(text))


def make_pod(name: str = "web-1", addrs: tuple[str, ...] = (V4, V6), **over: Any) -> PodMeta:
    """A Deployment pod whose strings and dicts are all fresh objects, record object built."""
    fields: dict[str, Any] = {
        "namespace": fresh("shop"),
        "name": name,
        "uid": f"uid-{name}",
        "ips": tuple(parse_ip(a) for a in addrs),
        "node": fresh("node-1"),
        "labels": {fresh("app"): fresh("web"), fresh("tier"): fresh("backend")},
        "owner_kind": fresh("Deployment"),
        "owner_name": fresh("web"),
        "logical_switch": fresh("ovn-default"),
        "phase": fresh("Running"),
    }
    fields.update(over)
    return PodMeta(**fields).with_record_object()


def event(src: str) -> FlowEvent:
    """A NEW TCP event from ``src``."""
    fam, ip = parse_ip(src)
    dst = parse_ip("1.1.1.1" if fam == 4 else "2001:db8::1")[1]
    return FlowEvent(
        action=ACTION_NEW, family=fam, proto=6, orig_src=ip, orig_dst=dst, orig_sport=40000,
        orig_dport=443, reply_src=dst, reply_dst=ip, reply_sport=443, reply_dport=40000,
        icmp_type=None, icmp_code=None, icmp_id=None, ct_id=7, status=None, tcp_state=None,
        mark=None, zone=None, timeout=None, orig_packets=None, orig_bytes=None,
        reply_packets=None, reply_bytes=None, ts_start=None, ts_stop=None, ts_event=None,
        received_ns=T0,
    )


def unshared_objects(p: PodMeta) -> dict[int, dict[str, Any]]:
    """The per-address record objects as built before sharing (every dict its own copy)."""
    pod: dict[str, Any] = {"name": p.name, "uid": p.uid}
    obj: dict[str, Any] = {"namespace": p.namespace, "pod": pod}
    if p.labels:
        obj["labels"] = dict(p.labels)
    if p.annotations:
        obj["annotations"] = dict(p.annotations)
    if p.node:
        obj["node"] = {"name": p.node}
    if p.owner_kind and p.owner_name:
        obj["owner"] = {"kind": p.owner_kind, "name": p.owner_name}
    if p.logical_switch:
        obj["ovn"] = {"logical_switch": p.logical_switch}
    return {
        ip_key(fam, ip): {**obj, "pod": {**pod, "ip": ip_to_str(fam, ip)}} for fam, ip in p.ips
    }


class TestSharing:
    def test_equal_labels_share_one_dict(self) -> None:
        """Two pods with equal labels (built from different dicts) share one labels dict."""
        a, b = make_pod("a"), make_pod("b")
        assert a.labels is b.labels
        ka, kb = a.kubernetes_by_ip, b.kubernetes_by_ip
        key = ip_key(*parse_ip(V4))
        assert ka[key]["labels"] is a.labels  # stored once, referenced twice
        for part in ("labels", "node", "owner", "ovn"):
            assert ka[key][part] is kb[key][part]

    def test_different_labels_not_shared(self) -> None:
        """Pods whose labels differ in a value or in order get different dicts."""
        a = make_pod("a")
        b = make_pod("b", labels={"app": "web", "tier": "frontend"})
        c = make_pod("c", labels={"tier": "backend", "app": "web"})
        assert b.labels == {"app": "web", "tier": "frontend"}
        assert a.labels is not b.labels
        assert a.labels is not c.labels
        assert list(c.labels) == ["tier", "app"]

    def test_records_of_one_pod_leave_the_other_alone(self) -> None:
        """Building records for one pod alters neither pod's objects nor their shared dicts."""
        a, b = make_pod("a"), make_pod("b")
        before_a = copy.deepcopy(a.kubernetes_by_ip)
        before_b = copy.deepcopy(b.kubernetes_by_ip)
        labels = copy.deepcopy(a.labels)
        for src in (V4, V6, V4):
            rec = ecs.build_record(event(src), a, "n")
            assert rec["kubernetes"]["pod"] == {"name": "a", "uid": "uid-a", "ip": src}
        assert a.kubernetes_by_ip == before_a
        assert b.kubernetes_by_ip == before_b
        assert b.labels == labels
        rec_b = ecs.build_record(event(V4), b, "n")
        assert rec_b["kubernetes"]["pod"] == {"name": "b", "uid": "uid-b", "ip": V4}

    def test_caller_dict_is_never_shared(self) -> None:
        """The caller's labels dict is copied: changing it later changes no pod."""
        mine = {"app": "web", "tier": "backend"}
        a = make_pod("a", labels=mine)
        assert a.labels is not mine
        mine["app"] = "evil"
        assert a.labels == {"app": "web", "tier": "backend"}
        assert make_pod("b").labels == {"app": "web", "tier": "backend"}

    def test_repeated_strings_interned(self) -> None:
        """Namespace, node, owner and phase of two pods are one string object each."""
        a, b = make_pod("a"), make_pod("b")
        for attr in ("namespace", "node", "owner_kind", "owner_name", "logical_switch", "phase"):
            assert getattr(a, attr) is getattr(b, attr), attr

    def test_full_cache_is_cleared_and_pods_keep_their_objects(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Beyond the cache's bound it starts over; pods built before keep equal objects."""
        monkeypatch.setattr(record, "_SHARED_MAX", 3)
        monkeypatch.setattr(record, "_shared_maps", {})
        pods = [make_pod(f"p{n}", labels={"app": f"a{n}"}) for n in range(10)]
        assert len(record._shared_maps) <= 3
        assert [p.labels for p in pods] == [{"app": f"a{n}"} for n in range(10)]

    def test_unhashable_values_are_copied_not_shared(self) -> None:
        """A labels value that cannot be a cache key is still carried, in a private copy."""
        odd: dict[str, Any] = {"app": ["x"]}
        a = make_pod("a", labels=odd)
        assert a.labels == odd
        assert a.labels is not odd


class TestLazyRecordObjects:
    def test_built_on_first_use_then_shared(self) -> None:
        """A pod has no record object until its first record; later calls return that one."""
        p = make_pod("a")
        assert p.record_objects == {}
        key, text = ip_key(*parse_ip(V4)), V4
        first = p.kubernetes_for(key, text)
        assert p.record_objects == {key: first}
        assert p.kubernetes_for(key, text) is first
        assert first == unshared_objects(p)[key]

    def test_unlisted_address_is_not_kept(self) -> None:
        """An address the pod does not list gets a new object each time, none is kept."""
        p = make_pod("a")
        key = ip_key(*parse_ip("10.16.9.9"))
        one = p.kubernetes_for(key, "10.16.9.9")
        assert one["pod"]["ip"] == "10.16.9.9"
        assert p.kubernetes_for(key, "10.16.9.9") is not one
        assert p.record_objects == {}

    def test_replace_starts_without_objects(self) -> None:
        """A copy made with dataclasses.replace does not inherit the original's objects."""
        p = make_pod("a")
        p.kubernetes_for(ip_key(*parse_ip(V4)), V4)
        assert replace(p, name="b").record_objects == {}


class TestRecordObjects:
    @pytest.mark.parametrize(
        "over",
        [
            {},
            {"labels": {}, "node": None, "owner_kind": None, "logical_switch": None},
            {"annotations": {"ovn.kubernetes.io/ip_address": V4}},
            {"owner_kind": "StatefulSet", "owner_name": None},
        ],
        ids=["full", "minimal", "annotations", "owner-kind-only"],
    )
    def test_objects_identical_to_unshared_build(self, over: dict[str, Any]) -> None:
        """Each address's object serialises byte for byte as the unshared build did."""
        p = make_pod("a", **over)
        want = unshared_objects(p)
        assert list(p.kubernetes_by_ip) == list(want)
        for key, obj in want.items():
            assert orjson.dumps(p.kubernetes_by_ip[key]) == orjson.dumps(obj)

    def test_records_identical_to_unshared_build(self) -> None:
        """A whole record built from a shared object equals one built from a private copy."""
        p = make_pod("a")
        private = replace(p)
        object.__setattr__(private, "record_objects", unshared_objects(p))
        for src in (V4, V6):
            assert orjson.dumps(ecs.build_record(event(src), p, "n")) == orjson.dumps(
                ecs.build_record(event(src), private, "n")
            )

    def test_kubernetes_is_the_object_without_ip(self) -> None:
        """``kubernetes`` is the record object without pod.ip, a new dict on each access."""
        p = make_pod("a")
        k = p.kubernetes
        assert k["pod"] == {"name": "a", "uid": "uid-a"}
        assert k == {**p.kubernetes_by_ip[ip_key(*parse_ip(V4))], "pod": k["pod"]}
        assert p.kubernetes is not k

    def test_value_equal_to_its_input(self) -> None:
        """``with_record_object`` changes no compared field."""
        raw = PodMeta(namespace="a", name="b", uid="u", ips=((4, 1),), labels={"x": "y"})
        assert raw.with_record_object() == raw

    def test_address_not_listed_still_gets_its_ip(self) -> None:
        """The fallback for an unlisted address builds the object with that address."""
        p = make_pod("a", addrs=("10.16.0.99",))
        rec = ecs.build_record(event(V4), p, "n")
        assert rec["kubernetes"]["pod"] == {"name": "a", "uid": "uid-a", "ip": V4}
        assert rec["kubernetes"]["labels"] == {"app": "web", "tier": "backend"}


UUID = "0c6f3d0e-8b1a-4c2e-9f4d-2a7b5e1c9d30"

#: Pods whose tombstones must read and record like them: canonical uid (packed) or
#: not, one address (kept as its key) or several, v6 alone, ip_sources mixed, etc.
TOMBSTONE_CASES: dict[str, dict[str, Any]] = {
    "full-dual": {"uid": UUID},
    "v4-only": {"uid": UUID, "addrs": (V4,)},
    "v6-only": {"uid": UUID, "addrs": (V6,)},
    "non-canonical-uid": {"uid": "uid-x"},
    "upper-case-uuid": {"uid": UUID.upper(), "addrs": (V4,)},
    "non-ascii-name": {"uid": UUID, "name": "caf\u00e9-1", "addrs": (V4,)},
    "minimal": {"uid": UUID, "addrs": (V4,), "labels": {}, "node": None, "owner_kind": None,
                "owner_name": None, "logical_switch": None, "phase": None},
    "annotations+sources": {"uid": UUID, "annotations": {"a": "b"},
                            "ip_sources": (IP_SOURCE_BOTH, IP_SOURCE_KUBE_OVN)},
}


def tombstone_case(case: str) -> PodMeta:
    over = dict(TOMBSTONE_CASES[case])
    return make_pod(over.pop("name", "web-1"), over.pop("addrs", (V4, V6)), **over)


def destroy(src: str) -> FlowEvent:
    """A late DESTROY of a flow from ``src`` (counters and times set)."""
    return event(src)._replace(action=ACTION_DESTROY, orig_packets=3, orig_bytes=180,
                               reply_packets=2, reply_bytes=120, ts_start=T0, ts_stop=T0 + 5)


class TestTombstone:
    @pytest.mark.parametrize("case", sorted(TOMBSTONE_CASES))
    def test_records_byte_identical_to_the_live_pods(self, case: str) -> None:
        """Every address's record (dict path and NDJSON line) of a tombstone is byte for
        byte the one its pod gave while it lived."""
        live = tombstone_case(case)
        tomb = PodTombstone(tombstone_case(case))  # no record object built before
        for fam, ip in live.ips:
            ev = destroy(ip_to_str(fam, ip))
            assert orjson.dumps(ecs.build_record(ev, tomb, "n")) == orjson.dumps(
                ecs.build_record(ev, live, "n"))
            assert JsonLineEncoder("n").encode(ev, tomb, None) == JsonLineEncoder(
                "n").encode(ev, live, None)
        assert list(tomb.kubernetes_by_ip) == list(live.kubernetes_by_ip)
        assert tomb.kubernetes == live.kubernetes

    @pytest.mark.parametrize("case", sorted(TOMBSTONE_CASES))
    def test_reads_like_its_pod(self, case: str) -> None:
        """A tombstone has its pod's values, except the creation time it does not keep."""
        p = replace(tombstone_case(case), created_ns=T0)
        t = PodTombstone(p)
        for attr in ("namespace", "name", "uid", "ips", "node", "labels", "annotations",
                     "owner_kind", "owner_name", "logical_switch", "host_network", "phase",
                     "ip_sources"):
            assert getattr(t, attr) == getattr(p, attr), attr
        assert t.created_ns is None
        assert t.with_record_object() == replace(p, created_ns=None)

    def test_inherits_the_record_objects_built(self) -> None:
        """Record objects built while the pod lived are the tombstone's: not built again."""
        p = make_pod("a")
        built = p.kubernetes_for(ip_key(*parse_ip(V4)), V4)
        t = PodTombstone(p)
        assert t.kubernetes_for(ip_key(*parse_ip(V4)), V4) is built
        assert ecs.build_record(event(V4), t, "n")["kubernetes"] is built

    def test_builds_and_keeps_its_record_object(self) -> None:
        """A tombstone's first record builds the object once; later ones share it."""
        t = PodTombstone(make_pod("a"))
        key = ip_key(*parse_ip(V6))
        first = t.kubernetes_for(key, V6)
        assert t.record_objects == {key: first}
        assert t.kubernetes_for(key, V6) is first

    def test_shares_the_values_pods_have_in_common(self) -> None:
        """Tombstones of pods with equal namespace, annotations, owner kind, switch, phase and
        ip_sources share one tuple of them; their labels dict is the pods' shared one."""
        a, b = PodTombstone(make_pod("a")), PodTombstone(make_pod("b"))
        assert a._common is b._common
        assert a.labels is b.labels
        c = PodTombstone(make_pod("c", namespace="other"))
        assert c._common is not a._common and c.namespace == "other"

    def test_one_address_kept_as_its_key(self) -> None:
        """A pod with one address keeps it as the index's integer key, not a tuple of pairs;
        a canonical uid and an ASCII name are packed into one bytes object."""
        p = make_pod("a", (V4,), uid=UUID)
        t = PodTombstone(p)
        assert t._addrs is p.ips[0][1]
        assert t._id == bytes.fromhex(UUID.replace("-", "")) + b"a"
        assert PodTombstone(make_pod("a", (V6,)))._addrs == ip_key(*parse_ip(V6))

    def test_equality_by_value(self) -> None:
        """Equal pods give equal tombstones; a different value (or a PodMeta) is not equal."""
        a = PodTombstone(make_pod("a", uid=UUID))
        assert a == PodTombstone(make_pod("a", uid=UUID))
        assert a != PodTombstone(make_pod("a", uid=UUID, node="node-2"))
        assert a != PodTombstone(make_pod("a", uid=UUID, annotations={"k": "v"}))
        assert a != make_pod("a", uid=UUID)

    def test_read_only(self) -> None:
        """No attribute can be set or deleted."""
        t = PodTombstone(make_pod("a"))
        with pytest.raises(AttributeError):
            t.node = "x"
        with pytest.raises(AttributeError):
            del t.labels

    def test_pickle_and_copy_give_an_equal_tombstone(self) -> None:
        """A pickled or copied tombstone is equal and records the same."""
        import pickle

        t = PodTombstone(make_pod("a", uid=UUID, ip_sources=(IP_SOURCE_BOTH, IP_SOURCE_BOTH)))
        for other in (pickle.loads(pickle.dumps(t)), copy.copy(t), copy.deepcopy(t)):
            assert isinstance(other, PodTombstone) and other == t
            assert orjson.dumps(ecs.build_record(event(V6), other, "n")) == orjson.dumps(
                ecs.build_record(event(V6), t, "n"))

    @pytest.mark.parametrize("case", sorted(TOMBSTONE_CASES))
    def test_of_values_equals_the_tombstone_of_the_pod(self, case: str) -> None:
        """``PodTombstone.of`` (the state file's loader) gives the tombstone of the PodMeta
        with those values."""
        p = tombstone_case(case)
        t = PodTombstone.of(
            p.namespace, p.name, p.uid, p.ips, p.node, p.labels, p.annotations, p.owner_kind,
            p.owner_name, p.logical_switch, p.host_network, p.phase, p.ip_sources)
        assert t == PodTombstone(p) and t.record_objects == {}
