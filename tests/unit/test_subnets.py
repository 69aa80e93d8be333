"""Tests for shipper.enrich.subnets: Subnets + Nodes -> CIDRs and NAT policy (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from shipper.enrich.subnets import NatPolicy, compute, node_from_dict, subnet_from_dict
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
