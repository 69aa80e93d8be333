"""Pure: a flow event (+ the pod that owned its source) -> an ECS-aligned record.

The record's fields are declared once, in ``shipper/schema.py``: ``build_record``
and ``gap_record`` are compiled from that declaration at import, and so are the
NDJSON encoder (``shipper.ecs_json``) and the field table of ``docs/SCHEMA.md``.
The names are an interface that users' pipelines depend on. Records are nested
dicts (ECS's canonical JSON form), encoded by the sink. This module holds the
helpers the declaration's expressions call (time texts, Community ID, status
names).

Community ID (``network.community_id``) is computed here by hand: the
``communityid`` package implements the same spec but costs about 88 us per
flow here (object construction per call), which alone would exceed the
event budget; the tests check this implementation against that package.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from binascii import b2a_base64
from collections.abc import Callable
from typing import Any

from shipper import schema
from shipper.record import (  # F401: read by the code compiled from shipper/schema.py
    _V6_TAG,  # noqa: F401
    ACTION_DESTROY,
    ACTION_GAP,  # noqa: F401
    ACTION_NEW,
    ACTION_SNAPSHOT,
    ACTION_UPDATE,
    ATTR_RESOLVED,  # noqa: F401
    ATTR_UNRESOLVED,  # noqa: F401
    ATTRIBUTIONS,
    FlowEvent,
    _ip_text,  # noqa: F401
    ip_to_str,  # noqa: F401
)

try:  # CPython's built-in SHA-1: for 16-40 byte inputs, cheaper than OpenSSL's EVP setup
    from _sha1 import sha1
except ImportError:  # pragma: no cover - other interpreters
    from hashlib import sha1

SCHEMA_VERSION = schema.SCHEMA_VERSION

TRANSPORTS = {
    1: "icmp",
    2: "igmp",
    4: "ipip",
    6: "tcp",
    17: "udp",
    33: "dccp",
    41: "ipv6",
    47: "gre",
    50: "esp",
    51: "ah",
    58: "ipv6-icmp",
    132: "sctp",
    136: "udplite",
}
_IANA = {n: str(n) for n in range(256)}
_TRANSPORT = {n: TRANSPORTS.get(n, str(n)) for n in range(256)}

TCP_STATES = (
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
)

# enum ip_conntrack_status bits, in bit order.
STATUS_BITS = (
    "EXPECTED",
    "SEEN_REPLY",
    "ASSURED",
    "CONFIRMED",
    "SRC_NAT",
    "DST_NAT",
    "SEQ_ADJUST",
    "SRC_NAT_DONE",
    "DST_NAT_DONE",
    "DYING",
    "FIXED_TIMEOUT",
    "TEMPLATE",
    "NAT_CLASH",
    "HELPER",
    "OFFLOAD",
    "HW_OFFLOAD",
)
_status_cache: dict[int, list[str]] = {}

_EVENT_TYPE = {
    ACTION_NEW: ["connection", "start"],
    ACTION_DESTROY: ["connection", "end"],
    ACTION_UPDATE: ["connection", "info"],
    ACTION_SNAPSHOT: ["connection", "info"],
}


def status_names(status: int) -> list[str]:
    """Names of the set conntrack status bits (cached; a few distinct values occur)."""
    names = _status_cache.get(status)
    if names is None:
        names = [n for i, n in enumerate(STATUS_BITS) if status & (1 << i)]
        if len(_status_cache) < 4096:
            _status_cache[status] = names
    return names


# ---- time formatting ----------------------------------------------------------

# The text of each millisecond seen lately (``2026-11-27T08:00:00.123``) and of
# each microsecond within one (``456Z``): a timestamp is then two lookups and a
# concatenation, about half the instructions of formatting its remainder. A new
# millisecond is its second's text (cached too: strftime once per second) and
# its digits.
_ms_text: dict[int, str] = {}
_sec_text: dict[int, str] = {}
_US_TEXT = tuple(f"{i:03d}Z" for i in range(1000))
_MS_TEXT = tuple(f".{i:03d}" for i in range(1000))


def rfc3339(ns: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-27T08:00:00.123456Z``."""
    ms = ns // 1_000_000
    prefix = _ms_text.get(ms)
    if prefix is None:
        prefix = ms_prefix(ms)
    return prefix + _US_TEXT[ns // 1000 % 1000]


def ms_prefix(ms: int) -> str:
    """The text of millisecond ``ms`` since the epoch, ``2026-11-27T08:00:00.123`` (cached)."""
    text = _ms_text.get(ms)
    if text is not None:
        return text
    sec, rem = divmod(ms, 1000)
    sec_text = _sec_text.get(sec)
    if sec_text is None:
        if len(_sec_text) >= 1024:
            _sec_text.clear()
        sec_text = _sec_text[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    if len(_ms_text) >= 4096:
        _ms_text.clear()
    text = _ms_text[ms] = sec_text + _MS_TEXT[rem]
    return text


# ---- community id -------------------------------------------------------------

_ICMP4_PAIRS = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17, 10: 9, 9: 10}
_ICMP6_PAIRS = {
    128: 129, 129: 128, 130: 131, 131: 130, 133: 134, 134: 133,
    135: 136, 136: 135, 139: 140, 140: 139, 144: 145, 145: 144,
}


_CID4 = struct.Struct(">HIIBB").pack
_CID4P = struct.Struct(">HIIBBHH").pack
_PORTS = struct.Struct(">HH").pack


def community_id(
    family: int,
    proto: int,
    src: int,
    dst: int,
    sport: int | None,
    dport: int | None,
    icmp_type: int | None = None,
    icmp_code: int | None = None,
    seed: int = 0,
) -> str:
    """Community ID v1 of a flow (https://github.com/corelight/community-id-spec)."""
    if family == 4 and sport is not None and dport is not None and icmp_type is None:
        # The common case (TCP/UDP/SCTP over IPv4) in one pack.
        if src > dst or (src == dst and sport > dport):
            src, dst, sport, dport = dst, src, dport, sport
        digest = sha1(_CID4P(seed, src, dst, proto, 0, sport, dport)).digest()
        return "1:" + b2a_base64(digest, newline=False).decode()
    one_way = False
    if icmp_type is not None and (proto == 1 or proto == 58):
        pairs = _ICMP4_PAIRS if proto == 1 else _ICMP6_PAIRS
        sport = icmp_type
        peer = pairs.get(icmp_type)
        if peer is None:
            dport = icmp_code or 0
            one_way = True
        else:
            dport = peer
    has_ports = sport is not None and dport is not None
    if not one_way and (src > dst or (src == dst and has_ports and (sport or 0) > (dport or 0))):
        src, dst, sport, dport = dst, src, dport, sport
    if family == 4:
        data = _CID4(seed, src, dst, proto, 0)
    else:
        data = (
            seed.to_bytes(2, "big") + src.to_bytes(16, "big") + dst.to_bytes(16, "big")
            + bytes((proto, 0))
        )
    if has_ports:
        data += _PORTS(sport, dport)
    return "1:" + b2a_base64(sha1(data).digest(), newline=False).decode()


def event_id(host: str, ev: FlowEvent, time_ns: int) -> str:
    """A stable id for one flow event: ``<node>:<conntrack id>:<action>:<event time ns>``.

    The same event always gets the same id (a batch delivered twice under
    at-least-once delivery yields duplicates a store can drop by
    ``event.id``), and two different events of one node never share one: a
    conntrack entry cannot have two events of the same kind at the same
    nanosecond.
    """
    return f"{host}:{ev.ct_id}:{ev.action}:{time_ns}"


# ---- records ------------------------------------------------------------------


def event_time(ev: FlowEvent) -> int:
    """When the event happened: the kernel's event timestamp if sent, else when we read it.

    For DESTROY the flow's stop timestamp is used when present: the kernel
    reaps expired entries lazily, so the event can come long after the end.
    """
    if ev.action == ACTION_DESTROY and ev.ts_stop:
        return ev.ts_stop
    return ev.ts_event or ev.received_ns


def gap_id(host: str, since_ns: int, until_ns: int) -> str:
    """The ``event.id`` of a gap record: a digest of the node and the gap's bounds."""
    return base64.urlsafe_b64encode(
        hashlib.blake2b(f"{host}|gap|{since_ns}|{until_ns}".encode(), digest_size=15).digest()
    ).decode()


_N_STATES = len(TCP_STATES)
_ATTRIBUTION = {a: a for a in ATTRIBUTIONS}  # a lookup that rejects an unknown status

# Compiled from the one declaration of the record (shipper/schema.py), at import:
# straight-line code, so a record costs what the hand-written builder cost.
build_record: Callable[..., dict[str, Any]] = schema.compile_dict(
    schema.FLOW,
    "ev, pod, host, *, flow_start_ns=None, attribution=None, t_ns=None",
    schema.FLOW_PRELUDE + schema.FLOW_DICT_PRELUDE,
    globals(),
    "build_record",
    """Build the record of one flow event (the fields of ``schema.FLOW``).

    ``build_record(ev, pod, host, *, flow_start_ns=None, attribution=None, t_ns=None)``.
    ``pod`` is the owner of the original source address at the flow's start
    (None: no ``kubernetes`` object). ``attribution`` is written to
    ``flowlog.attribution``: one of ``record.ATTRIBUTIONS``, as
    ``PodIndex.attribute`` returned it; None means ``resolved`` with a pod,
    ``unresolved`` without. ``flow_start_ns`` is the best known start of the
    flow when the kernel sent none. ``t_ns`` is ``event_time(ev)`` if the caller
    has it already (None: computed here).
    """,
)

gap_record: Callable[..., dict[str, Any]] = schema.compile_dict(
    schema.GAP,
    "host, *, since_ns, until_ns, lost, overruns, resync",
    schema.GAP_PRELUDE,
    globals(),
    "gap_record",
    """The record emitted after the kernel dropped events (the fields of ``schema.GAP``).

    ``gap_record(host, *, since_ns, until_ns, lost, overruns, resync)``; ``lost``
    is the kernel's count of dropped events (None if unknown).
    """,
)
