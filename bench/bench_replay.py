#!/usr/bin/env python3
"""Micro-benchmark: CPU per event of the event path, decode + handle, on captured messages.

Replays the real kernel messages of ``tests/data/ctnetlink_messages.json`` (NEW,
DESTROY and dump messages, with and without accounting and timestamps) through
the real receive loop (``ConntrackSource.read_burst``, fed by a stand-in socket:
``bench/replay_socket.py``) and ``Pipeline.handle`` - filter, flow-start cache, pod
lookup, encoding, batching - ``--loops`` times
over, and reports the median µs/event over ``--runs`` runs. Every source
address has a pod in the index (the resolved path, the common one); the sink is
an NDJSON sink (the fused encoder) or, with ``--msgpack``, a dict-encoding one.
Closed batches are dropped, never delivered: delivery runs on its own thread.

Run from the repository root::

    python3 bench/bench_replay.py --loops 300 --runs 9

Process CPU time (``time.process_time``), so other processes on a shared
machine disturb it less than wall time; to compare two trees, interleave their
runs (``PYTHONPATH=<tree> python3 <tree>/bench/bench_replay.py --runs 1``, in
turns) and compare medians. A script, never a unit test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from shipper.config import Config
from shipper.metrics import Metrics
from shipper.pipeline import Pipeline
from shipper.record import PodMeta

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay_socket import count_events, decode_all, replay

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "ctnetlink_messages.json"


class NullSink:
    """A sink that encodes like the real ones and never delivers (batches are dropped)."""

    name = "null"
    acknowledged = False

    def __init__(self, ndjson: bool) -> None:
        self.entry_format = "ndjson" if ndjson else "msgpack"

    def encode(self, record: dict[str, Any], time_ns: int) -> bytes:
        return orjson.dumps(record)

    def deliver(self, batch: Any) -> None:  # pragma: no cover - never called
        raise AssertionError("not used")

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--loops", type=int, default=300, help="passes over the messages per run")
    ap.add_argument("--runs", type=int, default=9, help="runs; the median is reported")
    ap.add_argument("--msgpack", action="store_true", help="dict path instead of NDJSON lines")
    args = ap.parse_args()

    datagrams = [bytes.fromhex(m["hex"]) for m in json.loads(DATA.read_text())]
    cfg = Config(filter={"pod_cidrs": ["0.0.0.0/0", "::/0"]}, enrich={"resolve_wait_s": 0},
                 batch={"max_records": 1 << 30, "max_bytes": 1 << 40, "max_age_s": 60})
    p = Pipeline(cfg, Metrics(), sink=NullSink(not args.msgpack))  # type: ignore[arg-type]
    # One pod per source address, known since long before the captured flows.
    srcs = {(ev.family, ev.orig_src) for ev in decode_all(datagrams)}
    for i, (fam, ip) in enumerate(sorted(srcs)):
        pod = PodMeta(namespace="bench", name=f"pod-{i}", uid=f"uid-{i}", ips=((fam, ip),),
                      phase="Running", created_ns=1).with_record_object()
        p.index.update(pod, 2)
    handle = p.handle
    events = count_events(datagrams) * args.loops
    results = []
    for _ in range(args.runs):
        t0 = time.process_time()
        for _ in range(args.loops):
            replay(p.source, datagrams, handle)  # through the real ConntrackSource.read_burst
            p.batcher.flush()
        results.append((time.process_time() - t0) / events * 1e6)
    print(json.dumps({"us_per_event": round(statistics.median(results), 3),
                      "runs": [round(r, 3) for r in results], "events_per_run": events}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
