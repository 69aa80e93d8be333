#!/usr/bin/env python3
"""Benchmark: ``flowlog-shipper dump`` against ``conntrack -L -o extended`` on one table.

Builds a :class:`shipper.lab.Lab`, fills the gateway's conntrack table with
``--entries`` UDP flows from pod namespaces (one new flow per datagram, long UDP
timeout so none expires during the run; accounting and timestamps on, as the
shipper sets them), then runs the two listers **one after the other**,
``--repeat`` times, on that same table:

* ``conntrack -L -o extended`` in the gateway namespace, output to a file;
* ``python3 -m shipper dump --netns <gw> --config <tmp>/dump.yaml`` with the
  file sink and the lab's pods file (so every record carries the full pod
  metadata, as in production), output to a file.

With ``--not-nated N`` the gateway also sends N flows of its own (not NATed,
not from a pod) and a third lister runs, the shipper with
``conntrack.kernel_filter: false``: that shows what the kernel-side dump filter
(only source-NATed entries) saves.

The package's bytecode is written first (``compileall``), as an installed shipper
has it. For each run: wall time (from fork to exit, interpreter start-up included),
user+system CPU and peak RSS of the command (GNU time), lines written.
Prints the runs, the medians and the shipper/conntrack ratio of each pair.

Run as root from the repository root (iproute2, iptables, conntrack-tools)::

    python3 bench/bench_dump.py --entries 250000 --repeat 3
    python3 bench/bench_dump.py --entries 250000 --repeat 5 --json
    python3 bench/bench_dump.py --entries 100000 --not-nated 150000   # filtered dump

This is a script, never a unit test: times depend on the machine and on
whatever else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shipper.lab import Flood, Lab, LabError  # noqa: E402 - after the sys.path fix

GNU_TIME = "/usr/bin/time"


@dataclass
class Run:
    """One run of one lister."""

    tool: str
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    lines: int
    rc: int


def _lines(paths: Sequence[Path]) -> int:
    total = 0
    for p in paths:
        with p.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                total += chunk.count(b"\n")
    return total


def _timed(argv: list[str], out: Path, env: dict[str, str] | None, tool: str,
           outputs: Sequence[Path], timeout: float) -> Run:
    """Run ``argv`` with stdout to ``out``; wall time, CPU and peak RSS from wait4."""
    for p in outputs:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    err = out.with_suffix(".err")
    usage = out.with_suffix(".usage")
    # GNU time measures the command itself: the rusage of a child forked from this
    # (large) Python process would count our pages as its peak RSS until it execs.
    argv = [GNU_TIME, "-f", "%M %U %S", "-o", str(usage), *argv]
    with out.open("wb") as fh, err.open("wb") as eh:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=fh, stderr=eh,
                                stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(f"{tool} failed ({proc.returncode}): "
              f"{err.read_text(errors='replace')[-1500:]}", file=sys.stderr)
    try:
        rss_kb, utime, stime = usage.read_text().split()[-3:]
        cpu, rss = float(utime) + float(stime), int(rss_kb) / 1024
    except (OSError, ValueError):
        cpu, rss = ru.ru_utime + ru.ru_stime, float("nan")
    return Run(tool=tool, wall_s=wall, cpu_s=cpu, maxrss_mib=rss,
               lines=_lines([p for p in outputs if p.exists()]), rc=proc.returncode)


def fill(lab: Lab, entries: int, senders: int, rate: float) -> int:
    """Fill the gateway's table with about ``entries`` UDP flows; return the table size."""
    per = entries // senders
    floods = [lab.start_udp_flood(i, rate / senders, per / (rate / senders) * 3 + 5,
                                  max_count=per, sockets=64) for i in range(senders)]
    for f in floods:
        f.wait()
    deadline = time.monotonic() + 30
    size = 0
    while time.monotonic() < deadline:
        size = int(lab.run(lab.gw, "conntrack", "-C").stdout.strip())
        if size >= entries:
            break
        time.sleep(0.2)
    return size


def fill_not_nated(lab: Lab, entries: int, rate: float) -> None:
    """Add about ``entries`` UDP flows sent by the gateway itself (its own address: not
    source-NATed, not from a pod), the kind of entry a filtered dump skips in the kernel."""
    proc = lab.popen(lab.gw, sys.executable, "-m", "shipper.lab.agents", "--parent-pid",
                     str(os.getpid()), "--max-seconds", "600", "flood", "--dst",
                     lab.ext_ip(4), "--rate", str(rate), "--duration",
                     str(entries / rate * 3 + 5), "--max-count", str(entries), "--sockets", "64",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    Flood(proc, entries / rate * 3 + 35).wait()


def dump_config(lab: Lab, tmp: Path, extra: Sequence[str], name: str = "dump.yaml") -> Path:
    """The shipper's config for the dump (file sink, pods file, no rotation)."""
    pods = lab.write_pod_list(tmp / "pods.json")
    lines = [
        "node_name: bench-node",
        "filter:",
        f"  pod_cidrs: {json.dumps(lab.pod_cidrs())}",
        f"  cluster_cidrs: {json.dumps(lab.cluster_cidrs())}",
        "inventory:",
        f"  pods_file: {json.dumps(str(pods))}",
        "sink:",
        "  type: file",
        "  file:",
        f"    path: {json.dumps(str(tmp / 'flows.json'))}",
        "    max_bytes: 100000000000",
        *extra,
    ]
    path = tmp / name
    path.write_text("\n".join(lines) + "\n")
    return path


def compile_bytecode() -> None:
    """Write the package's bytecode (``__pycache__``, ignored by git) before timing.

    An installed shipper starts from bytecode: pip compiles it at install, and the
    image's root filesystem is read-only, so it is never compiled at run time. A
    checkout run with ``PYTHONDONTWRITEBYTECODE`` (or never imported before) would
    compile every module of the package from source at each start, about 0.1 s
    that no production start pays.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "shipper")],
                   check=True, stdout=subprocess.DEVNULL)


def run(args: argparse.Namespace) -> dict[str, object]:
    """Build the lab, fill it, time both listers alternately; return the results."""
    tmp = Path(tempfile.mkdtemp(prefix="flowlog-dump-bench-"))
    runs: list[Run] = []
    try:
        with Lab(pods=args.senders, ipv6=True) as lab:
            for key, value in (("events", 1), ("acct", 1), ("timestamp", 1),
                               ("udp_timeout", 3600)):
                lab.set_sysctl(lab.gw, f"net.netfilter.nf_conntrack_{key}", value)
            size = fill(lab, args.entries, args.senders, args.rate)
            if args.not_nated:
                fill_not_nated(lab, args.not_nated, args.rate)
                size = int(lab.run(lab.gw, "conntrack", "-C").stdout.strip())
            config = dump_config(lab, tmp, args.config_line)
            compile_bytecode()
            unfiltered = None
            if args.not_nated:
                unfiltered = dump_config(lab, tmp, [*args.config_line, "conntrack:",
                                                    "  kernel_filter: false"],
                                         name="dump-unfiltered.yaml")
            env = dict(os.environ, PYTHONPATH=str(REPO))
            ct_out = tmp / "conntrack-L.txt"
            flows = tmp / "flows.json"
            for _ in range(args.repeat):
                runs.append(_timed(["ip", "netns", "exec", lab.gw, "conntrack", "-L", "-o",
                                    "extended"], ct_out, None, "conntrack -L -o extended",
                                   [ct_out], args.timeout))
                for n in args.workers:
                    runs.append(_timed([sys.executable, "-m", "shipper", "dump", "--netns",
                                        lab.gw, "--config", str(config), "--workers", str(n)],
                                       tmp / "shipper.out", env, shipper_tool(n), [flows],
                                       args.timeout))
                if unfiltered is not None:
                    runs.append(_timed([sys.executable, "-m", "shipper", "dump", "--netns",
                                        lab.gw, "--config", str(unfiltered)],
                                       tmp / "shipper.out", env,
                                       "dump, kernel_filter off", [flows], args.timeout))
            end_size = int(lab.run(lab.gw, "conntrack", "-C").stdout.strip())
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    ct = [r for r in runs if r.tool.startswith("conntrack")]
    un = [r for r in runs if r.tool.startswith("dump, kernel_filter off")]
    tools = [("conntrack", ct)] + [
        (shipper_key(n), [r for r in runs if r.tool == shipper_tool(n)]) for n in args.workers
    ] + ([("shipper_unfiltered", un)] if un else [])
    res: dict[str, object] = {
        "entries_at_start": size,
        "entries_at_end": end_size,
        "workers": list(args.workers),
        "runs": [asdict(r) for r in runs],
        "median": {
            tool: {k: statistics.median(getattr(r, k) for r in rs)
                   for k in ("wall_s", "cpu_s", "maxrss_mib", "lines")}
            for tool, rs in tools
        },
        "self_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    for n in args.workers:  # each shipper run against the conntrack run just before it
        sh = [r for r in runs if r.tool == shipper_tool(n)]
        key = ratios_key(n)
        res[f"{key}_wall"] = [s.wall_s / c.wall_s for c, s in zip(ct, sh, strict=True)]
        res[f"{key}_cpu"] = [s.cpu_s / c.cpu_s for c, s in zip(ct, sh, strict=True)]
    return res


def shipper_tool(workers: int) -> str:
    """The run name of the shipper's dump with ``workers`` processes."""
    return "flowlog-shipper dump" + ("" if workers == 1 else f" --workers {workers}")


def shipper_key(workers: int) -> str:
    """The results' key of the shipper's dump with ``workers`` processes: ``shipper`` for
    one (the key the issue's table reads), ``shipper_w<N>`` otherwise."""
    return "shipper" if workers == 1 else f"shipper_w{workers}"


def ratios_key(workers: int) -> str:
    """The prefix of the results' pairwise ratio keys (``<prefix>_wall``, ``<prefix>_cpu``)
    of the shipper's dump with ``workers`` processes: ``ratios``, ``ratios_w<N>``."""
    return shipper_key(workers).replace("shipper", "ratios", 1)


def print_report(res: dict[str, object]) -> None:
    """Print the runs and the medians as a table."""
    print(f"table: {res['entries_at_start']} entries at start, {res['entries_at_end']} at end")
    print(f"{'tool':<26} {'wall s':>7} {'cpu s':>7} {'peak RSS MiB':>13} {'lines':>8} {'rc':>3}")
    for r in res["runs"]:  # type: ignore[attr-defined]
        print(f"{r['tool']:<26} {r['wall_s']:7.2f} {r['cpu_s']:7.2f} {r['maxrss_mib']:13.1f} "
              f"{r['lines']:8d} {r['rc']:3d}")
    med: dict[str, dict[str, float]] = res["median"]  # type: ignore[assignment]
    ct = med["conntrack"]
    for n in res["workers"]:  # type: ignore[attr-defined]
        sh, key = med[shipper_key(n)], ratios_key(n)
        print(f"median conntrack -L: {ct['wall_s']:.2f} s, {ct['maxrss_mib']:.1f} MiB; "
              f"{shipper_tool(n)}: {sh['wall_s']:.2f} s, CPU {sh['cpu_s']:.2f} s, "
              f"{sh['maxrss_mib']:.1f} MiB; ratio of medians {sh['wall_s'] / ct['wall_s']:.2f}")
        print("  pairwise wall ratios: "
              + ", ".join(f"{x:.2f}" for x in res[f"{key}_wall"]))  # type: ignore[attr-defined]
        print("  pairwise CPU ratios: "
              + ", ".join(f"{x:.2f}" for x in res[f"{key}_cpu"]))  # type: ignore[attr-defined]
    if "shipper_unfiltered" in med:
        un = med["shipper_unfiltered"]
        print(f"median shipper dump with kernel_filter off: {un['wall_s']:.2f} s, "
              f"{un['cpu_s']:.2f} s CPU, {un['maxrss_mib']:.1f} MiB")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=250_000, help="table size (default 250000)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each lister (alternating)")
    p.add_argument("--senders", type=int, default=2, help="pods generating the flows")
    p.add_argument("--rate", type=float, default=60_000, help="flows/s while filling")
    p.add_argument("--not-nated", type=int, default=0,
                   help="also add this many flows sent by the gateway itself (not NATed) and "
                        "time the shipper with conntrack.kernel_filter off as well")
    p.add_argument("--timeout", type=float, default=300.0, help="limit per run, seconds")
    p.add_argument("--config-line", action="append", default=[],
                   help="extra YAML line appended to the shipper's config (repeatable)")
    p.add_argument("--workers", type=_workers, default=[1],
                   help="comma-separated worker counts of the shipper's dump, each timed "
                        "(`dump --workers N`; default 1, e.g. 1,2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _workers(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of worker counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be 1 or more: {text!r}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 1 if a lister failed or the table could not be filled."""
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench_dump: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not os.access(GNU_TIME, os.X_OK):
        print(f"bench_dump: needs GNU time at {GNU_TIME} (Debian package 'time')",
              file=sys.stderr)
        return 2
    try:
        res = run(args)
    except LabError as exc:
        print(f"bench_dump: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_report(res)
    failed = any(r["rc"] != 0 for r in res["runs"])  # type: ignore[attr-defined]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
