#!/usr/bin/env python3
"""Benchmark: the shipper against ``conntrack -E``/``-L`` and ulogd2, as one table per run.

Rows (``--rows``, all by default):

* ``new`` - NEW events only: UDP, each datagram a new flow through the lab
  gateway's MASQUERADE, ``--rate`` flows/s for ``--duration`` s;
* ``new+destroy`` - the same load with NEW and DESTROY subscribed (the
  shipper's default); the run waits until the gateway's table has emptied
  (UDP timeout ``--udp-timeout``), so every flow's DESTROY is due;
* ``workers`` - the shipper with ``conntrack.workers: --workers`` on the
  NEW+DESTROY load (its baselines are the ``new+destroy`` row's);
* ``dump`` - ``conntrack -L -o extended`` against ``flowlog-shipper dump`` on
  a table of ``--dump-entries`` flows (``bench/bench_dump.py``'s measurement,
  imported, median of ``--dump-repeat`` alternating runs);
* ``memory`` - peak RSS of each listener while ``--memory-flows`` flows are
  live, created at ``--rate`` under NEW+DESTROY subscription (long UDP
  timeout, so the flows stay in the table).

Columns: ``conntrack -E`` (``-L`` for the dump), ulogd2 (NFCT input ->
IP2STR -> JSON output, its own config file written here; not for the dump),
the shipper, and the ratios shipper/conntrack and shipper/ulogd2.

Each listener runs ALONE on the load, in a fresh ``shipper.lab.Lab``: the
generator, the kernel and one listener share the CPUs, never two listeners.
For each listener run:

* ``kernel`` - events the kernel generated for pod flows: NEW = the packet
  counters of the MASQUERADE rules (the nat table sees exactly the first
  packet of each new entry; ``conntrack -S insert`` is 0 on current kernels);
  DESTROY = those NEW minus the entries still in the table at the end;
* ``seen`` - events of pod flows in the listener's output (shipper: records
  with ``event.action`` new/destroy; ``conntrack -E``: ``[NEW]``/``[DESTROY]``
  lines; ulogd2: JSON lines by ``ct.event``), ``loss`` = ``1 - seen/kernel``;
* ``µs/event`` - utime+stime of the listener's processes (``/proc/PID/stat``,
  the shipper's worker processes included) from just before the traffic until
  its output settled, divided by the events it delivered (``seen``: the
  issue's "µs per shipped event"; equal to the kernel's events when nothing
  was lost);
* ``VmHWM`` - peak RSS (the sum over the shipper's processes with workers).

Run as root on a Linux box with netfilter, conntrack-tools, ulogd2 and
ulogd2-json, GNU time, from the repository root::

    python3 bench/bench_events.py                                  # the full table
    python3 bench/bench_events.py --rate 10000 --duration 5 --dump-entries 50000 \\
        --memory-flows 50000                                       # quick check

This is a script, never a unit test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import ipaddress
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_dump  # noqa: E402 - after the sys.path fix; the dump row's measurement

from shipper.lab import Lab, LabError  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The lab's external networks: every generated flow goes there (the MASQUERADE rules'
#: flows); other pod-CIDR entries (the gateway's own IGMP/MLD) are not counted.
EXT_CIDRS = (Lab.ext_cidr4, Lab.ext_cidr6)
ROWS = ("new", "new+destroy", "workers", "dump", "memory")
LISTENERS = ("conntrack", "ulogd2", "shipper")
LISTENER_TITLES = {"conntrack": "`conntrack -E` (`-L`)", "ulogd2": "ulogd2 NFCT→JSON",
                   "shipper": "shipper"}
#: ``ct.event`` values of ulogd's NFCT plugin (libnetfilter_conntrack's NFCT_T_*).
ULOGD_EVENT_NEW = 1
ULOGD_EVENT_DESTROY = 4
#: The NFCT plugin's ``event_mask`` bits (NF_NETLINK_CONNTRACK_NEW / _DESTROY groups).
ULOGD_MASK = {"new": 1, "destroy": 4}


@dataclass
class GapRecords:
    """The shipper's gap records: how many, the sum of their
    ``flowlog.gap.lost_events``, and how many said null (the drop counter was
    unreadable: the loss is unknown)."""

    count: int = 0
    lost: int = 0
    lost_unknown: int = 0


@dataclass
class ListenerRun:
    """One listener alone on one load (one fresh lab)."""

    row: str
    listener: str
    events: list[str]
    rate: float
    duration: float
    generated_sent: int = 0
    generated_rate: float = 0.0
    kernel_new: int = 0
    kernel_destroy: int = 0
    seen_new: int = 0
    seen_destroy: int = 0
    loss: float | None = None
    cpu_s: float | None = None
    us_per_event: float | None = None
    vmhwm_kb: int | None = None
    processes: int = 0
    #: The kernel's receive buffer of the listener's event socket(s) (``ss -m``: rb).
    socket_rb: list[int] = field(default_factory=list)
    #: Events the kernel dropped on the listener's event socket(s) (overruns).
    socket_drops: int | None = None
    live_flows: int | None = None
    #: Shipper records whose event.id had been shipped already (not counted as seen).
    duplicates: int | None = None
    #: The shipper's gap records (None for the other listeners).
    gaps: GapRecords | None = None
    #: ``conntrack.workers`` given to the shipper (the workers row), else None.
    workers: int | None = None
    warnings: int = 0
    shipper_metrics: dict[str, float] = field(default_factory=dict)
    rejected: str | None = None
    error: str | None = None

    @property
    def kernel_events(self) -> int:
        """NEW plus DESTROY events the kernel generated for pod flows."""
        return self.kernel_new + self.kernel_destroy


@dataclass
class DumpRow:
    """The medians of ``bench_dump.run`` (``conntrack -L -o extended`` and the shipper)."""

    entries: int = 0
    conntrack: dict[str, float] = field(default_factory=dict)
    shipper: dict[str, float] = field(default_factory=dict)
    ratios_wall: list[float] = field(default_factory=list)
    ratios_cpu: list[float] = field(default_factory=list)
    #: ``dump --workers N`` (``--dump-workers``; 1: not run)
    workers: int = 1
    shipper_workers: dict[str, float] = field(default_factory=dict)
    ratios_wall_workers: list[float] = field(default_factory=list)
    ratios_cpu_workers: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Table:
    """Everything one run measured at one rate."""

    rate: float
    machine: dict[str, str]
    load: str
    runs: list[ListenerRun] = field(default_factory=list)
    dump: DumpRow | None = None

    def run(self, row: str, listener: str) -> ListenerRun | None:
        """The run of ``listener`` on ``row``, None when it did not run."""
        for r in self.runs:
            if r.row == row and r.listener == listener:
                return r
        return None


# ----------------------------------------------------------------- /proc and ss
def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its living descendants (by the parent pid in ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids: Iterable[int]) -> int:
    """utime + stime of ``pids`` in clock ticks (fields 14 and 15 of proc(5))."""
    total = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f is not None:
            total += int(f[11]) + int(f[12])
    return total


def cpu_split(pin: bool) -> tuple[set[int], set[int]] | None:
    """``(the load's CPUs, the listener's CPUs)`` when pinning (``--pin``, on a machine
    with at least two CPUs this process may use): the load on the first, the listener
    on the others. None: the scheduler places both."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def pin_tree(pid: int, cpus: set[int]) -> int:
    """Bind every thread of ``pid`` and of its descendants to ``cpus`` (threads and
    processes they start later inherit it); return how many threads were bound."""
    bound = 0
    for p in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), cpus)
                bound += 1
    return bound


def vmhwm_kb(pids: Iterable[int]) -> int | None:
    """Sum of the peak RSS (``VmHWM``) of ``pids``, None when none is readable."""
    total, found = 0, False
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
                    found = True
    return total if found else None


NETLINK_NETFILTER = 12
_SS_NFT = re.compile(r"\bnft:(?:\S*/)?(-?\d+)\s.*?skmem:\(\S*?\brb(\d+)")


def netlink_event_sockets(netlink_tables: Iterable[str], inodes: set[int]) -> dict[int, int]:
    """``{portid: drops}`` of the netfilter netlink sockets with multicast groups (event
    sockets) among ``inodes``, from ``/proc/net/netlink`` tables (portid as ``ss`` prints
    it: signed)."""
    out: dict[int, int] = {}
    for table in netlink_tables:
        for line in table.splitlines()[1:]:
            f = line.split()
            # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            if len(f) < 10 or not f[1].isdigit() or int(f[1]) != NETLINK_NETFILTER:
                continue
            if int(f[3], 16) == 0 or int(f[9]) not in inodes:
                continue
            portid = int(f[2])
            out[portid - 2**32 if portid >= 2**31 else portid] = int(f[8])
    return out


def ss_receive_buffers(ss_output: str) -> dict[int, int]:
    """``{portid: rb}`` of the netfilter sockets in ``ss -f netlink -m`` output."""
    return {int(m.group(1)): int(m.group(2)) for m in _SS_NFT.finditer(ss_output)}


def event_sockets(lab: Lab, pids: Iterable[int]) -> list[tuple[int, int]]:
    """``(rb, drops)`` of every event socket of ``pids``: the receive buffer the kernel
    gives it (``ss``: twice what setsockopt asked) and the events it dropped on overruns."""
    inodes: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    # The gateway namespace's table (the shipper opens its socket there from a thread).
    tables = [lab.run(lab.gw, "cat", "/proc/net/netlink").stdout]
    socks = netlink_event_sockets(tables, inodes)
    rbs = ss_receive_buffers(lab.run(lab.gw, "ss", "-f", "netlink", "-m", "-p").stdout)
    return [(rbs.get(portid, 0), drops) for portid, drops in sorted(socks.items())]


# ----------------------------------------------------------------- output counting
def _net_matcher(cidrs: Sequence[str]) -> Callable[[str], bool]:
    nets = [ipaddress.ip_network(c) for c in cidrs]
    cache: dict[str, bool] = {}

    def inside(addr: str) -> bool:
        hit = cache.get(addr)
        if hit is None:
            try:
                ip = ipaddress.ip_address(addr)
                hit = any(ip in n for n in nets)
            except ValueError:
                hit = False
            cache[addr] = hit
        return hit

    return inside


@dataclass
class ShipperOutput:
    """What the shipper's output says (:func:`count_shipper_records`)."""

    new: int = 0
    destroy: int = 0
    #: Records whose event.id had been seen already (not counted as seen).
    duplicates: int = 0
    gaps: GapRecords = field(default_factory=GapRecords)


def count_shipper_records(path: Path) -> ShipperOutput:
    """NEW, DESTROY and duplicate records and the gap records' lost events in the
    shipper's file sink output (``path``, ``path.1``...). A record whose ``event.id``
    (the first ``"id"`` of the line: node, conntrack id, action and event time, unique
    per event) was seen before is a duplicate, counted apart and not as seen: with
    sharded readers an event read by two workers would show here."""
    res = ShipperOutput()
    ids: set[bytes] = set()
    for f in sorted(path.parent.glob(path.name + "*")):
        with f.open("rb") as fh:
            for line in fh:
                if b'"action":"new"' in line:
                    is_new = True
                elif b'"action":"destroy"' in line:
                    is_new = False
                else:
                    if b'"action":"gap"' in line:
                        lost = json.loads(line)["flowlog"]["gap"]["lost_events"]
                        res.gaps.count += 1
                        if lost is None:
                            res.gaps.lost_unknown += 1
                        else:
                            res.gaps.lost += lost
                    continue
                start = line.find(b'"id":"') + 6
                eid = line[start:line.find(b'"', start)]
                if eid in ids:
                    res.duplicates += 1
                    continue
                ids.add(eid)
                if is_new:
                    res.new += 1
                else:
                    res.destroy += 1
    return res


def count_conntrack_lines(lines: Iterable[bytes], sources: Sequence[str],
                          destinations: Sequence[str]) -> tuple[int, int]:
    """``(new, destroy)`` lines of ``conntrack -E`` whose original source is in ``sources``
    and original destination in ``destinations`` (the flows the kernel reference counts)."""
    src_ok, dst_ok = _net_matcher(sources), _net_matcher(destinations)
    new = destroy = 0
    for line in lines:
        head = line[:12]  # "%9s" of the event type: "    [NEW] ", "[DESTROY] "
        if b"[NEW]" in head:
            kind = "new"
        elif b"[DESTROY]" in head:
            kind = "destroy"
        else:
            continue
        if src_ok(_field(line, b" src=")) and dst_ok(_field(line, b" dst=")):
            if kind == "new":
                new += 1
            else:
                destroy += 1
    return new, destroy


def count_table_entries(lines: Iterable[str], sources: Sequence[str],
                        destinations: Sequence[str]) -> int:
    """Entries of a ``conntrack -L`` listing whose original source is in ``sources`` and
    original destination in ``destinations``."""
    src_ok, dst_ok = _net_matcher(sources), _net_matcher(destinations)
    return sum(1 for text in lines
               if src_ok(_field(line := text.encode(), b" src="))
               and dst_ok(_field(line, b" dst=")))


def _field(line: bytes, key: bytes) -> str:
    """The value after the first ``key`` (`` src=``) of a ``conntrack -E`` line, or ""."""
    i = line.find(key)
    if i < 0:
        return ""
    i += len(key)
    j = line.find(b" ", i)
    return line[i:j if j > 0 else None].decode(errors="replace").strip()


def count_ulogd_json(lines: Iterable[bytes], sources: Sequence[str],
                     destinations: Sequence[str]) -> tuple[int, int]:
    """``(new, destroy)`` lines of ulogd's JSON output (NFCT -> IP2STR -> JSON) whose
    original source (``src_ip``) is in ``sources`` and original destination (``dest_ip``)
    in ``destinations``; unparsable lines are not counted."""
    src_ok, dst_ok = _net_matcher(sources), _net_matcher(destinations)
    new = destroy = 0
    for line in lines:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or not src_ok(str(rec.get("src_ip", ""))) \
                or not dst_ok(str(rec.get("dest_ip", ""))):
            continue
        event = rec.get("ct.event")
        if event == ULOGD_EVENT_NEW:
            new += 1
        elif event == ULOGD_EVENT_DESTROY:
            destroy += 1
    return new, destroy


def _read_lines(path: Path) -> Iterable[bytes]:
    if not path.exists():
        return
    with path.open("rb") as fh:
        yield from fh


# ----------------------------------------------------------------- listener configs
# conntrack-tools 1.4.7's ``-b`` sizes the buffer of its socket *without* multicast groups
# and leaves the event socket at net.core.rmem_default (read-only inside a network
# namespace). For the "equal buffers" conntrack -E runs with this LD_PRELOAD
# shim: when a netlink socket binds with groups (libnfnetlink subscribes that way), it
# first asks SO_RCVBUFFORCE of FLOWLOG_BENCH_RCVBUF bytes, the size -b asked for. Nothing
# else of the tool changes; the rb column shows the buffer the kernel gave.
RCVBUF_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <linux/netlink.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind)
        real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_NETLINK && len >= sizeof(struct sockaddr_nl)
        && ((const struct sockaddr_nl *)addr)->nl_groups != 0) {
        const char *v = getenv("FLOWLOG_BENCH_RCVBUF");
        int size = v ? atoi(v) : 0;
        if (size > 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
    }
    return real_bind(fd, addr, len);
}
"""


def rcvbuf_shim(workdir: Path) -> Path | None:
    """Build the LD_PRELOAD shim above in ``workdir`` (None, with a note, without gcc)."""
    src, lib = workdir / "rcvbuf_shim.c", workdir / "rcvbuf_shim.so"
    if lib.exists():
        return lib
    src.write_text(RCVBUF_SHIM)
    try:
        res = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src),
                              "-ldl"], capture_output=True, text=True, check=False)
    except OSError as exc:
        print(f"# no rcvbuf shim for conntrack -E ({exc}): its event socket keeps "
              "rmem_default", file=sys.stderr)
        return None
    if res.returncode != 0:
        print(f"# no rcvbuf shim for conntrack -E (gcc: {res.stderr.strip()[:200]}): its "
              "event socket keeps rmem_default", file=sys.stderr)
        return None
    return lib


def ulogd_plugin_dir() -> Path | None:
    """Where Debian's ulogd2 and ulogd2-json put their plugins (None when absent)."""
    for pattern in ("/usr/lib/*/ulogd/ulogd_output_JSON.so", "/usr/lib/ulogd/ulogd_output_JSON.so",
                    "/usr/local/lib/ulogd/ulogd_output_JSON.so"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return Path(hits[0]).parent
    return None


def ulogd_config(plugins: Path, log: Path, out: Path, events: Sequence[str], rcvbuf: int,
                 sync: bool) -> str:
    """ulogd's config: NFCT events (no hash table: one JSON line per event, as
    ``conntrack -E`` prints one line per event) -> IP2STR -> JSON file.

    ``netlink_socket_buffer_size`` is set only when it is below
    ``netlink_socket_buffer_maxsize``, and on ENOBUFS the plugin doubles the buffer up
    to the max: max = size + 1 keeps the buffer at ``rcvbuf``, as the other listeners'.
    """
    mask = sum(ULOGD_MASK[e] for e in events)
    return "\n".join([
        "[global]",
        f'logfile="{log}"',
        "loglevel=3",
        f'plugin="{plugins}/ulogd_inpflow_NFCT.so"',
        f'plugin="{plugins}/ulogd_filter_IP2STR.so"',
        f'plugin="{plugins}/ulogd_output_JSON.so"',
        "stack=ct1:NFCT,ip2str1:IP2STR,json1:JSON",
        "",
        "[ct1]",
        f"event_mask={mask}",
        "hash_enable=0",
        f"netlink_socket_buffer_size={rcvbuf}",
        f"netlink_socket_buffer_maxsize={rcvbuf + 1}",
        "",
        "[json1]",
        f'file="{out}"',
        f"sync={1 if sync else 0}",
        "",
    ])


def shipper_config(rcvbuf: int, events: Sequence[str], workers: int | None) -> str:
    """The shipper's YAML config (buffer, event types, workers, no rotation)."""
    lines = [
        "conntrack:",
        f"  rcvbuf_bytes: {rcvbuf}",
        f"  events: [{', '.join(events)}]",
        "  dump_at_start: false",
    ]
    if workers is not None:
        lines.append(f"  workers: {workers}")
    lines += ["sink:", "  file:", "    max_bytes: 100000000000", ""]
    return "\n".join(lines)


def shipper_command(args: argparse.Namespace, lab: Lab, out: Path, metrics: str,
                    config: Path, pods: Path) -> list[str]:
    """Return the shipper's command line (``python3 -m shipper run ...``)."""
    cmd = [sys.executable, "-m", "shipper", "run", "--netns", lab.gw]
    for cidr in lab.pod_cidrs():
        cmd += ["--pod-cidr", cidr]
    for cidr in lab.cluster_cidrs():
        cmd += ["--exclude-cidr", cidr]
    cmd += ["--sink", "file", "--output", str(out), "--metrics-address", metrics,
            "--config", str(config), "--pods-file", str(pods)]
    return cmd + list(args.shipper_arg)


# ----------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


def _loss_metrics(metrics: dict[str, float]) -> dict[str, float]:
    keep = ("shipper_overruns_total", "shipper_events_lost_total",
            "shipper_records_dropped_total", "shipper_decode_errors_total",
            "shipper_errors_total")
    return {k: v for k, v in metrics.items() if k.startswith(keep) and v}


def _total_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())


class OutputWatch:
    """Follows a listener's output size and CPU time. ``busy_ticks`` is the CPU time at
    the last sample that saw the output grow: idle time after the last event (the
    shipper's polling while the bench waits) is not counted."""

    def __init__(self, out: Path, pids: Sequence[int]) -> None:
        """Start following ``out`` and the CPU time of ``pids``."""
        self.out, self.pids = out, list(pids)
        self.size = _total_size(out) if out.parent.exists() else 0
        self.busy_ticks = cpu_ticks(self.pids)
        self.last_growth = time.monotonic()

    def sample(self) -> None:
        """Read the size; if it grew, remember the CPU time now."""
        size = _total_size(self.out)
        if size != self.size:
            self.size, self.busy_ticks = size, cpu_ticks(self.pids)
            self.last_growth = time.monotonic()

    def wait_quiet(self, quiet_s: float, limit_s: float) -> None:
        """Sample until the output has not grown for ``quiet_s`` (bounded by ``limit_s``)."""
        deadline = time.monotonic() + limit_s
        self.sample()
        while time.monotonic() < deadline and time.monotonic() - self.last_growth < quiet_s:
            time.sleep(0.1)
            self.sample()


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


def _table_size(lab: Lab) -> int:
    return int(lab.run(lab.gw, "conntrack", "-C").stdout.strip())


def _wait_subscribed(lab: Lab, proc: subprocess.Popen[bytes], err: Path,
                     timeout: float) -> None:
    """Poll until ``proc`` has an event socket (a netfilter netlink socket with multicast
    groups: it has subscribed); bounded; raises RuntimeError if it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited ({proc.returncode}): "
                               f"{err.read_text(errors='replace')[-800:].strip()}")
        if event_sockets(lab, [proc.pid]):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no event socket within {timeout}s")


def _wait_ready(proc: subprocess.Popen[bytes], metrics: str, err: Path, timeout: float) -> None:
    """Poll the shipper's metrics endpoint until it answers (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ShipperExited(proc.returncode, err.read_text(errors="replace"))
        if _scrape(metrics, timeout=0.5) is not None:
            return
        time.sleep(0.1)
    raise RuntimeError(f"shipper not ready within {timeout}s (no metrics on {metrics})")


class ShipperExited(RuntimeError):
    """The shipper exited while starting (exit code and stderr)."""

    def __init__(self, code: int, stderr: str) -> None:
        """Keep the exit code and stderr."""
        super().__init__(f"shipper exited ({code}): {stderr[-1500:].strip()}")
        self.code = code
        self.stderr = stderr


# ----------------------------------------------------------------- one listener run
def run_listener(args: argparse.Namespace, row: str, listener: str) -> ListenerRun:
    """Run one listener alone on the row's load in a fresh lab; remove everything after."""
    memory = row == "memory"
    events = ["new"] if row == "new" else ["new", "destroy"]
    duration = args.memory_flows / args.rate if memory else args.duration
    res = ListenerRun(row=row, listener=listener, events=events, rate=args.rate,
                      duration=duration)
    tmp = Path(tempfile.mkdtemp(prefix=f"flowlog-bench-{listener}-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        with Lab(pods=args.senders, ipv6=True) as lab:
            # The same kernel work and message size for every listener: the shipper
            # would turn accounting and timestamps on itself.
            for key, value in (("events", 1), ("acct", 1), ("timestamp", 1)):
                lab.set_sysctl(lab.gw, f"net.netfilter.nf_conntrack_{key}", value)
            udp_timeout = math.ceil(duration + 60) if memory else args.udp_timeout
            lab.set_sysctl(lab.gw, "net.netfilter.nf_conntrack_udp_timeout", udp_timeout)
            out, err = tmp / "out", tmp / "err"
            metrics = ""
            if listener == "conntrack":
                mask = ",".join(e.upper() for e in events)
                env = dict(os.environ)
                shim = None if args.no_conntrack_shim else rcvbuf_shim(args.shim_dir)
                if shim is not None:
                    env.update(LD_PRELOAD=str(shim), FLOWLOG_BENCH_RCVBUF=str(args.rcvbuf))
                with out.open("wb") as o, err.open("wb") as e:
                    proc = lab.popen(lab.gw, "conntrack", "-E", "-e", mask, "-b",
                                     str(args.rcvbuf), stdout=o, stderr=e, env=env)
                _wait_subscribed(lab, proc, err, args.ready_timeout)
            elif listener == "ulogd2":
                plugins = ulogd_plugin_dir()
                if plugins is None or not os.access("/usr/sbin/ulogd", os.X_OK):
                    raise RuntimeError("ulogd2 is not installed (Debian packages ulogd2 and "
                                       "ulogd2-json; or run with --no-ulogd2)")
                conf = tmp / "ulogd.conf"
                conf.write_text(ulogd_config(plugins, tmp / "ulogd.log", out, events,
                                             args.rcvbuf, args.ulogd_sync))
                with (tmp / "ulogd.out").open("wb") as o, err.open("wb") as e:
                    proc = lab.popen(lab.gw, "/usr/sbin/ulogd", "-c", str(conf),
                                     stdout=o, stderr=e)
                _wait_subscribed(lab, proc, tmp / "ulogd.log", args.ready_timeout)
            else:
                workers = args.workers if row == "workers" else None
                res.workers = workers
                config = tmp / "shipper.yaml"
                config.write_text(shipper_config(args.rcvbuf, events, workers))
                # The lab's pods (labels, owner, node): the full default record, as on a
                # real node.
                pods = lab.write_pod_list(tmp / "pods.json")
                metrics = f"127.0.0.1:{_free_port()}"
                cmd = shipper_command(args, lab, out, metrics, config, pods)
                with (tmp / "shipper.out").open("wb") as o, err.open("wb") as e:
                    proc = subprocess.Popen(cmd, stdout=o, stderr=e, cwd=REPO,
                                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                try:
                    _wait_ready(proc, metrics, err, args.ready_timeout)
                except ShipperExited as exc:
                    if exc.code == 2:  # EXIT_CONFIG: e.g. a shipper without conntrack.workers
                        lines = [ln for ln in exc.stderr.splitlines() if ln.strip()]
                        res.rejected = " / ".join(lines[-3:])[-300:]
                        res.error = f"the shipper rejected the config: {res.rejected}"
                        return res
                    raise
                # Metrics answer from the main process; worker processes subscribe on
                # their own: wait until every reader has its event socket.
                deadline = time.monotonic() + args.ready_timeout
                while len(event_sockets(lab, process_tree(proc.pid))) < (workers or 1):
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"the shipper has not {workers or 1} event "
                                           f"socket(s) within {args.ready_timeout}s")
                    time.sleep(0.1)

            baseline = _table_size(lab)
            before = lab.nat_new_flows()
            pids = process_tree(proc.pid)
            split = cpu_split(args.pin)
            if split is not None:  # the listener off the load's CPU (see --no-pin)
                pin_tree(proc.pid, split[1])
            cpu0 = cpu_ticks(pids)
            per = args.memory_flows // args.senders if memory else 10_000_000
            floods = [lab.start_udp_flood(i, args.rate / args.senders,
                                          duration * 2 + 5 if memory else duration,
                                          family=args.family, max_count=per, sockets=64)
                      for i in range(args.senders)]
            if split is not None:
                for f in floods:
                    pin_tree(f.proc.pid, split[0])
            sent = [f.wait() for f in floods]
            res.generated_sent = sum(s.sent for s in sent)
            res.generated_rate = res.generated_sent / max(max(s.seconds for s in sent), 1e-9)
            watch = OutputWatch(out, pids)
            if "destroy" in events and not memory:
                # DESTROYs come when the kernel's garbage collector reaps the expired
                # entries, in bursts, from a few to about 60 s after they expired: wait
                # (bounded) until the table is back to about its size before the load (a
                # few entries of the gateway's own may come and go).
                deadline = time.monotonic() + args.destroy_wait
                while time.monotonic() < deadline and _table_size(lab) > baseline + 16:
                    watch.sample()
                    time.sleep(0.25)
            watch.wait_quiet(args.settle, args.settle_limit)
            res.kernel_new = lab.nat_new_flows() - before
            if memory:
                res.live_flows = _table_size(lab)
            elif "destroy" in events:
                listing = lab.run(lab.gw, "conntrack", "-L", "-p", "udp",
                                  "-f", "ipv6" if args.family == 6 else "ipv4").stdout
                left = count_table_entries(listing.splitlines(), lab.pod_cidrs(), EXT_CIDRS)
                res.kernel_destroy = max(0, res.kernel_new - left)
            pids = process_tree(proc.pid)
            socks = event_sockets(lab, pids)
            res.socket_rb = [rb for rb, _ in socks]
            res.socket_drops = sum(d for _, d in socks)
            res.processes = len(pids)
            res.cpu_s = (watch.busy_ticks - cpu0) / CLK_TCK
            res.vmhwm_kb = vmhwm_kb(pids)
            if proc.poll() is not None:
                res.error = f"{listener} exited early ({proc.returncode})"
            if metrics:
                res.shipper_metrics = _loss_metrics(_scrape(metrics) or {})
            _stop(proc, args.stop_grace)
            if listener == "shipper":
                shipped = count_shipper_records(out)
                res.seen_new, res.seen_destroy = shipped.new, shipped.destroy
                res.duplicates, res.gaps = shipped.duplicates, shipped.gaps
            elif listener == "conntrack":
                res.seen_new, res.seen_destroy = count_conntrack_lines(
                    _read_lines(out), lab.pod_cidrs(), EXT_CIDRS)
                res.warnings = err.read_text(errors="replace").count("hit ENOBUFS")
            else:
                res.seen_new, res.seen_destroy = count_ulogd_json(
                    _read_lines(out), lab.pod_cidrs(), EXT_CIDRS)
                res.warnings = (tmp / "ulogd.log").read_text(errors="replace").count(
                    "losing events")
            if res.kernel_events:
                res.loss = 1 - (res.seen_new + res.seen_destroy) / res.kernel_events
            seen = res.seen_new + res.seen_destroy
            if seen:
                # Per event the listener delivered (the "per shipped event"): a
                # listener that lost events did not pay for them.
                res.us_per_event = res.cpu_s * 1e6 / seen
    except (LabError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        if proc is not None:
            with contextlib.suppress(Exception):
                _stop(proc, args.stop_grace)
        if args.keep:
            print(f"# kept {tmp}", file=sys.stderr)
        else:
            for path in tmp.iterdir():
                path.unlink()
            tmp.rmdir()
    return res


def run_dump(args: argparse.Namespace) -> DumpRow:
    """The dump row: ``bench_dump.run`` (its own fresh lab) with our entries and repeats."""
    row = DumpRow(entries=args.dump_entries, workers=args.dump_workers)
    if not os.access(bench_dump.GNU_TIME, os.X_OK):
        row.error = f"needs GNU time at {bench_dump.GNU_TIME} (Debian package 'time')"
        return row
    workers = "1" if row.workers == 1 else f"1,{row.workers}"
    dump_args = bench_dump.build_parser().parse_args(
        ["--entries", str(args.dump_entries), "--repeat", str(args.dump_repeat),
         "--workers", workers])
    try:
        res: dict[str, Any] = bench_dump.run(dump_args)
    except (LabError, OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    row.entries = int(res["entries_at_start"])
    row.conntrack = dict(res["median"]["conntrack"])
    row.shipper = dict(res["median"]["shipper"])
    row.ratios_wall = list(res["ratios_wall"])
    row.ratios_cpu = list(res["ratios_cpu"])
    if row.workers > 1:
        ratios = bench_dump.ratios_key(row.workers)
        row.shipper_workers = dict(res["median"][bench_dump.shipper_key(row.workers)])
        row.ratios_wall_workers = list(res[f"{ratios}_wall"])
        row.ratios_cpu_workers = list(res[f"{ratios}_cpu"])
    failed = [r for r in res["runs"] if r["rc"] != 0]
    if failed:
        row.error = "failed: " + ", ".join(f"{r['tool']} rc={r['rc']}" for r in failed)
    return row


# ----------------------------------------------------------------- machine, plan
def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "absent"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine_info() -> dict[str, str]:
    """What a pasted table needs to be self-describing: CPU, cores, kernel, versions."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = _tool_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "conntrack": _tool_version(["conntrack", "--version"]),
        "ulogd": _tool_version(["/usr/sbin/ulogd", "-V"]),
        "shipper": commit + (" (with local changes)" if dirty else ""),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (row, listener) runs in order; the dump row is ("dump", "")."""
    out: list[tuple[str, str]] = []
    for row in args.rows:
        if row == "dump":
            out.append(("dump", ""))
        elif row == "workers":
            if "shipper" in args.listeners:
                out.append(("workers", "shipper"))
        else:
            out += [(row, lis) for lis in LISTENERS if lis in args.listeners]
    return out


def expected_seconds(args: argparse.Namespace) -> float:
    """A rough estimate of the whole run (lab set-up, load, waits, dump fill)."""
    total = 0.0
    for row, _ in plan(args):
        if row == "dump":
            listers = 2 + (args.dump_workers > 1)
            total += (15 + args.dump_entries / 30_000
                      + listers * args.dump_repeat * args.dump_entries / 60_000)
        elif row == "memory":
            total += 8 + args.memory_flows / args.rate + args.settle
        else:
            total += 8 + args.duration + args.settle
            if row != "new":
                # the kernel's garbage collector reaps expired entries from a few to
                # about 60 s after they expired (measured here): 30 s on average
                total += args.udp_timeout + min(30.0, args.destroy_wait)
    return total


def load_description(args: argparse.Namespace) -> str:
    """One line: what load every listener got."""
    return (f"UDP, one new flow per datagram through the gateway's MASQUERADE, IPv{args.family}, "
            f"{args.senders} sender(s), {args.rate:.0f} flows/s for {args.duration:g} s "
            f"(memory: {args.memory_flows} flows, UDP timeout long), UDP timeout "
            f"{args.udp_timeout} s, receive buffer {args.rcvbuf} bytes for every listener; "
            f"listeners one at a time, each in a fresh lab; {_pin_text(args)}")


def _pin_text(args: argparse.Namespace) -> str:
    split = cpu_split(args.pin)
    if split is None:
        return "not pinned (the scheduler places load and listener)"
    load, listener = (",".join(str(c) for c in sorted(c)) for c in split)
    return f"the load pinned to CPU {load}, the listener to CPU {listener}"


# ----------------------------------------------------------------- the table
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


def _mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def _get(r: ListenerRun | None, name: str) -> float | None:
    value = None if r is None else getattr(r, name)
    return None if value is None else float(value)


def _event_cell(r: ListenerRun | None) -> str:
    if r is None:
        return "not run"
    if r.rejected is not None:
        return f"rejected the config ({r.rejected})"
    if r.error and r.us_per_event is None:
        return f"ERROR: {r.error[:120]}"
    return f"{_pct(r.loss)}, {r.us_per_event:.1f} µs/event" if r.us_per_event is not None else "-"


def _memory_cell(r: ListenerRun | None) -> str:
    if r is None:
        return "not run"
    if r.rejected is not None:
        return f"rejected the config ({r.rejected})"
    if r.vmhwm_kb is None:
        return f"ERROR: {(r.error or '?')[:120]}"
    return f"{_mib(r.vmhwm_kb)} ({_pct(r.loss)} loss)"


def table_rows(t: Table) -> list[list[str]]:
    """The table's cells: one list per row (header excluded)."""
    rows: list[list[str]] = []
    k = f"{t.rate / 1000:g}k/s"
    for row in ("new", "new+destroy", "workers", "memory"):
        sh = t.run(row, "shipper")
        base_row = "new+destroy" if row == "workers" else row
        ct, ul = t.run(base_row, "conntrack"), t.run(base_row, "ulogd2")
        if (t.run(row, "shipper") or t.run(row, "conntrack") or t.run(row, "ulogd2")) is None:
            continue  # not measured in this run
        if row == "memory":
            label = f"memory, {sh.live_flows if sh and sh.live_flows else '?'} live flows " \
                    f"(NEW+DESTROY, {k})"
            cells = [_memory_cell(ct), _memory_cell(ul), _memory_cell(sh)]
            ratios = [_ratio(_get(sh, "vmhwm_kb"), _get(ct, "vmhwm_kb")),
                      _ratio(_get(sh, "vmhwm_kb"), _get(ul, "vmhwm_kb"))]
        else:
            label = {"new": f"NEW only, {k}", "new+destroy": f"NEW+DESTROY, {k}",
                     "workers": f"N={sh.workers if sh else '?'} workers, NEW+DESTROY, {k}"}[row]
            cells = [_event_cell(ct), _event_cell(ul), _event_cell(sh)]
            if row == "workers":
                cells[0] = cells[0] + " (NEW+DESTROY row)" if ct else cells[0]
                cells[1] = cells[1] + " (NEW+DESTROY row)" if ul else cells[1]
            ratios = [_ratio(_get(sh, "us_per_event"), _get(ct, "us_per_event")),
                      _ratio(_get(sh, "us_per_event"), _get(ul, "us_per_event"))]
        rows.append([label, *cells, *ratios])
    if t.dump is not None:
        d = t.dump
        shippers = [(f"dump {d.entries} entries", d.shipper)]
        if d.workers > 1:
            shippers.append((f"dump {d.entries} entries, N={d.workers} workers",
                             d.shipper_workers))
        for label, med in shippers:
            if d.conntrack and med:
                ct_cell = (f"{d.conntrack['wall_s']:.2f} s, CPU {d.conntrack['cpu_s']:.2f} s, "
                           f"{d.conntrack['maxrss_mib']:.1f} MiB")
                sh_cell = (f"{med['wall_s']:.2f} s, CPU {med['cpu_s']:.2f} s, "
                           f"{med['maxrss_mib']:.1f} MiB")
                ratio = (f"{med['wall_s'] / d.conntrack['wall_s']:.2f} wall, "
                         f"{med['cpu_s'] / d.conntrack['cpu_s']:.2f} CPU")
            else:
                ct_cell = sh_cell = f"ERROR: {(d.error or '?')[:120]}"
                ratio = "-"
            rows.append([label, ct_cell, "n/a (no one-shot dump)", sh_cell, ratio, "-"])
    return rows


def _gap_text(r: ListenerRun) -> str:
    """The shipper's gap records against what is missing from its output: the issue's
    "gap accounting is exact" is ``lost == missing``."""
    g = r.gaps
    missing = r.kernel_events - r.seen_new - r.seen_destroy
    if g is None or not (g.count or missing > 0):
        return ""
    text = f"  gaps {g.count}: lost {g.lost}"
    if g.lost_unknown:
        text += f" (+{g.lost_unknown} unknown)"
    return text + (" = missing" if g.lost == missing else f", missing {missing}")


def format_table(t: Table) -> str:
    """The table as Markdown, preceded by the machine and load, followed by the runs."""
    m = t.machine
    head = ["row", LISTENER_TITLES["conntrack"], LISTENER_TITLES["ulogd2"],
            LISTENER_TITLES["shipper"], "shipper / conntrack", "shipper / ulogd2"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, {m['python']}, "
        f"{m['conntrack']}, ulogd {m['ulogd'].split()[-1] if m['ulogd'] else '?'}; "
        f"shipper {m['shipper']}; load average {m['loadavg_start']} at start, "
        f"{m.get('loadavg_end', '?')} at end",
        f"load: {t.load}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(t)]
    lines += ["", "runs (kernel = events the kernel generated for pod flows; rb = the "
              "listener's socket receive buffer as the kernel reports it, twice the asked size):"]
    for r in t.runs:
        lines.append(
            f"  {r.row:<11} {r.listener:<9} gen {r.generated_rate:>8.0f}/s  kernel "
            f"{r.kernel_new}+{r.kernel_destroy}  seen {r.seen_new}+{r.seen_destroy}  loss "
            f"{_pct(r.loss)}  cpu {r.cpu_s if r.cpu_s is not None else float('nan'):.2f} s  "
            f"VmHWM {_mib(r.vmhwm_kb)}  procs {r.processes}  rb {r.socket_rb}  "
            f"dropped {r.socket_drops}"
            + (f"  dup {r.duplicates}" if r.duplicates is not None else "")
            + _gap_text(r)
            + (f"  live {r.live_flows}" if r.live_flows is not None else "")
            + (f"  warnings {r.warnings}" if r.warnings else "")
            + (f"  shipper reported {r.shipper_metrics}" if r.shipper_metrics else "")
            + (f"  ERROR {r.error}" if r.error else ""))
    if t.dump is not None and t.dump.ratios_wall:
        lines.append("  dump pairwise ratios: wall "
                     + ", ".join(f"{x:.2f}" for x in t.dump.ratios_wall) + "; CPU "
                     + ", ".join(f"{x:.2f}" for x in t.dump.ratios_cpu))
    if t.dump is not None and t.dump.ratios_wall_workers:
        lines.append(f"  dump N={t.dump.workers} pairwise ratios: wall "
                     + ", ".join(f"{x:.2f}" for x in t.dump.ratios_wall_workers) + "; CPU "
                     + ", ".join(f"{x:.2f}" for x in t.dump.ratios_cpu_workers))
    return "\n".join(lines)


def failed(t: Table) -> bool:
    """True when a run failed (loss is a result, never a failure)."""
    return any(r.error for r in t.runs) or bool(t.dump and t.dump.error)


# ----------------------------------------------------------------- CLI
def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {value!r})")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=25000, help="new flows/s (default 25000)")
    p.add_argument("--rates", help="comma-separated rates: one table per rate")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of traffic per run of the event rows (default 10)")
    p.add_argument("--family", type=int, choices=[4, 6], default=4)
    p.add_argument("--senders", type=int, default=1,
                   help="pods sending in parallel (one Python sender makes ~25-100k/s)")
    p.add_argument("--rcvbuf", type=int, default=8 * 1024 * 1024,
                   help="receive buffer bytes of every listener (default 8 MiB)")
    p.add_argument("--rows", type=_csv(ROWS), default=list(ROWS),
                   help=f"rows to measure, comma-separated (default {','.join(ROWS)})")
    p.add_argument("--listeners", type=_csv(LISTENERS), default=list(LISTENERS),
                   help=f"listeners, comma-separated (default {','.join(LISTENERS)})")
    p.add_argument("--no-conntrack", action="store_true", help="skip conntrack -E")
    p.add_argument("--no-ulogd2", action="store_true", help="skip ulogd2")
    p.add_argument("--no-shipper", action="store_true", help="skip the shipper")
    p.add_argument("--no-conntrack-shim", action="store_true",
                   help="run conntrack -E without the LD_PRELOAD shim that gives its event "
                        "socket the --rcvbuf buffer (its -b misses it in conntrack-tools "
                        "1.4.7): it then keeps net.core.rmem_default")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="let the scheduler place the load and the listener (default: the "
                        "load's senders on the first CPU, the listener on the others)")
    p.add_argument("--workers", type=int, default=2,
                   help="conntrack.workers of the shipper in the workers row (default 2)")
    p.add_argument("--udp-timeout", type=int, default=1,
                   help="gateway nf_conntrack_udp_timeout in the event rows (default 1)")
    p.add_argument("--destroy-wait", type=float, default=60.0,
                   help="NEW+DESTROY rows: longest wait for the table to empty (default 60)")
    p.add_argument("--dump-entries", type=int, default=250_000,
                   help="table size of the dump row (default 250000)")
    p.add_argument("--dump-repeat", type=int, default=3,
                   help="alternating runs of each lister in the dump row (default 3)")
    p.add_argument("--dump-workers", type=int, default=2,
                   help="also time `dump --workers N` in the dump row (its own line of the "
                        "table; default 2, 1: only the one-process dump)")
    p.add_argument("--memory-flows", type=int, default=250_000,
                   help="live flows of the memory row (default 250000)")
    p.add_argument("--ulogd-sync", action="store_true",
                   help="ulogd's JSON plugin flushes every line (sync=1, as Debian's "
                        "/etc/ulogd.conf); default: the plugin's default, buffered (sync=0)")
    p.add_argument("--settle", type=float, default=1.5,
                   help="the output must not grow for this long after the traffic")
    p.add_argument("--settle-limit", type=float, default=30.0)
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument("--stop-grace", type=float, default=15.0)
    p.add_argument("--shipper-arg", action="append", default=[],
                   help="extra argument for 'python3 -m shipper run' (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (outputs, logs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 1 if a run failed, 0 otherwise (loss is not a failure)."""
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench_events: needs root (network namespaces)", file=sys.stderr)
        return 2
    skip = {"conntrack": args.no_conntrack, "ulogd2": args.no_ulogd2,
            "shipper": args.no_shipper}
    args.listeners = [lis for lis in args.listeners if not skip[lis]]
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    tables: list[Table] = []
    shim_dir = tempfile.TemporaryDirectory(prefix="flowlog-bench-shim-")
    args.shim_dir = Path(shim_dir.name)
    for rate in rates:
        args.rate = rate
        est = expected_seconds(args)
        print(f"# bench_events: {len(plan(args))} runs at {rate:.0f}/s, expected about "
              f"{est / 60:.1f} min", file=sys.stderr)
        t = Table(rate=rate, machine=machine_info(), load=load_description(args))
        tables.append(t)
        try:
            for row, listener in plan(args):
                print(f"# {row} {listener}".rstrip(), file=sys.stderr, flush=True)
                if row == "dump":
                    t.dump = run_dump(args)
                else:
                    t.runs.append(run_listener(args, row, listener))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            break
        finally:
            t.machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    shim_dir.cleanup()
    if args.json:
        print(json.dumps([asdict(t) for t in tables], indent=2))
    else:
        print("\n\n".join(format_table(t) for t in tables))
    return 1 if not tables or any(failed(t) for t in tables) else 0


if __name__ == "__main__":
    sys.exit(main())
