"""The pod index's history on disk, so a restart keeps it (the state file).

Without it a restarted shipper knows only the pods that exist now. A flow
that outlived its pod (the conntrack table keeps it for up to days) whose
address went to a new pod while the shipper was down would then be given to
the new pod. With it, the index starts from what it knew when it stopped: the
live pods with their creation times and the tombstones of deleted ones.

File ``<state_dir>/pod-index.state``, written whole each time::

    header  8s magic b"FLOWLOGS", u32 format version, u64 payload length,
            u32 CRC-32 of the payload (big-endian, 24 bytes)
    payload msgpack map (see ``_encode``): node name, write time, a string
            table, a label-map table, the distinct ``ip_sources`` tuples and
            each pod's, the live pods, the pods (flat), every address's
            intervals referring to pods by index, and the missed-deletion
            handover windows (where a flow is uncertain)

Pods are written once however many intervals name them, and equal
label/annotation maps once, so loading rebuilds the sharing the index has in
memory (``PodMeta.with_record_object`` interns the rest; record objects are
built on a pod's first record). A pod that is not live is restored as the
:class:`~shipper.record.PodTombstone` the index kept (tombstones are written
like pods, without a creation time).

Format version 1 throughout: ``source_sets`` and ``pod_sources`` (the
``ip_sources``) were added later, with ``live`` moved before ``pods``. A
reader skips keys it does not know, so older shippers read these files (their
pods lose ``ip_sources``, as before); a file without them loads with no
``ip_sources``, and one with ``live`` after ``pods`` makes the tombstones when
it reaches ``addrs``.

Writes are atomic: temp file, fsync, rename, fsync of the directory; a crash
leaves the old file or the new one. The CPU work (serialising) runs outside
the index's writer lock: :meth:`PodIndex.snapshot` only copies two dicts
under it. :class:`StateSaver` writes periodically from its own thread, never
from the event thread.

A file that is truncated, fails its CRC, cannot be decoded, has another
format version, or was written for another node is logged, counted in
``shipper_state_load_errors_total{reason}`` and ignored: the shipper starts
without history, as on a first start (records then say ``uncertain`` where
the history would have decided).

msgpack rather than JSON: addresses and times are integers and IPv6 addresses
raw 16-byte strings, which JSON can only carry as text.
"""

from __future__ import annotations

import gc
import logging
import os
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import msgpack

from shipper.enrich.pod_index import Flat, Handovers, PodIndex
from shipper.metrics import Metrics
from shipper.record import (
    _EMPTY,
    _V6_TAG,
    IndexedPod,
    PodMeta,
    PodTombstone,
    _shared_map,
    _shared_tuple,
)

log = logging.getLogger("shipper.state")

FILE_NAME = "pod-index.state"
MAGIC = b"FLOWLOGS"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sIQI")

REASON_TRUNCATED = "truncated"
REASON_CORRUPT = "corrupt"
REASON_VERSION = "version"
REASON_FOREIGN_NODE = "foreign_node"
REASON_UNREADABLE = "unreadable"

# Pod fields in the flat pod table, in this order.
_POD_FIELDS = 13


class StateError(Exception):
    """A state file that cannot be used; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---- encoding (pure) ---------------------------------------------------------------


def _encode(
    hist: dict[int, Flat],
    live: dict[str, PodMeta],
    *,
    node: str,
    written_ns: int,
    horizon_ns: int,
    handovers: Handovers | None = None,
) -> bytes:
    """The payload for a snapshot; closed intervals ended before ``horizon_ns`` are left
    out, and so are handover windows that ended before it."""
    strings: dict[str | None, int] = {None: 0}
    maps: dict[int, int] = {}
    map_list: list[list[str]] = []
    pod_idx: dict[int, int] = {}
    pods: list[Any] = []
    # Each pod's ip_sources as an index into source_sets (0: none).
    source_sets: dict[tuple[str, ...], int] = {(): 0}
    pod_sources: list[int] = []

    def s(text: str | None) -> int:
        i = strings.get(text)
        if i is None:
            i = strings[text] = len(strings)
        return i

    def m(d: dict[str, str]) -> int:
        if not d:
            return -1
        i = maps.get(id(d))
        if i is None:
            i = maps[id(d)] = len(map_list)
            flat: list[str] = []
            for k, v in d.items():
                flat.append(k)
                flat.append(v)
            map_list.append(flat)
        return i

    def p(meta: IndexedPod) -> int:
        i = pod_idx.get(id(meta))
        if i is None:
            i = pod_idx[id(meta)] = len(pod_idx)
            ips: list[Any] = []
            for fam, ip in meta.ips:
                ips.append(fam)
                ips.append(ip if fam == 4 else ip.to_bytes(16, "big"))
            pods.extend((
                s(meta.namespace), meta.name, meta.uid, ips, s(meta.node), m(meta.labels),
                m(meta.annotations), s(meta.owner_kind), s(meta.owner_name),
                s(meta.logical_switch), meta.host_network, s(meta.phase), meta.created_ns,
            ))
            sources = meta.ip_sources
            j = source_sets.get(sources)
            if j is None:
                j = source_sets[sources] = len(source_sets)
            pod_sources.append(j)
        return i

    addrs: list[Any] = []
    for key, flat in hist.items():
        # Oldest first in the file (the index keeps them newest first).
        kept = [i for i in range(len(flat) - 3, -1, -3)
                if flat[i + 1] is None or flat[i + 1] >= horizon_ns]
        if not kept:
            continue
        addrs.append(key if key < _V6_TAG else (key ^ _V6_TAG).to_bytes(16, "big"))
        addrs.append(len(kept))
        for i in kept:
            addrs.append(flat[i])
            addrs.append(flat[i + 1])
            addrs.append(p(flat[i + 2]))
    windows: list[Any] = []
    for key, ws in (handovers or {}).items():
        kept_ws = [w for w in ws if w[1] >= horizon_ns]
        if kept_ws and key in hist:
            windows.append(key if key < _V6_TAG else (key ^ _V6_TAG).to_bytes(16, "big"))
            windows.append([x for w in kept_ws for x in w])
    live_idx = [p(meta) for meta in live.values()]
    source_list = [[s(x) for x in t] for t in source_sets]  # before the string table
    string_list: list[str | None] = [None] * len(strings)
    for text, i in strings.items():
        string_list[i] = text
    return msgpack.packb({
        "node": node,
        "written_ns": written_ns,
        "strings": string_list,
        "maps": map_list,
        # Added after format version 1 was first written: older readers skip
        # keys they do not know, and a file without them has no ip_sources.
        "source_sets": source_list,
        "pod_sources": pod_sources,
        # Before "pods" (since ip_sources were added; older files have it after):
        # a reader can then make deleted pods' tombstones as it reads them.
        "live": live_idx,
        "pods": pods,
        "addrs": addrs,
        # Added after format version 1 was first written (older readers skip it): the
        # missed-deletion handover windows, [address, [from, until, ...], ...].
        "handovers": windows,
    }, use_bin_type=True)


def _decode(
    payload: bytes | memoryview,
) -> tuple[str, int, dict[int, Flat], dict[str, PodMeta], Handovers]:
    """``(node, written_ns, hist, live, handovers)`` from a payload; raises
    StateError("corrupt"). A file written before handover windows were saved has none.

    Streamed (msgpack ``Unpacker``, one value at a time) rather than decoded
    whole: the whole document held every pod's and interval's transient
    values (address lists, indexes, duplicate integers) at once, interleaved in
    memory with the strings the index keeps, and left the restored index about
    half as large again in RSS as the live one it was saved from.
    """
    try:
        # Read in chunks from the payload (feeding it whole would copy it all).
        up = msgpack.Unpacker(_Chunks(payload), raw=False, strict_map_key=True,
                              max_buffer_size=max(len(payload), 1))
        doc: dict[str, Any] = {}
        metas: list[IndexedPod] = []
        hist: dict[int, Flat] = {}
        # Equal values decoded once each, as the live index shares them: the
        # addresses of pods that had the same address (PodIndex._share_ips),
        # and interval bounds (one pod's end is often the next one's start).
        shared_ns: dict[int, int] = {}
        for _ in range(up.read_map_header()):
            name = up.unpack()
            if name == "pods":  # after "strings" and "maps", as _encode writes them
                sets = _source_sets(doc.get("source_sets", ()), doc["strings"])
                live_rows = set(doc["live"]) if "live" in doc else None
                metas = _decode_pods(up, doc["strings"], doc["maps"], shared_ns,
                                     [sets[j] for j in doc.get("pod_sources", ())], live_rows)
            elif name == "addrs":  # after "pods" and "live"
                if "live" not in doc:
                    raise ValueError("addresses before the live pods")
                # A pod that is not live is gone: its intervals keep its tombstone,
                # as they did in the index that wrote the file (a file with "live"
                # after "pods" leaves this to here).
                live_rows = set(doc["live"])
                for i, m in enumerate(metas):
                    if i not in live_rows and isinstance(m, PodMeta):
                        metas[i] = PodTombstone(m)
                hist = _decode_addrs(up, metas, shared_ns)
            elif name == "strings":
                # Interned and shared as the pod sources do (record._shared_map), so
                # pods added after the restart share these objects too.
                doc[name] = [sys.intern(t) if isinstance(t, str) else t for t in up.unpack()]
            elif name == "maps":
                maps: list[dict[str, str]] = []
                for flat in up.unpack():
                    it = iter(flat)
                    maps.append(_shared_map(dict(zip(it, it, strict=True))))
                doc[name] = maps
            else:
                doc[name] = up.unpack()
        if up.tell() != len(payload):
            raise ValueError(f"{len(payload) - up.tell()} bytes after the payload's map")
        node = doc["node"]
        written_ns = doc["written_ns"]
        live: dict[str, PodMeta] = {}
        for pi in doc["live"]:
            m = metas[pi]
            if not isinstance(m, PodMeta):
                raise ValueError("a live pod is a tombstone")
            live[m.uid] = m
        if not isinstance(node, str) or not isinstance(written_ns, int):
            raise ValueError("node/written_ns")
        handovers = _decode_handovers(doc.get("handovers", []))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError,
            msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise StateError(REASON_CORRUPT, f"state payload cannot be decoded: {exc}") from exc
    return node, written_ns, hist, live, handovers


def _decode_handovers(flat: Any) -> Handovers:
    """The handover windows ``[address, [from, until, ...], ...]``; ValueError if malformed."""
    if not isinstance(flat, list) or len(flat) % 2:
        raise ValueError("handover table is not address/window pairs")
    out: Handovers = {}
    for addr, bounds in zip(flat[::2], flat[1::2], strict=True):
        if isinstance(addr, int):
            key = addr
        elif isinstance(addr, bytes) and len(addr) == 16:
            key = int.from_bytes(addr, "big") | _V6_TAG
        else:
            raise ValueError("handover address is neither IPv4 nor IPv6")
        if (not isinstance(bounds, list) or not bounds or len(bounds) % 2
                or not all(isinstance(x, int) for x in bounds)):
            raise ValueError("handover window bounds are not integer pairs")
        ws = tuple(zip(bounds[::2], bounds[1::2], strict=True))
        if any(lo >= hi for lo, hi in ws):
            raise ValueError("handover window ends before it starts")
        out[key] = ws
    return out


class _Chunks:
    """A read-only file over a payload's bytes (for ``msgpack.Unpacker``), without copying it."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else self._pos + n
        chunk = bytes(self._view[self._pos:end])
        self._pos += len(chunk)
        return chunk


def _source_sets(sets: list[list[int]], strings: list[str | None]) -> list[tuple[str, ...]]:
    """The distinct ip_sources tuples (string-table indexes in the file), shared."""
    out: list[tuple[str, ...]] = []
    for t in sets:
        texts = tuple(strings[x] for x in t)
        if not all(isinstance(x, str) for x in texts):
            raise ValueError("an ip_source is not a string")
        out.append(_shared_tuple(texts) if texts else ())  # type: ignore[arg-type]
    return out


def _decode_pods(
    up: msgpack.Unpacker, strings: list[str | None], maps: list[dict[str, str]],
    shared_ns: dict[int, int], ip_sources: list[tuple[str, ...]], live: set[int] | None,
) -> list[IndexedPod]:
    """The flat pod table, one field at a time; raises ValueError on a malformed row.

    ``ip_sources``: each pod's, by its row (empty: a file written without them).
    ``live``: the rows of live pods, if known yet; the others are made
    :class:`PodTombstone` here, without a PodMeta first (fewer transient
    objects, less time).
    """
    n = up.read_array_header()
    if n % _POD_FIELDS:
        raise ValueError("pod table length is not a multiple of its row")
    unpack = up.unpack
    metas: list[IndexedPod] = []
    if ip_sources and len(ip_sources) != n // _POD_FIELDS:
        raise ValueError("pod_sources and the pod table differ in length")
    shared_ips: dict[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]] = {}
    for _ in range(n // _POD_FIELDS):
        (ns, name, uid, ips_flat, node_s, labels_m, ann_m, okind, oname, ls, hostnet,
         phase, created) = [unpack() for _ in range(_POD_FIELDS)]
        if not isinstance(name, str) or not isinstance(uid, str):
            raise ValueError("pod name/uid is not a string")
        ips = []
        for j in range(0, len(ips_flat), 2):
            fam, ip = ips_flat[j], ips_flat[j + 1]
            if fam == 4:
                if not isinstance(ip, int):
                    raise ValueError("IPv4 address is not an integer")
                # One int per address, as in the index (also the history's key).
                ips.append((4, shared_ns.setdefault(ip, ip)))
            elif fam == 6:
                ips.append((6, int.from_bytes(ip, "big")))
            else:
                raise ValueError(f"address family {fam!r}")
        ips_t = tuple(ips)
        dead = live is not None and len(metas) not in live
        if not dead or len(ips_t) > 1:  # a tombstone keeps one address as an int
            ips_t = shared_ips.setdefault(ips_t, ips_t)
        if created is not None and not dead:  # a tombstone does not keep it
            created = shared_ns.setdefault(created, created)
        # Record objects are built on the pod's first record (PodMeta.kubernetes_for).
        if dead:
            metas.append(PodTombstone.of(
                strings[ns], name, uid, ips_t, strings[node_s],
                maps[labels_m] if labels_m >= 0 else _EMPTY,
                maps[ann_m] if ann_m >= 0 else _EMPTY, strings[okind], strings[oname],
                strings[ls], bool(hostnet), strings[phase],
                ip_sources[len(metas)] if ip_sources else ()))
            continue
        metas.append(PodMeta(
            namespace=strings[ns], name=name, uid=uid, ips=ips_t,
            node=strings[node_s], labels=maps[labels_m] if labels_m >= 0 else _EMPTY,
            annotations=maps[ann_m] if ann_m >= 0 else _EMPTY,
            owner_kind=strings[okind], owner_name=strings[oname],
            logical_switch=strings[ls], host_network=bool(hostnet), phase=strings[phase],
            created_ns=created,
            ip_sources=ip_sources[len(metas)] if ip_sources else (),
        ))
    return metas


def _decode_addrs(
    up: msgpack.Unpacker, metas: list[IndexedPod], shared_ns: dict[int, int]
) -> dict[int, Flat]:
    """Every address's intervals (oldest first in the file, newest first in the index)."""
    unpack = up.unpack
    hist: dict[int, Flat] = {}
    left = up.read_array_header()
    while left > 0:
        addr, n = unpack(), unpack()
        left -= 2 + 3 * n
        if left < 0:
            raise ValueError("address table ends inside an address")
        key = (shared_ns.setdefault(addr, addr) if isinstance(addr, int)
               else int.from_bytes(addr, "big") | _V6_TAG)
        ivs: list[Any] = []
        for _ in range(n):
            start, end, pi = unpack(), unpack(), unpack()
            if not isinstance(start, int) or not (end is None or isinstance(end, int)):
                raise ValueError("interval bounds are not integers")
            start = shared_ns.setdefault(start, start)
            if end is not None:
                end = shared_ns.setdefault(end, end)
            ivs[:0] = (start, end, metas[pi])  # the index keeps them newest first
        if ivs:  # an address with no interval left would have no history at all
            hist[key] = tuple(ivs)
    return hist


def pack(payload: bytes) -> bytes:
    """Header + payload: the bytes of a state file."""
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload)) + payload


def unpack(data: bytes | memoryview) -> bytes | memoryview:
    """The payload of a state file's bytes; raises StateError naming what is wrong."""
    if len(data) < _HEADER.size:
        if MAGIC.startswith(data[:len(MAGIC)]):
            raise StateError(REASON_TRUNCATED, f"state file is {len(data)} bytes: "
                             "shorter than its header")
        raise StateError(REASON_CORRUPT, "not a state file (bad magic)")
    magic, version, length, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError(REASON_CORRUPT, "not a state file (bad magic)")
    if version != FORMAT_VERSION:
        raise StateError(REASON_VERSION, f"state file format version {version}, "
                         f"this shipper reads {FORMAT_VERSION}")
    payload = data[_HEADER.size:]
    if len(payload) < length:
        raise StateError(REASON_TRUNCATED, f"state file truncated: {len(payload)} of "
                         f"{length} payload bytes")
    if len(payload) > length:
        raise StateError(REASON_CORRUPT, f"state file has {len(payload) - length} bytes "
                         "after its payload")
    if zlib.crc32(payload) != crc:
        raise StateError(REASON_CORRUPT, "state file CRC mismatch")
    return payload


# ---- the file -----------------------------------------------------------------------


class StateFile:
    """Loads the pod index from, and saves it to, ``<directory>/pod-index.state``."""

    def __init__(self, directory: Path, node: str, metrics: Metrics) -> None:
        self.path = Path(directory) / FILE_NAME
        self.node = node
        self.metrics = metrics
        self._lock = threading.Lock()  # one save at a time (periodic vs. shutdown)

    def load(self, index: PodIndex, now_ns: int | None = None) -> bool:
        """Restore ``index`` from the file; False (logged, counted) if there is none to use.

        Never raises for a bad or missing file: the shipper then starts without
        history. Call before any pod source writes to ``index``.
        """
        now_ns = time.time_ns() if now_ns is None else now_ns
        started = time.monotonic()
        try:
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                log.info("no state file: starting without pod history",
                         extra={"fields": {"path": str(self.path)}})
                return False
            except OSError as exc:
                raise StateError(REASON_UNREADABLE, f"cannot read: {exc}") from exc
            # Hundreds of thousands of new containers: without the collector
            # (nothing here makes cycles) decoding takes about 40 % less time.
            gc_on = gc.isenabled()
            gc.disable()
            try:
                # A view, not a copy: the file can be tens of MiB.
                node, written_ns, hist, live, handovers = _decode(unpack(memoryview(data)))
                if node != self.node:
                    raise StateError(REASON_FOREIGN_NODE,
                                     f"written for node {node!r}, this is {self.node!r}")
                kept = index.restore(hist, live, min(written_ns, now_ns), now_ns, handovers)
            finally:
                if gc_on:
                    gc.enable()
        except StateError as exc:
            self.metrics.inc("shipper_state_load_errors_total", exc.reason)
            log.error("state file ignored: starting without pod history",
                      extra={"fields": {"path": str(self.path), "reason": exc.reason,
                                        "error": str(exc)}})
            return False
        log.info("pod history restored from the state file", extra={"fields": {
            "path": str(self.path), "live_pods": len(live), "intervals": kept,
            "written_s_ago": round((now_ns - written_ns) / 1e9, 1),
            "seconds": round(time.monotonic() - started, 3)}})
        return True

    def save(self, index: PodIndex, now_ns: int | None = None) -> bool:
        """Write the index's history atomically; False (logged, counted) on failure."""
        with self._lock:
            started = time.monotonic()
            now_ns = time.time_ns() if now_ns is None else now_ns
            hist, live, handovers = index.snapshot()
            data = pack(_encode(hist, live, node=self.node, written_ns=now_ns,
                                horizon_ns=now_ns - index.retention_ns, handovers=handovers))
            try:
                self._write(data)
            except OSError as exc:
                self.metrics.inc("shipper_state_saves_total", "error")
                log.error("state file not written", extra={"fields": {
                    "path": str(self.path), "error": str(exc)}})
                return False
            seconds = time.monotonic() - started
            self.metrics.inc("shipper_state_saves_total", "ok")
            self.metrics.set("shipper_state_bytes", len(data))
            self.metrics.set("shipper_state_save_seconds", seconds)
            log.debug("state file written", extra={"fields": {
                "path": str(self.path), "bytes": len(data), "seconds": round(seconds, 3)}})
            return True

    def _write(self, data: bytes) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class StateSaver:
    """Saves the state file every ``interval_s`` from its own thread, and once at :meth:`stop`."""

    def __init__(self, state: StateFile, index: PodIndex, interval_s: float) -> None:
        self.state = state
        self.index = index
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the periodic writer."""
        self._thread = threading.Thread(target=self._run, name="state-saver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.state.save(self.index)
            except Exception as exc:  # a bug here must not end periodic saving
                self.state.metrics.inc("shipper_errors_total", "state", type(exc).__name__)
                log.exception("state file save failed")

    def stop(self) -> bool:
        """Stop the writer and save one last time; return whether that save worked."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.state.save(self.index)
