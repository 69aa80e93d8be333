"""``flowlog-shipper demo``: prove attribution end to end in a throwaway lab.

As root on any Linux host with netfilter and ``iptables``/``ip6tables`` (checked up
front: a missing command is named with how to install it, exit status 2):

1. build a :class:`shipper.lab.Lab` (gateway namespace with MASQUERADE, N pod
   namespaces, an external host) and write a pods inventory file for it;
2. start echo servers on the external host that log the ``ip:port`` they see
   and the first bytes each peer sends;
3. run the real pipeline (:class:`shipper.pipeline.Pipeline`) attached to the
   gateway namespace, with a file sink in a temp dir, in a thread;
4. make connections: every pod over TCP/IPv4 and TCP/IPv6, then all pods at
   once with the SAME source port (TCP v4, UDP v4, TCP v6), so MASQUERADE
   rewrites the port of all but one;
5. wait (bounded) for the records and print, for every connection the server
   saw: the node ``ip:port`` it saw, the pod the shipper's ``new`` record with
   that ``source.nat.ip``/``source.nat.port`` names, the pod that really made
   it (from the payload it sent: ground truth that does not depend on the
   shipper) and ✔/✘.

Exit status: 0 only if every connection was attributed to the right pod; 1 if
any was not; 2 if the demo could not run (not root, a host command missing, no
netfilter, timeout).
Everything is removed afterwards, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from shipper.lab.errors import LabError
from shipper.lab.host import missing_tools, missing_tools_message
from shipper.lab.topology import Lab, Server

log = logging.getLogger("shipper.lab.demo")

#: Bounded waits (seconds).
READY_TIMEOUT_S = 20.0
RECORDS_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0

_PROBE_PORT = 9  # discard: a UDP probe nobody answers; only its record matters


@dataclass(frozen=True, slots=True)
class Observed:
    """One connection as the external server saw it, with the truth and the verdict."""

    step: str
    proto: str
    family: int
    seen_ip: str
    seen_port: int
    pod_sport: int | None
    true_pod: str | None
    shipped_pod: str | None

    @property
    def ok(self) -> bool:
        """True when the shipper named the pod that really made the connection."""
        return self.true_pod is not None and self.true_pod == self.shipped_pod


def _payload(pod: int, sport: int | None = None) -> bytes:
    """The client's first bytes: its pod index (and the source port it bound, if fixed)."""
    return f"pod={pod};sport={sport or ''};".encode()


def _parse_payload(data: bytes) -> tuple[int | None, int | None]:
    """Return ``(pod index, bound source port)`` from a client's payload (None if absent)."""
    fields = dict(kv.partition("=")[::2] for kv in data.decode(errors="replace").split(";"))
    pod = fields.get("pod", "")
    sport = fields.get("sport", "")
    return (int(pod) if pod.isdigit() else None, int(sport) if sport.isdigit() else None)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record in the file sink's output (rotated files included)."""
    records: list[dict[str, Any]] = []
    for f in sorted(path.parent.glob(path.name + "*")):
        if not f.is_file():
            continue
        for line in f.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                rec = orjson.loads(line)
                if isinstance(rec, dict):
                    records.append(rec)
    return records


def _new_record_index(records: list[dict[str, Any]]) -> dict[tuple[str, str, int, int], str]:
    """Map ``(transport, nat ip, nat port, destination port)`` -> pod of ``new`` records."""
    out: dict[tuple[str, str, int, int], str] = {}
    for rec in records:
        if rec.get("event", {}).get("action") != "new":
            continue
        nat = rec.get("source", {}).get("nat") or {}
        kube = rec.get("kubernetes") or {}
        pod = (kube.get("pod") or {}).get("name")
        ns = kube.get("namespace")
        key = (str(rec.get("network", {}).get("transport")), str(nat.get("ip")),
               int(nat.get("port") or 0), int(rec.get("destination", {}).get("port") or 0))
        out[key] = f"{ns}/{pod}" if pod else "(unresolved)"
    return out


class _PipelineThread:
    """The pipeline running in a thread, with its exit code or exception kept."""

    def __init__(self, cfg: Any) -> None:
        from shipper.metrics import Metrics
        from shipper.pipeline import Pipeline

        self.stop = threading.Event()
        self.pipeline = Pipeline(cfg, Metrics())
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pipeline", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.pipeline.run(self.stop)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Ask the pipeline to stop and wait for it (bounded)."""
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(STOP_TIMEOUT_S)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the demo runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    fired = False
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if os.getpid() != owner:
            # A forked helper (pyroute2 forks some) inherits this handler; it must die
            # as SIGTERM says, quietly, not unwind and run this process's cleanup.
            os._exit(128 + signum)
        if not fired:  # only once: a second SIGTERM must not interrupt the cleanup
            fired = True
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait_for(pred: Any, timeout: float, what: str, worker: _PipelineThread) -> None:
    """Poll ``pred()`` until true; raise LabError on timeout or if the pipeline died."""
    deadline = time.monotonic() + timeout
    while not pred():
        if not worker.thread.is_alive():
            raise LabError(f"the pipeline stopped while waiting for {what}: "
                           f"{worker.error or worker.result}")
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _make_connections(lab: Lab, servers: dict[tuple[str, int], Server], n: int,
                      ) -> list[tuple[str, str, int, int | None]]:
    """Make the demo's connections; return ``(step, proto, family, sport)`` per batch."""
    steps: list[tuple[str, str, int, int | None]] = []
    families = [4, 6] if lab.ipv6 else [4]
    for family in families:
        for i in range(n):
            lab.connect(i, proto="tcp", family=family, payload=_payload(i))
        steps.append((f"each pod, TCP/IPv{family}", "tcp", family, None))
    collisions: list[tuple[str, int, int]] = [("tcp", 4, 40000), ("udp", 4, 40001)]
    if lab.ipv6:
        collisions.append(("tcp", 6, 40002))
    for proto, family, sport in collisions:
        port = servers[(proto, family)].port
        # One client per pod, all bound to `sport`, connected at the same moment.
        lab.connect_many(list(range(n)), sport=sport, proto=proto, family=family, dport=port,
                         hold_s=1.0, payloads=[_payload(i, sport) for i in range(n)])
        steps.append((f"same sport {sport}, {proto.upper()}/IPv{family}", proto, family, sport))
    return steps


def run_demo(pods: int, keep_output: str | None, out: Any = sys.stdout) -> int:
    """Run the whole demo; return the exit status (see the module docstring)."""
    from shipper.config import load

    tmp = Path(tempfile.mkdtemp(prefix="flowlog-demo-"))
    flows = tmp / "flows.json"
    podsfile = tmp / "pods.json"
    worker: _PipelineThread | None = None
    lab: Lab | None = None
    try:
        lab = Lab(pods=pods, ipv6=True)
        lab.write_pod_list(podsfile)
        servers = {
            ("tcp", 4): lab.start_server("tcp", 8080, 4),
            ("tcp", 6): lab.start_server("tcp", 8080, 6),
            ("udp", 4): lab.start_server("udp", 5353, 4),
        }
        cfg = load(None, overrides={
            "conntrack.netns": lab.gw,
            "conntrack.dump_at_start": False,
            "filter.pod_cidrs": lab.pod_cidrs(),
            "filter.cluster_cidrs": lab.cluster_cidrs(),
            "sink.type": "file",
            "sink.file.path": str(flows),
            "metrics.address": None,
            "inventory.pods_file": str(podsfile),
            "inventory.reload_interval_s": 0.5,
            "batch.max_age_s": 0.2,
            "node_name": lab.node_name,
            "state_dir": str(tmp / "state"),  # the lab's pods are not the host's history
        })
        worker = _PipelineThread(cfg)
        worker.start()
        # Ready = subscribed and attributing: a probe flow's record names pod 0.
        probe_ok = _probe(lab, flows, worker)
        if not probe_ok:
            return 2
        steps = _make_connections(lab, servers, pods)
        made = Counter({(proto, family): 0 for proto, family in servers})
        for _, proto, family, _ in steps:
            made[(proto, family)] += pods
        expected = _collect_truth(lab, servers, made)
        _wait_for(lambda: _all_shipped(flows, expected), RECORDS_TIMEOUT_S,
                  "the records of every connection", worker)
    except LabError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        rows = None
        status = 2
    except KeyboardInterrupt:
        print("demo interrupted; cleaning up", file=sys.stderr)
        rows = None
        status = 130
    else:
        rows = _verdicts(lab, expected, flows)
        status = 0 if rows and all(r.ok for r in rows) else 1
    finally:
        if worker is not None:
            worker.close()
        if lab is not None:
            lab.close()
    try:
        if rows is not None:
            _print_table(rows, out)
            if worker is not None and worker.error is not None:
                print(f"pipeline error: {worker.error!r}", file=sys.stderr)
        if keep_output and flows.exists():
            shutil.copyfile(flows, keep_output)
            print(f"records copied to {keep_output}", file=out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return status


def _probe(lab: Lab, flows: Path, worker: _PipelineThread) -> bool:
    """Send UDP probes from pod 0 until one is shipped attributed; False on timeout."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        sport = lab.connect(0, proto="udp", dport=_PROBE_PORT, payload=b"probe", timeout=5)
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            if not worker.thread.is_alive():
                print(f"demo failed: the pipeline stopped: {worker.error or worker.result}",
                      file=sys.stderr)
                return False
            for rec in _read_records(flows):
                if (rec.get("source", {}).get("port") == sport
                        and rec.get("destination", {}).get("port") == _PROBE_PORT
                        and (rec.get("kubernetes") or {}).get("pod")):
                    return True
            time.sleep(0.1)
    print(f"demo failed: the pipeline shipped no attributed record within "
          f"{READY_TIMEOUT_S:.0f}s", file=sys.stderr)
    return False


@dataclass(frozen=True, slots=True)
class _Truth:
    proto: str
    family: int
    dport: int
    ip: str
    port: int
    pod: int | None
    sport: int | None


def _collect_truth(lab: Lab, servers: dict[tuple[str, int], Server],
                   made: Counter[tuple[str, int]]) -> list[_Truth]:
    """What every server saw, each peer with the pod its payload names (bounded wait).

    Waits until each server logged as many peers as connections were made to it (a
    client reports ``connected`` a moment before the server's accept is logged) and
    the first data of each, for at most 5 s per server.
    """
    truths = []
    for (proto, family), server in servers.items():
        deadline = time.monotonic() + 5
        while True:
            seen = server.seen()
            pays = server.payloads()
            if (len(dict.fromkeys(seen)) >= made[(proto, family)]
                    and all(p in pays for p in seen)) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for ip, port in dict.fromkeys(seen):
            pod, sport = _parse_payload(pays.get((ip, port), b""))
            truths.append(_Truth(proto, family, server.port, ip, port, pod, sport))
    return truths


def _all_shipped(flows: Path, truths: list[_Truth]) -> bool:
    index = _new_record_index(_read_records(flows))
    return all((t.proto, t.ip, t.port, t.dport) in index for t in truths)


def _verdicts(lab: Lab | None, truths: list[_Truth], flows: Path) -> list[Observed]:
    assert lab is not None
    index = _new_record_index(_read_records(flows))
    rows = []
    for t in truths:
        true_pod = None
        if t.pod is not None and 0 <= t.pod < len(lab.identities):
            ident = lab.identities[t.pod]
            true_pod = f"{ident.namespace}/{ident.name}"
        rows.append(Observed(
            step=f"{t.proto.upper()}/IPv{t.family} :{t.dport}", proto=t.proto, family=t.family,
            seen_ip=t.ip, seen_port=t.port, pod_sport=t.sport, true_pod=true_pod,
            shipped_pod=index.get((t.proto, t.ip, t.port, t.dport))))
    return rows


def _print_table(rows: list[Observed], out: Any) -> None:
    def addr(r: Observed) -> str:
        return f"[{r.seen_ip}]:{r.seen_port}" if r.family == 6 else f"{r.seen_ip}:{r.seen_port}"

    head = ["flow", "pod's sport", "server saw (node ip:port)", "records say", "really from",
            ""]
    body = [[r.step, str(r.pod_sport) if r.pod_sport else "ephemeral", addr(r),
             r.shipped_pod or "(no record)", r.true_pod or "(unknown)",
             "✔" if r.ok else "✘"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths).rstrip(), file=out)
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip(), file=out)
    good = sum(r.ok for r in rows)
    shared = [r for r in rows if r.pod_sport]
    rewritten = sum(r.seen_port != r.pod_sport for r in shared)
    print(f"\n{good}/{len(rows)} connections attributed to the pod that made them "
          f"({'all correct' if good == len(rows) else 'MISMATCHES'}); "
          f"{len(shared)} used a shared source port, {rewritten} of them rewritten by "
          f"MASQUERADE.", file=out)


def main(args: argparse.Namespace) -> int:
    """Body of ``flowlog-shipper demo``; ``args.pods`` and ``args.keep_output`` are read.

    Every precondition (root, the host commands, ``--pods``) is checked before anything
    is built, and all unmet ones are reported at once (exit status 2).
    """
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (network namespaces, iptables)")
    missing = missing_tools(ipv6=True)
    if missing:
        problems.append(missing_tools_message(missing))
    pods = int(getattr(args, "pods", 4) or 4)
    if not 2 <= pods <= 20:
        problems.append("--pods must be 2..20")
    if problems:
        for problem in problems:
            print(f"demo: {problem}", file=sys.stderr)
        return 2
    with _sigterm_as_interrupt():
        return run_demo(pods, getattr(args, "keep_output", None))
