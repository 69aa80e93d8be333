"""The record schema, declared once: every field, how it is computed, and its documentation.

Three things follow from :data:`FLOW` and :data:`GAP` (nothing else restates them):

* ``ecs.build_record`` / ``ecs.gap_record`` - the record as nested dicts (the
  ``forward`` and ``syslog`` sinks), compiled by :func:`compile_dict` at import;
* ``ecs_json.JsonLineEncoder.encode`` - the NDJSON line without building dicts
  (the ``stdout`` and ``file`` sinks' event path), compiled by :func:`compile_line`
  at import: static JSON text (keys, punctuation, constants) is encoded once and
  merged into one f-string per record, so the per-event work is only the
  values;
* ``docs/SCHEMA.md``'s field table and examples (``scripts/gen_docs.py``,
  checked by its ``--check``).

A :class:`Field` names one key of one object, in record order. ``when`` is the
Python condition under which it is present (None: always), ``let`` statements
run before its value is computed (when present), ``value`` is the Python
expression of its value in the dict path, and ``json`` is its JSON text as an
f-string fragment in the NDJSON path (derived from ``kind`` when not given).
Expressions see the locals of :data:`FLOW_PRELUDE` (the event tuple unpacked
once, address and time texts) and the globals of the module that compiles them
(``shipper.ecs``, ``shipper.ecs_json``).

Why generated code rather than an interpreter walking the description per
event: the per-event cost must stay that of the hand-written encoders it
replaced (CPU per event is the project's budget); the generated functions are
the same straight-line code, readable with :func:`source_of`.

Changing a field: edit its declaration here, run ``python3 scripts/gen_docs.py``
(SCHEMA.md), map it in ``config/elasticsearch/index-template.json`` (the recipe
tests parse SCHEMA.md's table), and, since the record bytes change, bump
:data:`SCHEMA_VERSION` and rewrite the golden file (``python3 -m
tests.data.record_cases``). ``source_of("shipper.ecs_json.encode")`` shows the code
compiled from it.

Kinds (how a value is written in JSON): ``text`` - a string that needs no JSON
escaping (our own keywords, address and time texts, base64); ``int`` - an int
(never None where present); ``intn`` - an int or None (``null``); ``port`` /
``portn`` - a member named ``port``, an int 0-65535 (16 bits on the wire;
``portn`` also None, ``null``): the NDJSON path takes the whole member's text
(``,"port":443``) from a table indexed by the port rather than formatting it
(four of them on most records; see ``member`` for the same with any cache);
``const`` - a
constant (``const``), encoded once; ``raw`` - ``json`` is given explicitly (a
pre-encoded or escaped text); ``object`` - ``children``. ``doc_only`` fields are
documented but not built here (they are inside a value built elsewhere: the
pod's ``kubernetes`` object, pre-built per pod by ``shipper.enrich``). A
``line_skip`` field is written, in the NDJSON path, by the ``json`` or ``member``
of the field before it (one table lookup or one text for several members: each
piece joined into the line costs about 150-200 instructions); the dict path and the
documentation treat it as any other field.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from shipper.record import ACTION_GAP

SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class Field:
    """One key of one object of the record (see the module docstring)."""

    name: str
    kind: str = "text"
    value: str = ""
    json: str = ""
    when: str | None = None
    let: str = ""
    line_let: str | None = None  # the NDJSON path's ``let`` when it differs (None: ``let``)
    # Written, in the NDJSON path, by the ``json`` of the always-present member before
    # it (one table lookup for several members: fewer pieces to join per record).
    line_skip: bool = False
    # The NDJSON path's expression for the whole member (``,"key":value``: comma and
    # key included; never an object's first member), instead of ``json``: lets a
    # cache hold members, not just values.
    member: str = ""
    const: Any = None
    children: tuple[Field, ...] = ()
    # Documentation: the columns of SCHEMA.md's field table.
    type: str = ""
    present: str = ""
    meaning: str = ""
    doc_name: str = ""  # the name shown in the table when not the full path
    doc_join: bool = False  # shares the table row of the field before it
    doc_only: bool = False


F = Field

#: The event tuple unpacked once, and the texts several fields need. Both compiled
#: functions of a flow record start with this (``host`` is the dict path's argument;
#: ``t_ns``, the event time, is the NDJSON path's argument when its caller knows it),
#: followed by :data:`FLOW_DICT_PRELUDE` or :data:`FLOW_LINE_PRELUDE`: both define
#: ``ts``, the event time's text.
FLOW_PRELUDE = """\
(action, fam, proto, osrc, odst, osport, odport, rsrc, rdst, rsport, rdport,
 itype, icode, iid, ct_id, status, tcp_state, mark, zone, timeout,
 opk, oby, rpk, rby, ts_start, ts_stop, _ts_event, received) = ev
if t_ns is None:
    t_ns = event_time(ev)
v6 = fam != 4
src_key = osrc | _V6_TAG if v6 else osrc
src_ip = _ip_text.get(src_key) or ip_to_str(fam, osrc)
dst_ip = _ip_text.get(odst | _V6_TAG if v6 else odst) or ip_to_str(fam, odst)
nat_ip = _ip_text.get(rdst | _V6_TAG if v6 else rdst) or ip_to_str(fam, rdst)
start = ts_start or flow_start_ns
if attribution is None:
    attribution = ATTR_RESOLVED if pod is not None else ATTR_UNRESOLVED
"""

#: What the dict path adds to :data:`FLOW_PRELUDE`.
FLOW_DICT_PRELUDE = """\
ts = rfc3339(t_ns)
"""

#: What the NDJSON path adds to :data:`FLOW_PRELUDE`: the texts it writes twice, and
#: ``ts`` from the event time's decimal text (which ``event.id`` needs anyway): the
#: text of its millisecond (all digits but the last six) looked up, its microsecond
#: digits sliced out; ``_ts_text`` on a miss (and for a time below a millisecond or
#: negative, never cached). The same text as ``rfc3339(t_ns)``, with less arithmetic
#: on a 61-bit int.
FLOW_LINE_PRELUDE = """\
ct_text = f"{ct_id}"
t_text = f"{t_ns}"
ts = _ts_ms.get(t_text[:-6])
ts = _ts_text(t_ns, t_text) if ts is None else f"{ts}{t_text[-6:-3]}Z"
"""

_KUBE_LET = """\
k = pod.record_objects.get(src_key)
if k is None:  # the pod's first record from this address: build its object once
    k = pod.kubernetes_for(src_key, src_ip)
"""

#: The NDJSON path's Community ID without the "1:" (static text there): the common
#: case (IPv4 with both ports, not ICMP) inline, ``community_id``'s own fast path
#: without a call; the rest through ``community_id``. Same text (the tests compare
#: the two paths on swapped and equal addresses and ports too).
_CID_LET = """\
if v6 or osport is None or odport is None or itype is not None:
    cid = community_id(fam, proto, osrc, odst, osport, odport, itype, icode)[2:]
elif osrc < odst or (osrc == odst and osport <= odport):
    cid = b2a_base64(sha1(_CID4P(0, osrc, odst, proto, 0, osport, odport)).digest(),
                     newline=False).decode()
else:
    cid = b2a_base64(sha1(_CID4P(0, odst, osrc, proto, 0, odport, osport)).digest(),
                     newline=False).decode()
"""

#: The NDJSON path's end member and the duration member after it (present when the
#: start is known and not after the end): one text, one test.
_END_LINE = """f',"end":"{ts if end == t_ns else rfc3339(end)}","duration":{end - start}' \
if start and end >= start else f',"end":"{ts if end == t_ns else rfc3339(end)}"'"""

_ALL = "resolved/uncertain"

#: The record of one flow event (``event.action`` new, update, destroy, snapshot).
FLOW: tuple[Field, ...] = (
    F("@timestamp", value="ts", type="RFC 3339 UTC, microseconds", present="always",
      meaning="when the event happened: the kernel's event time where the kernel sends it "
      "(Linux 6.18+ `CTA_TIMESTAMP_EVENT`), for `destroy` the kernel's stop time when known "
      "(the kernel reaps entries lazily, so a DESTROY may arrive long after the flow ended), "
      "else when the shipper read it"),
    F("event", kind="object", children=(
        F("kind", kind="const", const="event", type="keyword", present="always",
          meaning="`event` (`pipeline_error` for `gap`)"),
        F("category", kind="const", const=["network"], type="array", present="always",
          meaning='`["network"]`'),
        # The NDJSON path writes type and action with one lookup (``_TYPE_ACTION_JSON``).
        F("type", kind="raw", value="_EVENT_TYPE[action]", json="{_TYPE_ACTION_JSON[action]}",
          type="array", present="always", meaning="see the table above"),
        F("action", value="action", type="keyword", present="always", line_skip=True,
          meaning="`new`, `update`, `destroy`, `snapshot`, `gap`"),
        F("id", kind="raw", value="event_id(host, ev, t_ns)",
          json='"{self._host_esc}:{ct_text}{_ACTION_ID[action]}{t_text}"', type="keyword",
          present="always",
          meaning="stable id of this event: `<host.name>:<conntrack.id>:<action>:<event time "
          "ns>`; a batch delivered twice (at-least-once delivery) carries the same ids, so a "
          "store can deduplicate on it"),
        F("start", when="start", value="ts if start == t_ns else rfc3339(start)",
          type="RFC 3339", present="when known",
          meaning="flow start: the kernel's start timestamp, else the time of the flow's "
          "`new`/`snapshot` event"),
        # The NDJSON path writes end and duration as one text (``_END_LINE``).
        F("end", when="action == ACTION_DESTROY", let="end = ts_stop or received",
          value="ts if end == t_ns else rfc3339(end)", member=_END_LINE, type="RFC 3339",
          present="`destroy`",
          meaning="flow end: the kernel's stop timestamp, else when the DESTROY was read"),
        F("duration", kind="int", when="action == ACTION_DESTROY and start and end >= start",
          value="end - start", line_skip=True, type="integer, ns",
          present="`destroy` with a known start", meaning="`end - start`"),
    )),
    F("network", kind="object", children=(
        # The NDJSON path writes these three with one lookup (``_NET6_JSON``/``_NET4_JSON``).
        F("transport", value="_TRANSPORT[proto]", type="keyword", present="always",
          json="{_NET6_JSON[proto] if v6 else _NET4_JSON[proto]}",
          meaning="lowercase IANA name: `tcp`, `udp`, `icmp`, `ipv6-icmp`, `sctp`, `gre`, ... "
          "or the protocol number as a string when unnamed"),
        F("iana_number", value="_IANA[proto]", type="keyword", present="always", line_skip=True,
          meaning='IP protocol number as a string (`"6"`)'),
        F("type", value='"ipv6" if v6 else "ipv4"', type="keyword", present="always",
          line_skip=True, meaning="`ipv4` or `ipv6`"),
        F("community_id",
          value="community_id(fam, proto, osrc, odst, osport, odport, itype, icode)",
          line_let=_CID_LET, json='"1:{cid}"',
          type="keyword", present="always",
          meaning="[Community ID](https://github.com/corelight/community-id-spec) v1 (seed 0) "
          "of the original (pre-NAT) tuple"),
    )),
    F("source", kind="object", children=(
        F("ip", value="src_ip", type="ip", present="always",
          meaning="the pod's address (original tuple source)"),
        F("port", kind="port", when="osport is not None", value="osport", type="integer",
          present="TCP/UDP/SCTP/...", meaning="the pod's source port (original tuple)"),
        F("nat", kind="object", children=(
            F("ip", value="nat_ip", type="ip", present="always",
              meaning="address after SNAT/MASQUERADE (reply tuple destination): "
              "**the join key**"),
            F("port", kind="portn", when="osport is not None", value="rdport", type="integer",
              present="when the protocol has ports",
              meaning="port after SNAT/MASQUERADE (reply tuple destination port): "
              "**the join key**"),
        )),
        F("bytes", kind="int", when="oby is not None", value="oby", type="integer",
          json="{_INT_TEXT.get(oby, oby)}",
          present="`destroy` with `nf_conntrack_acct=1`", meaning="pod -> remote direction"),
        F("packets", kind="intn", when="oby is not None", value="opk", type="integer",
          json='{"null" if opk is None else _INT_TEXT.get(opk, opk)}',
          present="`destroy` with `nf_conntrack_acct=1`", doc_join=True),
    )),
    F("destination", kind="object", children=(
        F("ip", value="dst_ip", type="ip", present="always",
          meaning="the remote end as the pod addressed it"),
        F("port", kind="portn", when="osport is not None", value="odport", type="integer",
          present="with ports", doc_join=True),
        F("nat", kind="object", when="rsrc != odst or rsport != odport",
          let="dnat = ip_to_str(fam, rsrc)", children=(
              F("ip", value="dnat", type="ip", present="when DNATed",
                meaning="where the flow really went (reply tuple source)"),
              F("port", kind="port", when="rsport is not None", value="rsport", type="integer",
                present="when DNATed", doc_join=True),
          )),
        F("bytes", kind="intn", when="oby is not None", value="rby", type="integer",
          json='{"null" if rby is None else _INT_TEXT.get(rby, rby)}',
          present="`destroy` with `nf_conntrack_acct=1`", meaning="remote -> pod direction"),
        F("packets", kind="intn", when="oby is not None", value="rpk", type="integer",
          json='{"null" if rpk is None else _INT_TEXT.get(rpk, rpk)}',
          present="`destroy` with `nf_conntrack_acct=1`", doc_join=True),
    )),
    F("host", kind="object", children=(
        F("name", kind="raw", value="host", json="{self._host_json}", type="keyword",
          present="always", meaning="the node that shipped the record (`node_name`)"),
    )),
    F("conntrack", kind="object", children=(
        F("id", kind="raw", value="ct_id", json='{"null" if ct_id is None else ct_text}',
          type="long", present="always",
          meaning="kernel conntrack id (same for all events of one entry)"),
        F("state", kind="raw", when="tcp_state is not None",
          value="TCP_STATES[tcp_state] if tcp_state < _N_STATES else str(tcp_state)",
          json="{_STATE_JSON[tcp_state] if tcp_state < _N_STATES else _quoted(tcp_state)}",
          type="keyword", present="TCP",
          meaning="TCP state: `SYN_SENT`, `ESTABLISHED`, `TIME_WAIT`, ..."),
        F("status", kind="raw", when="status is not None",
          value="_status_cache.get(status) or status_names(status)",
          member="self._status.get(status) or self._status_member(status)",
          type="array", present="always",
          meaning="set status bits: `SEEN_REPLY`, `ASSURED`, `CONFIRMED`, `SRC_NAT`, "
          "`SRC_NAT_DONE`, ..."),
        F("mark", kind="int", when="mark is not None", value="mark", type="long",
          present="when non-zero", meaning="connmark"),
        F("zone", kind="int", when="zone is not None", value="zone", type="integer",
          present="when not the default zone", meaning="conntrack zone"),
        F("timeout", kind="int", when="timeout is not None", value="timeout",
          member="_TIMEOUT_MEMBER.get(timeout) or _timeout_member(timeout)",
          type="integer, s", present="when sent", meaning="seconds until the entry expires"),
        F("icmp", kind="object", when="itype is not None", children=(
            F("type", kind="int", value="itype", type="integer", present="ICMP/ICMPv6",
              meaning="of the original tuple"),
            F("code", kind="intn", value="icode", doc_name=".code", doc_join=True),
            F("id", kind="intn", value="iid", doc_name=".id", doc_join=True),
        )),
    )),
    F("kubernetes", kind="raw", when="pod is not None", let=_KUBE_LET, value="k",
      line_let="",
      member="kt[1] if (kt := self._kube.get(src_key)) is not None and kt[0] is pod "
      "else self._kube_member(pod, src_key, src_ip)", children=(
          F("namespace", doc_only=True, type="keyword", present="resolved, uncertain",
            meaning="pod namespace"),
          F("pod", kind="object", doc_only=True, children=(
              F("name", type="keyword", present="resolved, uncertain",
                meaning="the pod that owned `source.ip` when the flow started"),
              F("uid", doc_join=True),
              F("ip", type="ip", present="resolved, uncertain", meaning="= `source.ip`"),
              F("ip_source", type="keyword", present="resolved, uncertain (stale)",
                meaning="how the shipper learnt that the pod holds this address: `kube-ovn` "
                "(Kube-OVN's allocation annotations `<provider>.kubernetes.io/ip_address` + "
                '`allocated: "true"`, before `status.podIPs` was set, or an attachment '
                "network's address), `status` (`status.podIPs` only), `kube-ovn+status` "
                "(both, agreeing). Ours, not a Beats field; see "
                "[docs/KUBERNETES.md](KUBERNETES.md#ownership-from-kube-ovns-allocation)"),
          )),
          F("labels.*", doc_only=True, type="keyword", present=f"{_ALL}, if any",
            meaning="pod labels (allow/deny lists and size caps apply)"),
          F("annotations.*", doc_only=True, type="keyword", present=f"{_ALL}, if allowed",
            meaning="only annotations on `enrich.annotation_allowlist` (empty by default)"),
          F("node", kind="object", doc_only=True, children=(
              F("name", type="keyword", present=f"{_ALL}, if scheduled",
                meaning="the pod's node (with a centralized gateway, often not `host.name`)"),
          )),
          F("owner", kind="object", doc_only=True, children=(
              F("kind", type="keyword", present=f"{_ALL}, if owned",
                meaning="controller owner; a ReplicaSet owned pod is reported as its "
                "`Deployment`"),
              F("name", doc_join=True),
          )),
          F("ovn", kind="object", doc_only=True, children=(
              F("logical_switch", type="keyword", present=f"{_ALL}, if annotated",
                meaning="Kube-OVN logical switch (`ovn.kubernetes.io/logical_switch`)"),
          )),
      )),
    F("flowlog", kind="object", children=(
        F("attribution", value="_ATTRIBUTION[attribution]", type="keyword", present="flows",
          meaning="how `kubernetes.*` was found; `resolved`, `uncertain`, `unresolved` or "
          "`stale`, see [Attribution](#attribution)"),
        F("schema_version", kind="const", const=SCHEMA_VERSION, type="keyword",
          present="always", meaning='`"1"`'),
    )),
)

#: The record emitted after the kernel dropped events (``event.action`` gap). Its
#: fields shared with :data:`FLOW` are documented there.
GAP_PRELUDE = ""
GAP: tuple[Field, ...] = (
    F("@timestamp", value="rfc3339(until_ns)"),
    F("event", kind="object", children=(
        F("kind", kind="const", const="pipeline_error"),
        F("category", kind="const", const=["network"]),
        F("type", kind="const", const=["info"]),
        F("action", kind="const", const=ACTION_GAP),
        F("start", value="rfc3339(since_ns)"),
        F("end", value="rfc3339(until_ns)"),
        F("duration", kind="int", value="max(0, until_ns - since_ns)"),
        F("id", value="gap_id(host, since_ns, until_ns)"),
    )),
    F("host", kind="object", children=(F("name", kind="raw", value="host"),)),
    F("flowlog", kind="object", children=(
        F("schema_version", kind="const", const=SCHEMA_VERSION),
        F("gap", kind="object", children=(
            F("lost_events", kind="intn", value="lost", type="integer or null",
              present="`gap`",
              meaning="events the kernel dropped (the socket's drop counter; null if "
              "unreadable)"),
            F("overruns", kind="int", value="overruns", type="integer", present="`gap`",
              meaning="ENOBUFS errors seen during the gap"),
            F("resync", kind="raw", value="resync", type="boolean", present="`gap`",
              meaning="whether a table dump follows (its entries come as `snapshot`)"),
        )),
    )),
)


# ---- the dict path ---------------------------------------------------------------


class _Gen:
    def __init__(self, name: str) -> None:
        self.prefix = f"_{name}"
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.n = 0
        self.inline: dict[str, str] = {}  # json fragment -> static f-string text
        self.conds: dict[str, int] = {}  # top-level condition -> how often it is tested
        self.cond_vars: dict[str, str] = {}

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value: Any) -> str:
        """A module-level name holding ``value`` (shared: records are never mutated)."""
        name = self.name(self.prefix + "_K")
        self.consts[name] = value
        return name

    def emit(self, indent: str, code: str) -> None:
        self.lines.extend(indent + line for line in code.splitlines())

    def when(self, cond: str, indent: str) -> str:
        """The test for ``cond`` at ``indent``: a condition the function tests more than
        once at its top level is computed once, into a local, where it is first tested
        (conditions read only the prelude's locals, which never change after it)."""
        if indent != _TOP or self.conds.get(cond, 0) < 2:
            return cond
        var = self.cond_vars.get(cond)
        if var is None:
            var = self.cond_vars[cond] = self.name("_w")
            self.emit(indent, f"{var} = {cond}")
        return var


_TOP = "    "  # the indent of a compiled function's top level


def _top_conds(fields: tuple[Field, ...], counts: dict[str, int]) -> dict[str, int]:
    """Count the conditions tested at the top level of the compiled line function: each
    run of members under one condition is one test; an always-present object's members
    are at the top level too."""
    prev = None
    for f in fields:
        if f.when is not None:
            if f.when != prev:
                counts[f.when] = counts.get(f.when, 0) + 1
        elif f.kind == "object":
            _top_conds(_built(f.children), counts)
        prev = f.when
    return counts


def _built(fields: tuple[Field, ...]) -> tuple[Field, ...]:
    return tuple(f for f in fields if not f.doc_only)


def _dict_value(g: _Gen, f: Field, indent: str) -> str:
    if f.kind == "const":
        return g.const(f.const)
    if f.kind == "object":
        return _dict_object(g, _built(f.children), indent)
    return f.value


def _dict_object(g: _Gen, fields: tuple[Field, ...], indent: str) -> str:
    """Emit the statements building one object; return the expression naming it."""
    head: list[str] = []
    i = 0
    while i < len(fields) and fields[i].when is None and not fields[i].let:
        head.append(f"{fields[i].name!r}: {_dict_value(g, fields[i], indent)}")
        i += 1
    literal = "{" + ", ".join(head) + "}"
    if i == len(fields):
        return literal
    var = g.name("_o")
    g.emit(indent, f"{var} = {literal}")
    prev: str | None = None
    for f in fields[i:]:
        inner = indent
        if f.when is not None:
            if f.when != prev or f.let:  # a run under one condition shares one test
                g.emit(indent, f"if {f.when}:")
            inner = indent + "    "
        prev = f.when
        if f.let:
            g.emit(inner, f.let)
        g.emit(inner, f"{var}[{f.name!r}] = {_dict_value(g, f, inner)}")
    return var


def compile_dict(fields: tuple[Field, ...], signature: str, prelude: str,
                 namespace: dict[str, Any], name: str, doc: str) -> Callable[..., Any]:
    """Compile the function building a record of ``fields`` as nested dicts."""
    g = _Gen(name)
    g.emit("    ", prelude)
    top = _dict_object(g, _built(fields), "    ")
    g.emit("    ", f"return {top}")
    src = f"def {name}({signature}):\n" + "\n".join(g.lines) + "\n"
    return _define(src, name, namespace, g.consts, doc)


# ---- the NDJSON path -------------------------------------------------------------


def _static(text: str) -> str:
    """``text`` as literal f-string source (inside single quotes). The characters that
    end a line for ``str.splitlines`` but that JSON leaves unescaped are written as
    escapes, so the source stays one line."""
    return (text.replace("\\", "\\\\").replace("'", "\\'")
            .replace("{", "{{").replace("}", "}}")
            .replace("\x85", "\\x85").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _json_value(g: _Gen, f: Field, indent: str) -> str:
    """The f-string fragment writing ``f``'s value."""
    if f.kind == "const":
        return _static(orjson.dumps(f.const).decode())
    if f.kind == "object":
        return _json_object(g, _built(f.children), indent)
    if f.json:
        text = f.json
        for frag, static in g.inline.items():
            text = text.replace(frag, static)
        return text
    if f.kind == "text":
        return '"{' + f.value + '}"'
    if f.kind == "int":
        return "{" + f.value + "}"
    if f.kind == "intn":  # inline, not a call: it is on every record
        return '{"null" if ' + f.value + " is None else " + f.value + "}"
    raise ValueError(f"field {f.name!r}: kind {f.kind!r} needs a json fragment")


def _member(f: Field) -> str:
    """The expression of a member's whole text, comma included (``member``, kinds port
    and portn); "" when the member is written as key and ``json`` value."""
    if f.member:
        return f"({f.member})"
    if f.kind not in ("port", "portn"):
        return ""
    if f.name != "port":
        raise ValueError(f"{f.name!r}: kind {f.kind!r} is the member named 'port'")
    v = f.value
    text = f"(_PORT_MEMBER[{v}] or _port_member({v}))"
    return text if f.kind == "port" else f"""(',"port":null' if {v} is None else {text})"""


def _line_let(f: Field) -> str:
    return f.let if f.line_let is None else f.line_let


def _json_object(g: _Gen, fields: tuple[Field, ...], indent: str) -> str:
    """Emit the statements of one object's optional members; return its f-string fragment.

    Members present only under a condition are computed before into a local text
    (empty when absent); runs of members under the same condition share one test,
    and consecutive optional members (no always-present one between them) one text,
    appended to: fewer pieces for the final f-string to join.
    """
    if not fields or fields[0].when is not None:
        raise ValueError(f"{fields[0].name if fields else '?'}: an object's first member "
                         "must always be present (the comma rule relies on it)")
    out = "{{"
    acc: str | None = None  # the text the current run of optional members appends to
    i = 0
    while i < len(fields):
        f = fields[i]
        sep = "" if i == 0 else ","
        if f.line_skip:  # written by the member before it
            if i == 0 or (fields[i - 1].when is not None and f.when is None):
                raise ValueError(f"{f.name!r}: line_skip needs a member before it that is "
                                 "present whenever it is")
            i += 1
            continue
        if f.when is None:
            acc = None
            if _line_let(f):
                g.emit(indent, _line_let(f))
            if _member(f):  # never first (see above): its text has the comma
                out += "{" + _member(f) + "}"
            else:
                out += (sep + _static(orjson.dumps(f.name).decode()) + ":"
                        + _json_value(g, f, indent))
            i += 1
            continue
        group = [f]
        while i + len(group) < len(fields) and fields[i + len(group)].when == f.when:
            group.append(fields[i + len(group)])
        if acc is None:
            acc = g.name("_c")
            g.emit(indent, f"{acc} = ''")
            out += "{" + acc + "}"
        g.emit(indent, f"if {g.when(f.when, indent)}:")
        inner = indent + "    "
        text = ""
        for m in group:
            if m.line_skip:  # written by the member before it
                continue
            if _line_let(m):
                g.emit(inner, _line_let(m))
            if _member(m):
                if text:
                    g.emit(inner, f"{acc} += f'{text}'")
                    text = ""
                g.emit(inner, f"{acc} += {_member(m)}")
                continue
            text += "," + _static(orjson.dumps(m.name).decode()) + ":" + _json_value(g, m, inner)
        if text:
            g.emit(inner, f"{acc} += f'{text}'")
        i += len(group)
    return out + "}}"


def compile_line(fields: tuple[Field, ...], signature: str, prelude: str,
                 namespace: dict[str, Any], name: str, doc: str,
                 inline: dict[str, str] | None = None) -> Callable[..., Any]:
    """Compile the function writing a record of ``fields`` as one NDJSON line (bytes).

    ``inline`` maps expressions of ``json`` fragments (``self._host_json``) to the
    JSON text they always have in this function (one encoder's host name): written
    as static text, they merge into the literal around them (fewer pieces to join
    per record).
    """
    g = _Gen(name)
    g.inline = {"{" + expr + "}": _static(text) for expr, text in (inline or {}).items()}
    g.conds = _top_conds(_built(fields), {})
    g.emit(_TOP, prelude)
    text = _json_object(g, _built(fields), _TOP)
    for line in _chunked_fstring(f"f'{text}\\n'", g):
        g.emit("    ", line)
    src = f"def {name}({signature}):\n" + "\n".join(g.lines) + "\n"
    return _define(src, name, namespace, g.consts, doc)


#: Most pieces one f-string of the generated code joins. CPython (3.11 and later)
#: compiles an f-string of more than 30 pieces (its ``STACK_USE_GUIDELINE``) as a
#: list built append by append and passed to ``str.join``, about 2,000 instructions
#: more per record than ``BUILD_STRING`` on the stack.
_MAX_PIECES = 28


def _chunked_fstring(fstring: str, g: _Gen) -> list[str]:
    """The statements returning ``fstring.encode()``, its pieces split into f-strings of
    at most :data:`_MAX_PIECES` each: every chunk but the last goes to a local that is
    the first piece of the next."""
    values = ast.parse(fstring, mode="eval").body.values  # type: ignore[attr-defined]
    lines: list[str] = []
    prev: str | None = None
    while True:
        room = _MAX_PIECES - (prev is not None)
        chunk, values = values[:room], values[room:]
        if prev is not None:
            chunk = [ast.FormattedValue(value=ast.Name(id=prev, ctx=ast.Load()),
                                        conversion=-1, format_spec=None), *chunk]
        expr = ast.unparse(ast.JoinedStr(values=chunk))
        if not values:
            lines.append(f"return {expr}.encode()")
            return lines
        prev = g.name("_l")
        lines.append(f"{prev} = {expr}")


_SOURCES: dict[str, str] = {}


def _define(src: str, name: str, namespace: dict[str, Any], consts: dict[str, Any],
            doc: str) -> Callable[..., Any]:
    namespace.update(consts)
    filename = f"<shipper.schema {namespace.get('__name__', '?')}.{name}>"
    exec(compile(src, filename, "exec"), namespace)  # our own generated source, nothing from input
    fn: Callable[..., Any] = namespace[name]
    fn.__doc__ = doc
    _SOURCES[f"{namespace.get('__name__', '?')}.{name}"] = src
    return fn


def source_of(qualname: str) -> str:
    """The generated source of a compiled function, e.g. ``shipper.ecs.build_record``."""
    return _SOURCES[qualname]


# ---- documentation ----------------------------------------------------------------


def _walk(fields: tuple[Field, ...], prefix: str = "") -> Iterator[tuple[str, Field]]:
    for f in fields:
        path = prefix + f.name
        if f.children:
            yield from _walk(f.children, path + ".")
        else:
            yield path, f


def documented_fields() -> list[tuple[str, Field]]:
    """Every leaf field of the flow and gap records, in record order, each path once."""
    seen: dict[str, Field] = {}
    for path, f in (*_walk(FLOW), *_walk(GAP)):
        if path in seen:
            continue
        if not (f.type or f.doc_join):
            raise ValueError(f"{path}: first declared without documentation")
        seen[path] = f
    return list(seen.items())


def field_table() -> str:
    """The field table of docs/SCHEMA.md (markdown)."""
    rows: list[tuple[list[str], list[str], list[str], str]] = []
    for path, f in documented_fields():
        name = f"`{f.doc_name or path}`"
        if f.doc_join and rows:
            names, types, present, _ = rows[-1]
            names.append(name)
            types.append(f.type or types[-1])
            present.append(f.present or present[-1])
        else:
            rows.append(([name], [f.type], [f.present], f.meaning))
    out = ["| field | type | present | meaning |", "|---|---|---|---|"]
    for names, types, present, meaning in rows:
        t = types[0] if len(set(types)) == 1 else ", ".join(types)
        p = present[0] if len(set(present)) == 1 else " / ".join(present)
        out.append(f"| {', '.join(names)} | {t} | {p} | {meaning} |")
    return "\n".join(out)
