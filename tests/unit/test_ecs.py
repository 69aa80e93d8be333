"""Tests for shipper.ecs: community id, time formatting, event ids and the record schema."""

from __future__ import annotations

import copy
import ipaddress
import re
from datetime import UTC, datetime
from typing import Any

import communityid
import orjson
import pytest

from shipper import ecs
from shipper.ecs import (
    SCHEMA_VERSION,
    TRANSPORTS,
    build_record,
    community_id,
    event_id,
    event_time,
    gap_record,
    rfc3339,
    status_names,
)
from shipper.record import (
    ACTION_DESTROY,
    ACTION_NEW,
    ACTION_SNAPSHOT,
    ACTION_UPDATE,
    ATTR_STALE,
    ATTR_UNCERTAIN,
    FlowEvent,
    PodMeta,
)

POD_V4 = "10.16.0.5"
POD_V6 = "fd00:10:16::5"
NODE_V4 = "192.168.1.10"
NODE_V6 = "2001:db8:1::10"
REMOTE_V4 = "93.184.216.34"
REMOTE_V6 = "2606:2800:220:1::1"

T0 = 1_714_557_600_000_000_000  # 2024-05-01T10:00:00Z


def ip(text: str) -> int:
    """Integer form of an address."""
    return int(ipaddress.ip_address(text))


def make_event(**over: Any) -> FlowEvent:
    """A MASQUERADEd TCP flow from a pod to the Internet (v4), fields overridable."""
    fields: dict[str, Any] = {
        "action": ACTION_NEW,
        "family": 4,
        "proto": 6,
        "orig_src": ip(POD_V4),
        "orig_dst": ip(REMOTE_V4),
        "orig_sport": 40000,
        "orig_dport": 443,
        "reply_src": ip(REMOTE_V4),
        "reply_dst": ip(NODE_V4),
        "reply_sport": 443,
        "reply_dport": 61000,
        "icmp_type": None,
        "icmp_code": None,
        "icmp_id": None,
        "ct_id": 123456,
        "status": None,
        "tcp_state": None,
        "mark": None,
        "zone": None,
        "timeout": None,
        "orig_packets": None,
        "orig_bytes": None,
        "reply_packets": None,
        "reply_bytes": None,
        "ts_start": None,
        "ts_stop": None,
        "ts_event": None,
        "received_ns": T0,
    }
    fields.update(over)
    return FlowEvent(**fields)


def make_v6_event(**over: Any) -> FlowEvent:
    """The same flow over IPv6."""
    base: dict[str, Any] = {
        "family": 6,
        "orig_src": ip(POD_V6),
        "orig_dst": ip(REMOTE_V6),
        "reply_src": ip(REMOTE_V6),
        "reply_dst": ip(NODE_V6),
    }
    base.update(over)
    return make_event(**base)


def make_icmp_event(**over: Any) -> FlowEvent:
    """An ICMP echo request from a pod, MASQUERADEd."""
    base: dict[str, Any] = {
        "proto": 1,
        "orig_sport": None,
        "orig_dport": None,
        "reply_sport": None,
        "reply_dport": None,
        "icmp_type": 8,
        "icmp_code": 0,
        "icmp_id": 77,
    }
    base.update(over)
    return make_event(**base)


def make_pod(**over: Any) -> PodMeta:
    """A dual-stack pod with labels, owner, node and logical switch, record object built."""
    fields: dict[str, Any] = {
        "namespace": "shop",
        "name": "web-1",
        "uid": "uid-web-1",
        "ips": ((4, ip(POD_V4)), (6, ip(POD_V6))),
        "node": "node-1",
        "labels": {"app": "web"},
        "owner_kind": "Deployment",
        "owner_name": "web",
        "logical_switch": "ovn-default",
    }
    fields.update(over)
    return PodMeta(**fields).with_record_object()


def ref_cid(proto: int, src: str, dst: str, sport: int | None, dport: int | None,
            seed: int = 0) -> str:
    """Community id from the reference ``communityid`` package."""
    cid = communityid.CommunityID(seed=seed)
    ft = communityid.FlowTuple
    if proto == 6:
        tup = ft.make_tcp(src, dst, sport, dport)
    elif proto == 17:
        tup = ft.make_udp(src, dst, sport, dport)
    elif proto == 132:
        tup = ft.make_sctp(src, dst, sport, dport)
    elif proto == 1:
        tup = ft.make_icmp(src, dst, sport, dport)
    elif proto == 58:
        tup = ft.make_icmp6(src, dst, sport, dport)
    else:
        tup = ft(proto, src, dst)
    return cid.calc(tup)


def fam(text: str) -> int:
    """Address family (4 or 6) of an address."""
    return ipaddress.ip_address(text).version


RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def ref_rfc3339(ns: int) -> str:
    """Independent RFC 3339 formatting (microseconds truncated)."""
    sec, rem = divmod(ns, 1_000_000_000)
    dt = datetime.fromtimestamp(sec, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{rem // 1000:06d}Z"


# ---- community id ---------------------------------------------------------------

PORTED_TUPLES = [
    (POD_V4, REMOTE_V4, 40000, 443),
    (REMOTE_V4, POD_V4, 443, 40000),
    ("10.0.0.1", "10.0.0.2", 1, 65535),
    ("10.0.0.1", "10.0.0.1", 1234, 80),  # same address: ports decide the order
    ("10.0.0.1", "10.0.0.1", 80, 1234),
    ("10.0.0.1", "10.0.0.1", 80, 80),
    ("0.0.0.0", "255.255.255.255", 0, 0),
    (POD_V6, REMOTE_V6, 40000, 443),
    (REMOTE_V6, POD_V6, 443, 40000),
    ("::1", "::1", 5353, 53),
    ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 1),
]


class TestCommunityId:
    @pytest.mark.parametrize("proto", [6, 17, 132])
    @pytest.mark.parametrize(("src", "dst", "sport", "dport"), PORTED_TUPLES)
    def test_ported_protocols_match_reference(
        self, proto: int, src: str, dst: str, sport: int, dport: int
    ) -> None:
        """TCP, UDP and SCTP ids equal the reference package's for v4 and v6, either order."""
        got = community_id(fam(src), proto, ip(src), ip(dst), sport, dport)
        assert got == ref_cid(proto, src, dst, sport, dport)

    @pytest.mark.parametrize("proto", [6, 17, 132])
    @pytest.mark.parametrize(("src", "dst", "sport", "dport"), PORTED_TUPLES)
    def test_both_directions_give_one_id(
        self, proto: int, src: str, dst: str, sport: int, dport: int
    ) -> None:
        """A flow and its reverse direction share one community id."""
        f = fam(src)
        assert community_id(f, proto, ip(src), ip(dst), sport, dport) == community_id(
            f, proto, ip(dst), ip(src), dport, sport
        )

    @pytest.mark.parametrize(
        ("proto", "src", "dst", "maker"),
        [
            (1, POD_V4, REMOTE_V4, communityid.FlowTuple.make_icmp),
            (1, REMOTE_V4, POD_V4, communityid.FlowTuple.make_icmp),
            (58, POD_V6, REMOTE_V6, communityid.FlowTuple.make_icmp6),
            (58, REMOTE_V6, POD_V6, communityid.FlowTuple.make_icmp6),
        ],
    )
    def test_every_icmp_type_matches_reference(
        self, proto: int, src: str, dst: str, maker: Any
    ) -> None:
        """Every ICMP/ICMPv6 type (paired and one-way), with several codes, equals the reference."""
        ref = communityid.CommunityID()
        mismatches = []
        for icmp_type in range(256):
            for code in (0, 1, 3, 255):
                got = community_id(fam(src), proto, ip(src), ip(dst), None, None, icmp_type, code)
                want = ref.calc(maker(src, dst, icmp_type, code))
                if got != want:
                    mismatches.append((icmp_type, code, got, want))
        assert mismatches == []

    @pytest.mark.parametrize(
        ("proto", "req", "rep", "src", "dst"),
        [(1, 8, 0, POD_V4, REMOTE_V4), (1, 13, 14, POD_V4, REMOTE_V4),
         (58, 128, 129, POD_V6, REMOTE_V6), (58, 135, 136, POD_V6, REMOTE_V6)],
    )
    def test_icmp_request_and_reply_share_an_id(
        self, proto: int, req: int, rep: int, src: str, dst: str
    ) -> None:
        """An ICMP request and its reply in the other direction get the same id."""
        f = fam(src)
        assert community_id(f, proto, ip(src), ip(dst), None, None, req, 0) == community_id(
            f, proto, ip(dst), ip(src), None, None, rep, 0
        )

    @pytest.mark.parametrize(
        ("proto", "icmp_type", "src", "dst"),
        [(1, 3, POD_V4, REMOTE_V4), (1, 11, POD_V4, REMOTE_V4),
         (58, 1, POD_V6, REMOTE_V6), (58, 2, POD_V6, REMOTE_V6)],
    )
    def test_one_way_icmp_types_keep_their_direction(
        self, proto: int, icmp_type: int, src: str, dst: str
    ) -> None:
        """One-way ICMP types (unreachable, time exceeded, ...) are not reordered by address."""
        f = fam(src)
        forward = community_id(f, proto, ip(src), ip(dst), None, None, icmp_type, 0)
        backward = community_id(f, proto, ip(dst), ip(src), None, None, icmp_type, 0)
        assert forward != backward

    @pytest.mark.parametrize("proto", [47, 50, 51, 4, 253])
    @pytest.mark.parametrize(
        ("src", "dst"),
        [(POD_V4, REMOTE_V4), (REMOTE_V4, POD_V4), (POD_V6, REMOTE_V6), (REMOTE_V6, POD_V6)],
    )
    def test_portless_protocols_match_reference(self, proto: int, src: str, dst: str) -> None:
        """A raw protocol without ports (GRE, ESP, AH, IPIP, experimental) equals the reference."""
        got = community_id(fam(src), proto, ip(src), ip(dst), None, None)
        assert got == ref_cid(proto, src, dst, None, None)

    @pytest.mark.parametrize("seed", [1, 77, 65535])
    def test_seed_is_hashed_like_the_reference(self, seed: int) -> None:
        """A non-zero seed changes the id exactly as the reference implementation does."""
        got = community_id(4, 6, ip(POD_V4), ip(REMOTE_V4), 40000, 443, seed=seed)
        assert got == ref_cid(6, POD_V4, REMOTE_V4, 40000, 443, seed=seed)
        assert got != community_id(4, 6, ip(POD_V4), ip(REMOTE_V4), 40000, 443)

    def test_format_is_version_prefix_and_base64_sha1(self) -> None:
        """The id is ``1:`` followed by 28 characters of base64 (a SHA-1 digest)."""
        got = community_id(4, 17, ip(POD_V4), ip(REMOTE_V4), 5353, 53)
        assert re.fullmatch(r"1:[A-Za-z0-9+/]{27}=", got)

    def test_known_vector_from_the_spec(self) -> None:
        """The spec's published TCP example (128.232.110.120:34855 -> 66.35.250.204:80) matches."""
        got = community_id(4, 6, ip("128.232.110.120"), ip("66.35.250.204"), 34855, 80)
        assert got == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="


# ---- time ----------------------------------------------------------------------


class TestRfc3339:
    def test_epoch(self) -> None:
        """Zero nanoseconds is the Unix epoch with six fractional digits and a Z."""
        assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"

    def test_microseconds_are_truncated_not_rounded(self) -> None:
        """Sub-microsecond digits are cut, never rounded up into the next microsecond."""
        assert rfc3339(T0 + 123_456_999) == "2024-05-01T10:00:00.123456Z"
        assert rfc3339(T0 + 999_999_999) == "2024-05-01T10:00:00.999999Z"

    def test_format(self) -> None:
        """Every value has the exact shape YYYY-MM-DDTHH:MM:SS.ffffffZ."""
        for ns in (0, 1, T0, T0 + 1, 4_102_444_800_000_000_000 - 1):
            assert RFC3339_RE.match(rfc3339(ns)), rfc3339(ns)

    def test_millisecond_cache_agrees_with_independent_formatting(self) -> None:
        """Through the per-millisecond prefix cache (hits, misses, across millisecond and
        second boundaries, and after the cache was cleared for size) every time text is
        the independent formatting's."""
        import random

        rng = random.Random(7)
        times = [T0 + d for d in (0, 999, 1000, 999_999, 1_000_000, 999_999_999)]
        times += [T0 + rng.randrange(3_000_000_000) for _ in range(3000)]
        times += [rng.randrange(4_102_444_800_000_000_000) for _ in range(6000)]
        for ns in times + times[::-1]:
            assert rfc3339(ns) == ref_rfc3339(ns), ns

    def test_second_boundary_with_cache(self) -> None:
        """The cached seconds prefix is replaced when the second changes, in either direction."""
        before = T0 + 999_999_999
        after = T0 + 1_000_000_000
        assert rfc3339(before) == "2024-05-01T10:00:00.999999Z"
        assert rfc3339(after) == "2024-05-01T10:00:01.000000Z"
        assert rfc3339(before) == "2024-05-01T10:00:00.999999Z"
        assert rfc3339(T0 + 59 * 10**9 + 5_000) == "2024-05-01T10:00:59.000005Z"
        assert rfc3339(T0 + 60 * 10**9) == "2024-05-01T10:01:00.000000Z"

    def test_matches_independent_formatting_for_interleaved_times(self) -> None:
        """Interleaved times across seconds, days and years all equal datetime's formatting."""
        values = [
            T0, T0 + 10**9, T0 - 1, T0 + 86_400 * 10**9, 0, T0 + 7,
            1_735_689_599_999_999_999,  # 2024-12-31T23:59:59.999999Z
            1_735_689_600_000_000_000,  # 2025-01-01T00:00:00Z
            1_709_164_800_000_000_000,  # 2024-02-29 (leap day)
            T0 + 5,
        ]
        for ns in values + list(reversed(values)):
            assert rfc3339(ns) == ref_rfc3339(ns)


class TestEventTimeAndId:
    def test_event_id_format(self) -> None:
        """The id is ``<host>:<conntrack id>:<action>:<time ns>``."""
        ev = make_event(ct_id=42, action=ACTION_DESTROY)
        assert event_id("node-1", ev, 5) == "node-1:42:destroy:5"

    def test_event_id_is_stable(self) -> None:
        """The same event built twice gets the same id (duplicates can be dropped by id)."""
        ev = make_event(action=ACTION_DESTROY, ts_start=T0, ts_stop=T0 + 10**9)
        a = build_record(ev, None, "node-1")
        b = build_record(make_event(action=ACTION_DESTROY, ts_start=T0, ts_stop=T0 + 10**9,
                                    received_ns=T0 + 99 * 10**9), None, "node-1")
        assert a["event"]["id"] == b["event"]["id"]

    def test_event_ids_differ_between_events(self) -> None:
        """Different node, conntrack id, action or time each yield a different id."""
        ev = make_event()
        ids = {
            event_id("node-1", ev, T0),
            event_id("node-2", ev, T0),
            event_id("node-1", ev._replace(ct_id=999), T0),
            event_id("node-1", ev._replace(action=ACTION_DESTROY), T0),
            event_id("node-1", ev, T0 + 1),
        }
        assert len(ids) == 5

    def test_destroy_uses_kernel_stop_time(self) -> None:
        """A DESTROY's time is the kernel's stop timestamp, not when it was read."""
        ev = make_event(action=ACTION_DESTROY, ts_stop=T0 + 5, ts_event=T0 + 9,
                        received_ns=T0 + 10**12)
        assert event_time(ev) == T0 + 5

    def test_event_timestamp_then_receive_time(self) -> None:
        """Other events use the kernel event timestamp if sent, else the receive time."""
        assert event_time(make_event(ts_event=T0 + 3, received_ns=T0 + 9)) == T0 + 3
        assert event_time(make_event(received_ns=T0 + 9)) == T0 + 9
        # A NEW never uses a stop timestamp even if one were present.
        assert event_time(make_event(ts_stop=T0 + 1, received_ns=T0 + 9)) == T0 + 9
        # A DESTROY without stop timestamp falls back like the others.
        assert event_time(make_event(action=ACTION_DESTROY, received_ns=T0 + 9)) == T0 + 9


# ---- records -------------------------------------------------------------------

TOP_KEYS_UNRESOLVED = {
    "@timestamp", "event", "network", "source", "destination", "host", "conntrack", "flowlog",
}


class TestBuildRecordSchema:
    @pytest.mark.parametrize(
        ("action", "types"),
        [
            (ACTION_NEW, ["connection", "start"]),
            (ACTION_DESTROY, ["connection", "end"]),
            (ACTION_UPDATE, ["connection", "info"]),
            (ACTION_SNAPSHOT, ["connection", "info"]),
        ],
    )
    def test_field_names_per_action(self, action: str, types: list[str]) -> None:
        """Every action yields the documented top-level, event, network and endpoint fields."""
        ev = make_event(action=action, status=0x19E, tcp_state=3, timeout=120)
        rec = build_record(ev, None, "node-1")
        assert set(rec) == TOP_KEYS_UNRESOLVED
        assert rec["event"]["kind"] == "event"
        assert rec["event"]["category"] == ["network"]
        assert rec["event"]["type"] == types
        assert rec["event"]["action"] == action
        assert set(rec["event"]) >= {"kind", "category", "type", "action", "id"}
        assert set(rec["network"]) == {"transport", "iana_number", "type", "community_id"}
        assert set(rec["source"]) == {"ip", "port", "nat"}
        assert set(rec["source"]["nat"]) == {"ip", "port"}
        assert set(rec["destination"]) == {"ip", "port"}
        assert rec["host"] == {"name": "node-1"}
        assert set(rec["conntrack"]) == {"id", "state", "status", "timeout"}
        assert rec["flowlog"] == {"attribution": "unresolved", "schema_version": SCHEMA_VERSION}

    def test_new_event_has_no_end_or_duration(self) -> None:
        """A NEW record carries no event.end or event.duration (the flow has not ended)."""
        rec = build_record(make_event(), None, "n")
        assert "end" not in rec["event"]
        assert "duration" not in rec["event"]
        assert "start" not in rec["event"]

    def test_timestamp_is_event_time(self) -> None:
        """``@timestamp`` is the event time in RFC 3339."""
        rec = build_record(make_event(ts_event=T0 + 1_500), None, "n")
        assert rec["@timestamp"] == "2024-05-01T10:00:00.000001Z"

    def test_addresses_ports_and_snat(self) -> None:
        """source/destination are the original tuple; source.nat is the reply destination."""
        rec = build_record(make_event(), None, "n")
        assert rec["source"]["ip"] == POD_V4
        assert rec["source"]["port"] == 40000
        assert rec["destination"] == {"ip": REMOTE_V4, "port": 443}
        assert rec["source"]["nat"] == {"ip": NODE_V4, "port": 61000}

    def test_nat_port_is_post_nat_port_not_original(self) -> None:
        """source.nat.port is the reply tuple's dport (what the server saw), not orig sport."""
        ev = make_event(orig_sport=1111, reply_dport=2222)
        rec = build_record(ev, None, "n")
        assert rec["source"]["nat"]["port"] == 2222
        assert rec["source"]["port"] == 1111

    def test_no_dnat_means_no_destination_nat(self) -> None:
        """Without DNAT (reply source == original destination) destination.nat is absent."""
        rec = build_record(make_event(), None, "n")
        assert "nat" not in rec["destination"]

    def test_dnat_address(self) -> None:
        """A DNATed flow names the real destination (reply source) in destination.nat."""
        ev = make_event(reply_src=ip("10.96.0.10"), reply_sport=8443)
        rec = build_record(ev, None, "n")
        assert rec["destination"]["ip"] == REMOTE_V4
        assert rec["destination"]["nat"] == {"ip": "10.96.0.10", "port": 8443}

    def test_dnat_port_only(self) -> None:
        """A port-only DNAT (same address, other port) also yields destination.nat."""
        ev = make_event(reply_sport=8080)
        rec = build_record(ev, None, "n")
        assert rec["destination"]["nat"] == {"ip": REMOTE_V4, "port": 8080}

    def test_counters_only_when_present(self) -> None:
        """Byte/packet counters appear only when the kernel sent them."""
        rec = build_record(make_event(action=ACTION_DESTROY), None, "n")
        for side in ("source", "destination"):
            assert "bytes" not in rec[side]
            assert "packets" not in rec[side]
        ev = make_event(action=ACTION_DESTROY, orig_packets=3, orig_bytes=180,
                        reply_packets=2, reply_bytes=1500)
        rec = build_record(ev, None, "n")
        assert (rec["source"]["packets"], rec["source"]["bytes"]) == (3, 180)
        assert (rec["destination"]["packets"], rec["destination"]["bytes"]) == (2, 1500)

    def test_zero_counters_are_kept(self) -> None:
        """Counters of zero are shipped as 0 (present), not dropped as falsy."""
        ev = make_event(action=ACTION_DESTROY, orig_packets=0, orig_bytes=0,
                        reply_packets=0, reply_bytes=0)
        rec = build_record(ev, None, "n")
        assert rec["destination"]["bytes"] == 0
        assert rec["source"]["packets"] == 0

    def test_destroy_times_from_kernel_timestamps(self) -> None:
        """DESTROY: event.start/end from the kernel's start/stop, duration in ns between them."""
        ev = make_event(action=ACTION_DESTROY, ts_start=T0, ts_stop=T0 + 2_500_000_000,
                        received_ns=T0 + 600 * 10**9)
        rec = build_record(ev, None, "n")
        assert rec["event"]["start"] == "2024-05-01T10:00:00.000000Z"
        assert rec["event"]["end"] == "2024-05-01T10:00:02.500000Z"
        assert rec["event"]["duration"] == 2_500_000_000
        assert rec["@timestamp"] == rec["event"]["end"]

    def test_destroy_without_timestamps_ends_when_read(self) -> None:
        """DESTROY without kernel times: end is the receive time; no start, no duration."""
        ev = make_event(action=ACTION_DESTROY, received_ns=T0 + 10**9)
        rec = build_record(ev, None, "n")
        assert rec["event"]["end"] == "2024-05-01T10:00:01.000000Z"
        assert "start" not in rec["event"]
        assert "duration" not in rec["event"]

    def test_remembered_flow_start_is_used_without_kernel_start(self) -> None:
        """``flow_start_ns`` supplies event.start (and the duration) when the kernel sent none."""
        ev = make_event(action=ACTION_DESTROY, ts_stop=T0 + 3 * 10**9)
        rec = build_record(ev, None, "n", flow_start_ns=T0)
        assert rec["event"]["start"] == "2024-05-01T10:00:00.000000Z"
        assert rec["event"]["duration"] == 3 * 10**9

    def test_kernel_start_wins_over_remembered_start(self) -> None:
        """A kernel start timestamp takes precedence over ``flow_start_ns``."""
        ev = make_event(action=ACTION_DESTROY, ts_start=T0 + 10**9, ts_stop=T0 + 3 * 10**9)
        rec = build_record(ev, None, "n", flow_start_ns=T0)
        assert rec["event"]["start"] == "2024-05-01T10:00:01.000000Z"
        assert rec["event"]["duration"] == 2 * 10**9

    def test_no_negative_duration(self) -> None:
        """A stop before the start (clock step) yields no duration rather than a negative one."""
        ev = make_event(action=ACTION_DESTROY, ts_start=T0 + 10**9, ts_stop=T0)
        rec = build_record(ev, None, "n")
        assert "duration" not in rec["event"]

    def test_new_event_with_start_has_start_only(self) -> None:
        """A NEW with a known start carries event.start but no end."""
        rec = build_record(make_event(), None, "n", flow_start_ns=T0)
        assert rec["event"]["start"] == "2024-05-01T10:00:00.000000Z"
        assert "end" not in rec["event"]

    def test_ipv6_record(self) -> None:
        """An IPv6 flow: network.type ipv6 and canonical (compressed) address text."""
        rec = build_record(make_v6_event(), None, "n")
        assert rec["network"]["type"] == "ipv6"
        assert rec["source"]["ip"] == POD_V6
        assert rec["destination"]["ip"] == "2606:2800:220:1::1"
        assert rec["source"]["nat"] == {"ip": NODE_V6, "port": 61000}
        assert "nat" not in rec["destination"]
        assert rec["network"]["community_id"] == ref_cid(6, POD_V6, REMOTE_V6, 40000, 443)

    def test_ipv4_network_type(self) -> None:
        """An IPv4 flow: network.type ipv4."""
        assert build_record(make_event(), None, "n")["network"]["type"] == "ipv4"

    def test_community_id_from_original_tuple(self) -> None:
        """network.community_id is computed on the original (pre-NAT) tuple."""
        rec = build_record(make_event(), None, "n")
        assert rec["network"]["community_id"] == ref_cid(6, POD_V4, REMOTE_V4, 40000, 443)

    def test_icmp_record(self) -> None:
        """ICMP: no ports anywhere, conntrack.icmp carries type, code and id."""
        rec = build_record(make_icmp_event(), None, "n")
        assert "port" not in rec["source"]
        assert "port" not in rec["destination"]
        assert rec["source"]["nat"] == {"ip": NODE_V4}
        assert rec["conntrack"]["icmp"] == {"type": 8, "code": 0, "id": 77}
        assert rec["network"]["transport"] == "icmp"
        assert rec["network"]["iana_number"] == "1"
        assert rec["network"]["community_id"] == ref_cid(1, POD_V4, REMOTE_V4, 8, 0)

    def test_icmpv6_record(self) -> None:
        """ICMPv6: transport ipv6-icmp, iana 58, community id per the reference."""
        ev = make_icmp_event(family=6, proto=58, orig_src=ip(POD_V6), orig_dst=ip(REMOTE_V6),
                             reply_src=ip(REMOTE_V6), reply_dst=ip(NODE_V6), icmp_type=128)
        rec = build_record(ev, None, "n")
        assert rec["network"]["transport"] == "ipv6-icmp"
        assert rec["network"]["iana_number"] == "58"
        assert rec["network"]["community_id"] == ref_cid(58, POD_V6, REMOTE_V6, 128, 0)

    @pytest.mark.parametrize(("proto", "name"), sorted(TRANSPORTS.items()))
    def test_transport_names_lowercase(self, proto: int, name: str) -> None:
        """network.transport is the lowercase IANA keyword; iana_number is the number as text."""
        rec = build_record(make_event(proto=proto, orig_sport=None, orig_dport=None,
                                      reply_sport=None, reply_dport=None), None, "n")
        assert rec["network"]["transport"] == name
        assert rec["network"]["transport"] == rec["network"]["transport"].lower()
        assert rec["network"]["iana_number"] == str(proto)
        assert isinstance(rec["network"]["iana_number"], str)

    def test_expected_transport_keywords(self) -> None:
        """The common protocols have their ECS names."""
        assert (TRANSPORTS[6], TRANSPORTS[17], TRANSPORTS[1], TRANSPORTS[132]) == (
            "tcp", "udp", "icmp", "sctp")

    @pytest.mark.parametrize("proto", [0, 253, 255])
    def test_unknown_protocol_transport_is_its_number(self, proto: int) -> None:
        """A protocol without a name has its number (as text) as network.transport."""
        rec = build_record(make_event(proto=proto, orig_sport=None, orig_dport=None,
                                      reply_sport=None, reply_dport=None), None, "n")
        assert rec["network"]["transport"] == str(proto)
        assert rec["network"]["iana_number"] == str(proto)

    def test_conntrack_fields(self) -> None:
        """conntrack carries id, TCP state name, status bit names, mark, zone and timeout."""
        status = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x80
        ev = make_event(tcp_state=3, status=status, mark=7, zone=2, timeout=431999)
        ct = build_record(ev, None, "n")["conntrack"]
        assert ct == {
            "id": 123456,
            "state": "ESTABLISHED",
            "status": ["EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT",
                       "SRC_NAT_DONE"],
            "mark": 7,
            "zone": 2,
            "timeout": 431999,
        }

    def test_conntrack_optional_fields_absent(self) -> None:
        """Without state, status, mark, zone or timeout only conntrack.id is shipped."""
        assert build_record(make_event(), None, "n")["conntrack"] == {"id": 123456}

    def test_unknown_tcp_state_is_its_number(self) -> None:
        """A TCP state beyond the known names is shipped as its number in text."""
        ct = build_record(make_event(tcp_state=42), None, "n")["conntrack"]
        assert ct["state"] == "42"

    def test_status_names_every_bit(self) -> None:
        """status_names names each of the 16 status bits in bit order."""
        assert status_names(0) == []
        assert status_names(0xFFFF) == list(ecs.STATUS_BITS)
        assert status_names(1 << 4) == ["SRC_NAT"]
        assert status_names(1 << 15) == ["HW_OFFLOAD"]


class TestBuildRecordAttribution:
    def test_uncertain_names_the_pod_and_says_so(self) -> None:
        """attribution="uncertain": the candidate pod's kubernetes object, flagged uncertain."""
        rec = build_record(make_event(), make_pod(), "n", attribution=ATTR_UNCERTAIN)
        assert rec["flowlog"] == {"attribution": "uncertain", "schema_version": SCHEMA_VERSION}
        assert rec["kubernetes"]["pod"]["name"] == "web-1"

    def test_explicit_status_without_pod(self) -> None:
        """An explicit status is written as given, also without a pod (e.g. stale)."""
        rec = build_record(make_event(), None, "n", attribution=ATTR_STALE)
        assert rec["flowlog"]["attribution"] == "stale"
        assert "kubernetes" not in rec

    def test_unknown_status_is_rejected(self) -> None:
        """A status outside the schema's values is a programming error, not a record."""
        with pytest.raises(KeyError):
            build_record(make_event(), None, "n", attribution="maybe")

    def test_unresolved_is_flagged_without_kubernetes(self) -> None:
        """No pod: flowlog.attribution is "unresolved" and there is no kubernetes key."""
        rec = build_record(make_event(), None, "n")
        assert rec["flowlog"]["attribution"] == "unresolved"
        assert "kubernetes" not in rec

    def test_resolved_carries_pod_and_its_ip(self) -> None:
        """A pod: kubernetes object of the pod, with kubernetes.pod.ip equal to source.ip."""
        rec = build_record(make_event(), make_pod(), "n")
        assert set(rec) == TOP_KEYS_UNRESOLVED | {"kubernetes"}
        assert rec["flowlog"] == {"attribution": "resolved", "schema_version": SCHEMA_VERSION}
        assert rec["kubernetes"] == {
            "namespace": "shop",
            "pod": {"name": "web-1", "uid": "uid-web-1", "ip": POD_V4},
            "labels": {"app": "web"},
            "node": {"name": "node-1"},
            "owner": {"kind": "Deployment", "name": "web"},
            "ovn": {"logical_switch": "ovn-default"},
        }
        assert rec["kubernetes"]["pod"]["ip"] == rec["source"]["ip"]

    def test_minimal_pod_object(self) -> None:
        """A pod without labels, node, owner or switch ships only namespace and pod."""
        pod = PodMeta(namespace="a", name="b", uid="u", ips=((4, ip(POD_V4)),))
        rec = build_record(make_event(), pod.with_record_object(), "n")
        assert rec["kubernetes"] == {"namespace": "a", "pod": {"name": "b", "uid": "u",
                                                               "ip": POD_V4}}

    def test_pod_shared_object_is_not_mutated(self) -> None:
        """Records of a dual-stack pod carry each its own pod.ip; the PodMeta dict is unchanged."""
        pod = make_pod()
        before = copy.deepcopy(pod.kubernetes)
        r4 = build_record(make_event(), pod, "n")
        r6 = build_record(make_v6_event(), pod, "n")
        assert pod.kubernetes == before
        assert "ip" not in pod.kubernetes["pod"]
        assert r4["kubernetes"]["pod"]["ip"] == POD_V4
        assert r6["kubernetes"]["pod"]["ip"] == POD_V6
        assert r4["kubernetes"]["pod"]["ip"] == r4["source"]["ip"]
        assert r6["kubernetes"]["pod"]["ip"] == r6["source"]["ip"]

    def test_repeated_records_keep_their_own_ip(self) -> None:
        """Interleaved v4/v6 records of one pod never leak one address into the other's record."""
        pod = make_pod()
        recs = [build_record(make_event() if i % 2 == 0 else make_v6_event(), pod, "n")
                for i in range(6)]
        assert [r["kubernetes"]["pod"]["ip"] for r in recs] == [POD_V4, POD_V6] * 3

    def test_pod_without_the_flow_address_still_gets_its_ip(self) -> None:
        """A pod whose metadata does not list the flow's source still gets pod.ip == source.ip."""
        pod = make_pod(ips=((4, ip("10.16.0.99")),))
        before = copy.deepcopy(pod.kubernetes)
        rec = build_record(make_event(), pod, "n")
        assert rec["kubernetes"]["pod"] == {"name": "web-1", "uid": "uid-web-1", "ip": POD_V4}
        assert rec["kubernetes"]["namespace"] == "shop"
        assert pod.kubernetes == before


class TestSerialisation:
    @pytest.mark.parametrize("action", [ACTION_NEW, ACTION_DESTROY, ACTION_UPDATE,
                                        ACTION_SNAPSHOT])
    def test_records_round_trip_through_orjson(self, action: str) -> None:
        """Every record kind serialises with orjson and decodes back to the same data."""
        for ev, pod in (
            (make_event(action=action, status=0x19E, tcp_state=3, orig_packets=1, orig_bytes=60,
                        reply_packets=1, reply_bytes=60, ts_start=T0, ts_stop=T0 + 1), make_pod()),
            (make_v6_event(action=action), None),
            (make_icmp_event(action=action), make_pod()),
        ):
            rec = build_record(ev, pod, "node-1")
            assert orjson.loads(orjson.dumps(rec)) == rec

    def test_gap_record_serialises(self) -> None:
        """The gap record serialises with orjson."""
        rec = gap_record("n", since_ns=T0, until_ns=T0 + 1, lost=None, overruns=1, resync=False)
        assert orjson.loads(orjson.dumps(rec)) == rec


class TestGapRecord:
    def test_shape(self) -> None:
        """A gap record: pipeline_error event with start/end/duration and the loss counters."""
        rec = gap_record("node-1", since_ns=T0, until_ns=T0 + 2 * 10**9, lost=1234,
                         overruns=3, resync=True)
        assert set(rec) == {"@timestamp", "event", "host", "flowlog"}
        assert rec["@timestamp"] == "2024-05-01T10:00:02.000000Z"
        ev = rec["event"]
        assert set(ev) == {"kind", "category", "type", "action", "start", "end", "duration", "id"}
        assert ev["kind"] == "pipeline_error"
        assert ev["category"] == ["network"]
        assert ev["type"] == ["info"]
        assert ev["action"] == "gap"
        assert ev["start"] == "2024-05-01T10:00:00.000000Z"
        assert ev["end"] == "2024-05-01T10:00:02.000000Z"
        assert ev["duration"] == 2 * 10**9
        assert rec["host"] == {"name": "node-1"}
        assert rec["flowlog"] == {
            "schema_version": SCHEMA_VERSION,
            "gap": {"lost_events": 1234, "overruns": 3, "resync": True},
        }

    def test_unknown_loss_is_null(self) -> None:
        """An unknown number of lost events is shipped as null."""
        rec = gap_record("n", since_ns=T0, until_ns=T0, lost=None, overruns=1, resync=False)
        assert rec["flowlog"]["gap"]["lost_events"] is None

    def test_duration_never_negative(self) -> None:
        """A window that ends before it starts has duration 0."""
        rec = gap_record("n", since_ns=T0 + 10, until_ns=T0, lost=0, overruns=1, resync=False)
        assert rec["event"]["duration"] == 0

    def test_id_stable_and_distinct(self) -> None:
        """The gap id is the same for the same window and host, different otherwise."""

        def gid(host: str, since: int, until: int) -> str:
            return gap_record(host, since_ns=since, until_ns=until, lost=1, overruns=1,
                              resync=False)["event"]["id"]

        assert gid("a", T0, T0 + 1) == gid("a", T0, T0 + 1)
        assert len({gid("a", T0, T0 + 1), gid("b", T0, T0 + 1), gid("a", T0, T0 + 2),
                    gid("a", T0 + 1, T0 + 2)}) == 4
        assert re.fullmatch(r"[A-Za-z0-9_-]{20}", gid("a", T0, T0 + 1))
