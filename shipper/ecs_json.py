"""Pure: a flow event straight to its NDJSON line, without building the record dict.

This is the event path of the ``stdout`` and ``file`` sinks. It produces the
same bytes as ``orjson.dumps(ecs.build_record(...))`` (the tests check that on
every captured kernel message, with and without a pod), about twice as fast:
building ~10 nested dicts per event and serialising them again cost more than
half of the per-event CPU budget. Both are compiled from the one declaration of
the record in ``shipper/schema.py``: this module holds only the encoder's
caches (the host name, status lists and each pod's ``kubernetes`` object,
escaped once by orjson) that the declaration's JSON fragments read.

Why this is safe to write by hand: every value formatted here is either a
number, a fixed keyword from our own tables, an address or timestamp text we
produced, a Community ID (base64: no characters that need escaping), or a
string that was escaped once by orjson (the host name, the pod's
``kubernetes`` object). Nothing untrusted is spliced unescaped.
"""

from __future__ import annotations

from binascii import b2a_base64  # noqa: F401  (read by the compiled encoder)
from collections.abc import Callable
from types import MethodType

import orjson

from shipper import schema
from shipper.ecs import (  # F401: read by the code compiled from shipper/schema.py
    _CID4P,  # noqa: F401
    _EVENT_TYPE,
    _IANA,
    _TRANSPORT,
    TCP_STATES,
    community_id,  # noqa: F401
    event_time,  # noqa: F401
    ms_prefix,
    rfc3339,
    sha1,  # noqa: F401
    status_names,
)
from shipper.record import (  # F401: read by the code compiled from shipper/schema.py
    _V6_TAG,  # noqa: F401
    ACTION_DESTROY,  # noqa: F401
    ATTR_RESOLVED,  # noqa: F401
    ATTR_UNRESOLVED,  # noqa: F401
    ATTRIBUTIONS,
    PodMeta,
    PodTombstone,
    _ip_text,  # noqa: F401
    ip_to_str,  # noqa: F401
)

# event.type's value and the action member after it (schema: ``line_skip``), and
# event.id's ``:<action>:``, by action.
_TYPE_ACTION_JSON = {a: f'{orjson.dumps(t).decode()},"action":{orjson.dumps(a).decode()}'
                     for a, t in _EVENT_TYPE.items()}
_ACTION_ID = {a: f":{a}:" for a in _EVENT_TYPE}
# The decimal text of small counter values (DESTROY's bytes and packets: a lookup
# instead of formatting an int; larger values are formatted as before).
_INT_TEXT = {n: str(n) for n in range(1024)}
# network.transport's value and the iana_number and type members after it, by protocol.
_NET4_JSON = [f'"{_TRANSPORT[n]}","iana_number":"{_IANA[n]}","type":"ipv4"' for n in range(256)]
_NET6_JSON = [f'"{_TRANSPORT[n]}","iana_number":"{_IANA[n]}","type":"ipv6"' for n in range(256)]
_STATE_JSON = [orjson.dumps(s).decode() for s in TCP_STATES]
_N_STATES = len(_STATE_JSON)
_ATTRIBUTION = {a: a for a in ATTRIBUTIONS}  # a lookup that rejects an unknown status
_MAX_CACHE = 65536

# The member text of each port number seen (``,"port":443``; kinds ``port``/``portn``
# of the schema): a list lookup instead of formatting an int into a fragment, for
# three or four members of most records. Indexed by the port, which is 0-65535
# (16 bits on the wire, as the decoder reads it). Filled on first use, so it holds
# the ports a node really sees (at most 65536 short strings, about 4.5 MB, when
# every port occurs).
_PORT_MEMBER: list[str | None] = [None] * 65536


def _port_member(port: int) -> str:
    text = _PORT_MEMBER[port] = f',"port":{port}'
    return text


# The member text of each timeout value seen lately (a few: each protocol state's
# timeout, on NEW and UPDATE events).
_TIMEOUT_MEMBER: dict[int, str] = {}


def _timeout_member(timeout: int) -> str:
    text = f',"timeout":{timeout}'
    if len(_TIMEOUT_MEMBER) >= 4096:
        _TIMEOUT_MEMBER.clear()
    _TIMEOUT_MEMBER[timeout] = text
    return text


# The text of each millisecond seen lately, by the event time's decimal digits but
# the last six (``FLOW_LINE_PRELUDE`` in shipper/schema.py).
_ts_ms: dict[str, str] = {}


def _ts_text(t_ns: int, t_text: str) -> str:
    """``rfc3339(t_ns)``, caching its millisecond's text for the next (a miss)."""
    if t_ns < 1_000_000:  # no millisecond digits to key by: not cached
        return rfc3339(t_ns)
    prefix = ms_prefix(t_ns // 1_000_000)
    if len(_ts_ms) >= 4096:
        _ts_ms.clear()
    _ts_ms[t_text[:-6]] = prefix
    return f"{prefix}{t_text[-6:-3]}Z"


_ENCODE_DOC = """The NDJSON line (with its newline) of one event; see ``ecs.build_record``.

        ``encode(ev, pod, flow_start_ns, attribution=None, t_ns=None)``: ``attribution``
        as in ``ecs.build_record`` (None: derived from ``pod``); ``t_ns`` is
        ``ecs.event_time(ev)`` if the caller has it already (None: computed here).
        """


def _compile_encode(name: str, inline: dict[str, str] | None = None) -> Callable[..., bytes]:
    """``JsonLineEncoder.encode`` compiled from the record's declaration (with the
    ``inline`` attribute values written in as static text)."""
    return schema.compile_line(
        schema.FLOW, "self, ev, pod, flow_start_ns, attribution=None, t_ns=None",
        schema.FLOW_PRELUDE + schema.FLOW_LINE_PRELUDE, globals(), name, _ENCODE_DOC,
        inline=inline)


def _quoted(v: int) -> str:
    return f'"{v}"'


class JsonLineEncoder:
    """Encodes events as NDJSON lines for one host name. Not thread-safe (one per pipeline)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._host_json = orjson.dumps(host).decode()
        self._host_esc = self._host_json[1:-1]
        # This encoder's own compiled encode, its host name written as static text.
        self.encode = MethodType(_encode_for(self._host_json), self)
        self._status: dict[int, str] = {}  # status bits -> their member text
        # Source address (ip_key) -> (the pod, the member text of its kubernetes
        # object for that address: ``,"kubernetes":{...}``). The text is used only
        # for the very pod value it was made from (``is``; PodMeta and PodTombstone
        # values never change, and the entry holds it, so its id is never reused
        # while cached): a new owner
        # of the address, or a pod updated since, is a miss. Read inline by the
        # compiled encoder (the declaration's ``member`` expression).
        self._kube: dict[int, tuple[PodMeta | PodTombstone, str]] = {}

    def _kube_member(self, pod: PodMeta | PodTombstone, src_key: int, src_ip: str) -> str:
        """The member text of ``pod``'s kubernetes object for address ``src_key`` (a cache
        miss)."""
        k = pod.record_objects.get(src_key)
        if k is None:  # the pod's first record from this address: build its object once
            k = pod.kubernetes_for(src_key, src_ip)
        if len(self._kube) >= _MAX_CACHE:
            self._kube.clear()
        text = ',"kubernetes":' + orjson.dumps(k).decode()
        self._kube[src_key] = (pod, text)
        return text

    def _status_member(self, status: int) -> str:
        text = ',"status":' + orjson.dumps(status_names(status)).decode()
        if len(self._status) < 4096:
            self._status[status] = text
        return text

    # Compiled from the one declaration of the record (shipper/schema.py), at import:
    # the record's static JSON text merged into one f-string, the values computed in
    # straight-line code (``schema.source_of("shipper.ecs_json.encode")`` shows it).
    encode: Callable[..., bytes] = _compile_encode("encode")


_ENCODERS: dict[str, Callable[..., bytes]] = {}


def _encode_for(host_json: str) -> Callable[..., bytes]:
    """``JsonLineEncoder.encode`` compiled with one host name (its JSON text) inlined:
    the same lines, a few pieces fewer to join per record. Compiled once per host."""
    fn = _ENCODERS.get(host_json)
    if fn is None:
        if len(_ENCODERS) >= 64:
            _ENCODERS.clear()
        fn = _ENCODERS[host_json] = _compile_encode(
            "encode_host",
            inline={"self._host_json": host_json, "self._host_esc": host_json[1:-1]})
    return fn
