"""Tests for shipper.enrich.subnets: Subnets + Nodes -> CIDRs and NAT policy (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from shipper.enrich.subnets import (
    NatPolicy,
    NodeRole,
    compute,
    compute_role,
    node_from_dict,
    node_labels,
    parse_gateway_node,
    subnet_from_dict,
)
from shipper.errors import EnrichError
from shipper.record import parse_ip
from tests.fakes.kube_api import node, subnet


def ip(text: str) -> int:
    return parse_ip(text)[1]


class TestSubnetFromDict:
    def test_dual_stack(self) -> None:
        """A "v4,v6" cidrBlock yields both networks."""
        s = subnet_from_dict(subnet("d", "10.16.0.0/16, fd00:10:16::/64"))
        assert [str(c) for c in s.cidrs] == ["10.16.0.0/16", "fd00:10:16::/64"]
        assert s.nat_outgoing is True and s.vpc == "ovn-cluster"

    @pytest.mark.parametrize(
        ("spec", "needle"),
        [
            ({"cidrBlock": "10.300.0.0/16"}, "spec.cidrBlock"),
            ({"cidrBlock": ""}, "spec.cidrBlock"),
            ({"cidrBlock": "10.0.0.0/8", "natOutgoing": "yes"}, "spec.natOutgoing"),
            ({"cidrBlock": "10.0.0.0/8", "natOutgoingPolicyRules": [{"action": "drop"}]},
             "natOutgoingPolicyRules[0].action"),
            ({"cidrBlock": "10.0.0.0/8",
              "natOutgoingPolicyRules": [{"action": "nat", "match": {"srcIPs": "x"}}]},
             "match.srcIPs"),
        ],
    )
    def test_malformed(self, spec: dict[str, Any], needle: str) -> None:
        """Malformed Subnets raise EnrichError naming the field and the Subnet."""
        with pytest.raises(EnrichError) as info:
            subnet_from_dict({"metadata": {"name": "s1"}, "spec": spec})
        assert needle in str(info.value) and "s1" in str(info.value)

    def test_no_name(self) -> None:
        """A Subnet without a name is rejected."""
        with pytest.raises(EnrichError, match=r"metadata\.name"):
            subnet_from_dict({"metadata": {}, "spec": {"cidrBlock": "10.0.0.0/8"}})


class TestNodeFromDict:
    def test_internal_ips_only(self) -> None:
        """Only InternalIP addresses become host CIDRs."""
        assert node_from_dict(node("n1", ["172.18.0.2", "fc00::2"])) == (
            "n1", ("172.18.0.2/32", "fc00::2/128"))

    def test_bad_address(self) -> None:
        """A malformed InternalIP raises EnrichError naming the node."""
        with pytest.raises(EnrichError, match="n1"):
            node_from_dict(node("n1", "nope"))

    def test_no_status(self) -> None:
        """A Node without addresses yields none."""
        assert node_from_dict({"metadata": {"name": "n"}}) == ("n", ())


def infos(*objs: dict[str, Any]) -> list[Any]:
    return [subnet_from_dict(o) for o in objs]


class TestCompute:
    def test_nat_outgoing_selection(self) -> None:
        """By default only natOutgoing Subnets are pod CIDRs; every Subnet is a cluster CIDR."""
        r = compute(infos(subnet("a", "10.16.0.0/16"),
                          subnet("b", "10.17.0.0/16", nat_outgoing=False)), [])
        assert r.pod_cidrs == ("10.16.0.0/16",)
        assert r.cluster_cidrs == ("10.16.0.0/15",)  # merged

    def test_all_selection(self) -> None:
        """selection=all makes every Subnet (but the join subnet) a pod CIDR."""
        r = compute(infos(subnet("b", "10.17.0.0/16", nat_outgoing=False),
                          subnet("join", "100.64.0.0/16")), [], selection="all")
        assert r.pod_cidrs == ("10.17.0.0/16",)
        assert "100.64.0.0/16" in r.cluster_cidrs

    def test_vpc_filter(self) -> None:
        """With vpcs set, Subnets of other VPCs give no pod CIDRs."""
        r = compute(infos(subnet("a", "10.16.0.0/16"), subnet("c", "10.30.0.0/16", vpc="vpc1")),
                    [], vpcs=["ovn-cluster"])
        assert r.pod_cidrs == ("10.16.0.0/16",)

    def test_static_nodes_services(self) -> None:
        """Static CIDRs, node IPs and service CIDRs are all included."""
        r = compute([], ["172.18.0.2/32"], service_cidrs=["10.96.0.0/12"],
                    static_pod_cidrs=["192.168.0.0/24"], static_cluster_cidrs=["10.200.0.0/16"])
        assert r.pod_cidrs == ("192.168.0.0/24",)
        assert set(r.cluster_cidrs) == {"172.18.0.2/32", "10.96.0.0/12", "10.200.0.0/16"}

    def test_leading_forward_rules_shrink_pod_cidrs(self) -> None:
        """Sources always forwarded (leading forward rules without dstIPs) are not pod CIDRs."""
        rules = [{"action": "forward", "match": {"srcIPs": "10.16.0.0/30,10.16.0.254"}},
                 {"action": "nat", "match": {"srcIPs": "10.16.0.128/26", "dstIPs": "8.8.8.8"}},
                 {"action": "forward", "match": {"srcIPs": "10.16.0.8/30"}}]
        r = compute(infos(subnet("a", "10.16.0.0/24", rules=rules)), [])
        covered = {str(c) for c in r.pod_cidrs}
        assert "10.16.0.4/30" in covered and "10.16.0.0/30" not in covered
        # The later forward rule depends on order only: left to the NAT policy.
        assert r.nat_policy.forwards(4, ip("10.16.0.9"), ip("1.1.1.1")) is True
        assert r.nat_policy.forwards(4, ip("10.16.0.129"), ip("8.8.8.8")) is False

    def test_forward_everything_removes_subnet(self) -> None:
        """A first rule forwarding everything removes the Subnet from the pod CIDRs."""
        r = compute(infos(subnet("a", "10.16.0.0/24", rules=[{"action": "forward"}])), [])
        assert r.pod_cidrs == ()

    def test_static_pod_cidrs_never_shrunk(self) -> None:
        """Static pod CIDRs stay even if a rule forwards those sources."""
        r = compute(infos(subnet("a", "10.16.0.0/24", rules=[{"action": "forward"}])), [],
                    static_pod_cidrs=["10.16.0.0/24"])
        assert r.pod_cidrs == ("10.16.0.0/24",)

    def test_rules_ignored_when_disabled(self) -> None:
        """honour_rules=False keeps the whole Subnet and an empty policy."""
        r = compute(infos(subnet("a", "10.16.0.0/24", rules=[{"action": "forward"}])), [],
                    honour_rules=False)
        assert r.pod_cidrs == ("10.16.0.0/24",) and not r.nat_policy


class TestNatPolicy:
    def test_first_match_wins_default_nat(self) -> None:
        """Rules are matched in order; no match means NAT (not forwarded)."""
        s = subnet_from_dict(subnet("a", "10.16.0.0/16", rules=[
            {"action": "nat", "match": {"dstIPs": "1.1.1.1"}},
            {"action": "forward", "match": {"dstIPs": "1.1.1.0/24"}},
        ]))
        p = NatPolicy([s])
        assert p.forwards(4, ip("10.16.0.5"), ip("1.1.1.1")) is False
        assert p.forwards(4, ip("10.16.0.5"), ip("1.1.1.2")) is True
        assert p.forwards(4, ip("10.16.0.5"), ip("9.9.9.9")) is False
        assert p.forwards(4, ip("10.99.0.5"), ip("1.1.1.2")) is False  # other subnet

    def test_ipv6(self) -> None:
        """IPv6 sources and destinations are evaluated in their own family."""
        s = subnet_from_dict(subnet("a", "10.16.0.0/16,fd00::/64", rules=[
            {"action": "forward", "match": {"dstIPs": "2001:db8::/32"}}]))
        p = NatPolicy([s])
        assert p.forwards(6, ip("fd00::5"), ip("2001:db8::1")) is True
        assert p.forwards(6, ip("fd00::5"), ip("2001:db9::1")) is False

    def test_empty_policy_is_falsy(self) -> None:
        """Without rules the policy is falsy (the event path can skip it)."""
        assert not NatPolicy(infos(subnet("a", "10.16.0.0/16")))


# ---- node role ---------------------------------------------------------------------

# The seed document's cluster (docs: source-identification.md): ovn-default is
# centralized, and its conntrack lines show 10.16.x NATed to 192.168.137.176, ovn1.
OVN1, OVN2 = "ovn1-192.168.137.176", "ovn2-192.168.137.177"
SEED = [
    subnet("central", "192.101.0.0/16", gateway_type="distributed"),
    subnet("join", "100.64.0.0/16", nat_outgoing=False, gateway_type="distributed"),
    subnet("ovn-default", "10.16.0.0/16", gateway_type="centralized", gateway_node=OVN1),
    subnet("snat", "172.22.0.0/16", gateway_type="distributed"),
]


def role_of(objs: list[dict[str, Any]], node_name: str,
            labels: dict[str, str] | None = None) -> NodeRole:
    return compute_role([subnet_from_dict(o) for o in objs], node_name, labels)


def modes(role: NodeRole) -> dict[str, str]:
    return {e.subnet: e.mode for e in role.entries}


class TestSubnetGatewayFields:
    def test_defaults_are_distributed(self) -> None:
        """A Subnet without gatewayType is distributed (Kube-OVN's default for "")."""
        s = subnet_from_dict(subnet("d", "10.16.0.0/16"))
        assert s.gateway_type == "distributed" and s.gateway_nodes == () and not s.ecmp

    def test_gateway_node_entries(self) -> None:
        """gatewayNode "a:10.0.0.5, b" gives node names and the egress IP of "name:ip" entries."""
        s = subnet_from_dict(subnet("c", "10.16.0.0/16", gateway_type="centralized",
                                    gateway_node="a:10.0.0.5, b,,"))
        assert s.gateway_nodes == (("a", "10.0.0.5"), ("b", None))

    def test_parse_gateway_node_ipv6_egress(self) -> None:
        """Only the part before the first colon is the node name (an IPv6 egress IP stays whole)."""
        assert parse_gateway_node("gw1:fd00::5") == (("gw1", "fd00::5"),)

    @pytest.mark.parametrize(
        ("spec", "needle"),
        [
            ({"gatewayType": "central"}, "spec.gatewayType"),
            ({"gatewayNode": ["a"]}, "spec.gatewayNode"),
            ({"enableEcmp": "true"}, "spec.enableEcmp"),
            ({"gatewayNodeSelectors": {"matchLabels": {}}}, "spec.gatewayNodeSelectors"),
            ({"gatewayNodeSelectors": [{"matchLabels": {"a": 1}}]}, "matchLabels"),
            ({"gatewayNodeSelectors": [{"matchExpressions": [
                {"key": "a", "operator": "Equals", "values": ["x"]}]}]}, ".operator"),
            ({"gatewayNodeSelectors": [{"matchExpressions": [
                {"key": "a", "operator": "In", "values": []}]}]}, "needs values"),
            ({"gatewayNodeSelectors": [{"matchExpressions": [
                {"key": "a", "operator": "Exists", "values": ["x"]}]}]}, "takes no values"),
        ],
    )
    def test_malformed_gateway_fields(self, spec: dict[str, Any], needle: str) -> None:
        """Malformed gateway fields raise EnrichError naming the field and the Subnet."""
        with pytest.raises(EnrichError) as info:
            subnet_from_dict({"metadata": {"name": "s1"},
                              "spec": {"cidrBlock": "10.0.0.0/8", **spec}})
        assert needle in str(info.value) and "s1" in str(info.value)

    def test_node_labels(self) -> None:
        """node_labels returns metadata.labels, empty when absent."""
        assert node_labels(node("n1", "10.0.0.1", labels={"a": "b"})) == {"a": "b"}
        assert node_labels(node("n1", "10.0.0.1")) == {}
        with pytest.raises(EnrichError, match="n1"):
            node_labels({"metadata": {"name": "n1", "labels": {"a": 1}}})


class TestLabelSelector:
    @pytest.mark.parametrize(
        ("selector", "labels", "expected"),
        [
            ({}, {}, True),  # empty selector: everything
            ({"matchLabels": {"gw": "true"}}, {"gw": "true", "x": "y"}, True),
            ({"matchLabels": {"gw": "true"}}, {"gw": "false"}, False),
            ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]},
             {"zone": "b"}, True),
            ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
             {}, False),
            ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]},
             {}, True),
            ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]},
             {"zone": "a"}, False),
            ({"matchExpressions": [{"key": "gw", "operator": "Exists"}]}, {"gw": ""}, True),
            ({"matchExpressions": [{"key": "gw", "operator": "DoesNotExist"}]},
             {"gw": ""}, False),
            ({"matchLabels": {"gw": "true"},
              "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
             {"gw": "true", "zone": "b"}, False),
        ],
    )
    def test_matches(self, selector: dict[str, Any], labels: dict[str, str],
                     expected: bool) -> None:
        """Selectors match as metav1.LabelSelectorAsSelector does."""
        s = subnet_from_dict(subnet("c", "10.0.0.0/8", gateway_type="centralized",
                                    gateway_node_selectors=[selector]))
        assert s.gateway_selectors[0].matches(labels) is expected


class TestNodeRole:
    def test_distributed_only(self) -> None:
        """With only distributed Subnets every node NATs its own pods: node scope, no gateway."""
        objs = [subnet("a", "10.16.0.0/16"), subnet("b", "10.17.0.0/16", nat_outgoing=False)]
        role = role_of(objs, "n1")
        assert modes(role) == {"a": "distributed"}
        assert not role.gateway and role.pod_scope == "node"

    @pytest.mark.parametrize("gw", ["a,b", "a:10.0.0.5,b", " b , a "])
    def test_centralized_by_name(self, gw: str) -> None:
        """A node named in gatewayNode (plain or node:ip) is a gateway; others NAT nothing."""
        objs = [subnet("c", "10.16.0.0/16", gateway_type="centralized", gateway_node=gw,
                       enable_ecmp=True)]
        for name in ("a", "b"):
            role = role_of(objs, name)
            assert modes(role) == {"c": "centralized"}
            assert role.gateway and role.pod_scope == "cluster"
            assert role.entries[0].active is True  # ECMP: every gateway NATs
        other = role_of(objs, "c")
        assert other.entries == () and other.pod_scope == "node"

    def test_egress_ip_reported(self) -> None:
        """The egress IP of a "node:ip" entry is part of that node's role."""
        objs = [subnet("c", "10.16.0.0/16", gateway_type="centralized",
                       gateway_node="a:10.0.0.5,b")]
        assert role_of(objs, "a").entries[0].egress_ip == "10.0.0.5"
        assert role_of(objs, "b").entries[0].egress_ip is None

    def test_name_prefix_is_not_a_match(self) -> None:
        """gatewayNode "node-10" does not make "node-1" a gateway (whole names only)."""
        objs = [subnet("c", "10.16.0.0/16", gateway_type="centralized", gateway_node="node-10")]
        assert role_of(objs, "node-1").entries == ()

    def test_active_and_standby(self) -> None:
        """Without ECMP the role tells the active gateway (status.activateGateway) from standby."""
        objs = [subnet("c", "10.16.0.0/16", gateway_type="centralized", gateway_node="a,b",
                       activate_gateway="b")]
        assert role_of(objs, "a").entries[0].active is False
        assert role_of(objs, "b").entries[0].active is True
        assert role_of(objs, "a").gateway  # a standby still needs every pod
        unknown = [subnet("c", "10.16.0.0/16", gateway_type="centralized", gateway_node="a")]
        assert role_of(unknown, "a").entries[0].active is None

    def test_selectors(self) -> None:
        """With gatewayNode empty, gatewayNodeSelectors matched against the node's labels decide."""
        sel: list[dict[str, Any]] = [
            {"matchLabels": {"kube-ovn/role": "gateway"}},
            {"matchExpressions": [{"key": "egress", "operator": "Exists"}]},
        ]
        objs = [subnet("c", "10.16.0.0/16", gateway_type="centralized",
                       gateway_node_selectors=sel)]
        assert modes(role_of(objs, "n1", {"kube-ovn/role": "gateway"})) == {"c": "centralized"}
        assert modes(role_of(objs, "n2", {"egress": ""})) == {"c": "centralized"}
        assert role_of(objs, "n3", {"kube-ovn/role": "worker"}).entries == ()
        unknown = role_of(objs, "n1", None)
        assert unknown.entries == () and not unknown.node_known

    def test_gateway_node_takes_precedence_over_selectors(self) -> None:
        """When gatewayNode is set, selectors are ignored (as in Kube-OVN)."""
        objs = [subnet("c", "10.16.0.0/16", gateway_type="centralized", gateway_node="a",
                       gateway_node_selectors=[{"matchLabels": {"gw": "y"}}])]
        assert role_of(objs, "b", {"gw": "y"}).entries == ()
        assert role_of(objs, "a", {}).gateway

    def test_centralized_without_gateways_nats_nowhere(self) -> None:
        """A centralized Subnet with neither gatewayNode nor selectors has no gateway here."""
        objs = [subnet("c", "10.16.0.0/16", gateway_type="centralized")]
        assert role_of(objs, "n1", {}).entries == ()

    def test_mixed_seed_gateway_node(self) -> None:
        """The seed's four Subnets on the gateway ovn1: ovn-default plus central and snat."""
        role = role_of(SEED, OVN1, {})
        assert modes(role) == {"central": "distributed", "ovn-default": "centralized",
                               "snat": "distributed"}
        assert role.pod_scope == "cluster"
        res = compute([subnet_from_dict(o) for o in SEED], [], role=role)
        assert res.pod_cidrs == ("10.16.0.0/16", "172.22.0.0/16", "192.101.0.0/16")

    def test_mixed_seed_other_node(self) -> None:
        """On ovn2 (no gateway) only the distributed NAT Subnets remain; join never counts."""
        role = role_of(SEED, OVN2, {})
        assert modes(role) == {"central": "distributed", "snat": "distributed"}
        assert role.pod_scope == "node"
        res = compute([subnet_from_dict(o) for o in SEED], [], role=role)
        assert res.pod_cidrs == ("172.22.0.0/16", "192.101.0.0/16")
        assert "10.16.0.0/16" in res.cluster_cidrs and "100.64.0.0/16" in res.cluster_cidrs

    def test_subnet_changed(self) -> None:
        """Recomputing after a Subnet change moves the role (centralized -> distributed)."""
        before = role_of(SEED, OVN2, {})
        changed = [*SEED[:2], subnet("ovn-default", "10.16.0.0/16", gateway_type="distributed"),
                   SEED[3]]
        after = role_of(changed, OVN2, {})
        assert "ovn-default" not in before.subnets
        assert modes(after)["ovn-default"] == "distributed"

    def test_hand_set_pod_cidrs_win(self) -> None:
        """Static pod CIDRs replace the role's: the role is then only reported."""
        role = role_of(SEED, OVN2, {})
        res = compute([subnet_from_dict(o) for o in SEED], [], role=role,
                      static_pod_cidrs=["10.16.0.0/16"])
        assert res.pod_cidrs == ("10.16.0.0/16",)

    def test_describe(self) -> None:
        """describe() is JSON-able and names subnets, modes, activity and the pod scope."""
        role = role_of(SEED, OVN1, {})
        d = role.describe()
        assert d["pod_scope"] == "cluster" and d["gateway"] is True
        assert {"name": "ovn-default", "mode": "centralized", "cidrs": ["10.16.0.0/16"],
                "active": None} in d["subnets"]
        assert "ovn-default (centralized, gateway)" in role.summary()
        assert role_of([], "n").summary().startswith("nothing")
