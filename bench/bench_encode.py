#!/usr/bin/env python3
"""Micro-benchmark: CPU per record of the two record encoders, on the captured messages.

Encodes the real kernel messages of ``tests/data/ctnetlink_messages.json``
(NEW, UPDATE, DESTROY and dump messages, with and without accounting and
timestamps), each with a pod attached (``tests/data/record_cases.py``'s example
pod), ``--loops`` times over, and reports the median over ``--runs`` runs of:

* ``ndjson`` - ``JsonLineEncoder.encode`` (the ``stdout``/``file`` sinks' event path);
* ``dict`` - ``ecs.build_record`` (the dict path of the ``forward`` and ``syslog`` sinks),
  without the sink's own serialisation.

Run from the repository root::

    python3 bench/bench_encode.py --loops 200 --runs 9

Process CPU time (``time.process_time``), so other processes on a shared
machine disturb it less than wall time; still, compare runs made in the same
minutes only. A script, never a unit test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shipper import ecs
from shipper.ecs_json import JsonLineEncoder
from tests.data import record_cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--loops", type=int, default=200, help="passes over the messages per run")
    ap.add_argument("--runs", type=int, default=9, help="runs; the median is reported")
    args = ap.parse_args()
    events = record_cases.events()
    work = [(ev, record_cases._pod(ev)) for ev in events]
    starts = [None if ev.ts_start else record_cases.START for ev in events]
    n = len(work) * args.loops
    enc = JsonLineEncoder("node-a")
    build = ecs.build_record
    results: dict[str, list[float]] = {"ndjson": [], "dict": []}
    for _ in range(args.runs):
        t0 = time.process_time()
        encode = enc.encode
        for _ in range(args.loops):
            for (ev, pod), start in zip(work, starts, strict=True):
                encode(ev, pod, start, None)
        results["ndjson"].append((time.process_time() - t0) / n * 1e6)
        t0 = time.process_time()
        for _ in range(args.loops):
            for (ev, pod), start in zip(work, starts, strict=True):
                build(ev, pod, "node-a", flow_start_ns=start)
        results["dict"].append((time.process_time() - t0) / n * 1e6)
    print(f"{len(work)} messages x {args.loops} loops, {args.runs} runs (median, min) us/record")
    for name, vals in results.items():
        print(f"{name:7s} {statistics.median(vals):6.3f} {min(vals):6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
