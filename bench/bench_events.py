#!/usr/bin/env python3
"""Benchmark: how many conntrack NEW events per second the shipper keeps up with.

For each rate: build a :class:`shipper.lab.Lab`, run the shipper (a
subprocess: ``python3 -m shipper run --netns <gw> ...`` with a file sink) and,
as the baseline, ``conntrack -E`` with the same receive buffer, side by side;
generate new UDP flows from pod namespaces at the rate; then compare what each
listener wrote with what the kernel did.

* ``kernel`` - new pod->ext flows the gw NATed during the run: the packet
  counters of the MASQUERADE rules (the nat table sees exactly the first
  packet of each new conntrack entry). ``conntrack -S insert`` is 0 on
  current kernels, so it cannot be used.
* ``shipped`` - records with ``event.action`` "new" in the shipper's output.
* ``ct -E`` - NEW lines of ``conntrack -E`` whose original source is a pod.
* ``loss`` - ``1 - seen / kernel`` for each listener.
* ``µs/event`` - the shipper's utime+stime (``/proc/PID/stat``) from just
  before the traffic until its output stopped growing, divided by the kernel
  count (idle polling during the settle wait is included: an upper bound).
* ``VmHWM`` - the shipper's peak RSS.

The shipper reads the lab's pods from a pods file (``--pods-file``), so each
record is the full default record: pod labels, owner, node, community id,
``event.id``.

Run as root on a Linux box with netfilter, from the repository root::

    python3 bench/bench_events.py --rate 25000 --duration 10
    python3 bench/bench_events.py --rates 10000,25000,50000 --duration 10 --json

This is a script, never a unit test: numbers depend on the machine (the
generator, the shipper and ``conntrack -E`` share its CPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shipper.lab import Flood, Lab, LabError  # noqa: E402 - after the sys.path fix

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class RunResult:
    """The measurements of one rate."""

    rate: float
    duration: float
    family: int
    senders: int
    generated_sent: int = 0
    generated_rate: float = 0.0
    kernel_new: int = 0
    shipped_new: int = 0
    shipper_loss: float | None = None
    ct_new: int | None = None
    ct_loss: float | None = None
    ct_enobufs: int | None = None
    shipper_cpu_us_per_event: float | None = None
    ct_cpu_us_per_event: float | None = None
    shipper_vmhwm_kb: int | None = None
    shipper_metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def _vmhwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _scrape(address: str, timeout: float = 2.0) -> dict[str, float] | None:
    """Return ``{name{labels}: value}`` from a Prometheus endpoint, None if unreachable."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("shipper_") and " " in line:
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def _interesting(metrics: dict[str, float]) -> dict[str, float]:
    keep = ("shipper_events_total", "shipper_overruns_total", "shipper_events_lost_total",
            "shipper_records_shipped_total", "shipper_records_dropped_total",
            "shipper_decode_errors_total", "shipper_errors_total",
            "shipper_events_filtered_total")
    return {k: v for k, v in metrics.items() if k.startswith(keep)}


def _count_records(path: Path) -> int:
    """Count output records with ``event.action`` "new" (all files: path, path.1, ...)."""
    total = 0
    for f in sorted(path.parent.glob(path.name + "*")):
        with f.open("rb") as fh:
            for line in fh:
                if b'"action":"new"' in line or b'"action": "new"' in line:
                    total += 1
    return total


def _count_ct_lines(path: Path, cidrs: list[str]) -> int:
    """Count ``conntrack -E`` NEW lines whose original source is in ``cidrs``."""
    nets = [ipaddress.ip_network(c) for c in cidrs]
    total = 0
    with path.open("rb") as fh:
        for line in fh:
            if b"[NEW]" not in line:
                continue
            i = line.find(b" src=")
            if i < 0:
                continue
            src = line[i + 5:line.index(b" ", i + 5)].decode()
            with contextlib.suppress(ValueError):
                addr = ipaddress.ip_address(src)
                if any(addr in n for n in nets):
                    total += 1
    return total


def _wait_stable(sizes: Sequence[Path], quiet_s: float, limit_s: float) -> None:
    """Poll until none of ``sizes`` grew for ``quiet_s`` (bounded by ``limit_s``)."""
    deadline = time.monotonic() + limit_s
    last: list[int] = []
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        now = [_total_size(p) for p in sizes]
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return
        time.sleep(0.1)


def _total_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM ``proc``'s process group, wait ``grace`` s, then SIGKILL; always reaps."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def shipper_command(args: argparse.Namespace, lab: Lab, out: Path, metrics: str,
                    config: Path) -> list[str]:
    """Return the shipper's command line (``python3 -m shipper run ...``)."""
    cmd = [sys.executable, "-m", "shipper", "run", "--netns", lab.gw]
    for cidr in lab.pod_cidrs():
        cmd += ["--pod-cidr", cidr]
    for cidr in lab.cluster_cidrs():
        cmd += ["--exclude-cidr", cidr]
    cmd += ["--sink", "file", "--output", str(out), "--metrics-address", metrics,
            "--config", str(config)]
    return cmd + list(args.shipper_arg)


def shipper_config(args: argparse.Namespace) -> str:
    """Return the YAML config given to the shipper (buffer, event types, big file)."""
    events = ", ".join(e.strip().lower() for e in args.events.split(","))
    return (
        "conntrack:\n"
        f"  rcvbuf_bytes: {args.rcvbuf}\n"
        f"  events: [{events}]\n"
        "  dump_at_start: false\n"
        "sink:\n"
        "  file:\n"
        "    max_bytes: 100000000000\n"
    )


def run_rate(args: argparse.Namespace, rate: float) -> RunResult:
    """Measure one rate in a fresh lab; always removes everything it started."""
    res = RunResult(rate=rate, duration=args.duration, family=args.family, senders=args.senders)
    tmp = Path(tempfile.mkdtemp(prefix="flowlog-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with Lab(pods=args.senders, ipv6=True) as lab:
            lab.set_sysctl(lab.gw, "net.netfilter.nf_conntrack_events", 1)
            lab.set_sysctl(lab.gw, "net.netfilter.nf_conntrack_udp_timeout", args.udp_timeout)
            ct_out = tmp / "conntrack-E.txt"
            ct = None
            if not args.no_conntrack:
                ev = ",".join(e.strip().upper() for e in args.events.split(","))
                with ct_out.open("wb") as o, (tmp / "conntrack-E.err").open("wb") as e:
                    ct = lab.popen(lab.gw, "conntrack", "-E", "-e", ev, "-b", str(args.rcvbuf),
                                   stdout=o, stderr=e)
            shipper = None
            flows = tmp / "flows.json"
            metrics = f"127.0.0.1:{_free_port()}"
            if not args.no_shipper:
                config = tmp / "shipper.yaml"
                config.write_text(shipper_config(args))
                # The lab's pods (labels, owner, node): records carry the full default
                # record, attributed, as on a real node.
                pods = lab.write_pod_list(tmp / "pods.json")
                cmd = [*shipper_command(args, lab, flows, metrics, config),
                       "--pods-file", str(pods)]
                env = dict(os.environ, PYTHONPATH=str(REPO))
                with (tmp / "shipper.out").open("wb") as o, \
                        (tmp / "shipper.err").open("wb") as e:
                    shipper = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=REPO,
                                               stdin=subprocess.DEVNULL,
                                               start_new_session=True)
                procs.append(shipper)
                _wait_ready(shipper, metrics, tmp / "shipper.err", args.ready_timeout)
            time.sleep(0.5)  # let conntrack -E subscribe (it prints nothing when ready)

            before = lab.nat_new_flows()
            cpu0 = _cpu_ticks(shipper.pid) if shipper else None
            ct_cpu0 = _cpu_ticks(ct.pid) if ct else None
            per_sender = rate / args.senders
            floods: list[Flood] = [
                lab.start_udp_flood(i, per_sender, args.duration, family=args.family)
                for i in range(args.senders)
            ]
            results = [f.wait() for f in floods]
            res.generated_sent = sum(r.sent for r in results)
            res.generated_rate = res.generated_sent / max(r.seconds for r in results)
            watch = [flows] if shipper else []
            if ct:
                watch.append(ct_out)
            _wait_stable(watch, quiet_s=args.settle, limit_s=args.settle_limit)
            res.kernel_new = lab.nat_new_flows() - before
            if shipper:
                cpu1 = _cpu_ticks(shipper.pid)
                res.shipper_vmhwm_kb = _vmhwm_kb(shipper.pid)
                res.shipper_metrics = _interesting(_scrape(metrics) or {})
                if cpu0 is not None and cpu1 is not None and res.kernel_new:
                    res.shipper_cpu_us_per_event = (
                        (cpu1 - cpu0) / CLK_TCK * 1e6 / res.kernel_new)
                if shipper.poll() is not None:
                    res.error = f"shipper exited early ({shipper.returncode})"
                _stop(shipper, args.stop_grace)
                res.shipped_new = _count_records(flows) if flows.exists() else 0
                if res.kernel_new:
                    res.shipper_loss = 1 - res.shipped_new / res.kernel_new
            if ct:
                ct_cpu1 = _cpu_ticks(ct.pid)
                if ct_cpu0 is not None and ct_cpu1 is not None and res.kernel_new:
                    res.ct_cpu_us_per_event = (ct_cpu1 - ct_cpu0) / CLK_TCK * 1e6 / res.kernel_new
                _stop(ct, 5.0)
                res.ct_new = _count_ct_lines(ct_out, lab.pod_cidrs())
                err = (tmp / "conntrack-E.err").read_text(errors="replace")
                res.ct_enobufs = err.count("hit ENOBUFS")
                if res.kernel_new:
                    res.ct_loss = 1 - res.ct_new / res.kernel_new
    except (LabError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                _stop(p, args.stop_grace)
        if args.keep:
            print(f"# kept {tmp}", file=sys.stderr)
        else:
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return res


def _wait_ready(proc: subprocess.Popen[bytes], metrics: str, err: Path, timeout: float) -> None:
    """Poll the shipper's metrics endpoint until it answers (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"shipper exited ({proc.returncode}): "
                               f"{err.read_text(errors='replace')[-1500:]}")
        if _scrape(metrics, timeout=0.5) is not None:
            return
        time.sleep(0.1)
    raise RuntimeError(f"shipper not ready within {timeout}s (no metrics on {metrics})")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def print_table(results: list[RunResult]) -> None:
    """Print one row per rate."""
    head = ["rate/s", "gen/s", "kernel", "shipped", "loss", "µs/event", "VmHWM MB",
            "ct -E", "ct loss", "ct µs/ev", "ENOBUFS"]
    rows = []
    for r in results:
        rows.append([
            f"{r.rate:.0f}", f"{r.generated_rate:.0f}", str(r.kernel_new), str(r.shipped_new),
            _pct(r.shipper_loss), _num(r.shipper_cpu_us_per_event),
            _num(None if r.shipper_vmhwm_kb is None else r.shipper_vmhwm_kb / 1024),
            "-" if r.ct_new is None else str(r.ct_new), _pct(r.ct_loss),
            _num(r.ct_cpu_us_per_event), "-" if r.ct_enobufs is None else str(r.ct_enobufs),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    for r in results:
        if r.error:
            print(f"rate {r.rate:.0f}: ERROR {r.error}")
        lost = {k: v for k, v in r.shipper_metrics.items()
                if ("overrun" in k or "lost" in k or "dropped" in k) and v}
        if lost:
            print(f"rate {r.rate:.0f}: shipper reported {lost}")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=25000, help="NEW events/s (default 25000)")
    p.add_argument("--rates", help="comma-separated rates to sweep, e.g. 10000,25000,50000")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of traffic per rate")
    p.add_argument("--family", type=int, choices=[4, 6], default=4)
    p.add_argument("--senders", type=int, default=1,
                   help="pods sending in parallel (one Python sender makes ~50-100k/s)")
    p.add_argument("--rcvbuf", type=int, default=8 * 1024 * 1024,
                   help="receive buffer bytes for both listeners (conntrack -E -b)")
    p.add_argument("--events", default="new",
                   help="event types both listeners subscribe to: new or new,destroy")
    p.add_argument("--udp-timeout", type=int, default=1,
                   help="gw nf_conntrack_udp_timeout, so the table does not fill")
    p.add_argument("--settle", type=float, default=1.5,
                   help="the outputs must not grow for this long after the traffic")
    p.add_argument("--settle-limit", type=float, default=30.0)
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument("--stop-grace", type=float, default=15.0)
    p.add_argument("--no-conntrack", action="store_true", help="skip the conntrack -E baseline")
    p.add_argument("--no-shipper", action="store_true", help="only the generator and baseline")
    p.add_argument("--shipper-arg", action="append", default=[],
                   help="extra argument for 'python3 -m shipper run' (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (outputs, logs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 1 if a run failed, 0 otherwise (loss is not a failure)."""
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench_events: needs root (network namespaces)", file=sys.stderr)
        return 2
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    results: list[RunResult] = []
    try:
        for rate in rates:
            results.append(run_rate(args, rate))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print_table(results)
    return 1 if any(r.error for r in results) or not results else 0


if __name__ == "__main__":
    sys.exit(main())
