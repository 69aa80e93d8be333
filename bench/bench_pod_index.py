"""Memory and speed of the PodIndex for a large cluster with heavy churn.

Builds N live pods plus T tombstones (a pod deleted and a new pod created in
its place, T times) through ``pod_from_dict`` and ``PodIndex.update/delete``,
exactly as the API watch does, then reports tracemalloc and RSS growth and the
event path's costs: ``PodIndex.lookup`` (live and tombstone) and
``ecs.build_record`` for a resolved event (a pod's first record, which builds
its record object, and the later ones; the same for deleted pods' tombstones,
as late DESTROYs name them).

The cluster is shaped like a real one: replicas of ``--deployments``
Deployments (default 2,000) across 20 namespaces and 100 nodes, 5-8 labels per
pod (equal for the replicas of one Deployment), the Kube-OVN annotations, a
Deployment owner, and a share of dual-stack pods. Every pod object goes
through an orjson encode/decode round trip, so its strings are fresh objects,
as they are when decoded from the API server's JSON.

    python bench/bench_pod_index.py                      # 100k pods + 300k tombstones
    python bench/bench_pod_index.py --no-tracemalloc     # RSS only (the number to size by)
    python bench/bench_pod_index.py --fresh-ips          # new pods get new addresses
    python bench/bench_pod_index.py --no-tracemalloc --state /tmp/st  # + state file save/load

Measure RSS with ``--no-tracemalloc``: tracemalloc slows the build and adds
its own memory to RSS.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

from shipper import ecs
from shipper.enrich.pod_index import PodIndex
from shipper.enrich.pods import LabelPolicy, pod_from_dict
from shipper.record import ACTION_NEW, FlowEvent, PodTombstone

NAMESPACES = 20
NODES = 100
_TIERS = ("frontend", "backend", "worker")


def rss_mb() -> float:
    """Current resident set size in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def address(n: int) -> tuple[str, str]:
    """The v4 and v6 texts of pod address number ``n``."""
    a, b = divmod(n, 65536)
    return f"10.{16 + a}.{b >> 8}.{b & 255}", f"fd00:10:{16 + a:x}::{b:x}"


def v4_int(n: int) -> int:
    """Pod address number ``n`` (v4) as an integer."""
    a, b = divmod(n, 65536)
    return (10 << 24) | ((16 + a) << 16) | b


def make(i: int, gen: int, n_addr: int, deployments: int, dual_share: float) -> dict[str, Any]:
    """Pod slot ``i``, generation ``gen``, owning address number ``n_addr``, as an API object."""
    d = i % deployments
    dep = f"svc-{d}"
    tmpl = format(d * 2654435761 % 16**9, "09x")
    labels = dict(
        [
            ("app", dep),
            ("app.kubernetes.io/name", dep),
            ("pod-template-hash", tmpl),
            ("tier", _TIERS[d % 3]),
            ("team", f"team-{d % 25}"),
            ("app.kubernetes.io/part-of", f"platform-{d % 40}"),
            ("env", "production"),
            ("app.kubernetes.io/version", f"1.{d % 7}.{d % 3}"),
        ][: 5 + d % 4]
    )
    v4, v6 = address(n_addr)
    ips = [v4, v6] if (i % 100) < dual_share * 100 else [v4]
    ns = f"ns-{d % NAMESPACES}"
    obj = {
        "metadata": {
            "namespace": ns,
            "name": f"{dep}-{tmpl}-{i:06x}{gen:x}",
            "uid": f"{i:08d}-{gen:04d}-4000-8000-000000000000",
            "creationTimestamp": "2024-05-01T10:00:00Z",
            "labels": labels,
            "annotations": {
                "ovn.kubernetes.io/allocated": "true",
                "ovn.kubernetes.io/cidr": "10.16.0.0/12",
                "ovn.kubernetes.io/gateway": "10.16.0.1",
                "ovn.kubernetes.io/ip_address": ",".join(ips),
                "ovn.kubernetes.io/logical_router": "ovn-cluster",
                "ovn.kubernetes.io/logical_switch": "ovn-default" if d % 10 else f"sub-{ns}",
                "ovn.kubernetes.io/mac_address": f"00:00:{i:08x}",
                "ovn.kubernetes.io/pod_nic_type": "veth-pair",
                "ovn.kubernetes.io/routed": "true",
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": f"{dep}-{tmpl}", "controller": True}],
        },
        "spec": {"nodeName": f"node-{(i * 7) % NODES}"},
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": x} for x in ips]},
    }
    # Fresh strings, as decoded from the API server's JSON.
    result: dict[str, Any] = orjson.loads(orjson.dumps(obj))
    return result


def event(src: int, t_ns: int) -> FlowEvent:
    """A MASQUERADEd TCP NEW event from ``src`` (v4) with timestamps."""
    return FlowEvent(
        action=ACTION_NEW, family=4, proto=6, orig_src=src, orig_dst=0x08080808,
        orig_sport=40000, orig_dport=443, reply_src=0x08080808, reply_dst=0xC0A80001,
        reply_sport=443, reply_dport=61000, icmp_type=None, icmp_code=None, icmp_id=None,
        ct_id=123456, status=None, tcp_state=None, mark=None, zone=None, timeout=None,
        orig_packets=None, orig_bytes=None, reply_packets=None, reply_bytes=None,
        ts_start=t_ns, ts_stop=None, ts_event=t_ns, received_ns=t_ns,
    )


def main() -> None:
    """Run the benchmark and print its report."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=100_000)
    ap.add_argument("--tombstones", type=int, default=300_000)
    ap.add_argument("--deployments", type=int, default=2_000)
    ap.add_argument("--dual-stack-share", type=float, default=0.2,
                    help="share of pods with a v6 address as well (default 0.2)")
    ap.add_argument("--fresh-ips", action="store_true",
                    help="a new pod gets a new address (default: the deleted pod's)")
    ap.add_argument("--no-tracemalloc", action="store_true",
                    help="RSS only (tracemalloc slows the build and inflates RSS)")
    ap.add_argument("--state", metavar="DIR",
                    help="also time the state file: save the index to DIR, load it back")
    args = ap.parse_args()
    policy = LabelPolicy()
    gc.collect()
    rss0 = rss_mb()
    if not args.no_tracemalloc:
        tracemalloc.start()
    idx = PodIndex(max_tombstones=10_000_000)
    t_first = now = time.time_ns()
    t0 = time.perf_counter()
    conv_s = 0.0
    for i in range(args.pods):
        obj = make(i, 0, i, args.deployments, args.dual_stack_share)
        c0 = time.perf_counter()
        idx.update(pod_from_dict(obj, policy), now)
        conv_s += time.perf_counter() - c0
    # Churn: delete a pod and create its successor, `tombstones` times.
    gen = [0] * args.pods
    addr_of = list(range(args.pods))
    for k in range(args.tombstones):
        i = k % args.pods
        old = f"{i:08d}-{gen[i]:04d}-4000-8000-000000000000"
        now += 1_000_000
        gen[i] += 1
        if args.fresh_ips:
            addr_of[i] = args.pods + k
        obj = make(i, gen[i], addr_of[i], args.deployments, args.dual_stack_share)
        c0 = time.perf_counter()
        idx.delete(old, now)
        idx.update(pod_from_dict(obj, policy), now)
        conv_s += time.perf_counter() - c0
    build_s = time.perf_counter() - t0
    gc.collect()
    cur, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
    tracemalloc.stop()
    rss1 = rss_mb()
    kept = idx.live_pods() + idx.tombstones()
    print(f"pods={idx.live_pods()} addresses={idx.addresses()} tombstones={idx.tombstones()} "
          f"dual_stack_share={args.dual_stack_share} fresh_ips={args.fresh_ips}")
    if cur:
        print(f"tracemalloc current={cur / 2**20:.1f} MiB peak={peak / 2**20:.1f} MiB "
              f"(~{cur / kept:.0f} B per pod interval)")
    print(f"RSS growth={rss1 - rss0:.1f} MiB (RSS {rss1:.1f} MiB, "
          f"~{(rss1 - rss0) * 2**20 / kept:.0f} B per pod interval)")
    n_ev = args.pods + args.tombstones
    print(f"build {build_s:.1f}s; pod_from_dict+update(+delete) {conv_s / n_ev * 1e6:.1f} us "
          f"per pod event (JSON decode excluded)")

    # The event path on the big index. Live: the newest owner of each address;
    # tombstone: an address's first owner, long deleted (a late DESTROY).
    n = 200_000
    span = min(args.pods, 60_000)
    live = [v4_int(addr_of[k % span]) for k in range(n)]
    first = [v4_int(k % span) for k in range(n)]
    lookup = idx.lookup
    for label, keys, t in (("live", live, now), ("tombstone", first, t_first)):
        t0 = time.perf_counter()
        for a in keys:
            lookup(4, a, t)
        print(f"lookup ({label}) {(time.perf_counter() - t0) / n * 1e9:.0f} ns")
    pods = [idx.lookup(4, a, now) for a in live[:span]]
    assert all(p is not None for p in pods)
    events = [event(a, now) for a in live[:span]]
    build = ecs.build_record
    # A pod's first record builds its record object (PodMeta.kubernetes_for);
    # every later one reuses it. Time the first records apart.
    gc.collect()
    rss_before = rss_mb()
    t0 = time.perf_counter()
    for ev, pod in zip(events, pods, strict=True):
        build(ev, pod, "node-1")
    first = (time.perf_counter() - t0) / span
    gc.collect()
    print(f"build_record, a pod's first record {first * 1e6:.2f} us; record objects of "
          f"{span} pods: RSS +{rss_mb() - rss_before:.1f} MiB")
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        for ev, pod in zip(events, pods, strict=True):
            build(ev, pod, "node-1")
    per = (time.perf_counter() - t0) / (reps * span)
    print(f"build_record (resolved) {per * 1e6:.2f} us")
    # Late DESTROYs: the first owners of the addresses, deleted since (tombstones).
    late = [(event(v4_int(k), t_first), idx.lookup(4, v4_int(k), t_first)) for k in range(span)]
    late = [(ev, pod) for ev, pod in late if isinstance(pod, PodTombstone)]
    if late:
        t0 = time.perf_counter()
        for ev, pod in late:
            build(ev, pod, "node-1")
        first_t = (time.perf_counter() - t0) / len(late)
        t0 = time.perf_counter()
        for _ in range(reps):
            for ev, pod in late:
                build(ev, pod, "node-1")
        per_t = (time.perf_counter() - t0) / (reps * len(late))
        print(f"build_record, a tombstone's first record {first_t * 1e6:.2f} us, later "
              f"{per_t * 1e6:.2f} us ({len(late)} tombstones)")
    if args.state:
        bench_state(idx, args.state, now)


def bench_state(idx: PodIndex, directory: str, now: int) -> None:
    """Save ``idx`` to a state file in ``directory``, load it into a new index; report."""
    from shipper.enrich.state import StateFile
    from shipper.metrics import Metrics

    sf = StateFile(Path(directory), "node-1", Metrics())
    t0 = time.perf_counter()
    idx.snapshot()
    snap_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert sf.save(idx, now)
    save_s = time.perf_counter() - t0
    size = sf.path.stat().st_size
    gc.collect()
    rss0 = rss_mb()
    restored = PodIndex(max_tombstones=10_000_000)
    t0 = time.perf_counter()
    assert sf.load(restored, now)
    load_s = time.perf_counter() - t0
    gc.collect()
    print(f"state file {size / 2**20:.1f} MiB; snapshot (under the writer lock) "
          f"{snap_s * 1e3:.0f} ms; save {save_s:.2f}s; load {load_s:.2f}s; restored index "
          f"RSS growth {rss_mb() - rss0:.1f} MiB; tombstones {restored.tombstones()}")


if __name__ == "__main__":
    main()
