#!/usr/bin/env python3
"""Benchmark ``flowlog-shipper lookup`` against ``LC_ALL=C grep -F`` on ~1 GiB of records.

Generates realistic file-sink output (the shipper's own encoder, three nodes,
hundreds of labelled pods, NAT ports reused over hours, rotated files with the
older ones gzip-compressed), then measures, each ``--repeat`` times (median
reported):

- ``grep``: ``LC_ALL=C grep -F -c PORT`` on every plain file plus
  ``gzip -dc FILE | LC_ALL=C grep -F -c PORT`` on every ``.gz`` (``-c`` makes
  grep read everything, as lookup must);
- ``single``: ``python -m shipper lookup --nat IP:PORT --at T --json FILES``;
- ``batch``: ``--queries`` with ``--queries-n`` lines (default 10k) in one pass.

It also checks the batch answers against the generator's ground truth (the
pod that really held the port) and reports peak RSS of each lookup.

    python3 bench/bench_lookup.py                      # ~1 GiB in a temp dir
    python3 bench/bench_lookup.py --size-mib 256 --repeat 1 --json
    python3 bench/bench_lookup.py --dir /var/tmp/lk --keep   # reuse next time
"""

from __future__ import annotations

import argparse
import csv
import gzip
import heapq
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shipper.ecs import rfc3339  # noqa: E402
from shipper.ecs_json import JsonLineEncoder  # noqa: E402
from shipper.enrich.pods import pod_from_dict  # noqa: E402
from shipper.record import FlowEvent, PodMeta  # noqa: E402

S = 1_000_000_000
T0 = 1_795_766_400 * S  # 2026-11-27T08:00:00Z
NODES = [("node-a", 0xC6336401), ("node-b", 0xC6336402), ("node-c", 0xC6336403)]
STATUS_NEW = (1 << 3) | (1 << 4) | (1 << 7)
STATUS_END = STATUS_NEW | (1 << 1) | (1 << 2) | (1 << 9)


def _pods(n: int, rnd: random.Random) -> list[tuple[PodMeta, int]]:
    apps = ["checkout", "cart", "payments", "search", "recommendations", "auth", "mailer",
            "inventory", "shipping", "frontend", "ads", "reports"]
    out = []
    for i in range(n):
        app = apps[i % len(apps)]
        ip = (10 << 24) | (244 << 16) | (i // 250 << 8) | (i % 250 + 2)
        h = f"{rnd.getrandbits(40):010x}"
        meta = pod_from_dict({
            "metadata": {"namespace": f"team-{i % 7}", "name": f"{app}-{h}-{i:05x}",
                         "uid": f"{rnd.getrandbits(128):032x}",
                         "labels": {"app.kubernetes.io/name": app, "pod-template-hash": h,
                                    "app.kubernetes.io/version": f"1.{i % 9}.0",
                                    "team": f"team-{i % 7}", "tier": "backend"},
                         "ownerReferences": [{"kind": "ReplicaSet", "name": f"{app}-{h}",
                                              "controller": True, "apiVersion": "apps/v1",
                                              "uid": "x"}]},
            "spec": {"nodeName": NODES[i % 3][0]},
            "status": {"phase": "Running", "podIP": f"10.244.{i // 250}.{i % 250 + 2}"},
        })
        out.append((meta, ip))
    return out


def generate(directory: Path, size: int, files: int, gz_files: int, seed: int
             ) -> list[tuple[int, str, int, int, int, str]]:
    """Write the record files; return ground truth (start, node, nat ip, port, end, pod)."""
    rnd = random.Random(seed)
    pods = _pods(600, rnd)
    encs = {name: JsonLineEncoder(name) for name, _ in NODES}
    dsts = [(0xCB007100 | rnd.randrange(1, 255), rnd.choice([443, 443, 443, 80, 53, 5432]))
            for _ in range(400)]
    per_file = size // files
    idx = files - 1  # newest is flows.json; oldest flows.json.<files-1>
    path = directory / (f"flows.json.{idx}" if idx else "flows.json")
    out = open(path, "wb")  # noqa: SIM115
    written = total = 0
    pending: list[tuple[int, int, bytes]] = []
    truth = []
    t = T0
    ct = 1000
    busy: dict[tuple[int, int, int, int], int] = {}  # (node, port, dst, dport) -> end

    def emit(line: bytes) -> None:
        nonlocal out, written, total, idx, path
        out.write(line)
        written += len(line)
        total += len(line)
        if written >= per_file and idx > 0:
            out.close()
            idx -= 1
            path = directory / (f"flows.json.{idx}" if idx else "flows.json")
            out = open(path, "wb")  # noqa: SIM115
            written = 0

    seq = 0
    while total < size:
        t += rnd.randrange(1, 60_000_000)  # ~33 new flows/s per cluster on average
        while pending and pending[0][0] <= t:
            emit(heapq.heappop(pending)[2])
        meta, src = rnd.choice(pods)
        node = next(n for n in NODES if n[0] == meta.node)
        dst, dport = rnd.choice(dsts)
        proto = 17 if dport == 53 else 6
        sport = rnd.randrange(32768, 61000)
        port = sport
        while busy.get((node[1], port, dst, dport), 0) > t:
            port = rnd.randrange(32768, 61000)
        dur = int(rnd.expovariate(1 / 30) * S) + 1_000_000
        busy[(node[1], port, dst, dport)] = t + dur
        ct += 1
        base: dict[str, Any] = dict(
            family=4, proto=proto, orig_src=src, orig_dst=dst, orig_sport=sport,
            orig_dport=dport, reply_src=dst, reply_dst=node[1], reply_sport=dport,
            reply_dport=port, icmp_type=None, icmp_code=None, icmp_id=None,
            ct_id=ct, mark=None, zone=None)
        enc = encs[node[0]]
        emit(enc.encode(FlowEvent(action="new", status=STATUS_NEW,
                                  tcp_state=1 if proto == 6 else None, timeout=120,
                                  orig_packets=None, orig_bytes=None, reply_packets=None,
                                  reply_bytes=None, ts_start=None, ts_stop=None,
                                  ts_event=t, received_ns=t, **base), meta, t))
        b = rnd.randrange(100, 10_000_000)
        destroy = enc.encode(FlowEvent(action="destroy", status=STATUS_END,
                                       tcp_state=8 if proto == 6 else None, timeout=0,
                                       orig_packets=b // 900 + 1, orig_bytes=b // 7,
                                       reply_packets=b // 1400 + 1, reply_bytes=b,
                                       ts_start=t, ts_stop=t + dur, ts_event=t + dur,
                                       received_ns=t + dur, **base), meta, t)
        seq += 1
        heapq.heappush(pending, (t + dur, seq, destroy))
        truth.append((t, node[0], node[1], port, t + dur, meta.name))
    for _, _, line in sorted(pending):
        emit(line)
    out.close()
    for i in range(files - gz_files, files):  # the oldest, compressed as logrotate does
        p = directory / f"flows.json.{i}"
        with open(p, "rb") as src_f, gzip.open(str(p) + ".gz", "wb", compresslevel=6) as dst_f:
            shutil.copyfileobj(src_f, dst_f, 1 << 20)
        p.unlink()
    return truth


def _ip(n: int) -> str:
    return ".".join(str(n >> s & 255) for s in (24, 16, 8, 0))


def _wait(cmd: list[str] | str, shell: bool = False) -> tuple[float, int | None, int, str]:
    """Run to completion; return wall seconds, peak RSS KiB (GNU time), exit code, stdout.

    Peak RSS comes from /usr/bin/time when present: the rusage of a forked
    child would include this process's own pages (the ground truth list).
    """
    rss_file = None
    if not shell and os.path.exists("/usr/bin/time"):
        fd, rss_file = tempfile.mkstemp()
        os.close(fd)
        cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file, *cmd]
    t = time.perf_counter()
    p = subprocess.run(cmd, shell=shell, stdout=subprocess.PIPE, text=True, check=False,
                       env={**os.environ, "LC_ALL": "C", "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    rss = None
    if rss_file:
        text = Path(rss_file).read_text().split()
        rss = int(text[-1]) if text else None
        os.unlink(rss_file)
    return wall, rss, p.returncode, p.stdout


def _peak(runs: list[tuple[float, int | None]]) -> int | None:
    rss = [x[1] for x in runs if x[1] is not None]
    return max(rss) // 1024 if rss else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="Where the records go (reused if it holds them already).")
    ap.add_argument("--size-mib", type=int, default=1024, help="Uncompressed size (MiB).")
    ap.add_argument("--files", type=int, default=8, help="Files (rotation count).")
    ap.add_argument("--gzip-files", type=int, default=4, help="How many oldest are .gz.")
    ap.add_argument("--queries-n", type=int, default=10_000)
    ap.add_argument("--window", default="1m")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--keep", action="store_true", help="Keep a temp --dir.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = None
    if args.dir:
        d = Path(args.dir)
        d.mkdir(parents=True, exist_ok=True)
    else:
        d = Path(tmp := tempfile.mkdtemp(prefix="bench-lookup-"))
    rec_dir = d / "records"
    truth_file = d / "truth.json"
    try:
        if not truth_file.exists():
            rec_dir.mkdir(exist_ok=True)
            t = time.perf_counter()
            truth = generate(rec_dir, args.size_mib << 20, args.files, args.gzip_files,
                             args.seed)
            truth_file.write_text(json.dumps(truth))
            print(f"generated {args.size_mib} MiB in {time.perf_counter() - t:.0f}s",
                  file=sys.stderr)
        truth = [tuple(x) for x in json.loads(truth_file.read_text())]
        files = sorted(rec_dir.iterdir())
        plain_bytes = sum(p.stat().st_size for p in files if not p.name.endswith(".gz"))
        gz_bytes = sum(p.stat().st_size for p in files if p.name.endswith(".gz"))
        rnd = random.Random(args.seed + 1)
        flow = rnd.choice(truth)
        at = (flow[0] + flow[4]) // 2
        port = str(flow[3])
        grep_cmd = " ; ".join(
            (f"gzip -dc {p} | LC_ALL=C grep -F -c -- {port}" if p.name.endswith(".gz")
             else f"LC_ALL=C grep -F -c -- {port} {p}") for p in files)
        single_cmd = [sys.executable, "-m", "shipper", "lookup", "--nat",
                      f"{_ip(flow[2])}:{port}", "--at", rfc3339(at), "--window", args.window,
                      "--json", str(rec_dir)]
        queries = []
        for _ in range(args.queries_n):
            f = rnd.choice(truth)
            queries.append((rfc3339(f[0] + (f[4] - f[0]) * rnd.randrange(1, 100) // 100),
                            f"{_ip(f[2])}:{f[3]}", f[5]))
        qfile = d / "queries.csv"
        with open(qfile, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["time", "nat"])
            w.writerows(q[:2] for q in queries)
        batch_cmd = [sys.executable, "-m", "shipper", "lookup", "--queries", str(qfile),
                     "--window", args.window, "--json", str(rec_dir)]
        _wait(grep_cmd, shell=True)  # warm the page cache
        res: dict[str, list[tuple[float, int | None]]] = {"grep": [], "single": [], "batch": []}
        batch_out = ""
        single_out = ""
        for _ in range(args.repeat):
            s, rss, _, _ = _wait(grep_cmd, shell=True)
            res["grep"].append((s, rss))
            s, rss, code, single_out = _wait(single_cmd)
            assert code in (0, 3), (code, single_out)
            res["single"].append((s, rss))
            s, rss, code, batch_out = _wait(batch_cmd)
            res["batch"].append((s, rss))
        answers = [json.loads(x) for x in batch_out.splitlines()]
        counts: dict[str, int] = {}
        wrong = 0
        for q, a in zip(queries, answers, strict=True):
            counts[a["result"]] = counts.get(a["result"], 0) + 1
            if a["result"] == "not_found":
                wrong += 1
            if a["result"] == "found" and a["flows"][0]["kubernetes"]["pod"]["name"] != q[2]:
                wrong += 1
            if a["result"] == "ambiguous" and q[2] not in {
                    (f["kubernetes"] or {}).get("pod", {}).get("name") for f in a["flows"]}:
                wrong += 1
        med = {k: statistics.median(x[0] for x in v) for k, v in res.items()}
        report: dict[str, Any] = {
            "records_mib_uncompressed": args.size_mib, "files": len(files),
            "plain_bytes": plain_bytes, "gz_bytes": gz_bytes, "flows": len(truth),
            "lines": 2 * len(truth), "repeat": args.repeat, "window": args.window,
            "grep_s": round(med["grep"], 2), "single_s": round(med["single"], 2),
            "batch_s": round(med["batch"], 2), "queries": len(queries),
            "single_over_grep": round(med["single"] / med["grep"], 2),
            "batch_over_single": round(med["batch"] / med["single"], 2),
            "single_peak_rss_mib": _peak(res["single"]),
            "batch_peak_rss_mib": _peak(res["batch"]),
            "all_runs_s": {k: [round(x[0], 2) for x in v] for k, v in res.items()},
            "batch_results": counts, "batch_wrong_pod": wrong,
            "single_result": json.loads(single_out)["result"],
        }
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for k, v in report.items():
                print(f"{k:28} {v}")
        return 1 if wrong else 0
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
