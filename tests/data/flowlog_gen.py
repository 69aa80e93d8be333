"""Generate realistic flow-record files for ``lookup`` tests and its benchmark.

Records are produced by the shipper's own encoders from ``FlowEvent`` values,
exactly as the pipeline would write them:

- file sink: ``JsonLineEncoder`` lines, rotated like the file sink
  (``flows.json``, ``flows.json.1``, ...) with older files gzip-compressed as
  logrotate's ``compress`` does;
- Fluent Bit ``file`` output, format ``plain``: the record the forward sink
  sends (``ecs.build_record`` packed by ``forward_format.encode_entry``),
  unpacked from msgpack and written as compact JSON, which is what
  ``plain_output`` -> ``flb_msgpack_to_json_str`` does (plugins/out_file/file.c);
  rotated files are named ``<file>.<YYYYMMDD_HHMMSS>_<8 hex>.gz`` like its
  ``rotate_gzip`` (plugins/out_file/file_rotate.c).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import orjson

from shipper import ecs
from shipper.ecs_json import JsonLineEncoder
from shipper.enrich.pods import pod_from_dict
from shipper.record import FlowEvent, PodMeta, parse_ip
from shipper.sinks.forward_format import encode_entry

S = 1_000_000_000
T0 = 1_795_766_400 * S  # 2026-11-27T08:00:00Z

# enum ip_conntrack_status bits (ecs.STATUS_BITS order)
CONFIRMED, SRC_NAT, SRC_NAT_DONE = 1 << 3, 1 << 4, 1 << 7
SEEN_REPLY, ASSURED, DYING, NAT_CLASH = 1 << 1, 1 << 2, 1 << 9, 1 << 12
_NEW_STATUS = CONFIRMED | SRC_NAT | SRC_NAT_DONE


def iso(ns: int) -> str:
    """RFC 3339 text of a time in ns (as the records write it)."""
    return ecs.rfc3339(ns)


def pod(name: str, ip: str, *, ns: str = "shop", app: str | None = None,
        node: str = "node-a", owner: str | None = None) -> PodMeta:
    """A pod as the inventory builds it (ReplicaSet owner reported as its Deployment)."""
    meta: dict[str, Any] = {"namespace": ns, "name": name, "uid": f"uid-{name}",
                            "labels": {"app": app or name.rsplit("-", 1)[0]}}
    if owner:
        meta["ownerReferences"] = [{"kind": "ReplicaSet", "name": f"{owner}-7d9f8b6c5d",
                                    "controller": True, "apiVersion": "apps/v1", "uid": "x"}]
    return pod_from_dict({"metadata": meta, "spec": {"nodeName": node},
                          "status": {"phase": "Running", "podIP": ip}})


@dataclass
class Flow:
    """One conntrack entry: a ``new`` at ``start_ns``, a ``destroy`` at ``end_ns`` (if any)."""

    host: str
    ct_id: int
    pod: PodMeta | None
    src: str
    sport: int
    nat: str
    nat_port: int
    dst: str
    dport: int
    start_ns: int
    end_ns: int | None = None
    proto: int = 6
    clash: bool = False
    bytes_out: int = 1200
    bytes_in: int = 5400
    attribution: str | None = None  # as the pipeline passes it (None: from ``pod``)
    # First seen in a table dump at this time (the shipper started after the flow);
    # with kernel_ts the dump carries the kernel's start timestamp, else it does not
    # (nf_conntrack_timestamp=0) and the pipeline's flow start is the dump time.
    snapshot_at: int | None = None
    kernel_ts: bool = True

    def events(self) -> list[tuple[FlowEvent, int]]:
        """The flow's events with the flow start the pipeline would pass."""
        fam, src = parse_ip(self.src)
        _, dst = parse_ip(self.dst)
        _, nat = parse_ip(self.nat)
        status = _NEW_STATUS | (NAT_CLASH if self.clash else 0)
        base: dict[str, Any] = dict(
            family=fam, proto=self.proto, orig_src=src, orig_dst=dst,
            orig_sport=self.sport, orig_dport=self.dport, reply_src=dst,
            reply_dst=nat, reply_sport=self.dport, reply_dport=self.nat_port,
            icmp_type=None, icmp_code=None, icmp_id=None, ct_id=self.ct_id,
            tcp_state=(1 if self.proto == 6 else None), mark=None, zone=None)
        kstart = self.start_ns if self.kernel_ts else None
        if self.snapshot_at is None:
            remembered = self.start_ns
            out = [(FlowEvent(action="new", status=status, timeout=120, orig_packets=None,
                              orig_bytes=None, reply_packets=None, reply_bytes=None,
                              ts_start=None, ts_stop=None, ts_event=self.start_ns,
                              received_ns=self.start_ns, **base), remembered)]
        else:
            remembered = kstart or self.snapshot_at
            out = [(FlowEvent(action="snapshot", status=status | SEEN_REPLY | ASSURED,
                              timeout=100, orig_packets=None, orig_bytes=None,
                              reply_packets=None, reply_bytes=None, ts_start=kstart,
                              ts_stop=None, ts_event=None, received_ns=self.snapshot_at,
                              **base), remembered)]
        if self.end_ns is not None:
            out.append((FlowEvent(
                action="destroy", status=status | SEEN_REPLY | ASSURED | DYING, timeout=0,
                orig_packets=self.bytes_out // 100, orig_bytes=self.bytes_out,
                reply_packets=self.bytes_in // 100, reply_bytes=self.bytes_in,
                ts_start=kstart, ts_stop=self.end_ns if self.kernel_ts else None,
                ts_event=self.end_ns, received_ns=self.end_ns,
                **{**base, "tcp_state": 8 if self.proto == 6 else None},
            ), remembered))
        return out


def file_sink_lines(flows: Iterable[Flow], gaps: Iterable[dict[str, Any]] = ()) -> list[bytes]:
    """NDJSON lines in time order, as the file sink writes them."""
    encoders: dict[str, JsonLineEncoder] = {}
    timed: list[tuple[int, bytes]] = []
    for f in flows:
        enc = encoders.setdefault(f.host, JsonLineEncoder(f.host))
        for ev, start in f.events():
            timed.append((ev.ts_event or ev.received_ns,
                          enc.encode(ev, f.pod, start, f.attribution)))
    for g in gaps:
        timed.append((ecs_time(g), orjson.dumps(g) + b"\n"))
    timed.sort(key=lambda t: t[0])
    return [line for _, line in timed]


def ecs_time(rec: dict[str, Any]) -> int:
    """A gap record's end time in ns (its @timestamp)."""
    from datetime import datetime

    dt = datetime.fromisoformat(rec["@timestamp"])
    return int(dt.timestamp()) * S + dt.microsecond * 1000


def gap(host: str, since_ns: int, until_ns: int, lost: int = 10) -> dict[str, Any]:
    """A gap record as the pipeline emits it."""
    return ecs.gap_record(host, since_ns=since_ns, until_ns=until_ns, lost=lost,
                          overruns=1, resync=True)


def fluent_bit_plain_lines(flows: Iterable[Flow],
                           gaps: Iterable[dict[str, Any]] = ()) -> list[bytes]:
    """The same records as Fluent Bit's ``file`` output writes them (format plain).

    Forward sink record -> msgpack entry -> Fluent Bit decodes it -> compact
    JSON of the record body, one per line.
    """
    timed: list[tuple[int, bytes]] = []
    for f in flows:
        for ev, start in f.events():
            rec = ecs.build_record(ev, f.pod, f.host, flow_start_ns=start,
                                   attribution=f.attribution)
            t = ev.ts_event or ev.received_ns
            timed.append((t, encode_entry(rec, t)))
    for g in gaps:
        timed.append((ecs_time(g), encode_entry(g, ecs_time(g))))
    timed.sort(key=lambda t: t[0])
    out = []
    for _, entry in timed:
        _time, body = msgpack.unpackb(entry, raw=False, strict_map_key=False)
        out.append(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
    return out


def write_file_sink(directory: Path, lines: list[bytes], *, files: int = 4,
                    gzip_from: int = 2, name: str = "flows.json") -> list[Path]:
    """Split lines over ``name``, ``name.1``, ... (oldest last); ``name.N`` with
    N >= ``gzip_from`` gzip-compressed (``name.N.gz``)."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(lines) // files)
    parts = [lines[i * per:(i + 1) * per] for i in range(files)]
    paths = []
    for age, part in enumerate(reversed(parts)):  # newest part -> name
        path = directory / (name if age == 0 else f"{name}.{age}")
        data = b"".join(part)
        if age >= gzip_from:
            path = path.with_name(path.name + ".gz")
            path.write_bytes(gzip.compress(data, compresslevel=6))
        else:
            path.write_bytes(data)
        paths.append(path)
    return paths


def write_fluent_bit(directory: Path, lines: list[bytes], *, files: int = 3,
                     name: str = "flowlog") -> list[Path]:
    """Split lines like Fluent Bit's file output with rotate and rotate_gzip on."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(lines) // files)
    parts = [lines[i * per:(i + 1) * per] for i in range(files)]
    paths = []
    for i, part in enumerate(parts):
        data = b"".join(part)
        if i == len(parts) - 1:
            path = directory / name
            path.write_bytes(data)
        else:
            path = directory / f"{name}.20261127_08{i:02d}00_{i:08x}.gz"
            path.write_bytes(gzip.compress(data))
        paths.append(path)
    return paths
