"""A small shipper for the crash tests: Delivery + a network sink + disk spool, in its own
process; and the tests' helpers to start it and read what it prints.

    python -m tests.integration.spool_child --sink forward|syslog --address HOST:PORT \
        --spool DIR --first 0 --count 500 --batch 50 [--drain]

The sink is a ForwardSink (acks on) or a SyslogSink over RELP. Submits ``count``
records ``{"event": {"id": "%08d", "action": "new"}, "n": i}`` in batches, prints
``SUBMITTED <n>`` once all are spooled, then either keeps delivering until killed,
or with ``--drain`` waits until the spool is empty, closes and prints ``DRAINED``
(exit 0; exit 1 if not drained within ``--timeout``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from shipper.config import ForwardSinkConfig, SyslogSinkConfig
from shipper.delivery import Delivery
from shipper.metrics import Metrics
from shipper.sinks.base import Batch, Sink
from shipper.sinks.forward import ForwardSink
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.spool import Spool
from shipper.sinks.syslog import SyslogSink

T0 = 1_700_000_000_000_000_000
REPO = Path(__file__).resolve().parents[2]


def record(i: int) -> dict[str, object]:
    """The i-th test record (``event.id`` is i, zero-padded)."""
    return {"@timestamp": "2023-11-14T22:13:20.000000Z", "event": {"id": f"{i:08d}",
            "action": "new", "kind": "event"}, "host": {"name": "node-1"}, "n": i}


def start_child(sink: str, address: str, spool: Path, *args: str) -> subprocess.Popen[str]:
    """Start the child (our own process: the caller stops it, see :func:`kill`); its
    stderr (retry warnings) goes to ``<spool>/../child.stderr``, not a pipe that could
    fill and block it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(spool.parent / "child.stderr", "a") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.integration.spool_child", "--sink", sink,
             "--address", address, "--spool", str(spool), *args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
        )


def child_stderr(spool: Path) -> str:
    """The end of the child's stderr (for assertion messages)."""
    f = spool.parent / "child.stderr"
    return f.read_text()[-2000:] if f.exists() else ""


def read_line(p: subprocess.Popen[str], timeout: float) -> str:
    """The child's next line of output; the child is killed if none comes in ``timeout``."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline() if p.stdout else ""))
    t.start()
    t.join(timeout)
    if not out:
        p.kill()
        raise TimeoutError(f"child printed nothing in {timeout}s")
    return out[0].strip()


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a child of ours if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def _sink(kind: str, address: str, metrics: Metrics) -> Sink:
    if kind == "forward":
        return ForwardSink(ForwardSinkConfig(addresses=[address], ack_timeout_s=2,
                                             connect_timeout_s=1), metrics)
    return SyslogSink(SyslogSinkConfig(addresses=[address], protocol="relp",
                                       ack_timeout_s=2, connect_timeout_s=1), metrics)


def main(argv: list[str] | None = None) -> int:
    """Run the child; see the module docstring."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--sink", choices=("forward", "syslog"), required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--spool", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--drain", action="store_true")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)

    metrics = Metrics()
    sink = _sink(args.sink, args.address, metrics)
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
