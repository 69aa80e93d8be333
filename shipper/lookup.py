"""``flowlog-shipper lookup``: which pod held a NAT address and port at a time.

The forensics side of the join rule in ``docs/SCHEMA.md``: given a remote
log line (time, the node's address and port after MASQUERADE, optionally the
destination and protocol), find the flow in the shipper's NDJSON output that
held that ``source.nat.ip``/``source.nat.port`` then, and say which pod it was.
Ambiguity is an answer of its own (exit 3), never hidden behind a first hit.

How it reads the files (why it is fast and its memory bounded):

- Files are streamed in large blocks (plain, gzip, bzip2 or xz, detected by
  the magic bytes, so ``path.1``, ``path.2.gz`` and Fluent Bit's
  ``name.<date>.gz`` rotations all work); nothing is loaded whole.
- A block is searched as bytes before any JSON is parsed. One lookup searches
  for the port's digits (like ``grep -F``), then for the address on the same
  line; a batch of many queries matches one regular expression for the
  compact ``"nat":{"ip":"...","port":N}`` object and looks the address and
  port up in an index of the queried keys (one pass for every query). A block
  whose ``"nat"`` keys are not all in that compact form (another JSON
  writer's spacing) is read line by line with a JSON parser instead, so no
  record is missed because of formatting.
- Only lines that pass the pre-filter are parsed, and only records of a
  queried key (plus every ``gap`` record) are kept, in a slim form.

Nothing here is hand-written where a library would serve: the pre-filter is
CPython's own byte search and ``re``; parsing is orjson; gzip is the stdlib.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import ipaddress
import itertools
import lzma
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson

EXIT_FOUND = 0
EXIT_NOT_FOUND = 1
EXIT_BAD_INPUT = 2
EXIT_AMBIGUOUS = 3

RESULT_FOUND = "found"
RESULT_NOT_FOUND = "not_found"
RESULT_AMBIGUOUS = "ambiguous"
RESULT_BAD_INPUT = "bad_input"
_EXIT = {RESULT_FOUND: EXIT_FOUND, RESULT_NOT_FOUND: EXIT_NOT_FOUND,
         RESULT_AMBIGUOUS: EXIT_AMBIGUOUS, RESULT_BAD_INPUT: EXIT_BAD_INPUT}
# Batch exit code: the worst answer, in this order.
_SEVERITY = (EXIT_BAD_INPUT, EXIT_AMBIGUOUS, EXIT_NOT_FOUND, EXIT_FOUND)

DEFAULT_WINDOW_S = 300.0
CHUNK = 8 << 20
# A lookup with at most this many distinct ports searches each port's digits;
# more use the one-regex pass with the key index.
_MAX_NEEDLES = 4

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_GAP_NEEDLE = b'"gap"'
_NAT_NEEDLE = b'"nat"'
# Every "nat" key, with its object when in the compact form both the file sink
# and Fluent Bit's `file` output (format plain) write (no port for ICMP).
_NAT_RE = re.compile(rb'"nat"(:\{"ip":"[^"]*"(?:,"port":\d+)?\})?')


class LookupInputError(Exception):
    """Bad input (a query, a flag, a file): the message says what and where."""


# ---- parsing the question -------------------------------------------------------


def parse_time(text: str) -> int:
    """Parse a query time into microseconds since the epoch (UTC).

    Accepted: RFC 3339 / ISO 8601 with a zone (``2026-11-27T08:03:31Z``,
    ``...+01:00``), the Common Log Format time (``27/Nov/2026:08:03:31 +0000``)
    and Unix seconds (``1795766611.5``). A time without a zone is refused:
    guessing the remote log's zone could name the wrong flow.
    """
    s = text.strip()
    if not s:
        raise LookupInputError("empty time")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        sec, _, frac = s.partition(".")
        return int(sec) * 1_000_000 + int((frac + "000000")[:6])
    dt: datetime | None = None
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        try:
            dt = datetime.strptime(s.strip("[]"), "%d/%b/%Y:%H:%M:%S %z")
        except ValueError:
            dt = None
    if dt is None:
        raise LookupInputError(
            f"cannot read time {text!r}: use RFC 3339 (2026-11-27T08:03:31Z), "
            "Common Log Format (27/Nov/2026:08:03:31 +0000) or Unix seconds")
    if dt.tzinfo is None:
        raise LookupInputError(f"time {text!r} has no time zone: add Z or +HH:MM")
    return (dt - _EPOCH) // _US


def parse_window(text: str) -> int:
    """Parse a window like ``5m``, ``90s``, ``1h``, ``500ms`` or ``30`` (seconds) into µs."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise LookupInputError(f"cannot read window {text!r}: use e.g. 5m, 90s, 1h, 500ms")
    scale = {"ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6, None: 1e6}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _norm_ip(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise LookupInputError(f"{what}: {text!r} is not an IP address") from None


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise LookupInputError(f"{what}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_endpoint(text: str, what: str, *, port_required: bool) -> tuple[str, int | None]:
    """Parse ``IP:PORT``, ``[IPv6]:PORT``, or (if the port is optional) ``IP`` / ``IPv6``."""
    s = text.strip()
    if s.startswith("["):
        addr, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise LookupInputError(f"{what}: {text!r}: write IPv6 as [addr]:port")
        port = rest[1:] if rest else ""
    elif s.count(":") == 1:
        addr, _, port = s.partition(":")
    else:  # IPv4 without port, or a bare IPv6 address
        addr, port = s, ""
    if not port:
        if port_required:
            raise LookupInputError(
                f"{what}: {text!r} has no port: write IP:PORT, or [IPv6]:PORT")
        return _norm_ip(addr, what), None
    return _norm_ip(addr, what), _port(port, what)


@dataclass(frozen=True, slots=True)
class Query:
    """One question: who held ``nat_ip:nat_port`` at ``at_us`` (± ``window_us``)."""

    at_us: int
    nat_ip: str
    nat_port: int
    window_us: int
    dst_ip: str | None = None
    dst_port: int | None = None
    proto: str | None = None
    line: int | None = None  # line number in the --queries file

    @property
    def key(self) -> tuple[str, int]:
        """The index key: normalised NAT address text and port."""
        return self.nat_ip, self.nat_port

    def describe(self) -> dict[str, Any]:
        """The question as echoed in the answer."""
        d: dict[str, Any] = {}
        if self.line is not None:
            d["line"] = self.line
        d["at"] = fmt_us(self.at_us)
        d["nat"] = _fmt_ep(self.nat_ip, self.nat_port)
        if self.dst_ip:
            d["dst"] = _fmt_ep(self.dst_ip, self.dst_port)
        if self.proto:
            d["proto"] = self.proto
        d["window_s"] = self.window_us / 1e6
        return d


def make_query(at: str, nat: str, dst: str | None, proto: str | None, window_us: int,
               line: int | None = None) -> Query:
    """Build a query from its texts; raises :class:`LookupInputError` naming the bad part."""
    at_us = parse_time(at)
    nat_ip, nat_port = parse_endpoint(nat, "nat", port_required=True)
    assert nat_port is not None
    dst_ip = dst_port = None
    if dst:
        dst_ip, dst_port = parse_endpoint(dst, "dst", port_required=False)
    p = proto.strip().lower() if proto else None
    if p and p not in ("tcp", "udp"):
        raise LookupInputError(f"proto: {proto!r} is not tcp or udp")
    return Query(at_us, nat_ip, nat_port, window_us, dst_ip, dst_port, p or None, line)


_TIME_COLS = ("time", "at", "timestamp", "@timestamp")
_DST_COLS = ("dst", "destination")
_PROTO_COLS = ("proto", "transport", "protocol")


def read_queries(path: Path, window_us: int) -> list[Query | LookupInputError]:
    """Read a ``--queries`` file: CSV or NDJSON, one query per line, in order.

    CSV columns are ``time,nat[,dst[,proto]]``, or any order under a header
    row naming them (``time``/``at``, ``nat``, ``dst``, ``proto``). NDJSON
    objects use the same keys. Blank lines and lines starting with ``#`` are
    skipped. A bad line becomes a :class:`LookupInputError` in its place (it
    is answered as bad input), so the other lines are still answered.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LookupInputError(f"cannot read queries file {path}: {exc}") from exc
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1)
             if ln.strip() and not ln.lstrip().startswith("#")]
    out: list[Query | LookupInputError] = []
    if not lines:
        raise LookupInputError(f"queries file {path} has no queries")
    if lines[0][1].lstrip().startswith("{"):
        for n, ln in lines:
            try:
                obj = orjson.loads(ln)
                if not isinstance(obj, dict):
                    raise LookupInputError("not a JSON object")
                at = next((obj[k] for k in _TIME_COLS if k in obj), None)
                if at is None or "nat" not in obj:
                    raise LookupInputError("needs keys time and nat")
                dst = next((obj[k] for k in _DST_COLS if obj.get(k)), None)
                proto = next((obj[k] for k in _PROTO_COLS if obj.get(k)), None)
                out.append(make_query(str(at), str(obj["nat"]), dst and str(dst),
                                      proto and str(proto), window_us, n))
            except orjson.JSONDecodeError as exc:
                out.append(LookupInputError(f"line {n}: not JSON: {exc}"))
            except LookupInputError as exc:
                out.append(LookupInputError(f"line {n}: {exc}"))
        return out
    rows = list(csv.reader(io.StringIO("\n".join(ln for _, ln in lines))))
    cols = {"time": 0, "nat": 1, "dst": 2, "proto": 3}
    first = [c.strip().lower() for c in rows[0]]
    if first and first[0] in (*_TIME_COLS, "nat", *_DST_COLS, *_PROTO_COLS):
        names = {**{k: "time" for k in _TIME_COLS}, "nat": "nat",
                 **{k: "dst" for k in _DST_COLS}, **{k: "proto" for k in _PROTO_COLS}}
        unknown = [c for c in first if c not in names]
        if unknown or "time" not in {names[c] for c in first} or "nat" not in first:
            raise LookupInputError(
                f"{path}: header {rows[0]!r}: columns are time, nat, dst, proto "
                "(time and nat required)")
        cols = {names[c]: i for i, c in enumerate(first)}
        rows, lines = rows[1:], lines[1:]
    for (n, _), row in zip(lines, rows, strict=True):
        def col(name: str, row: list[str] = row) -> str | None:
            i = cols.get(name)
            return row[i].strip() if i is not None and i < len(row) and row[i].strip() else None
        try:
            at, nat = col("time"), col("nat")
            if not at or not nat:
                raise LookupInputError("needs a time and a nat IP:PORT")
            out.append(make_query(at, nat, col("dst"), col("proto"), window_us, n))
        except LookupInputError as exc:
            out.append(LookupInputError(f"line {n}: {exc}"))
    return out


# ---- reading the records --------------------------------------------------------


def expand_paths(paths: Iterable[str]) -> list[Path]:
    """Files to read: each FILE, and every regular file directly inside each directory."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(c for c in path.iterdir() if c.is_file()))
        elif path.is_file():
            out.append(path)
        elif path.exists():
            raise LookupInputError(f"{path}: not a regular file or directory")
        else:
            raise LookupInputError(f"{path}: no such file or directory")
    if not out:
        raise LookupInputError("no record files to read (empty directories?)")
    return out


def _open(path: Path) -> IO[bytes]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - returned to the caller, closed there
    except OSError as exc:
        raise LookupInputError(f"{path}: cannot open: {exc.strerror}") from exc
    head = f.peek(6)[:6]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    # logrotate's compresscmd may be bzip2 or xz (stdlib); zstd is not in the stdlib.
    if head[:3] == b"BZh":
        return bz2.BZ2File(f, mode="rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(f, mode="rb")
    if head[:4] == b"\x28\xb5\x2f\xfd":
        f.close()
        raise LookupInputError(f"{path}: zstd-compressed; decompress it first (zstd -d)")
    return f


def read_blocks(path: Path, size: int = CHUNK) -> Iterator[tuple[bytes, int, int]]:
    """Yield ``path``'s content as ``(buffer, start, end)``: whole lines in ``buffer[start:end]``.

    The buffer is what one read returned, not a copy (a gigabyte copied twice
    costs more than searching it); only the line cut at a read boundary is
    joined to the next read.
    """
    f = _open(path)
    try:
        rest = b""
        while True:
            try:
                data = f.read(size)
            except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
                raise LookupInputError(f"{path}: cannot read (corrupt or truncated "
                                       f"compressed file?): {exc}") from exc
            if not data:
                break
            begin = 0
            if rest:
                nl = data.find(b"\n")
                if nl < 0:
                    rest += data
                    continue
                joined = rest + data[:nl + 1]
                yield joined, 0, len(joined)
                begin = nl + 1
            cut = data.rfind(b"\n") + 1
            if cut > begin:
                yield data, begin, cut
                rest = data[cut:]
            else:
                rest = data[begin:]
        if rest:
            yield rest + b"\n", 0, len(rest) + 1
    finally:
        f.close()


_sec_cache: dict[str, int] = {}


def _ts_us(text: str) -> int:
    # Fast path for the records' own form, 2026-11-27T08:01:43.887525Z: the
    # seconds part repeats from record to record.
    if len(text) == 27 and text[19] == "." and text[26] == "Z":
        sec = _sec_cache.get(text[:19])
        if sec is None:
            if len(_sec_cache) > 65536:
                _sec_cache.clear()
            sec = _sec_cache[text[:19]] = (
                datetime.fromisoformat(text[:19] + "+00:00") - _EPOCH) // _US
        return sec + int(text[20:26])
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _US


@dataclass(slots=True)
class Rec:
    """The parts of one kept record that answers need (slim: many may be kept)."""

    ts_us: int
    action: str
    host: str
    ct_id: Any
    cid: str | None
    proto: str | None
    src_ip: str | None
    src_port: int | None
    dst_ip: str | None
    dst_port: int | None
    start_us: int | None
    end_us: int | None
    clash: bool
    status: tuple[str, ...]
    attribution: str | None
    kube: dict[str, Any] | None
    counters: tuple[Any, Any, Any, Any] | None
    event_id: str | None


@dataclass(slots=True)
class Gap:
    """A ``gap`` record: events may be missing between ``start_us`` and ``end_us``."""

    host: str
    start_us: int
    end_us: int
    lost: Any
    resync: Any
    event_id: str | None


@dataclass
class Scan:
    """What one pass over the files kept: records per queried key, and every gap."""

    recs: dict[tuple[str, int], list[Rec]] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)
    malformed: dict[str, int] = field(default_factory=dict)  # file -> lines not records
    files: int = 0
    bytes: int = 0


class Scanner:
    """One pass over record files, keeping records of the queried ``(nat ip, port)`` keys."""

    def __init__(self, keys: Iterable[tuple[str, int]]) -> None:
        self.keys = set(keys)
        # Byte forms of the keys, as the records write them.
        self._bkeys = {f':{{"ip":"{ip}","port":{port}}}'.encode() for ip, port in self.keys}
        ports = {p for _, p in self.keys}
        self._needles = ([str(p).encode() for p in sorted(ports)]
                         if len(ports) <= _MAX_NEEDLES else None)
        self._ips = {ip.encode() for ip, _ in self.keys}
        self._ipnorm: dict[str, str] = {}
        self._kube: dict[bytes, dict[str, Any]] = {}
        self._shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.scan = Scan()

    def run(self, paths: list[Path]) -> Scan:
        """Read every file once; return what was kept."""
        for path in paths:
            self.scan.files += 1
            name = str(path)
            for buf, start, end in read_blocks(path):
                self.scan.bytes += end - start
                self._block(buf, start, end, name)
        return self.scan

    # -- pre-filter: which lines of a block are worth parsing

    def _take(self, buf: bytes, i: int, end: int, starts: set[int], name: str) -> int:
        """Parse the line holding position ``i`` (once); return the position after it."""
        s = buf.rfind(b"\n", 0, i) + 1
        e = buf.find(b"\n", i, end)
        if e < 0:
            e = end
        if s not in starts:
            starts.add(s)
            self._line(buf[s:e], name)
        return e

    def _block(self, buf: bytes, start: int, end: int, name: str) -> None:
        starts: set[int] = set()
        find = buf.find
        if self._needles is not None:
            ips = self._ips
            for needle in self._needles:
                n = len(needle)
                i = find(needle, start, end)
                while i >= 0:
                    # a whole number only: 2895 must not match 28958 or 12895
                    if not buf[i - 1:i].isdigit() and not buf[i + n:i + n + 1].isdigit():
                        s = buf.rfind(b"\n", 0, i) + 1
                        e = find(b"\n", i, end)
                        if e < 0:
                            e = end
                        if s not in starts and any(buf.find(ip, s, e) >= 0 for ip in ips):
                            starts.add(s)
                            self._line(buf[s:e], name)
                        i = find(needle, e, end)
                    else:
                        i = find(needle, i + n, end)
        else:
            # Every "nat" key, with its object if in the compact form (else None).
            bkeys = self._bkeys
            compact = True
            for m in _NAT_RE.finditer(buf, start, end):
                k = m[1]
                if k is None:
                    compact = False
                elif k in bkeys:
                    self._take(buf, m.start(), end, starts, name)
            if not compact:  # another layout: parse every line that has a "nat" key
                i = find(_NAT_NEEDLE, start, end)
                while i >= 0:
                    i = find(_NAT_NEEDLE, self._take(buf, i, end, starts, name), end)
        i = find(_GAP_NEEDLE, start, end)
        while i >= 0:
            i = find(_GAP_NEEDLE, self._take(buf, i, end, starts, name), end)

    # -- a candidate line

    def _bad(self, name: str) -> None:
        self.scan.malformed[name] = self.scan.malformed.get(name, 0) + 1

    def _line(self, line: bytes, name: str) -> None:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            self._bad(name)
            return
        if not isinstance(rec, dict):
            self._bad(name)
            return
        try:
            self._record(rec, line)
        except (KeyError, TypeError, ValueError, AttributeError):
            self._bad(name)

    def _norm(self, text: str) -> str:
        n = self._ipnorm.get(text)
        if n is None:
            n = str(ipaddress.ip_address(text))
            if len(self._ipnorm) < 65536:
                self._ipnorm[text] = n
        return n

    def _record(self, rec: dict[str, Any], line: bytes) -> None:
        event = rec["event"]
        action = event["action"]
        if action == "gap":
            if "start" not in event or "end" not in event:
                raise ValueError("gap without start/end")
            self.scan.gaps.append(Gap(
                str((rec.get("host") or {}).get("name")), _ts_us(event["start"]),
                _ts_us(event["end"]), ((rec.get("flowlog") or {}).get("gap") or {}).get(
                    "lost_events"),
                ((rec.get("flowlog") or {}).get("gap") or {}).get("resync"), event.get("id")))
            return
        src = rec.get("source") or _EMPTY
        nat = src.get("nat") or _EMPTY
        port = nat.get("port")
        if port is None or "ip" not in nat:
            return  # a record without a NAT port (ICMP) is no join candidate
        key = (self._norm(nat["ip"]), int(port))
        if key not in self.keys:
            return  # the digits matched elsewhere on the line
        dst = rec.get("destination") or _EMPTY
        ct = rec.get("conntrack") or _EMPTY
        net = rec.get("network") or _EMPTY
        # Kept records are many and their texts repeat: share them.
        st = ct.get("status") or ()
        status = self._shared.get(tuple(st))
        if status is None:
            status = self._shared[tuple(st)] = tuple(st)
        kube = rec.get("kubernetes")
        if kube is not None:
            # Records of one pod share one dict: many kept records, few pods. The
            # key is the object's own text where the line has the usual layout.
            i = line.find(b'"kubernetes":')
            j = line.find(b',"flowlog":', i)
            kb = line[i:j] if 0 <= i < j else orjson.dumps(kube)
            kube = self._kube.setdefault(kb, kube)
        counters = None
        if "bytes" in src or "bytes" in dst:
            counters = (src.get("bytes"), src.get("packets"), dst.get("bytes"),
                        dst.get("packets"))
        start, end, dip = event.get("start"), event.get("end"), dst.get("ip")
        self.scan.recs.setdefault(key, []).append(Rec(
            _ts_us(rec["@timestamp"]),
            sys.intern(action),
            sys.intern(str((rec.get("host") or _EMPTY).get("name"))),
            ct.get("id"),
            net.get("community_id"),
            _intern_opt(net.get("transport")),
            src.get("ip"),
            src.get("port"),
            self._norm(dip) if dip else None,
            dst.get("port"),
            _ts_us(start) if start else None,
            _ts_us(end) if end else None,
            "NAT_CLASH" in status,
            status,
            _intern_opt((rec.get("flowlog") or _EMPTY).get("attribution")),
            kube,
            counters,
            event.get("id"),
        ))


_EMPTY: dict[str, Any] = {}


def _intern_opt(v: Any) -> Any:
    return sys.intern(v) if isinstance(v, str) else v


# ---- answering ------------------------------------------------------------------


@dataclass
class Flow:
    """One conntrack entry's lifetime on one host, built from its records.

    ``start_us`` is None when no record proves when the flow began: a flow
    first seen in a table dump (``snapshot``) without the kernel's start
    timestamp existed at ``seen_us`` and began at some unknown time before.
    """

    recs: list[Rec]
    start_us: int | None = None
    end_us: int | None = None
    end_inferred_us: int | None = None  # a later flow on the same tuple was seen here
    lower_us: int | None = None  # unknown start: not before an earlier flow's end
    closed: bool = False

    @property
    def first(self) -> Rec:
        """The record that opened the flow in these files."""
        return self.recs[0]

    @property
    def seen_us(self) -> int:
        """Time of the flow's earliest record."""
        return min(r.ts_us for r in self.recs)

    @property
    def begin_us(self) -> int:
        """Start of the flow, or its earliest record when the start is unknown."""
        return self.start_us if self.start_us is not None else self.seen_us

    @property
    def clash(self) -> bool:
        """Whether any record of the flow has the NAT_CLASH status bit."""
        return any(r.clash for r in self.recs)

    @property
    def pod_rec(self) -> Rec:
        """The record whose attribution speaks for the flow (its opening record)."""
        for r in self.recs:
            if r.action in ("new", "snapshot"):
                return r
        return self.recs[0]

    def tuple_key(self) -> tuple[Any, ...]:
        """Flows with equal keys cannot coexist (the kernel's reply tuple is unique)."""
        r = self.first
        return (r.proto, r.dst_ip, r.dst_port)

    def settle_start(self) -> None:
        """Set ``start_us`` from what the records prove.

        A ``new`` is the start. Otherwise ``event.start`` is proof only when it
        is earlier than the flow's first record: the kernel's start
        timestamp, or the time of a ``new`` in a file not given. Equal to it,
        it is the shipper's own first sight (a table dump), not the start.
        """
        news = [r for r in self.recs if r.action == "new"]
        if news:
            r = news[0]
            self.start_us = r.start_us if r.start_us is not None else r.ts_us
            return
        seen = self.seen_us
        earlier = [r.start_us for r in self.recs if r.start_us is not None and r.start_us < seen]
        self.start_us = min(earlier) if earlier else None


def build_flows(recs: list[Rec]) -> list[Flow]:
    """Group records into flows: per (host, conntrack id, community id), in time order.

    A ``new`` (or a ``snapshot``/``update`` when no flow of that id is open)
    opens a flow; a ``destroy`` closes it. Repeated records (the same
    ``event.id`` delivered twice) count once.
    """
    seen: set[str] = set()
    groups: dict[tuple[Any, ...], list[Rec]] = {}
    for r in recs:
        if r.event_id is not None:
            if r.event_id in seen:
                continue
            seen.add(r.event_id)
        groups.setdefault((r.host, r.ct_id, r.cid), []).append(r)
    _order = {"new": 0, "snapshot": 1, "update": 2, "destroy": 3}
    flows: list[Flow] = []
    for group in groups.values():
        group.sort(key=lambda r: (r.ts_us, _order.get(r.action, 9)))
        cur: Flow | None = None
        for r in group:
            opens = cur is None or cur.closed or (
                r.action == "new" and any(x.action == "new" for x in cur.recs))
            if opens:
                cur = Flow([r])
                flows.append(cur)
            else:
                assert cur is not None
                cur.recs.append(r)
            if r.action == "destroy":
                cur.end_us = r.end_us if r.end_us is not None else r.ts_us
                cur.closed = True
    for f in flows:
        f.settle_start()
    # The kernel's reply tuple is unique (except NAT_CLASH, where two entries
    # share it at once): an open flow ended before the next flow on its tuple
    # was seen, and a flow of unknown start began after the previous one ended.
    by_tuple: dict[tuple[Any, ...], list[Flow]] = {}
    for f in flows:
        by_tuple.setdefault(f.tuple_key(), []).append(f)
    for same in by_tuple.values():
        same.sort(key=lambda f: f.begin_us)
        for a, b in itertools.pairwise(same):
            if a.clash or b.clash:
                continue
            if a.end_us is None:
                a.end_inferred_us = b.begin_us
            if b.start_us is None and a.end_us is not None:
                b.lower_us = a.end_us
    return flows


@dataclass
class Answer:
    """The answer to one query."""

    query: Query | None
    result: str
    reasons: list[str] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    error: str | None = None

    @property
    def exit_code(self) -> int:
        """0 one answer, 1 no flow, 3 ambiguous, 2 bad input."""
        return _EXIT[self.result]


def answer(q: Query, scan: Scan) -> Answer:
    """Apply the join rule of docs/SCHEMA.md to the records kept for ``q``'s key."""
    recs = [r for r in scan.recs.get(q.key, ())
            if (q.proto is None or r.proto == q.proto)
            and (q.dst_ip is None or r.dst_ip == q.dst_ip)
            and (q.dst_port is None or r.dst_port == q.dst_port)]
    lo, hi = q.at_us - q.window_us, q.at_us + q.window_us
    cands = []
    for f in build_flows(recs):
        begin = f.start_us if f.start_us is not None else f.lower_us
        if begin is not None and begin > hi:
            continue  # began after the time (beyond the clock-skew window)
        end = f.end_us if f.end_us is not None else f.end_inferred_us
        if end is not None and end < lo:
            continue  # over before the time
        cands.append(f)
    cands.sort(key=lambda f: f.begin_us)
    # Events may be missing where a gap overlaps the window (from any host: a
    # NAT address can move between nodes). Before the window, a gap on a
    # candidate's host matters between the flow's start and the time when the
    # flow's end is unknown (its destroy and a successor on the port may be
    # among the lost events) or when no table dump followed the gap (a flow
    # that began during it would then be unknown; with a dump it would appear
    # as a `snapshot`).
    def relevant(g: Gap) -> bool:
        if g.start_us > hi:
            return False
        if g.end_us >= lo:
            return True
        return any(f.first.host == g.host and g.end_us >= f.begin_us
                   and (f.end_us is None or g.resync is not True) for f in cands)

    gaps = [g for g in scan.gaps if relevant(g)]
    reasons = []
    if len(cands) > 1:
        dsts = {(f.first.proto, f.first.dst_ip, f.first.dst_port) for f in cands}
        if any(f.clash for f in cands):
            reasons.append("NAT_CLASH: flows shared this NAT port at once")
        if len(dsts) > 1:
            reasons.append(f"{len(cands)} flows used this NAT port within the window, "
                           "to different destinations (give --dst and --proto)")
        else:
            reasons.append(f"{len(cands)} flows used this NAT port within the window "
                           "(port reuse; narrow --window if clocks are in sync)")
    elif cands and cands[0].clash:
        reasons.append("NAT_CLASH: another flow shared this NAT port at once")
    if gaps:
        reasons.append(f"{len(gaps)} gap record(s) overlap: events may be missing")
    for f in cands:
        if f.start_us is None and f.seen_us > lo:
            reasons.append(f"a flow's start is unknown: first seen at {fmt_us(f.seen_us)} "
                           "(a table dump), it may have begun after the time")
            break
    for f in cands:
        att = f.pod_rec.attribution
        if att != "resolved":
            reasons.append(f"attribution is {att or 'missing'}: the pod is not known for sure")
            break
    if not cands:
        return Answer(q, RESULT_AMBIGUOUS if gaps else RESULT_NOT_FOUND, reasons, [], gaps)
    return Answer(q, RESULT_AMBIGUOUS if reasons else RESULT_FOUND, reasons, cands, gaps)


# ---- output ---------------------------------------------------------------------


def fmt_us(us: int | None) -> str | None:
    """RFC 3339 UTC with microseconds."""
    if us is None:
        return None
    return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fmt_ep(ip: str | None, port: int | None) -> str:
    if ip is None:
        return "?"
    text = f"[{ip}]" if ":" in ip else ip
    return text if port is None else f"{text}:{port}"


def flow_json(f: Flow) -> dict[str, Any]:
    """A flow as the JSON answer shows it."""
    r, p = f.first, f.pod_rec
    d: dict[str, Any] = {
        "host": r.host,
        "conntrack_id": r.ct_id,
        "transport": r.proto,
        "source": {"ip": r.src_ip, "port": r.src_port},
        "destination": {"ip": r.dst_ip, "port": r.dst_port},
        "start": fmt_us(f.start_us),
        "end": fmt_us(f.end_us),
    }
    if f.start_us is None:
        d["first_seen"] = fmt_us(f.seen_us)
    if f.end_us is None and f.end_inferred_us is not None:
        d["ended_before"] = fmt_us(f.end_inferred_us)
    counters = next((x.counters for x in reversed(f.recs) if x.counters), None)
    if counters:
        d["source"].update(bytes=counters[0], packets=counters[1])
        d["destination"].update(bytes=counters[2], packets=counters[3])
    d["status"] = sorted({s for x in f.recs for s in x.status})
    d["attribution"] = p.attribution
    d["kubernetes"] = p.kube if p.kube is not None else next(
        (x.kube for x in f.recs if x.kube), None)
    d["records"] = [{"action": x.action, "@timestamp": fmt_us(x.ts_us), "event.id": x.event_id}
                    for x in f.recs]
    return d


def answer_json(a: Answer) -> dict[str, Any]:
    """An answer as one JSON object (``--json``)."""
    d: dict[str, Any] = {"query": a.query.describe() if a.query else None,
                         "result": a.result, "exit_code": a.exit_code}
    if a.error:
        d["error"] = a.error
    d["reasons"] = a.reasons
    d["flows"] = [flow_json(f) for f in a.flows]
    d["gaps"] = [{"host": g.host, "start": fmt_us(g.start_us), "end": fmt_us(g.end_us),
                  "lost_events": g.lost, "resync": g.resync, "event.id": g.event_id}
                 for g in a.gaps]
    return d


def _pod_text(k: dict[str, Any] | None) -> str:
    if not k:
        return "no pod"
    pod = k.get("pod") or {}
    return f"{k.get('namespace')}/{pod.get('name')}"


def answer_text(a: Answer) -> str:
    """An answer as readable lines (without ``--json``)."""
    if a.query is None:
        return f"BAD INPUT  {a.error}"
    q = a.query.describe()
    head = (f"{a.result.upper().replace('_', ' ')}  {q['nat']} at {q['at']}"
            + (f" dst {q['dst']}" if "dst" in q else "") + (f" {q['proto']}" if "proto" in q
                                                            else "")
            + f" (window {q['window_s']:g}s)")
    if "line" in q:
        head = f"line {q['line']}: " + head
    out = [head]
    if a.error:
        out.append(f"  error       {a.error}")
    out.extend(f"  !           {r}" for r in a.reasons)
    for i, f in enumerate(a.flows, 1):
        d = flow_json(f)
        k = d["kubernetes"] or {}
        if len(a.flows) > 1:
            out.append(f"  candidate {i}")
        out.append(f"  pod         {_pod_text(k)}"
                   + (f" (uid {k['pod'].get('uid')})" if k.get("pod") else ""))
        owner = k.get("owner") or {}
        if owner:
            out.append(f"  owner       {owner.get('kind')}/{owner.get('name')}")
        if k.get("node"):
            out.append(f"  node        {k['node'].get('name')}")
        if k.get("labels"):
            out.append("  labels      " + ", ".join(f"{lk}={lv}"
                                                  for lk, lv in sorted(k["labels"].items())))
        out.append(f"  attribution {d['attribution']}")
        src, dst = d["source"], d["destination"]
        out.append(f"  flow        {d['transport']} {_fmt_ep(src['ip'], src['port'])}"
                   f" -> {_fmt_ep(dst['ip'], dst['port'])}"
                   f"  (host {d['host']}, conntrack id {d['conntrack_id']})")
        out.append(f"  start       {d['start'] or 'unknown, first seen ' + d['first_seen']}")
        out.append("  end         " + (d["end"] or (
            f"before {d['ended_before']} (a later flow reused the port)" if "ended_before" in d
            else "not in these records")))
        if "bytes" in d["source"]:
            out.append(f"  bytes       out {d['source']['bytes']} ({d['source']['packets']} "
                       f"packets), in {d['destination']['bytes']} "
                       f"({d['destination']['packets']} packets)")
        if "NAT_CLASH" in d["status"]:
            out.append("  status      NAT_CLASH")
    for g in a.gaps:
        out.append(f"  gap         {fmt_us(g.start_us)} .. {fmt_us(g.end_us)} on {g.host} "
                   f"(lost events: {g.lost}, resync: {g.resync})")
    return "\n".join(out)


# ---- the command ----------------------------------------------------------------


def run(queries: list[Query | LookupInputError], paths: list[str], *, as_json: bool,
        out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    """Answer every query with one pass over the files; print one answer per query.

    Returns the exit code: a single query's own code; for several, the worst
    one (2, then 3, then 1, then 0).
    """
    files = expand_paths(paths)
    good = [q for q in queries if isinstance(q, Query)]
    scan = Scanner(q.key for q in good).run(files) if good else Scan()
    for name, n in scan.malformed.items():
        print(f"flowlog-shipper lookup: warning: {name}: {n} line(s) that are not "
              "flow records were skipped", file=err)
    codes = set()
    for q in queries:
        a = (Answer(None, RESULT_BAD_INPUT, error=str(q)) if isinstance(q, LookupInputError)
             else answer(q, scan))
        codes.add(a.exit_code)
        if as_json:
            out.write(orjson.dumps(answer_json(a)).decode() + "\n")
        else:
            out.write(answer_text(a) + "\n")
    out.flush()
    return next(c for c in _SEVERITY if c in codes) if codes else EXIT_FOUND


def main(args: Any) -> int:
    """``flowlog-shipper lookup`` with parsed arguments (see ``cli.build_parser``)."""
    try:
        window = parse_window(args.window)
        if args.queries and (args.nat or args.at or args.dst or args.proto):
            raise LookupInputError("--queries cannot be combined with --nat/--at/--dst/--proto")
        if args.queries:
            queries = read_queries(Path(args.queries), window)
        elif args.nat and args.at:
            queries = [make_query(args.at, args.nat, args.dst, args.proto, window)]
        else:
            raise LookupInputError("give --nat IP:PORT and --at TIME, or --queries FILE")
        return run(queries, args.files, as_json=args.json)
    except LookupInputError as exc:
        print(f"flowlog-shipper lookup: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # e.g. piped into head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FOUND
