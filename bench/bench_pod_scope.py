"""API watch load and memory of one shipper: node-scoped pod watch versus every pod.

A fake API server (tests/fakes/kube_api.py, the real list + watch protocol,
fieldSelector included) holds ``--pods`` pods spread evenly over ``--nodes``
nodes (the pod objects of bench_pod_index.py: realistic labels, Kube-OVN
annotations, owner, 20 % dual-stack). For each scope a fresh shipper process
(``KubeSource`` with ``subnets_enabled``, the real ``pod_scope: auto`` path)
runs against it:

- **node**: one distributed Subnet, so the node role asks for this node's pods
  only (``fieldSelector=spec.nodeName=node-0``);
- **cluster**: the Subnet is centralized with node-0 as its gateway, so every
  pod is watched.

Measured per scope: bytes the API server sent for the initial list, time until
the pods are listed and applied, pods cached, the shipper's RSS growth (pod
index and everything the list left behind, after a GC), then the watch load
of a churn of ``--churn`` pod updates spread over every node: events and bytes
delivered to this one shipper. The API server's own work (serialising,
filtering) is the fake's and is not measured; multiply the per-shipper bytes
by the node count for what the API server sends in total.

    python bench/bench_pod_scope.py                                   # 100k pods, 1,000 nodes
    python bench/bench_pod_scope.py --pods 20000 --nodes 200 --churn 2000   # quick
    python bench/bench_pod_scope.py --json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_pod_index import make, rss_mb  # noqa: E402

from tests.fakes.kube_api import (  # noqa: E402
    NODES,
    PODS,
    SUBNETS,
    FakeKubeApi,
    node,
    subnet,
    write_kubeconfig,
)

NODE = "node-0"


# ---- the measured shipper (a child process) ------------------------------------------


def child(kubeconfig: str, timeout: float) -> None:
    """Sync, report, wait for the churn count on stdin, report again (JSON lines)."""
    from shipper.config import Config
    from shipper.enrich.kube import KubeSource
    from shipper.enrich.pod_index import PodIndex
    from shipper.filters.cidr import CidrFilter
    from shipper.metrics import Metrics

    cfg = Config.model_validate({
        "node_name": NODE,
        "kubernetes": {"kubeconfig": kubeconfig, "subnets_enabled": True,
                       "watch_nodes": False, "sync_timeout_s": timeout},
    })
    index = PodIndex()
    metrics = Metrics()
    filt = CidrFilter(cfg.filter.pod_cidrs, cfg.filter.cluster_cidrs)
    source = KubeSource(cfg, index, filt, metrics)
    gc.collect()
    rss0 = rss_mb()
    t0 = time.monotonic()
    source.start()
    if not source.wait_synced(timeout):
        raise SystemExit("pods not listed in time")
    synced_s = time.monotonic() - t0
    gc.collect()
    print(json.dumps({"synced_s": round(synced_s, 2), "pods": index.live_pods(),
                      "rss_growth_mib": round(rss_mb() - rss0, 1)}), flush=True)
    expected = int(sys.stdin.readline())
    deadline = time.monotonic() + timeout
    while (metrics.value("shipper_kube_events_total", "pods", "MODIFIED") < expected
           and time.monotonic() < deadline):
        time.sleep(0.05)
    print(json.dumps({
        "events": int(metrics.value("shipper_kube_events_total", "pods", "MODIFIED")),
    }), flush=True)
    source.stop()


# ---- the driver -------------------------------------------------------------------------


def pod_object(i: int, nodes: int) -> dict[str, Any]:
    obj = make(i, 0, i, 2000, 0.2)
    obj["spec"]["nodeName"] = f"node-{i % nodes}"
    return obj


def run_scope(api: FakeKubeApi, kubeconfig: Path, scope: str, args: argparse.Namespace,
              objs: list[dict[str, Any]]) -> dict[str, Any]:
    if scope == "node":
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/12"))
    else:
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/12", gateway_type="centralized",
                                gateway_node=NODE))
    api.compact()  # start from a clean history: only the churn is watched
    api.bytes_sent.clear()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(kubeconfig), "--timeout",
         str(args.timeout)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = json.loads(proc.stdout.readline())
        list_bytes = api.bytes_sent.get((PODS, "list"), 0)
        deadline = time.monotonic() + args.timeout
        while api.open_watches(PODS) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Churn: --churn updates (a label change) spread evenly over every node.
        step = max(1, len(objs) // args.churn)
        churned = [objs[i] for i in range(0, len(objs), step)][: args.churn]
        for n, obj in enumerate(churned):
            obj["metadata"]["labels"]["churn"] = str(n)
            api.put(PODS, obj)
        mine = sum(1 for o in churned if o["spec"]["nodeName"] == NODE)
        expected = mine if scope == "node" else len(churned)
        proc.stdin.write(f"{expected}\n")
        proc.stdin.flush()
        second = json.loads(proc.stdout.readline())
        watch_bytes = api.bytes_sent.get((PODS, "watch"), 0)
    finally:
        proc.stdin.close()
        proc.wait(timeout=args.timeout)
    return {
        "scope": scope,
        "pods_cached": first["pods"],
        "list_bytes": list_bytes,
        "synced_s": first["synced_s"],
        "rss_growth_mib": first["rss_growth_mib"],
        "churn_cluster": len(churned),
        "watch_events": second["events"],
        "watch_events_expected": expected,
        "watch_bytes": watch_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=100_000)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--churn", type=int, default=10_000,
                    help="pod updates during the watch, spread over all nodes")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", metavar="KUBECONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.timeout)
        return
    with FakeKubeApi() as api, tempfile.TemporaryDirectory() as tmp:
        kc = write_kubeconfig(Path(tmp) / "kubeconfig", api.url)
        t0 = time.monotonic()
        api.put(NODES, node(NODE, "172.18.0.2"))
        objs = [pod_object(i, args.nodes) for i in range(args.pods)]
        for obj in objs:
            api.put(PODS, obj)
        setup_s = time.monotonic() - t0
        results = [run_scope(api, kc, scope, args, objs) for scope in ("node", "cluster")]
    if args.json:
        print(json.dumps({"pods": args.pods, "nodes": args.nodes, "results": results},
                         indent=2))
        return
    print(f"{args.pods:,} pods on {args.nodes:,} nodes ({args.pods // args.nodes} per node); "
          f"fake API filled in {setup_s:.0f} s; churn {args.churn:,} updates cluster-wide")
    print(f"{'scope':8} {'pods cached':>12} {'list MiB':>9} {'sync s':>7} {'RSS MiB':>8} "
          f"{'watch events':>13} {'watch KiB':>10}")
    for r in results:
        print(f"{r['scope']:8} {r['pods_cached']:>12,} {r['list_bytes'] / 2**20:>9.1f} "
              f"{r['synced_s']:>7.2f} {r['rss_growth_mib']:>8.1f} "
              f"{r['watch_events']:>6,}/{r['watch_events_expected']:<6,} "
              f"{r['watch_bytes'] / 1024:>10.0f}")


if __name__ == "__main__":
    main()
