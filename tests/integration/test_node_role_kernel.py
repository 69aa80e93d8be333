"""Node role and node-scoped pod watch on the real kernel (issue 12).

The lab's three pods all leave through the lab's gateway namespace (one
MASQUERADE), but the fake API places only pod 0 on this node (``lab-node``);
pods 1 and 2 are on ``other-node``. Subnets:

- ``local`` (distributed, natOutgoing): 10.244.0.8/30, pods 0 and 1;
- ``remote`` (centralized): 10.244.0.12/30, pod 2; its gateway is ``other-node``
  or, in the gateway cases, this node.

A shipper that is no gateway keeps only ``local``'s sources and watches only
its own pods (fieldSelector spec.nodeName=lab-node); a gateway of ``remote``
also keeps pod 2's sources and watches every pod, so it names pod 2, which runs
on another node. Lab, fake API and shipper are set up as in
test_kube_attribution.py and removed by its fixtures, also when a test fails.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from shipper.lab import Lab
from tests.fakes.kube_api import PODS, SUBNETS, FakeKubeApi, subnet
from tests.integration import test_kube_attribution as kube_it
from tests.integration.harness import ShipperProcess, get
from tests.integration.test_kube_attribution import (
    Factory,
    assert_names,
    from_ip,
    is_new,
    wait_gauge,
)

# The fake API and shipper fixtures of the attribution tests, shared as they are
# (``lab`` and ``no_ambient_kube`` come from tests/conftest.py).
api = kube_it.api
shipper = kube_it.shipper

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_ambient_kube")]

OTHER = "other-node"
SUBNET_CONFIG = {"filter.pod_cidrs": [], "filter.cluster_cidrs": [],
                 "kubernetes.subnets_enabled": True, "conntrack.kernel_filter": True}


def publish(api: FakeKubeApi, lab: Lab) -> None:
    """Pod 0 on this node, pods 1 and 2 on another node."""
    for i, item in enumerate(lab.pod_list()["items"]):
        item["spec"]["nodeName"] = lab.node_name if i == 0 else OTHER
        api.put(PODS, item)


def remote(gateway: str) -> dict[str, Any]:
    return subnet("remote", "10.244.0.12/30", gateway_type="centralized",
                  gateway_node=gateway, enable_ecmp=True)


def readyz_role(sp: ShipperProcess) -> dict[str, Any]:
    url = f"http://127.0.0.1:{sp.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503 still carries the body
        body = json.loads(exc.read())
    role: dict[str, Any] = body["info"]["node_role"]
    return role


def pod_requests(api: FakeKubeApi) -> list[dict[str, str]]:
    return [q for p, q in list(api.requests) if p == PODS]


class TestNodeRoleOnKernel:
    def test_node_scoped_shipper_ships_own_pods_and_filters_the_rest(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory
    ) -> None:
        """No gateway: pod 0 (own) is attributed; pod 2 (centralized elsewhere) is dropped
        in the kernel; pod 1 (distributed, on another node per the API) is shipped but never
        named, as this node does not know other nodes' pods. Then the Subnet makes this node
        its gateway at runtime: the scope widens and pod 2's flows are attributed."""
        publish(api, lab)
        api.put(SUBNETS, subnet("local", "10.244.0.8/30"))
        api.put(SUBNETS, remote(f"{OTHER}:172.30.0.2"))
        sp = shipper(SUBNET_CONFIG)
        sp.wait_ready()
        wait_gauge(sp, "shipper_kube_pod_scope", 1, {"scope": "node"})
        assert sp.metric("shipper_node_role", {"subnet": "local", "mode": "distributed"}) == 1
        assert sp.metric("shipper_node_role", {"subnet": "remote"}) == 0
        reqs = pod_requests(api)
        assert reqs and all(q.get("fieldSelector") == f"spec.nodeName={lab.node_name}"
                            for q in reqs)
        role = readyz_role(sp)
        assert role["pod_scope"] == "node" and [s["name"] for s in role["subnets"]] == ["local"]
        wait_gauge(sp, "shipper_pods_live", 1)

        lab.start_server("tcp", 8080, 4)
        pod0, pod1, pod2 = (lab.pod_ip(i, 4) for i in range(3))
        lab.connect(2, "tcp", 4, 8080)
        lab.connect(1, "tcp", 4, 8080)
        lab.connect(0, "tcp", 4, 8080)
        rec0 = sp.wait_records(lambda r: is_new(r) and from_ip(pod0)(r))[0]
        assert_names(rec0, lab, 0)
        rec1 = sp.wait_records(lambda r: is_new(r) and from_ip(pod1)(r))[0]
        assert get(rec1, "flowlog.attribution") == "unresolved"
        assert get(rec1, "kubernetes.pod.name") is None
        # Pod 2's flow was made first: had it passed the filter, its record would be here.
        assert [r for r in sp.records() if from_ip(pod2)(r)] == []

        # The remote Subnet now names this node as a gateway: role and scope change.
        api.put(SUBNETS, remote(f"{OTHER}:172.30.0.2,{lab.node_name}:172.30.0.1"))
        wait_gauge(sp, "shipper_kube_pod_scope", 1, {"scope": "cluster"})
        wait_gauge(sp, "shipper_node_role", 1, {"subnet": "remote", "mode": "centralized"})
        wait_gauge(sp, "shipper_pods_live", 3)
        assert "fieldSelector" not in pod_requests(api)[-1]
        lab.connect(2, "tcp", 4, 8080)
        rec2 = sp.wait_records(lambda r: is_new(r) and from_ip(pod2)(r))[0]
        assert_names(rec2, lab, 2)
        role = readyz_role(sp)
        assert role["pod_scope"] == "cluster"
        assert {"name": "remote", "mode": "centralized", "cidrs": ["10.244.0.12/30"],
                "active": True, "egress_ip": "172.30.0.1"} in role["subnets"]

    def test_gateway_shipper_attributes_pods_of_other_nodes(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory
    ) -> None:
        """A gateway of the centralized Subnet watches every pod from the start and names
        pod 2, which runs on another node, in its records (NEW and DESTROY)."""
        publish(api, lab)
        api.put(SUBNETS, subnet("local", "10.244.0.8/30"))
        api.put(SUBNETS, remote(f"{lab.node_name},{OTHER}"))
        sp = shipper(SUBNET_CONFIG)
        sp.wait_ready()
        wait_gauge(sp, "shipper_kube_pod_scope", 1, {"scope": "cluster"})
        wait_gauge(sp, "shipper_pods_live", 3)
        assert all("fieldSelector" not in q for q in pod_requests(api))
        lab.start_server("tcp", 8080, 4)
        pod2 = lab.pod_ip(2, 4)
        lab.connect(2, "tcp", 4, 8080)
        rec = sp.wait_records(lambda r: is_new(r) and from_ip(pod2)(r))[0]
        assert_names(rec, lab, 2)
        assert sp.metric("shipper_records_unresolved_total") == 0
