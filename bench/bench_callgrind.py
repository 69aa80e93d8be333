#!/usr/bin/env python3
"""Instructions per event of the event path, by stage, on a capture of real kernel events.

CPU time per event on a shared machine moves by tens of percent between runs; the
number of instructions executed hardly moves (repeated runs agree within about
0.1 %). This script counts them with valgrind's callgrind, so a change to the hot
path can be judged on a noisy machine. Two steps::

    # 1. as root: capture real NEW and DESTROY events of distinct UDP flows through the
    #    lab's MASQUERADE gateway (plus the lab's pods, for the inventory file)
    python3 bench/bench_callgrind.py capture --out /tmp/flows.cap --rate 10000 --duration 5

    # 2. count: each stage in its own valgrind run (about 15 s per 10,000 events)
    python3 bench/bench_callgrind.py run --capture /tmp/flows.cap --limit 10000 --new-only
    python3 bench/bench_callgrind.py run --capture /tmp/flows.cap --limit 10000 --destroy-only
    python3 bench/bench_callgrind.py run --capture /tmp/flows.cap --stages 3 --json

    # or time them: CPU µs per event of each stage, median of --rounds fresh processes
    python3 bench/bench_callgrind.py cpu --capture /tmp/flows.cap --rounds 5

Stages (each includes the ones before it): 0 the receive loop and decode
(``ConntrackSource.read_burst`` with ``LayoutDecoder``) fed by a stand-in socket; 1 +
``Pipeline.handle`` without the output (filter, flow-start cache, pod attribution); 2 +
the NDJSON encoder (no batching); 3 everything: batching and the ``file`` sink's
delivery thread writing to a temp dir. The stand-in (``bench/replay_socket.py``) copies
each datagram into the source's receive buffer from ``recv_into``, a Python call per
datagram instead of a system call; the kernel's side (receive, wake-ups) is not
counted: that is ``bench_events.py``'s job.

Counting is switched on by callgrind client requests just before the replay loop and
off after delivery closed (``--instr-atstart=no``), from a tiny shared library this
script compiles at first use (needs ``gcc`` and valgrind's headers: Debian packages
``gcc`` and ``valgrind``); every thread is counted, the delivery thread included. The
pod inventory is loaded (and waited for) before counting starts. Without valgrind
the ``replay`` step runs too, and prints CPU µs per event instead (noisy).

Not a test: nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = {0: "receive loop + decode", 1: "+ filter, flow starts, attribution",
          2: "+ NDJSON encoding", 3: "+ batching, file delivery"}
_SHIM = r"""
#include <valgrind/callgrind.h>
void flowlog_cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void flowlog_cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("replay"); }
"""
_LEN = struct.Struct("=I")
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_DELETE = 2


# ----------------------------------------------------------------- capture
def capture(args: argparse.Namespace) -> int:
    """Record the gateway's event datagrams during a UDP flood, and the lab's pods."""
    import select

    from shipper.lab import Lab
    from shipper.sources import conntrack

    out = Path(args.out)
    msgs: list[bytes] = []
    with Lab(pods=1) as lab:
        gw = lab.gw
        for key, value in (("events", 1), ("acct", 1), ("timestamp", 1),
                           ("udp_timeout", 1)):
            lab.set_sysctl(gw, f"net.netfilter.nf_conntrack_{key}", value)
        sock = conntrack.open_event_socket(gw, ["new", "destroy"], 64 << 20)
        try:
            lab.write_pod_list(Path(str(out) + ".pods.json"))
            flood = lab.start_udp_flood(0, args.rate, args.duration, sockets=64)
            buf = bytearray(1 << 16)
            assert isinstance(sock, socket.socket)  # not the reliable-DESTROY pair
            sock.setblocking(False)
            want = int(args.rate * args.duration) * 2 * 0.95
            deadline = time.monotonic() + args.duration + args.destroy_wait
            quiet_since: float | None = None
            while time.monotonic() < deadline:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    now = time.monotonic()
                    if len(msgs) >= want:
                        quiet_since = quiet_since or now
                        if now - quiet_since > 3:
                            break
                    select.select([sock], [], [], 0.2)
                    continue
                msgs.append(bytes(buf[:n]))
                quiet_since = None
            sent = flood.wait().sent
        finally:
            sock.close()
    with out.open("wb") as f:
        for m in msgs:
            f.write(_LEN.pack(len(m)))
            f.write(m)
    print(f"{len(msgs)} datagrams of {sent} flows written to {out} (pods: {out}.pods.json)")
    return 0


def read_capture(path: Path) -> list[bytes]:
    """The datagrams of a capture file (length-prefixed, host order)."""
    data = path.read_bytes()
    out, off = [], 0
    while off < len(data):
        (n,) = _LEN.unpack_from(data, off)
        out.append(data[off + 4:off + 4 + n])
        off += 4 + n
    return out


# ----------------------------------------------------------------- replay
def _shim(workdir: Path) -> ctypes.CDLL | None:
    """The client-request library (None without gcc or valgrind's headers)."""
    src, lib = workdir / "cgshim.c", workdir / "libcgshim.so"
    if not lib.exists():
        src.write_text(_SHIM)
        res = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"cannot build the callgrind shim: {res.stderr.strip()}", file=sys.stderr)
            return None
    return ctypes.CDLL(str(lib))


def replay(args: argparse.Namespace) -> int:
    """Replay the capture through the real Pipeline up to ``--stage`` (run under callgrind)."""
    from replay_socket import count_events
    from replay_socket import replay as replay_datagrams

    from shipper.config import load
    from shipper.metrics import Metrics
    from shipper.pipeline import Pipeline

    cap = Path(args.capture)
    dgrams = read_capture(cap)
    if args.new_only:  # the low byte of nlmsg_type: IPCTNL_MSG_CT_NEW
        dgrams = [d for d in dgrams if d[4] == IPCTNL_MSG_CT_NEW]
    elif args.destroy_only:  # IPCTNL_MSG_CT_DELETE
        dgrams = [d for d in dgrams if d[4] == IPCTNL_MSG_CT_DELETE]
    dgrams = dgrams[:args.limit or None]
    workdir = Path(args.workdir)
    out = workdir / "out" / "flows.json"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    shim = _shim(workdir)
    cfg = load(None, {"filter.pod_cidrs": ["10.244.0.0/24", "fd00:10:244::/64"],
                      "filter.cluster_cidrs": ["10.244.0.0/24", "fd00:10:244::/64"],
                      "sink.type": "file", "sink.file.path": str(out),
                      "sink.file.max_bytes": 10**11, "state_dir": None,
                      "inventory.pods_file": str(cap) + ".pods.json", "metrics.address": None,
                      "conntrack.events": ["new", "destroy"]})
    p = Pipeline(cfg, Metrics())
    p.delivery.start()
    p.starts.size(True, 262144)
    stop = threading.Event()
    p.pods.start(p.wait.states, stop)
    deadline = time.monotonic() + 60
    while p.index.live_pods() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the inventory loads on its thread: before counting starts
    p.wait.tick(time.time_ns(), time.monotonic())
    handle = p.handle
    if args.stage == 0:
        handle = _ignore  # type: ignore[assignment]
    elif args.stage == 1:
        p.out.record = _ignore  # type: ignore[method-assign,assignment]
    elif args.stage == 2:
        p.out.batcher.add = lambda *a: ()  # type: ignore[method-assign]
    events = count_events(dgrams)
    if shim is not None:
        shim.flowlog_cg_start()
    cpu0 = time.process_time()
    replay_datagrams(p.source, dgrams, handle)  # through the real ConntrackSource.read_burst
    p.out.due(time.monotonic())
    p.out.close(30)
    cpu = time.process_time() - cpu0
    if shim is not None:
        shim.flowlog_cg_stop()
    stop.set()
    p.pods.stop()
    print(json.dumps({"events": events, "cpu_us_per_event": round(cpu / max(events, 1) * 1e6,
                                                                 2)}))
    return 0


def _which(args: argparse.Namespace) -> str:
    return ("NEW only" if args.new_only else "DESTROY only" if args.destroy_only
            else "NEW + DESTROY")


def _ignore(*_a: object) -> None:
    return None


# ----------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """One callgrind run per stage; print instructions per event."""
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        for stage in args.stages:
            dump = Path(tmp) / f"cg.{stage}"
            out = _replay(args, stage, tmp, ["valgrind", "--tool=callgrind",
                                             "--instr-atstart=no",
                                             f"--callgrind-out-file={dump}"])
            dumped = Path(str(dump) + ".1")
            if out is None:
                return 1
            if not dumped.exists():
                print(f"stage {stage} failed: callgrind wrote no {dumped}", file=sys.stderr)
                return 1
            events = out["events"]
            total = next(int(ln.split()[1]) for ln in dumped.read_text().splitlines()
                         if ln.startswith("totals:"))
            rows.append({"stage": stage, "what": STAGES[stage], "events": events,
                         "instructions": total,
                         "per_event": round(total / max(events, 1))})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"capture {args.capture}, {_which(args)}, "
          f"first {args.limit or 'all'} datagrams; Python {sys.version.split()[0]}")
    print("| stage | counts | events | instructions per event | added by the stage |")
    print("|---|---|---|---|---|")
    prev = None
    for r in rows:
        added = "" if prev is None else f"{r['per_event'] - prev:+,}"
        print(f"| {r['stage']} | {r['what']} | {r['events']:,} | {r['per_event']:,} | "
              f"{added} |")
        prev = r["per_event"]
    return 0


# ----------------------------------------------------------------- cpu
def cpu(args: argparse.Namespace) -> int:
    """CPU µs per event of each stage, without valgrind: the median of ``--rounds``
    fresh processes per stage, the stages taking turns in each round (so a busy
    stretch of a shared machine lands on all of them)."""
    runs: dict[int, list[float]] = {s: [] for s in args.stages}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        for _ in range(args.rounds):
            for stage in args.stages:
                out = _replay(args, stage, tmp)
                if out is None:
                    return 1
                runs[stage].append(out["cpu_us_per_event"])
    med = {s: statistics.median(v) for s, v in runs.items()}
    if args.json:
        print(json.dumps({"runs": runs, "median": med}, indent=2))
        return 0
    print(f"capture {args.capture}, {_which(args)}, first {args.limit or 'all'} datagrams, "
          f"{args.rounds} rounds; process CPU µs per event (median; runs)")
    print("| stage | counts | µs per event | added by the stage | runs |")
    print("|---|---|---|---|---|")
    prev = None
    for s in args.stages:
        added = "" if prev is None else f"{med[s] - prev:+.2f}"
        print(f"| {s} | {STAGES[s]} | {med[s]:.2f} | {added} | "
              f"{', '.join(f'{x:.2f}' for x in runs[s])} |")
        prev = med[s]
    return 0


def _replay(args: argparse.Namespace, stage: int, workdir: str,
            prefix: list[str] | None = None) -> dict[str, Any] | None:
    """Run the ``replay`` step up to ``stage`` in a fresh process (behind ``prefix``,
    e.g. valgrind) with the capture and selection of ``args``; its JSON line, or None
    after saying on stderr why it failed."""
    cmd = [*(prefix or []), sys.executable, __file__, "replay", "--capture", args.capture,
           "--stage", str(stage), "--workdir", workdir, "--limit", str(args.limit)]
    cmd += ["--new-only"] if args.new_only else []
    cmd += ["--destroy-only"] if args.destroy_only else []
    res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        print(f"stage {stage} failed (exit {res.returncode}): "
              f"{(res.stderr or res.stdout)[-2000:]}", file=sys.stderr)
        return None
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def _replay_options(parser: argparse.ArgumentParser, limit: int) -> None:
    """The options that choose what a replay replays (``run``, ``cpu``, ``replay``)."""
    parser.add_argument("--capture", required=True)
    parser.add_argument("--limit", type=int, default=limit,
                        help=f"first N datagrams of the kind chosen (0: all; default {limit})")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--new-only", action="store_true", help="only the NEW datagrams")
    only.add_argument("--destroy-only", action="store_true",
                      help="only the DESTROY datagrams (their flows' NEW not replayed)")


def _stage_options(parser: argparse.ArgumentParser) -> None:
    """The stages to measure and the output format (``run``, ``cpu``)."""
    parser.add_argument("--stages", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 1, 2, 3], help="comma-separated stages (default 0,1,2,3)")
    parser.add_argument("--json", action="store_true")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="record a flood's event datagrams (root)")
    c.add_argument("--out", required=True, help="capture file (pods go to OUT.pods.json)")
    c.add_argument("--rate", type=float, default=10000, help="new flows per second")
    c.add_argument("--duration", type=float, default=5.0, help="seconds of traffic")
    c.add_argument("--destroy-wait", type=float, default=90.0,
                   help="longest wait for the DESTROYs after the traffic")
    r = sub.add_parser("run", help="count instructions per stage under callgrind")
    _replay_options(r, limit=10000)
    _stage_options(r)
    t = sub.add_parser("cpu", help="CPU µs per event per stage, without valgrind (noisy)")
    _replay_options(t, limit=0)
    _stage_options(t)
    t.add_argument("--rounds", type=int, default=5, help="fresh processes per stage")
    p = sub.add_parser("replay", help="(used by run and cpu) replay once, up to --stage")
    _replay_options(p, limit=0)
    p.add_argument("--stage", type=int, choices=sorted(STAGES), default=3)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    args = ap.parse_args()
    return {"capture": capture, "run": run, "cpu": cpu, "replay": replay}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
