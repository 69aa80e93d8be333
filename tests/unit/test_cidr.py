"""Tests for shipper.filters.cidr: which flow events become records, and why not."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

import pytest

from shipper.cidrs import Cidr, to_cidrs
from shipper.errors import ConfigError
from shipper.filters.cidr import (
    IPS_SRC_NAT,
    REASON_DESTINATION_IN_CLUSTER,
    REASON_NOT_SNAT,
    REASON_SOURCE_NOT_POD,
    CidrFilter,
)
from shipper.filters.nat_policy import REASON_NAT_POLICY_FORWARD, NatPolicy, NatRule
from shipper.record import FlowEvent

POD4 = "10.16.0.0/16"
POD6 = "fd00:10:16::/64"
CLUSTER = ["10.16.0.0/16", "100.64.0.0/16", "10.96.0.0/12", "192.168.1.0/24",
           "fd00:10:16::/64", "fd00:10:96::/108"]
NODE4 = "192.168.1.10"
NODE6 = "2001:db8:1::10"
REMOTE4 = "93.184.216.34"
REMOTE6 = "2606:2800:220:1::1"


def ip(text: str) -> int:
    """Integer form of an address."""
    return int(ipaddress.ip_address(text))


def flow(src: str, dst: str, *, snat_to: str | None = None, status: int | None = None,
         **over: Any) -> FlowEvent:
    """A TCP flow src -> dst; ``snat_to`` is the reply destination (src if not NATed)."""
    family = ipaddress.ip_address(src).version
    if snat_to is None:
        snat_to = NODE4 if family == 4 else NODE6
    fields: dict[str, Any] = {
        "action": "new", "family": family, "proto": 6,
        "orig_src": ip(src), "orig_dst": ip(dst), "orig_sport": 40000, "orig_dport": 443,
        "reply_src": ip(dst), "reply_dst": ip(snat_to), "reply_sport": 443, "reply_dport": 40000,
        "icmp_type": None, "icmp_code": None, "icmp_id": None, "ct_id": 1,
        "status": status, "tcp_state": None, "mark": None, "zone": None, "timeout": None,
        "orig_packets": None, "orig_bytes": None, "reply_packets": None, "reply_bytes": None,
        "ts_start": None, "ts_stop": None, "ts_event": None, "received_ns": 0,
    }
    fields.update(over)
    return FlowEvent(**fields)


@pytest.fixture
def filt() -> CidrFilter:
    """A dual-stack filter with typical Kube-OVN CIDRs."""
    return CidrFilter([POD4, POD6], CLUSTER)


class TestKeep:
    def test_snat_egress_is_kept_v4(self, filt: CidrFilter) -> None:
        """A MASQUERADEd v4 flow from a pod to the Internet is kept."""
        assert filt.reason(flow("10.16.0.5", REMOTE4)) is None

    def test_snat_egress_is_kept_v6(self, filt: CidrFilter) -> None:
        """A MASQUERADEd v6 flow from a pod to the Internet is kept."""
        assert filt.reason(flow("fd00:10:16::5", REMOTE6)) is None

    def test_source_outside_pod_cidrs(self, filt: CidrFilter) -> None:
        """A flow from a non-pod address (the node itself) is dropped as source_not_pod."""
        assert filt.reason(flow(NODE4, REMOTE4)) == REASON_SOURCE_NOT_POD
        assert filt.reason(flow(NODE6, REMOTE6)) == REASON_SOURCE_NOT_POD
        assert filt.reason(flow("0.0.0.0", REMOTE4)) == REASON_SOURCE_NOT_POD
        assert filt.reason(flow("255.255.255.255", REMOTE4)) == REASON_SOURCE_NOT_POD

    def test_destination_in_cluster(self, filt: CidrFilter) -> None:
        """A pod-to-service, pod-to-pod or pod-to-node flow is dropped as destination_in_cluster."""
        for dst in ("10.96.0.10", "10.16.0.9", "100.64.0.2", NODE4):
            assert filt.reason(flow("10.16.0.5", dst)) == REASON_DESTINATION_IN_CLUSTER, dst
        for dst in ("fd00:10:96::a", "fd00:10:16::9"):
            assert filt.reason(flow("fd00:10:16::5", dst)) == REASON_DESTINATION_IN_CLUSTER, dst

    def test_source_checked_before_destination(self, filt: CidrFilter) -> None:
        """A flow failing both checks reports source_not_pod."""
        assert filt.reason(flow(NODE4, "10.96.0.10")) == REASON_SOURCE_NOT_POD

    def test_families_do_not_mix(self) -> None:
        """A v4-only pod list never matches v6 sources, and vice versa."""
        f4 = CidrFilter(["0.0.0.0/0"], [])
        assert f4.reason(flow("10.16.0.5", REMOTE4)) is None
        assert f4.reason(flow("fd00:10:16::5", REMOTE6)) == REASON_SOURCE_NOT_POD
        f6 = CidrFilter(["::/0"], [])
        assert f6.reason(flow("fd00:10:16::5", REMOTE6)) is None
        assert f6.reason(flow("10.16.0.5", REMOTE4)) == REASON_SOURCE_NOT_POD

    def test_v4_integer_is_not_confused_with_v6_of_same_value(self) -> None:
        """The v6 address ::a10:5 (same integer as 10.16.0.5) is not in a v4 pod CIDR."""
        f = CidrFilter([POD4], [])
        ev = flow("10.16.0.5", REMOTE4)._replace(family=6)
        assert f.reason(ev) == REASON_SOURCE_NOT_POD

    def test_no_cluster_cidrs(self) -> None:
        """With no cluster CIDRs every destination is acceptable."""
        f = CidrFilter([POD4], [])
        assert f.reason(flow("10.16.0.5", "10.16.0.6")) is None

    def test_empty_pod_cidrs_keep_nothing(self) -> None:
        """With no pod CIDRs every flow is dropped as source_not_pod."""
        f = CidrFilter([], [])
        assert f.reason(flow("10.16.0.5", REMOTE4)) == REASON_SOURCE_NOT_POD
        assert f.reason(flow("fd00:10:16::5", REMOTE6)) == REASON_SOURCE_NOT_POD


class TestBoundaries:
    @pytest.mark.parametrize(
        ("src", "kept"),
        [("10.16.0.0", True), ("10.16.255.255", True), ("10.15.255.255", False),
         ("10.17.0.0", False)],
    )
    def test_v4_first_and_last_address(self, src: str, kept: bool) -> None:
        """The first and last address of a pod CIDR are inside; their neighbours are not."""
        f = CidrFilter([POD4], [])
        assert (f.reason(flow(src, REMOTE4)) is None) is kept

    @pytest.mark.parametrize(
        ("src", "kept"),
        [("fd00:10:16::", True), ("fd00:10:16:0:ffff:ffff:ffff:ffff", True),
         ("fd00:10:15:ffff:ffff:ffff:ffff:ffff", False), ("fd00:10:16:1::", False)],
    )
    def test_v6_first_and_last_address(self, src: str, kept: bool) -> None:
        """v6 pod CIDR boundaries are inclusive, neighbours outside."""
        f = CidrFilter([POD6], [])
        assert (f.reason(flow(src, REMOTE6)) is None) is kept

    @pytest.mark.parametrize(
        ("dst", "reason"),
        [("10.96.0.0", REASON_DESTINATION_IN_CLUSTER),
         ("10.111.255.255", REASON_DESTINATION_IN_CLUSTER),
         ("10.95.255.255", None), ("10.112.0.0", None)],
    )
    def test_cluster_boundaries(self, dst: str, reason: str | None) -> None:
        """Cluster CIDR boundaries (10.96.0.0/12) are inclusive."""
        f = CidrFilter([POD4], ["10.96.0.0/12"])
        assert f.reason(flow("10.16.0.5", dst)) == reason

    def test_extreme_v4_and_v6_ranges(self) -> None:
        """/0 and /32 (/128) ranges include exactly what they should."""
        f = CidrFilter(["10.16.0.5/32", "fd00::5/128"], ["0.0.0.0/0"])
        assert f.reason(flow("10.16.0.5", REMOTE4)) == REASON_DESTINATION_IN_CLUSTER
        assert f.reason(flow("10.16.0.4", REMOTE4)) == REASON_SOURCE_NOT_POD
        assert f.reason(flow("fd00::5", REMOTE6)) is None
        assert f.reason(flow("fd00::6", REMOTE6)) == REASON_SOURCE_NOT_POD
        assert f.is_pod_ip(6, ip("fd00::5"))
        assert not f.is_pod_ip(4, 0xFFFFFFFF)


class TestMerging:
    def test_overlapping_and_adjacent_cidrs_merge(self) -> None:
        """Overlapping, nested, duplicate and adjacent CIDRs behave as their union."""
        f = CidrFilter(["10.16.0.0/24", "10.16.0.128/25", "10.16.1.0/24", "10.16.0.0/24",
                        "10.20.0.0/16", "10.20.5.0/24"], [])
        for src in ("10.16.0.0", "10.16.0.200", "10.16.1.255", "10.20.5.1", "10.20.255.255"):
            assert f.reason(flow(src, REMOTE4)) is None, src
        for src in ("10.16.2.0", "10.19.255.255", "10.21.0.0"):
            assert f.reason(flow(src, REMOTE4)) == REASON_SOURCE_NOT_POD, src

    def test_many_disjoint_ranges(self) -> None:
        """Membership is right across many disjoint ranges (every /24 in 10.0-10.99 even)."""
        cidrs = [f"10.{i}.0.0/24" for i in range(0, 100, 2)]
        f = CidrFilter(cidrs, [])
        for i in range(100):
            for last in ("0", "255"):
                got = f.is_pod_ip(4, ip(f"10.{i}.0.{last}"))
                assert got is (i % 2 == 0), (i, last)
            assert not f.is_pod_ip(4, ip(f"10.{i}.1.0"))

    def test_host_bits_are_masked_and_whitespace_stripped(self) -> None:
        """A CIDR with host bits set or surrounding spaces is normalised to its network."""
        f = CidrFilter([" 10.16.0.7/16 "], ["fd00:10:96::1/108"])
        assert f.pod_cidrs == ("10.16.0.0/16",)
        assert f.cluster_cidrs == ("fd00:10:96::/108",)

    def test_properties_report_cidrs_in_force(self, filt: CidrFilter) -> None:
        """pod_cidrs and cluster_cidrs list the configured CIDRs."""
        assert filt.pod_cidrs == (POD4, POD6)
        assert filt.cluster_cidrs == tuple(CLUSTER)


class TestOnlySnat:
    def test_not_natted_flow_dropped(self, filt: CidrFilter) -> None:
        """A flow whose reply goes back to the pod itself, with no SRC_NAT bit, is not_snat."""
        assert filt.reason(flow("10.16.0.5", REMOTE4, snat_to="10.16.0.5")) == REASON_NOT_SNAT
        assert filt.reason(flow("fd00:10:16::5", REMOTE6, snat_to="fd00:10:16::5",
                                status=0x8)) == REASON_NOT_SNAT

    def test_src_nat_status_bit_suffices(self, filt: CidrFilter) -> None:
        """The SRC_NAT status bit keeps a flow even if its reply destination looks unchanged."""
        ev = flow("10.16.0.5", REMOTE4, snat_to="10.16.0.5", status=IPS_SRC_NAT | 0x8)
        assert filt.reason(ev) is None

    def test_reply_destination_suffices(self, filt: CidrFilter) -> None:
        """A changed reply destination keeps a flow even without a status (NEW w/o status)."""
        assert filt.reason(flow("10.16.0.5", REMOTE4, status=None)) is None
        assert filt.reason(flow("10.16.0.5", REMOTE4, status=0)) is None

    def test_only_snat_off_keeps_unnatted(self) -> None:
        """With only_snat off a pod's un-NATed egress flow is kept."""
        f = CidrFilter([POD4], [], only_snat=False)
        assert f.reason(flow("10.16.0.5", REMOTE4, snat_to="10.16.0.5", status=0)) is None

    def test_only_snat_off_still_applies_cidrs(self) -> None:
        """Turning only_snat off does not disable the source and destination checks."""
        f = CidrFilter([POD4], ["10.96.0.0/12"], only_snat=False)
        assert f.reason(flow(NODE4, REMOTE4)) == REASON_SOURCE_NOT_POD
        assert f.reason(flow("10.16.0.5", "10.96.0.1")) == REASON_DESTINATION_IN_CLUSTER

    def test_only_snat_defaults_on(self) -> None:
        """only_snat is on unless disabled."""
        assert CidrFilter([POD4], []).only_snat is True


class TestBadCidrs:
    def test_every_bad_entry_named(self) -> None:
        """ConfigError lists every bad CIDR, each by its text."""
        bad = ["garbage", "10.0.0.0/33", "fd00::/129", "", "1.2.3"]
        with pytest.raises(ConfigError) as ei:
            CidrFilter([POD4, *bad], [])
        problems = ei.value.problems
        assert len(problems) == len(bad)
        for entry, problem in zip(bad, problems, strict=True):
            assert repr(entry) in problem
            assert "is not a CIDR" in problem
            assert problem.startswith("pod CIDRs")
        assert ei.value.source == "pod CIDRs"

    def test_bad_cluster_cidr_named(self) -> None:
        """A bad cluster CIDR is reported as such."""
        with pytest.raises(ConfigError) as ei:
            CidrFilter([POD4], ["10.96.0.0/12", "nope/8"])
        (problem,) = ei.value.problems
        assert problem.startswith("cluster CIDRs")
        assert "'nope/8'" in problem
        assert "'nope/8'" in str(ei.value)

    def test_non_string_entry(self) -> None:
        """A non-string entry (None) is reported, not crashed on."""
        with pytest.raises(ConfigError) as ei:
            CidrFilter([None], [])
        assert "None" in ei.value.problems[0]


class TestSetCidrs:
    def test_swap_at_runtime(self, filt: CidrFilter) -> None:
        """set_cidrs replaces both lists: new pods are kept, old ones dropped."""
        new_pod = "10.17.0.5"
        assert filt.reason(flow(new_pod, REMOTE4)) == REASON_SOURCE_NOT_POD
        filt.set_cidrs(["10.17.0.0/16"], ["10.16.0.0/16"])
        assert filt.reason(flow(new_pod, REMOTE4)) is None
        assert filt.reason(flow("10.16.0.5", REMOTE4)) == REASON_SOURCE_NOT_POD
        assert filt.reason(flow(new_pod, "10.16.0.1")) == REASON_DESTINATION_IN_CLUSTER
        assert filt.reason(flow(new_pod, "10.96.0.1")) is None
        assert filt.pod_cidrs == ("10.17.0.0/16",)
        assert filt.cluster_cidrs == ("10.16.0.0/16",)

    def test_bad_swap_keeps_previous_tables(self, filt: CidrFilter) -> None:
        """A set_cidrs with a bad CIDR raises ConfigError and leaves the old lists in force."""
        with pytest.raises(ConfigError):
            filt.set_cidrs(["10.17.0.0/16", "bad"], [])
        assert filt.pod_cidrs == (POD4, POD6)
        assert filt.reason(flow("10.16.0.5", REMOTE4)) is None
        assert filt.reason(flow("10.16.0.5", "10.96.0.1")) == REASON_DESTINATION_IN_CLUSTER

    def test_set_cidrs_keeps_only_snat(self) -> None:
        """Swapping CIDRs does not change the only_snat setting."""
        f = CidrFilter([POD4], [], only_snat=False)
        f.set_cidrs(["10.17.0.0/16"], [])
        assert f.reason(flow("10.17.0.5", REMOTE4, snat_to="10.17.0.5")) is None


def forward_policy(subnet_cidrs: str, dst: str) -> NatPolicy:
    """The policy of one Subnet whose only rule forwards (no SNAT) flows to ``dst``."""
    rule = NatRule("forward", (), to_cidrs([dst]))
    return NatPolicy([SimpleNamespace(cidrs=to_cidrs(subnet_cidrs.split(",")), rules=(rule,))])


class TestNatPolicy:
    def test_forwarded_flow_has_its_own_reason(self) -> None:
        """A kept flow that a natOutgoingPolicyRule forwards is nat_policy_forward; others stay."""
        f = CidrFilter([POD4], [], only_snat=False)
        f.set_cidrs([POD4], [], forward_policy(POD4, "8.8.8.0/24"))
        assert f.reason(flow("10.16.0.5", "8.8.8.8")) == REASON_NAT_POLICY_FORWARD
        assert f.reason(flow("10.16.0.5", REMOTE4)) is None

    def test_earlier_reasons_win(self) -> None:
        """The policy is asked last: a flow failing another check keeps that reason."""
        f = CidrFilter([POD4], ["10.96.0.0/12"])
        f.set_cidrs([POD4], ["10.96.0.0/12"], forward_policy(POD4, "0.0.0.0/0"))
        assert f.reason(flow(NODE4, "8.8.8.8")) == REASON_SOURCE_NOT_POD
        assert f.reason(flow("10.16.0.5", "10.96.0.1")) == REASON_DESTINATION_IN_CLUSTER
        assert f.reason(flow("10.16.0.5", "8.8.8.8", snat_to="10.16.0.5")) == REASON_NOT_SNAT
        assert f.reason(flow("10.16.0.5", "8.8.8.8")) == REASON_NAT_POLICY_FORWARD

    def test_empty_policy_is_not_kept(self) -> None:
        """A policy without rules is stored as none (nothing evaluated per event)."""
        f = CidrFilter([POD4], [])
        f.set_cidrs([POD4], [], NatPolicy([]))
        assert f.nat_policy is None
        f.set_cidrs([POD4], [], forward_policy(POD4, "8.8.8.8"))
        assert f.nat_policy is not None
        f.set_cidrs([POD4], [])
        assert f.nat_policy is None


class TestSubscribe:
    def test_gets_current_then_every_change(self) -> None:
        """A subscriber gets the pod CIDRs at once, then after each change of them only."""
        f = CidrFilter([POD4], [])
        seen: list[tuple[str, ...]] = []
        f.subscribe(seen.append)
        f.set_cidrs([POD4], ["10.96.0.0/12"])  # cluster CIDRs only: no call
        f.set_cidrs([POD4], [], forward_policy(POD4, "8.8.8.8"))  # policy only: no call
        f.set_cidrs(["10.17.0.0/16", POD6], [])
        assert seen == [(POD4,), ("10.17.0.0/16", POD6)]

    def test_subscriber_gets_typed_cidrs(self) -> None:
        """What subscribers get are Cidr values (the typed network, no re-parse)."""
        f = CidrFilter([" 10.16.0.9/16 "], [])
        seen: list[tuple[Cidr, ...]] = []
        f.subscribe(seen.append)
        (c,) = seen[0]
        assert isinstance(c, Cidr) and c.network.prefixlen == 16

    def test_bad_change_notifies_nobody(self) -> None:
        """A rejected set_cidrs leaves subscribers uncalled."""
        f = CidrFilter([POD4], [])
        seen: list[tuple[str, ...]] = []
        f.subscribe(seen.append)
        with pytest.raises(ConfigError):
            f.set_cidrs(["bad"], [])
        assert seen == [(POD4,)]
