"""The fast ctnetlink decoder, checked against pyroute2 on real kernel messages."""

from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from shipper.errors import DecodeError
from shipper.record import FlowEvent
from shipper.sources.decode import (
    NLM_F_MULTI,
    LayoutDecoder,
    action_of,
    decode_generic,
    iter_messages,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "ctnetlink_messages.json"
MESSAGES: list[dict[str, str]] = json.loads(DATA.read_text())


def _ip(text: str | None) -> int | None:
    return None if text is None else int(ipaddress.ip_address(text))


def reference(raw: bytes) -> dict[str, Any]:
    """What pyroute2's (slow, independent) parser says about one message."""
    m = nfct_msg(raw)
    m.decode()
    fam = 4 if m["nfgen_family"] == 2 else 6
    v = "V4" if fam == 4 else "V6"

    def tup(which: str, leaf: str) -> Any:
        return m.get_nested(which, *leaf.split("/"))

    counters = m.get_attr("CTA_COUNTERS_ORIG")
    ts = m.get_attr("CTA_TIMESTAMP")
    proto = tup("CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO/CTA_PROTO_NUM")
    icmp = proto in (1, 58)
    i6 = "V6" if proto == 58 else ""
    return {
        "family": fam,
        "proto": proto,
        "orig_src": _ip(tup("CTA_TUPLE_ORIG", f"CTA_TUPLE_IP/CTA_IP_{v}_SRC")),
        "orig_dst": _ip(tup("CTA_TUPLE_ORIG", f"CTA_TUPLE_IP/CTA_IP_{v}_DST")),
        "reply_src": _ip(tup("CTA_TUPLE_REPLY", f"CTA_TUPLE_IP/CTA_IP_{v}_SRC")),
        "reply_dst": _ip(tup("CTA_TUPLE_REPLY", f"CTA_TUPLE_IP/CTA_IP_{v}_DST")),
        "orig_sport": tup("CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO/CTA_PROTO_SRC_PORT"),
        "orig_dport": tup("CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO/CTA_PROTO_DST_PORT"),
        "reply_sport": tup("CTA_TUPLE_REPLY", "CTA_TUPLE_PROTO/CTA_PROTO_SRC_PORT"),
        "reply_dport": tup("CTA_TUPLE_REPLY", "CTA_TUPLE_PROTO/CTA_PROTO_DST_PORT"),
        "icmp_type": tup("CTA_TUPLE_ORIG", f"CTA_TUPLE_PROTO/CTA_PROTO_ICMP{i6}_TYPE")
        if icmp else None,
        "icmp_id": tup("CTA_TUPLE_ORIG", f"CTA_TUPLE_PROTO/CTA_PROTO_ICMP{i6}_ID")
        if icmp else None,
        "ct_id": m.get_attr("CTA_ID"),
        "status": m.get_attr("CTA_STATUS"),
        "mark": m.get_attr("CTA_MARK"),
        "timeout": m.get_attr("CTA_TIMEOUT"),
        "tcp_state": m.get_nested("CTA_PROTOINFO", "CTA_PROTOINFO_TCP",
                                  "CTA_PROTOINFO_TCP_STATE"),
        "orig_bytes": counters.get_attr("CTA_COUNTERS_BYTES") if counters else None,
        "orig_packets": counters.get_attr("CTA_COUNTERS_PACKETS") if counters else None,
        "ts_start": ts.get_attr("CTA_TIMESTAMP_START") if ts else None,
        "ts_stop": ts.get_attr("CTA_TIMESTAMP_STOP") if ts else None,
    }


class TestAgainstPyroute2:
    """Every captured real message decodes to what pyroute2 reads from it."""

    @pytest.mark.parametrize("i", range(len(MESSAGES)), ids=[m["label"] for m in MESSAGES])
    def test_fast_decoder_matches_pyroute2(self, i: int) -> None:
        """The compiled-layout decoder reads the same fields as pyroute2."""
        raw = bytes.fromhex(MESSAGES[i]["hex"])
        ev, n = LayoutDecoder().decode(raw, 0, 123)
        assert ev is not None and n == len(raw)
        ref = reference(raw)
        got = {k: getattr(ev, k) for k in ref}
        assert got == ref

    def test_corpus_covers_protocols_and_families(self) -> None:
        """The captured corpus holds TCP, UDP, ICMP, ICMPv6, SCTP and a raw protocol, v4+v6."""
        dec = LayoutDecoder()
        seen = set()
        for m in MESSAGES:
            ev, _ = dec.decode(bytes.fromhex(m["hex"]), 0, 0)
            assert ev is not None
            seen.add((ev.family, ev.proto, ev.action))
        protos = {(f, p) for f, p, _ in seen}
        assert {(4, 6), (6, 6), (4, 17), (6, 17), (4, 1), (6, 58), (4, 132), (4, 253),
                (6, 253)} <= protos
        actions = {a for _, _, a in seen}
        assert {"new", "update", "destroy", "snapshot"} <= actions

    def test_counters_and_timestamps_arrive_on_destroy(self) -> None:
        """With acct and timestamp on, DESTROY carries bytes, packets, start and stop."""
        dec = LayoutDecoder()
        destroys = [dec.decode(bytes.fromhex(m["hex"]), 0, 0)[0]
                    for m in MESSAGES if m["label"] == "destroy/acct+ts"]
        assert destroys
        for ev in destroys:
            assert ev is not None
            assert ev.orig_packets and ev.orig_bytes
            assert ev.ts_start and ev.ts_stop and ev.ts_stop >= ev.ts_start


class TestLayoutCache:
    """Layouts compiled once are reused, and never misapplied."""

    def test_same_shape_reuses_one_layout(self) -> None:
        """Decoding the corpus twice compiles no new layout the second time."""
        dec = LayoutDecoder()
        for m in MESSAGES:
            dec.decode(bytes.fromhex(m["hex"]), 0, 0)
        compiled = dec.compiled_total
        for m in MESSAGES:
            dec.decode(bytes.fromhex(m["hex"]), 0, 0)
        assert dec.compiled_total == compiled

    def test_cached_and_generic_agree(self) -> None:
        """The compiled path and the plain attribute walk give identical events."""
        dec = LayoutDecoder()
        for m in MESSAGES * 2:
            raw = bytes.fromhex(m["hex"])
            ev, _ = dec.decode(raw, 0, 7)
            assert ev == decode_generic(raw, 0, 7)

    def test_same_length_other_layout_is_not_misread(self) -> None:
        """A message with the same length/type but other attribute order is walked anew."""
        raw = bytearray(bytes.fromhex(MESSAGES[0]["hex"]))
        dec = LayoutDecoder()
        ev1, _ = dec.decode(bytes(raw), 0, 0)
        # Swap the first two top-level attributes (same total length, new layout).
        off = 20
        l1 = struct.unpack_from("=H", raw, off)[0]
        a1 = bytes(raw[off:off + ((l1 + 3) & ~3)])
        off2 = off + len(a1)
        l2 = struct.unpack_from("=H", raw, off2)[0]
        a2 = bytes(raw[off2:off2 + ((l2 + 3) & ~3)])
        swapped = bytes(raw[:off]) + a2 + a1 + bytes(raw[off2 + len(a2):])
        ev2, _ = dec.decode(swapped, 0, 0)
        assert ev2 == ev1
        assert dec.compiled_total == 2

    def test_changed_attribute_header_is_rejected_and_recompiled(self) -> None:
        """A message whose layout differs from a cached one only in one nested attribute
        header (same length, type and flags) fails that layout's proof: it is walked and
        compiled anew, and decodes to what the plain walk reads."""
        raw = bytes.fromhex(MESSAGES[0]["hex"])
        dec = LayoutDecoder()
        ev1, _ = dec.decode(raw, 0, 0)
        assert ev1 is not None and ev1.orig_sport is not None
        # The original tuple's source port header (.../CTA_PROTO_SRC_PORT = 2) becomes
        # an unknown protocol attribute (type 15) of the same size.
        hdrs = [off for off in range(20, len(raw) - 4, 4)
                if struct.unpack_from("=HH", raw, off) == (6, 2)]
        changed = bytearray(raw)
        struct.pack_into("=HH", changed, hdrs[0], 6, 15)
        ev2, n = dec.decode(bytes(changed), 0, 0)
        assert n == len(raw)
        assert ev2 == decode_generic(bytes(changed), 0, 0)
        assert ev2 is not None and ev2.orig_sport is None
        assert dec.compiled_total == 2
        # Both layouts stay cached under the same key, each used for its own messages.
        assert dec.decode(raw, 0, 0)[0] == ev1
        assert dec.decode(bytes(changed), 0, 0)[0] == ev2
        assert dec.compiled_total == 2

    def test_changed_family_is_not_misread(self) -> None:
        """The nfgenmsg family is part of the proof: an IPv4 layout never reads a message
        that claims another family."""
        raw = bytes.fromhex(MESSAGES[0]["hex"])
        dec = LayoutDecoder()
        dec.decode(raw, 0, 0)
        changed = bytearray(raw)
        changed[16] = 7
        with pytest.raises(DecodeError, match="family"):
            dec.decode(bytes(changed), 0, 0)

    def test_cached_layout_rejects_a_message_cut_short(self) -> None:
        """With its layout cached, a message whose buffer ends before its length still
        raises DecodeError (not struct.error, not a misread event)."""
        raw = bytes.fromhex(MESSAGES[0]["hex"])
        dec = LayoutDecoder()
        dec.decode(raw, 0, 0)
        for cut in (1, 4, 8, len(raw) - 20):
            with pytest.raises(DecodeError, match="length"):
                dec.decode(raw[:-cut], 0, 0)

    def test_cache_is_bounded(self) -> None:
        """The number of cached layouts never exceeds the bound."""
        dec = LayoutDecoder(max_layouts=3)
        for m in MESSAGES:
            dec.decode(bytes.fromhex(m["hex"]), 0, 0)
            assert dec.layouts() <= 3


class TestGarbage:
    """Malformed input raises DecodeError naming the problem, never anything else."""

    def test_truncated_header(self) -> None:
        """Fewer than 16 bytes is a truncated header."""
        with pytest.raises(DecodeError, match="truncated"):
            LayoutDecoder().decode(b"\x01\x02", 0, 0)

    def test_length_past_buffer(self) -> None:
        """A header claiming more bytes than present is rejected."""
        raw = bytes.fromhex(MESSAGES[0]["hex"])
        with pytest.raises(DecodeError, match="length"):
            LayoutDecoder().decode(raw[:-8], 0, 0)

    def test_attribute_overrun(self) -> None:
        """An attribute whose length runs past the message is rejected."""
        raw = bytearray(bytes.fromhex(MESSAGES[0]["hex"]))
        struct.pack_into("=H", raw, 20, 4000)
        with pytest.raises(DecodeError, match="overruns"):
            LayoutDecoder().decode(bytes(raw), 0, 0)

    def test_random_bytes_never_crash(self) -> None:
        """Random mutations give an event or a DecodeError, never another exception."""
        import random

        rng = random.Random(42)
        base = [bytes.fromhex(m["hex"]) for m in MESSAGES]
        dec = LayoutDecoder()
        for _ in range(3000):
            raw = bytearray(rng.choice(base))
            for _ in range(rng.randint(1, 6)):
                raw[rng.randrange(16, len(raw))] = rng.randrange(256)
            try:
                ev, _ = dec.decode(bytes(raw), 0, 0)
            except DecodeError:
                continue
            assert ev is None or isinstance(ev, FlowEvent)
            if ev is not None:  # a cached layout never reads what the plain walk would not
                assert ev == decode_generic(bytes(raw), 0, 0)

    def test_non_flow_message_is_skipped(self) -> None:
        """NLMSG_DONE and other types decode to None with their length."""
        done = struct.pack("=IHHII", 20, 3, NLM_F_MULTI, 1, 0) + b"\0" * 4
        assert LayoutDecoder().decode(done, 0, 0) == (None, 20)


class TestActions:
    """Message type and flags map to the record's event.action."""

    def test_actions(self) -> None:
        """NEW with CREATE is new, NEW without is update, DELETE destroy, MULTI snapshot."""
        assert action_of(0x100, 0x400 | 0x200) == "new"
        assert action_of(0x100, 0) == "update"
        assert action_of(0x102, 0) == "destroy"
        assert action_of(0x100, NLM_F_MULTI) == "snapshot"
        assert action_of(0x3, 0) is None

    def test_iter_messages_walks_a_datagram(self) -> None:
        """Several messages in one buffer are found at their aligned offsets."""
        a = bytes.fromhex(MESSAGES[0]["hex"])
        b = bytes.fromhex(MESSAGES[1]["hex"])
        buf = a + b"\0" * (((len(a) + 3) & ~3) - len(a)) + b
        offs = [o for o, _, _ in iter_messages(buf, len(buf))]
        assert offs == [0, (len(a) + 3) & ~3]


def _stream(raws: list[bytes]) -> bytes:
    """Messages back to back, each padded to 4 bytes, as a dump delivers them."""
    return b"".join(r + b"\0" * (((len(r) + 3) & ~3) - len(r)) for r in raws)


class TestDecodeDump:
    """``decode_dump`` reads a dump stream: same events as ``decode``, split anywhere."""

    RAWS = [bytes.fromhex(m["hex"]) for m in MESSAGES] * 3
    DONE = struct.pack("=IHHII", 20, 3, NLM_F_MULTI, 1, 0) + b"\0" * 4

    def test_same_events_as_decode_per_message(self) -> None:
        """Over the whole corpus (three times, so cached layouts are hit) it yields what
        ``decode`` yields message by message, and reports the end at NLMSG_DONE."""
        stream = _stream(self.RAWS) + self.DONE
        out: list[FlowEvent] = []
        off, end = LayoutDecoder().decode_dump(stream, len(stream), 5, out)
        ref = [LayoutDecoder().decode(r, 0, 5)[0] for r in self.RAWS]
        assert out == ref
        assert (off, end) == (len(stream), 0)

    def test_split_stream_resumes_at_the_incomplete_message(self) -> None:
        """Cut at every 97th byte, feeding back the unread tail each time, the events come
        out complete and in order."""
        stream = _stream(self.RAWS) + self.DONE
        dec = LayoutDecoder()
        out: list[FlowEvent] = []
        pending = b""
        end = None
        for i in range(0, len(stream), 97):
            data = pending + stream[i:i + 97]
            off, end = dec.decode_dump(data, len(data), 5, out)
            pending = data[off:]
            if end is not None:
                break
        assert end == 0
        assert out == [LayoutDecoder().decode(r, 0, 5)[0] for r in self.RAWS]

    def test_error_message_ends_the_dump_with_its_errno(self) -> None:
        """An NLMSG_ERROR with a non-zero code ends the dump and reports the errno."""
        err = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -1) + b"\0" * 16
        stream = _stream(self.RAWS[:2]) + err
        out: list[FlowEvent] = []
        _off, end = LayoutDecoder().decode_dump(stream, len(stream), 0, out)
        assert end == 1 and len(out) == 2

    def test_malformed_entry_is_reported_and_skipped(self) -> None:
        """A flow message whose attributes overrun it goes to on_error; the rest decode."""
        good = self.RAWS[0]
        bad = bytearray(good)
        bad[20:22] = (len(good)).to_bytes(2, "little")  # first attribute claims everything
        stream = _stream([good, bytes(bad), good]) + self.DONE
        errors: list[DecodeError] = []
        out: list[FlowEvent] = []
        _off, end = LayoutDecoder().decode_dump(stream, len(stream), 0, out, errors.append)
        assert end == 0 and len(out) == 2 and len(errors) == 1
