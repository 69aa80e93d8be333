"""The fused NDJSON encoder yields exactly the record ``ecs.build_record`` builds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from shipper import ecs
from shipper.ecs_json import JsonLineEncoder
from shipper.enrich.pods import pod_from_dict
from shipper.record import ATTRIBUTIONS, FlowEvent, PodMeta, ip_to_str
from shipper.sources.decode import LayoutDecoder

DATA = Path(__file__).resolve().parents[1] / "data" / "ctnetlink_messages.json"
EVENTS: list[FlowEvent] = []
_dec = LayoutDecoder()
for _m in json.loads(DATA.read_text()):
    _ev, _ = _dec.decode(bytes.fromhex(_m["hex"]), 0, 1_795_766_503_887_525_603)
    assert _ev is not None
    EVENTS.append(_ev)


def _pod_for(ev: FlowEvent) -> PodMeta:
    return pod_from_dict({
        "metadata": {"namespace": "shop", "name": "checkout-7d9f8b6c5d-x2x7q", "uid": "u-1",
                     "labels": {"app": "checkout", "quote": 'he said "hi"\n\\'},
                     "annotations": {"ovn.kubernetes.io/logical_switch": "ovn-default"},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "checkout-7d9f8b6c5d",
                                          "controller": True, "apiVersion": "apps/v1",
                                          "uid": "x"}]},
        "spec": {"nodeName": "node-a"},
        "status": {"phase": "Running", "podIP": ip_to_str(ev.family, ev.orig_src)},
    })


class TestSameAsRecord:
    """For every real captured message, the line parses to the built record."""

    @pytest.mark.parametrize("i", range(len(EVENTS)))
    @pytest.mark.parametrize("resolved", [True, False])
    @pytest.mark.parametrize("start", [None, 1_795_766_500_000_000_000])
    def test_line_equals_record(self, i: int, resolved: bool, start: int | None) -> None:
        """orjson.loads(line) == build_record(...) for resolved/unresolved and any start."""
        ev = EVENTS[i]
        pod = _pod_for(ev) if resolved else None
        host = 'node "a"\\b'
        line = JsonLineEncoder(host).encode(ev, pod, start)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert orjson.loads(line) == orjson.loads(
            orjson.dumps(ecs.build_record(ev, pod, host, flow_start_ns=start))
        )

    @pytest.mark.parametrize("attribution", ATTRIBUTIONS)
    @pytest.mark.parametrize("resolved", [True, False])
    def test_attribution_written(self, attribution: str, resolved: bool) -> None:
        """Every attribution status is written to flowlog.attribution, as build_record does."""
        ev = EVENTS[0]
        pod = _pod_for(ev) if resolved else None
        line = JsonLineEncoder("n").encode(ev, pod, None, attribution)
        rec = orjson.loads(line)
        assert rec["flowlog"]["attribution"] == attribution
        assert ("kubernetes" in rec) is resolved
        assert rec == orjson.loads(orjson.dumps(
            ecs.build_record(ev, pod, "n", attribution=attribution)))

    def test_optional_fields(self) -> None:
        """Mark, zone, DNAT and missing counters come out as build_record has them."""
        base = EVENTS[0]
        ev = base._replace(mark=7, zone=3, reply_src=base.orig_dst + 1, reply_sport=None,
                           ct_id=None, tcp_state=99, status=0xFFFF)
        for pod in (None, _pod_for(ev)):
            line = JsonLineEncoder("n").encode(ev, pod, None)
            assert orjson.loads(line) == orjson.loads(orjson.dumps(
                ecs.build_record(ev, pod, "n", flow_start_ns=None)))

    def test_pod_without_this_address(self) -> None:
        """A pod whose metadata lacks the flow's address still yields the same record."""
        ev = EVENTS[0]
        pod = _pod_for(ev._replace(orig_src=ev.orig_src + 1))
        line = JsonLineEncoder("n").encode(ev, pod, None)
        rec = orjson.loads(line)
        assert rec == orjson.loads(orjson.dumps(ecs.build_record(ev, pod, "n")))
        assert rec["kubernetes"]["pod"]["ip"] == ip_to_str(ev.family, ev.orig_src)


class TestNetworkInlined:
    """The encoder's inline Community ID (IPv4 with ports) and its one-lookup network
    members are build_record's (``community_id``'s) for every ordering of the tuple."""

    def test_community_id_and_network_members_for_every_tuple_order(self) -> None:
        """Source above, below and equal to the destination, ports in either order or
        equal, a missing port, ICMP and IPv6, named and unnamed protocols: the same
        network object as build_record, and the Community ID is community_id's."""
        v4 = next(e for e in EVENTS if e.family == 4 and e.orig_sport is not None)
        v6 = next((e for e in EVENTS if e.family == 6), None)
        lo, hi = 0x0A000001, 0xC6336402
        enc = JsonLineEncoder("n")
        cases = []
        for proto in (6, 17, 132, 200):
            for src, dst in ((lo, hi), (hi, lo), (lo, lo)):
                for sport, dport in ((1000, 2000), (2000, 1000), (1500, 1500), (None, 53),
                                     (53, None), (None, None)):
                    cases.append(v4._replace(proto=proto, orig_src=src, orig_dst=dst,
                                             orig_sport=sport, orig_dport=dport,
                                             icmp_type=None, icmp_code=None))
        cases.append(v4._replace(proto=1, orig_sport=None, orig_dport=None, icmp_type=8,
                                 icmp_code=0, icmp_id=7))
        if v6 is not None:
            cases.append(v6)
            cases.append(v6._replace(orig_src=v6.orig_dst, orig_dst=v6.orig_src))
        assert len(cases) > 70
        for ev in cases:
            rec = orjson.loads(enc.encode(ev, None, None))
            want = orjson.loads(orjson.dumps(ecs.build_record(ev, None, "n")))
            assert rec["network"] == want["network"]
            assert rec["network"]["community_id"] == ecs.community_id(
                ev.family, ev.proto, ev.orig_src, ev.orig_dst, ev.orig_sport, ev.orig_dport,
                ev.icmp_type, ev.icmp_code)
            assert rec == want


class TestCounters:
    """Counter values are written from a table when small, formatted when not."""

    def test_counters_small_and_large(self) -> None:
        """DESTROY's counters, from the small-number table or formatted, and None
        packets: build_record's values."""
        base = next(e for e in EVENTS if e.orig_bytes is not None)
        enc = JsonLineEncoder("n")
        for v in (0, 1, 29, 1023, 1024, 65535, 2**32, 2**64 - 1):
            for pk in (v, None, 1023 - v % 1024):
                ev = base._replace(orig_bytes=v, orig_packets=pk, reply_bytes=2**64 - 1 - v,
                                   reply_packets=pk)
                rec = orjson.loads(enc.encode(ev, None, None))
                assert rec["source"]["bytes"] == v and rec["source"]["packets"] == pk
                assert rec["destination"]["bytes"] == 2**64 - 1 - v
                assert rec == orjson.loads(orjson.dumps(ecs.build_record(ev, None, "n")))


class TestHostInlined:
    """Each encoder writes its host name as static text of its own compiled function."""

    @pytest.mark.parametrize(
        "host", ["node-1", 'n "q" \\ {x} }{ \'s', "ünï\u2028\u2029\x85\n\t", ""])
    def test_any_host_name_gives_build_records_line(self, host: str) -> None:
        """Quotes, backslashes, braces, a single quote, control and non-ASCII characters
        in the host name: event.id and host.name are build_record's, for two encoders
        of different hosts used in turns."""
        other = JsonLineEncoder("other")
        enc = JsonLineEncoder(host)
        for ev in EVENTS[:5]:
            for e, h in ((enc, host), (other, "other")):
                assert orjson.loads(e.encode(ev, None, None)) == orjson.loads(
                    orjson.dumps(ecs.build_record(ev, None, h)))


class TestCaches:
    """The encoder's caches never put one pod's or one port's text into another record."""

    def test_new_owner_of_an_address_gets_its_own_kubernetes_object(self) -> None:
        """Two pods taking turns at one address (and an updated pod value): every line
        carries the kubernetes object of the pod it was encoded with."""
        ev = EVENTS[0]
        first = _pod_for(ev)
        second = replace(first, name="other-pod", uid="u-2", labels={"app": "other"})
        updated = replace(first, labels={"app": "checkout", "v": "2"})
        enc = JsonLineEncoder("n")
        for pod in (first, second, first, updated, updated, second):
            line = enc.encode(ev, pod, None)
            assert orjson.loads(line) == orjson.loads(orjson.dumps(
                ecs.build_record(ev, pod, "n")))

    def test_ports_written_from_the_table_are_the_ports(self) -> None:
        """Every port number, first seen or again, is written as its decimal text."""
        base = next(e for e in EVENTS if e.orig_sport is not None)
        enc = JsonLineEncoder("n")
        for port in (*range(0, 70), 1023, 1024, 32768, 65534, 65535, 0, 65535, 443):
            ev = base._replace(orig_sport=port, reply_dport=65535 - port,
                               orig_dport=port ^ 0x5555)
            rec = orjson.loads(enc.encode(ev, None, None))
            assert rec["source"]["port"] == port
            assert rec["source"]["nat"]["port"] == 65535 - port
            assert rec["destination"]["port"] == port ^ 0x5555
            assert rec == orjson.loads(orjson.dumps(ecs.build_record(ev, None, "n")))

    def test_event_time_texts_through_the_millisecond_cache(self) -> None:
        """@timestamp and event.id are build_record's for every event time: small ones (no
        millisecond digits to cache by), across millisecond and second boundaries, and
        the same milliseconds again (cache hits), also after the cache was cleared."""
        import random

        ev = EVENTS[0]
        rng = random.Random(3)
        base = 1_795_766_503_887_525_603
        times = [0, 1, 999, 999_999, 1_000_000, 1_000_001, 123_456_789_012, base,
                 base - base % 1_000_000, base - base % 1_000_000 - 1,
                 base - base % 1_000_000_000 + 999_999_999]
        times += [base + rng.randrange(5_000_000_000) for _ in range(5000)]
        enc = JsonLineEncoder("n")
        for t in times + times[::-1]:
            rec = orjson.loads(enc.encode(ev, None, None, None, t))
            assert rec == orjson.loads(orjson.dumps(ecs.build_record(ev, None, "n", t_ns=t)))
