"""Tests for shipper.enrich.pods: v1 Pod JSON -> PodMeta, label policy."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import orjson
import pytest

from shipper.config import EnrichConfig
from shipper.enrich.pods import (
    LabelPolicy,
    parse_time_ns,
    pod_from_dict,
    pods_from_list,
)
from shipper.errors import EnrichError
from shipper.record import ip_key, parse_ip


def make_pod(**over: Any) -> dict[str, Any]:
    """A realistic Deployment pod, as an API list item."""
    pod: dict[str, Any] = {
        "metadata": {
            "namespace": "shop",
            "name": "web-7d4b9c8f5-x2x9q",
            "uid": "11111111-2222-3333-4444-555555555555",
            "creationTimestamp": "2024-05-01T10:00:00Z",
            "labels": {"app": "web", "pod-template-hash": "7d4b9c8f5"},
            "annotations": {
                "ovn.kubernetes.io/logical_switch": "ovn-default",
                "ovn.kubernetes.io/ip_address": "10.16.0.5",
                "secret/token": "hunter2",
            },
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Service", "name": "ignored", "controller": False},
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "web-7d4b9c8f5",
                    "controller": True,
                },
            ],
        },
        "spec": {"nodeName": "node-1"},
        "status": {
            "phase": "Running",
            "podIP": "10.16.0.5",
            "podIPs": [{"ip": "10.16.0.5"}, {"ip": "fd00:10:16::5"}],
        },
    }
    for path, value in over.items():
        node = pod
        parts = path.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if value is _DELETE:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return pod


_DELETE = object()


class TestLabelPolicy:
    def test_default_ships_all_labels_and_no_annotations(self) -> None:
        """With the defaults every label is shipped and no annotation is."""
        p = LabelPolicy()
        assert p.labels({"b": "2", "a": "1"}) == {"a": "1", "b": "2"}
        assert p.annotations({"a": "1"}) == {}

    def test_result_keys_sorted(self) -> None:
        """Output keys are sorted, whatever the input order."""
        assert list(LabelPolicy().labels({"z": "1", "a": "2", "m": "3"})) == ["a", "m", "z"]

    def test_allowlist_globs(self) -> None:
        """A non-empty allowlist keeps only keys matching one of its globs."""
        p = LabelPolicy(label_allowlist=("app", "app.kubernetes.io/*"))
        raw = {"app": "x", "app.kubernetes.io/name": "y", "team": "z"}
        assert p.labels(raw) == {"app": "x", "app.kubernetes.io/name": "y"}

    def test_globs_are_case_sensitive(self) -> None:
        """Label keys are case-sensitive in Kubernetes, so are the globs."""
        assert LabelPolicy(label_allowlist=("app",)).labels({"App": "x"}) == {}

    def test_denylist_after_allowlist(self) -> None:
        """The denylist removes keys even when the allowlist matched them."""
        p = LabelPolicy(label_allowlist=("*",), label_denylist=("*hash*",))
        assert p.labels({"app": "x", "pod-template-hash": "abc"}) == {"app": "x"}

    def test_annotation_allowlist(self) -> None:
        """Only allowlisted annotation keys are shipped."""
        p = LabelPolicy(annotation_allowlist=("ovn.kubernetes.io/*",))
        raw = {"ovn.kubernetes.io/ip_address": "1", "other": "2"}
        assert p.annotations(raw) == {"ovn.kubernetes.io/ip_address": "1"}

    def test_non_string_keys_and_values_dropped(self) -> None:
        """Keys or values that are not strings are dropped, not stringified."""
        raw: dict[Any, Any] = {"ok": "1", 5: "x", "n": 3, "l": ["a"], "d": {"a": "b"}, "z": None}
        assert LabelPolicy().labels(raw) == {"ok": "1"}

    def test_not_a_mapping_yields_empty(self) -> None:
        """A labels value that is not a mapping yields no labels."""
        assert LabelPolicy().labels(["a", "b"]) == {}  # type: ignore[arg-type]
        assert LabelPolicy().labels(None) == {}

    def test_long_keys_dropped(self) -> None:
        """Keys longer than max_key_bytes (in UTF-8 bytes) are dropped, not truncated."""
        p = LabelPolicy(max_key_bytes=4)
        assert p.labels({"abcd": "1", "abcde": "2", "ééé": "3"}) == {"abcd": "1"}

    def test_values_truncated_on_character_boundary(self) -> None:
        """Values are cut to max_value_bytes without splitting a UTF-8 character."""
        p = LabelPolicy(max_value_bytes=5)
        out = p.labels({"a": "abcdefgh", "b": "ééé", "c": "abc"})
        assert out == {"a": "abcde", "b": "éé", "c": "abc"}
        assert all(len(v.encode()) <= 5 for v in out.values())

    def test_count_capped_deterministically(self) -> None:
        """At most max_labels entries ship: the first ones in key order."""
        p = LabelPolicy(max_labels=2)
        assert p.labels({"c": "3", "a": "1", "b": "2"}) == {"a": "1", "b": "2"}
        assert LabelPolicy(max_labels=0).labels({"a": "1"}) == {}

    def test_cap_counts_only_shipped_entries(self) -> None:
        """Entries removed by the lists do not use up the count cap."""
        p = LabelPolicy(max_labels=1, label_denylist=("a",))
        assert p.labels({"a": "1", "b": "2"}) == {"b": "2"}

    def test_from_config(self) -> None:
        """from_config copies every EnrichConfig field."""
        cfg = EnrichConfig(
            label_allowlist=["app"],
            label_denylist=["x"],
            annotation_allowlist=["y"],
            max_labels=3,
            max_key_bytes=10,
            max_value_bytes=20,
        )
        p = LabelPolicy.from_config(cfg)
        assert p == LabelPolicy(("app",), ("x",), ("y",), 3, 10, 20)

    def test_defaults_match_config_defaults(self) -> None:
        """LabelPolicy() equals the policy built from a default EnrichConfig."""
        assert LabelPolicy() == LabelPolicy.from_config(EnrichConfig())


class TestPodFromDict:
    def test_full_pod(self) -> None:
        """Every field of a Deployment pod is converted."""
        meta = pod_from_dict(make_pod(), LabelPolicy())
        assert meta.namespace == "shop"
        assert meta.name == "web-7d4b9c8f5-x2x9q"
        assert meta.uid == "11111111-2222-3333-4444-555555555555"
        assert meta.ips == (parse_ip("10.16.0.5"), parse_ip("fd00:10:16::5"))
        assert meta.node == "node-1"
        assert meta.labels == {"app": "web", "pod-template-hash": "7d4b9c8f5"}
        assert meta.annotations == {}
        assert meta.logical_switch == "ovn-default"
        assert meta.host_network is False
        assert meta.phase == "Running"
        assert meta.created_ns == 1714557600 * 1_000_000_000

    def test_record_object_built(self) -> None:
        """The result already carries the record's kubernetes object."""
        meta = pod_from_dict(make_pod(), LabelPolicy())
        assert meta.kubernetes == {
            "namespace": "shop",
            "pod": {"name": "web-7d4b9c8f5-x2x9q", "uid": "11111111-2222-3333-4444-555555555555"},
            "labels": {"app": "web", "pod-template-hash": "7d4b9c8f5"},
            "node": {"name": "node-1"},
            "owner": {"kind": "Deployment", "name": "web"},
            "ovn": {"logical_switch": "ovn-default"},
        }

    def test_replicas_share_labels_and_sub_objects(self) -> None:
        """Two replicas decoded separately share labels, node, owner and ovn dicts, safely."""
        a = pod_from_dict(orjson.loads(orjson.dumps(make_pod())), LabelPolicy())
        b = pod_from_dict(
            orjson.loads(orjson.dumps(make_pod(metadata__name="web-7d4b9c8f5-zzzzz",
                                               metadata__uid="other-uid"))),
            LabelPolicy(),
        )
        assert a.labels is b.labels
        ka = a.kubernetes_by_ip[ip_key(*parse_ip("10.16.0.5"))]
        kb = b.kubernetes_by_ip[ip_key(*parse_ip("10.16.0.5"))]
        assert ka["labels"] is a.labels
        for part in ("labels", "node", "owner", "ovn"):
            assert ka[part] is kb[part]
        assert ka["pod"] == {"name": "web-7d4b9c8f5-x2x9q",
                             "uid": "11111111-2222-3333-4444-555555555555", "ip": "10.16.0.5",
                             "ip_source": "status"}
        assert kb["pod"] == {"name": "web-7d4b9c8f5-zzzzz", "uid": "other-uid",
                             "ip": "10.16.0.5", "ip_source": "status"}
        assert orjson.dumps(ka) == orjson.dumps({
            "namespace": "shop",
            "pod": {"name": "web-7d4b9c8f5-x2x9q", "uid": "11111111-2222-3333-4444-555555555555",
                    "ip": "10.16.0.5", "ip_source": "status"},
            "labels": {"app": "web", "pod-template-hash": "7d4b9c8f5"},
            "node": {"name": "node-1"},
            "owner": {"kind": "Deployment", "name": "web"},
            "ovn": {"logical_switch": "ovn-default"},
        })

    def test_replicaset_becomes_deployment(self) -> None:
        """A controller ReplicaSet named <x>-<pod-template-hash> yields Deployment <x>."""
        meta = pod_from_dict(make_pod(), LabelPolicy())
        assert (meta.owner_kind, meta.owner_name) == ("Deployment", "web")

    def test_replicaset_without_hash_label_kept(self) -> None:
        """Without the pod-template-hash label the ReplicaSet itself is the owner."""
        pod = make_pod(metadata__labels={"app": "web"})
        meta = pod_from_dict(pod, LabelPolicy())
        assert (meta.owner_kind, meta.owner_name) == ("ReplicaSet", "web-7d4b9c8f5")

    def test_replicaset_name_not_matching_hash_kept(self) -> None:
        """A ReplicaSet whose name does not end with -<hash> stays a ReplicaSet."""
        pod = make_pod(metadata__labels={"pod-template-hash": "zzz"})
        meta = pod_from_dict(pod, LabelPolicy())
        assert (meta.owner_kind, meta.owner_name) == ("ReplicaSet", "web-7d4b9c8f5")

    def test_other_controller_kinds_kept(self) -> None:
        """StatefulSet, DaemonSet, Job owners are reported as they are."""
        pod = make_pod(
            metadata__ownerReferences=[{"kind": "StatefulSet", "name": "db", "controller": True}]
        )
        meta = pod_from_dict(pod, LabelPolicy())
        assert (meta.owner_kind, meta.owner_name) == ("StatefulSet", "db")

    def test_no_controller_no_owner(self) -> None:
        """Owner references that are not the controller give no owner."""
        pod = make_pod(metadata__ownerReferences=[{"kind": "Node", "name": "n"}])
        meta = pod_from_dict(pod, LabelPolicy())
        assert meta.owner_kind is None and meta.owner_name is None
        assert "owner" not in meta.kubernetes

    def test_pod_ip_fallback(self) -> None:
        """Without status.podIPs, status.podIP is used."""
        pod = make_pod(status__podIPs=_DELETE)
        assert pod_from_dict(pod, LabelPolicy()).ips == (parse_ip("10.16.0.5"),)

    def test_pending_pod_has_no_ips(self) -> None:
        """A pod without any IP yet converts with an empty ips tuple."""
        pod = make_pod(status={"phase": "Pending"})
        meta = pod_from_dict(pod, LabelPolicy())
        assert meta.ips == () and meta.phase == "Pending"

    def test_duplicate_ips_collapsed(self) -> None:
        """The same address listed twice appears once."""
        pod = make_pod(status__podIPs=[{"ip": "10.0.0.1"}, {"ip": "10.0.0.1"}])
        assert pod_from_dict(pod, LabelPolicy()).ips == (parse_ip("10.0.0.1"),)

    def test_host_network_flag(self) -> None:
        """spec.hostNetwork is carried so the index can refuse to attribute by IP."""
        pod = make_pod(spec__hostNetwork=True)
        assert pod_from_dict(pod, LabelPolicy()).host_network is True

    def test_logical_switch_read_regardless_of_allowlist(self) -> None:
        """The Kube-OVN logical switch is read even when no annotation is allowlisted."""
        meta = pod_from_dict(make_pod(), LabelPolicy(annotation_allowlist=()))
        assert meta.logical_switch == "ovn-default"
        assert meta.annotations == {}

    def test_annotations_allowlisted(self) -> None:
        """Allowlisted annotations are shipped; others are not."""
        p = LabelPolicy(annotation_allowlist=("ovn.kubernetes.io/*",))
        meta = pod_from_dict(make_pod(), p)
        assert meta.annotations == {
            "ovn.kubernetes.io/ip_address": "10.16.0.5",
            "ovn.kubernetes.io/logical_switch": "ovn-default",
        }
        assert "secret/token" not in meta.kubernetes.get("annotations", {})

    def test_watch_object_with_kind(self) -> None:
        """A watch event object (kind Pod, apiVersion v1) converts the same way."""
        pod = make_pod(kind="Pod", apiVersion="v1")
        assert pod_from_dict(pod, LabelPolicy()).name == "web-7d4b9c8f5-x2x9q"

    def test_minimal_pod(self) -> None:
        """Only namespace, name and uid are required."""
        meta = pod_from_dict({"metadata": {"namespace": "a", "name": "b", "uid": "c"}})
        assert (meta.namespace, meta.name, meta.uid, meta.ips) == ("a", "b", "c", ())
        assert meta.created_ns is None and meta.node is None

    def test_input_not_mutated(self) -> None:
        """Conversion does not modify the input object."""
        pod = make_pod()
        before = copy.deepcopy(pod)
        pod_from_dict(pod, LabelPolicy(max_labels=1))
        assert pod == before

    def test_label_values_are_data_not_markup(self) -> None:
        """Hostile label values are kept verbatim as data (JSON-escaped later), capped."""
        evil = '"}, {"injected": true} \n\x00'
        pod = make_pod(metadata__labels={"app": evil})
        assert pod_from_dict(pod, LabelPolicy()).labels == {"app": evil}

    @pytest.mark.parametrize(
        ("over", "needle"),
        [
            ({"metadata": _DELETE}, "metadata"),
            ({"metadata__uid": _DELETE}, "metadata.uid"),
            ({"metadata__name": 5}, "metadata.name"),
            ({"metadata__namespace": ""}, "metadata.namespace"),
            ({"metadata__labels": ["a"]}, "metadata.labels"),
            ({"metadata__annotations": "x"}, "metadata.annotations"),
            ({"metadata__creationTimestamp": "yesterday"}, "metadata.creationTimestamp"),
            ({"metadata__ownerReferences": "x"}, "metadata.ownerReferences"),
            ({"metadata__ownerReferences": [{"controller": True}]}, "ownerReferences[0]"),
            ({"status__podIPs": [{"ip": "10.0.0.300"}]}, "status.podIPs"),
            ({"status__podIPs": [{"address": "10.0.0.3"}]}, "status.podIPs[0].ip"),
            ({"status__podIPs": "10.0.0.3"}, "status.podIPs"),
            ({"status__podIPs": _DELETE, "status__podIP": 7}, "status.podIP"),
            ({"status__phase": 1}, "status.phase"),
            ({"spec__nodeName": ["n"]}, "spec.nodeName"),
            ({"spec__hostNetwork": "yes"}, "spec.hostNetwork"),
            ({"spec": "x"}, "spec"),
            ({"status": []}, "status"),
            ({"kind": "Service"}, "kind"),
        ],
    )
    def test_malformed_raises_naming_field_and_pod(self, over: dict[str, Any], needle: str) -> None:
        """A malformed object raises EnrichError naming the bad field and the pod."""
        with pytest.raises(EnrichError) as info:
            pod_from_dict(make_pod(**over), LabelPolicy())
        msg = str(info.value)
        assert needle in msg
        if "metadata" not in over and "metadata__name" not in over:
            assert "shop/web-7d4b9c8f5-x2x9q" in msg or "metadata.namespace" in msg

    def test_not_an_object(self) -> None:
        """A non-mapping item raises EnrichError."""
        with pytest.raises(EnrichError, match="not a JSON object"):
            pod_from_dict(["x"], LabelPolicy())  # type: ignore[arg-type]


class TestParseTimeNs:
    def test_utc_z(self) -> None:
        """The API's 'Z' form converts to whole-second nanoseconds."""
        assert parse_time_ns("1970-01-01T00:00:01Z") == 1_000_000_000

    def test_fraction_and_offset(self) -> None:
        """Fractions and explicit offsets are honoured."""
        assert parse_time_ns("1970-01-01T01:00:00.5+01:00") == 500_000_000

    def test_garbage(self) -> None:
        """Anything else raises ValueError."""
        with pytest.raises(ValueError):
            parse_time_ns("not a time")


class TestPodsFromList:
    def test_good_and_bad_items(self) -> None:
        """Bad items yield one error each; good items are still returned."""
        good = make_pod()
        bad = make_pod(metadata__uid=_DELETE)
        pods, errors = pods_from_list({"kind": "List", "items": [good, bad, "junk"]})
        assert [p.name for p in pods] == ["web-7d4b9c8f5-x2x9q"]
        assert len(errors) == 2
        assert errors[0].startswith("items[1]:") and "metadata.uid" in errors[0]
        assert errors[1].startswith("items[2]:")

    def test_policy_applied(self) -> None:
        """The given policy applies to every item."""
        pods, _ = pods_from_list({"items": [make_pod()]}, LabelPolicy(label_allowlist=("app",)))
        assert pods[0].labels == {"app": "web"}

    def test_empty_list(self) -> None:
        """An empty PodList gives no pods and no errors."""
        assert pods_from_list({"kind": "PodList", "items": []}) == ([], [])

    @pytest.mark.parametrize("doc", [{"kind": "PodList"}, {"items": {}}, [], {"kind": "Pod"}])
    def test_not_a_list(self, doc: Any) -> None:
        """A document without an items list is rejected as a whole."""
        with pytest.raises(EnrichError):
            pods_from_list(doc)


def kube_ovn_pod(annotations: dict[str, str], pod_ips: list[str] | None) -> dict[str, Any]:
    """A pod as Kube-OVN's controller leaves it: allocation annotations, status maybe unset."""
    pod = make_pod(metadata__annotations=annotations)
    if pod_ips is None:
        pod["status"] = {"phase": "Pending"}
    else:
        pod["status"]["podIPs"] = [{"ip": ip} for ip in pod_ips]
        pod["status"]["podIP"] = pod_ips[0]
    return pod


def addrs(meta: Any) -> list[tuple[str, str]]:
    """(address text, source) of every address the pod owns."""
    out = []
    for (_fam, ip), src in zip(meta.ips, meta.ip_sources, strict=True):
        out.append((str(ipaddress.ip_address(ip)), src))
    return out


class TestKubeOvnAllocation:
    """Kube-OVN's allocation annotations as ownership (pkg/util/const.go, pkg/controller/pod.go)."""

    def test_allocated_dual_stack_without_status_owns_both(self) -> None:
        """`ovn.kubernetes.io/ip_address: "v4,v6"` with `allocated: "true"` and no
        status.podIPs yet: the pod owns both addresses, learnt from Kube-OVN."""
        meta = pod_from_dict(kube_ovn_pod({
            "ovn.kubernetes.io/allocated": "true",
            "ovn.kubernetes.io/ip_address": "10.16.0.9,fd00:10:16::9",
        }, None))
        assert addrs(meta) == [("10.16.0.9", "kube-ovn"), ("fd00:10:16::9", "kube-ovn")]
        k = meta.kubernetes_by_ip[ip_key(*parse_ip("fd00:10:16::9"))]
        assert k["pod"]["ip"] == "fd00:10:16::9" and k["pod"]["ip_source"] == "kube-ovn"

    def test_ip_address_without_allocated_is_only_a_request(self) -> None:
        """A user's static-IP request (ip_address without allocated: "true") owns nothing."""
        for allocated in (None, "false", "True", ""):
            ann = {"ovn.kubernetes.io/ip_address": "10.16.0.9"}
            if allocated is not None:
                ann["ovn.kubernetes.io/allocated"] = allocated
            meta = pod_from_dict(kube_ovn_pod(ann, None))
            assert meta.ips == (), allocated

    def test_agreeing_annotation_and_status(self) -> None:
        """When status.podIPs names the same addresses, each is marked as learnt from both."""
        meta = pod_from_dict(kube_ovn_pod({
            "ovn.kubernetes.io/allocated": "true",
            "ovn.kubernetes.io/ip_address": "10.16.0.9,fd00:10:16::9",
        }, ["10.16.0.9", "fd00:10:16::9"]))
        assert addrs(meta) == [("10.16.0.9", "kube-ovn+status"),
                               ("fd00:10:16::9", "kube-ovn+status")]

    def test_disagreement_status_wins_and_is_reported(self) -> None:
        """Annotation and status.podIPs naming different addresses of one family: the pod
        owns only the status address (never both), and the conflict is reported."""
        problems: list[str] = []
        meta = pod_from_dict(kube_ovn_pod({
            "ovn.kubernetes.io/allocated": "true",
            "ovn.kubernetes.io/ip_address": "10.16.0.77,fd00:10:16::9",
        }, ["10.16.0.9"]), problems=problems)
        assert addrs(meta) == [("10.16.0.9", "status"), ("fd00:10:16::9", "kube-ovn")]
        assert len(problems) == 1 and "10.16.0.77" in problems[0] and "shop/web" in problems[0]

    def test_attachment_provider_addresses_are_owned(self) -> None:
        """`<provider>.kubernetes.io/...` of an attachment network (never in status.podIPs)
        adds its allocated address; an unallocated provider adds nothing."""
        meta = pod_from_dict(kube_ovn_pod({
            "ovn.kubernetes.io/allocated": "true",
            "ovn.kubernetes.io/ip_address": "10.16.0.9",
            "attachnet.default.ovn.kubernetes.io/allocated": "true",
            "attachnet.default.ovn.kubernetes.io/ip_address": "172.17.0.4",
            "other.default.ovn.kubernetes.io/ip_address": "172.18.0.4",
        }, ["10.16.0.9"]))
        assert addrs(meta) == [("10.16.0.9", "kube-ovn+status"), ("172.17.0.4", "kube-ovn")]

    def test_bad_allocated_address_rejects_the_pod(self) -> None:
        """An allocated annotation that is not an address list is an error naming it."""
        with pytest.raises(EnrichError, match=r"ovn.kubernetes.io/ip_address.*'10.16.0.x'"):
            pod_from_dict(kube_ovn_pod({
                "ovn.kubernetes.io/allocated": "true",
                "ovn.kubernetes.io/ip_address": "10.16.0.x",
            }, None))

    def test_status_only_pod_marks_status(self) -> None:
        """Without Kube-OVN annotations every address comes from status.podIPs."""
        meta = pod_from_dict(make_pod(metadata__annotations={}))
        assert addrs(meta) == [("10.16.0.5", "status"), ("fd00:10:16::5", "status")]
