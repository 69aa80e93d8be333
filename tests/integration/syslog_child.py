"""A small shipper for the syslog crash tests: Delivery + SyslogSink (RELP) + disk spool,
in its own process.

    python -m tests.integration.syslog_child --address HOST:PORT --spool DIR \
        --first 0 --count 500 --batch 50 [--drain]

Submits ``count`` records ``{"event": {"id": "%08d", "action": "new"}, "n": i}`` in
batches, prints ``SUBMITTED <n>`` once all are spooled, then either keeps
delivering until killed, or with ``--drain`` waits until the spool is empty,
closes and prints ``DRAINED`` (exit 0; exit 1 if not drained within ``--timeout``).
"""

from __future__ import annotations

import argparse
import sys
import time

from shipper.config import SyslogSinkConfig
from shipper.delivery import Delivery
from shipper.metrics import Metrics
from shipper.sinks.base import Batch
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.spool import Spool
from shipper.sinks.syslog import SyslogSink

T0 = 1_700_000_000_000_000_000


def record(i: int) -> dict[str, object]:
    """The i-th test record (``event.id`` is i, zero-padded)."""
    return {"@timestamp": "2023-11-14T22:13:20.000000Z", "event": {"id": f"{i:08d}",
            "action": "new", "kind": "event"}, "host": {"name": "node-1"}, "n": i}


def main(argv: list[str] | None = None) -> int:
    """Run the child; see the module docstring."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--spool", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--drain", action="store_true")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)

    metrics = Metrics()
    sink = SyslogSink(SyslogSinkConfig(addresses=[args.address], protocol="relp",
                                       ack_timeout_s=2, connect_timeout_s=1), metrics)
    spool = Spool(args.spool, sink_name=sink.name, metrics=metrics, max_bytes=64 << 20,
                  segment_bytes=64 << 10, fsync=True)
    d = Delivery(sink, metrics, max_batches=4, overflow="block", spool=spool,
                 retry=RetryPolicy(initial_s=0.02, max_s=0.2))
    d.start()
    starts = range(args.first, args.first + args.count, args.batch)
    for seq, start in enumerate(starts, 1):
        ids = range(start, min(start + args.batch, args.first + args.count))
        entries = [sink.encode(record(i), T0 + i) for i in ids]
        d.submit(Batch(seq=seq, entries=entries, times=[T0 + i for i in ids],
                       nbytes=sum(map(len, entries)), opened_mono=time.monotonic()))
    print(f"SUBMITTED {args.count}", flush=True)
    if not args.drain:
        while True:
            time.sleep(3600)
    deadline = time.monotonic() + args.timeout
    while spool.pending()[0] > 0 or d.pending_records() > 0:
        if time.monotonic() > deadline:
            print(f"NOT DRAINED {spool.pending()}", flush=True)
            d.close(0.1)
            return 1
        time.sleep(0.02)
    clean = d.close(5)
    print("DRAINED" if clean else "UNCLEAN", flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
