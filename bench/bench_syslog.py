#!/usr/bin/env python3
"""Benchmark: the syslog sink's throughput to a real rsyslog, per transport.

For each transport (tcp, tls, relp, relp with a larger window): start Debian's
rsyslogd on a loopback port (``tests/integration/rsyslog.py``: private config,
imtcp / imtcp+gtls / imrelp, an omfile output of one JSON line per message),
then hand ``--records`` real records (built by ``ecs.build_record``, about
0.9 KB each on the wire) to ``SyslogSink.deliver`` in batches of ``--batch``,
in this process. Reported per transport:

* ``deliver/s`` - records per second through ``deliver`` (for tcp/tls: written
  to the socket; for relp: acknowledged with ``200 OK``);
* ``written/s`` - records per second until rsyslog had written them all to its
  output file (the end-to-end rate, usually rsyslog's own limit);
* ``µs/rec`` - the sender's CPU (this process: encode excluded, framing,
  socket and ack handling included) per record.

Run as root or any user that may run rsyslogd, from the repository root, with
rsyslog, rsyslog-gnutls and rsyslog-relp installed (``scripts/install.sh --test``)::

    python3 bench/bench_syslog.py --records 40000 --batch 1000

This is a script, never a unit test: sender and receiver share the machine, so
the numbers say what this machine did, not what a dedicated collector does.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shipper.config import SyslogSinkConfig, SyslogTLSConfig
from shipper.metrics import Metrics
from shipper.sinks.base import Batch
from shipper.sinks.syslog import SyslogSink
from tests.integration.pki import make_pki
from tests.integration.rsyslog import Rsyslog
from tests.integration.test_syslog_rsyslog import _records


def run(protocol: str, window: int, records: int, batch: int, tmp: Path, pki: Path
        ) -> dict[str, float]:
    """One transport; returns the measured rates."""
    work = tmp / f"{protocol}-{window}"
    work.mkdir()
    with Rsyslog(work, protocol, pki=pki if protocol == "tls" else None).start() as rs:
        cfg = SyslogSinkConfig(addresses=[rs.address], protocol=protocol,
                               relp_window=window,
                               tls=SyslogTLSConfig(ca_file=pki / "ca.crt"))
        sink = SyslogSink(cfg, Metrics())
        recs = _records(records)
        entries = [sink.encode(r, 0) for r in recs]
        batches = [Batch(seq=i, entries=entries[i:i + batch], times=[0] * batch, nbytes=0)
                   for i in range(0, len(entries), batch)]
        t0 = time.perf_counter()
        c0 = time.process_time()
        for b in batches:
            sink.deliver(b)
        t1 = time.perf_counter()
        c1 = time.process_time()
        rs.wait_lines(records, timeout=600)
        t2 = time.perf_counter()
        sink.close()
    return {"deliver_per_s": records / (t1 - t0), "written_per_s": records / (t2 - t0),
            "cpu_us_per_record": (c1 - c0) / records * 1e6,
            "bytes_per_record": sum(map(len, entries)) / records}


def main() -> int:
    """Run every transport and print one line each."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=40000)
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args()
    if shutil.which("rsyslogd") is None:
        print("rsyslogd not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-syslog-") as d:
        tmp = Path(d)
        (tmp / "pki").mkdir()
        pki = make_pki(tmp / "pki")
        print(f"{'transport':<12} {'deliver/s':>10} {'written/s':>10} {'µs/rec':>7} "
              f"{'bytes/rec':>9}")
        for protocol, window in (("tcp", 128), ("tls", 128), ("relp", 128), ("relp", 1024)):
            r = run(protocol, window, args.records, args.batch, tmp, pki)
            name = protocol if protocol != "relp" else f"relp w{window}"
            print(f"{name:<12} {r['deliver_per_s']:>10,.0f} {r['written_per_s']:>10,.0f} "
                  f"{r['cpu_us_per_record']:>7.1f} {r['bytes_per_record']:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
