"""Memory of the PodIndex for a large cluster with heavy churn.

Builds N live pods (dual-stack optional) through pod_from_dict (the same path
the API watch takes, labels included) plus T tombstones (pods deleted, their
IPs reused by new pods), then reports tracemalloc and RSS growth.

    python bench/bench_pod_index.py --pods 100000 --tombstones 300000
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
import tracemalloc

from shipper.enrich.pod_index import PodIndex
from shipper.enrich.pods import LabelPolicy, pod_from_dict


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make(i: int, gen: int, dual: bool) -> dict:
    a, b = divmod(i, 65536)
    ips = [f"10.{16 + a}.{b >> 8}.{b & 255}"]
    if dual:
        ips.append(f"fd00:10:{16 + a:x}::{b:x}")
    dep = f"svc-{i % 2000}"
    return {
        "metadata": {
            "namespace": f"ns-{i % 500}",
            "name": f"{dep}-7d4b9c8f5-{i:06d}{gen}",
            "uid": f"{i:08d}-{gen:04d}-4000-8000-000000000000",
            "creationTimestamp": "2024-05-01T10:00:00Z",
            "labels": {"app": dep, "pod-template-hash": "7d4b9c8f5", "tier": "backend",
                       "app.kubernetes.io/version": "1.2.3"},
            "annotations": {"ovn.kubernetes.io/logical_switch": "ovn-default"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": f"{dep}-7d4b9c8f5",
                                 "controller": True}],
        },
        "spec": {"nodeName": f"node-{i % 300}"},
        "status": {"phase": "Running", "podIPs": [{"ip": x} for x in ips]},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=100_000)
    ap.add_argument("--tombstones", type=int, default=300_000)
    ap.add_argument("--dual-stack", action="store_true")
    ap.add_argument("--no-tracemalloc", action="store_true",
                    help="RSS only (tracemalloc slows the build and inflates RSS)")
    args = ap.parse_args()
    policy = LabelPolicy()
    gc.collect()
    rss0 = rss_mb()
    if not args.no_tracemalloc:
        tracemalloc.start()
    idx = PodIndex(max_tombstones=10_000_000)
    now = time.time_ns()
    t0 = time.perf_counter()
    for i in range(args.pods):
        idx.update(pod_from_dict(make(i, 0, args.dual_stack), policy), now)
    # Churn: delete a pod and give its IP to a new pod, `tombstones` times.
    gen = [0] * args.pods
    for k in range(args.tombstones):
        i = k % args.pods
        old = f"{i:08d}-{gen[i]:04d}-4000-8000-000000000000"
        now += 1_000_000
        idx.delete(old, now)
        gen[i] += 1
        idx.update(pod_from_dict(make(i, gen[i], args.dual_stack), policy), now)
    build_s = time.perf_counter() - t0
    gc.collect()
    cur, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
    tracemalloc.stop()
    rss1 = rss_mb()
    print(f"pods={idx.live_pods()} addresses={idx.addresses()} tombstones={idx.tombstones()} "
          f"dual_stack={args.dual_stack}")
    print(f"tracemalloc current={cur / 2**20:.1f} MiB peak={peak / 2**20:.1f} MiB")
    print(f"RSS growth={rss1 - rss0:.1f} MiB (RSS {rss1:.1f} MiB)")
    per = (cur or (rss1 - rss0) * 2**20) / (idx.live_pods() + idx.tombstones())
    print(f"~{per:.0f} B per pod interval; build {build_s:.1f}s "
          f"({build_s / (args.pods + args.tombstones) * 1e6:.1f} us/pod event incl. conversion)")
    # Lookup cost on the big index.
    t0 = time.perf_counter()
    n = 200_000
    for k in range(n):
        idx.lookup(4, (10 << 24) | (16 << 16) | (k % 60000), now)
    print(f"lookup {((time.perf_counter() - t0) / n) * 1e9:.0f} ns")


if __name__ == "__main__":
    main()
