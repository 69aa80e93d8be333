"""CPU and allocation of the filter decision, ``CidrFilter.reason``, per verdict.

The decision is one call per event (Kube-OVN NAT policy included). This
measures it for each outcome on a typical Kube-OVN node's tables (32 pod /16s,
services, join subnet, node network), with and without a Subnet that has
natOutgoingPolicyRules, and checks that deciding allocates nothing per event.

    python bench/bench_filter.py                 # 200k calls x 15 repeats, best of
    python bench/bench_filter.py --calls 1000000

Reports the best repeat (the least disturbed by other processes); on a shared
machine the spread between runs is large, so compare runs made side by side.
"""

from __future__ import annotations

import argparse
import gc
import timeit
import tracemalloc
from typing import Any

from shipper.cidrs import to_cidrs
from shipper.filters.cidr import CidrFilter
from shipper.filters.nat_policy import NatPolicy, NatRule
from shipper.record import ACTION_NEW, FlowEvent, parse_ip

PODS = [f"10.{i}.0.0/16" for i in range(16, 48)]
CLUSTER = ["10.96.0.0/12", "100.64.0.0/16", "192.168.0.0/16", *PODS]
NODE = "192.168.1.10"


class _Subnet:
    """A pod Subnet with one rule forwarding (no SNAT) flows to 8.8.8.8."""

    cidrs = to_cidrs(["10.16.0.0/16"])
    rules = (NatRule("forward", (), to_cidrs(["8.8.8.8"])),)


def event(src: str, dst: str, reply_dst: str = NODE) -> FlowEvent:
    """A NEW TCP event ``src -> dst`` whose reply goes to ``reply_dst`` (the node: SNATed)."""
    fam, s = parse_ip(src)
    d, r = parse_ip(dst)[1], parse_ip(reply_dst)[1]
    return FlowEvent(ACTION_NEW, fam, 6, s, d, 40000, 443, d, r, 443, 40000, None, None,
                     None, 1, None, None, None, None, None, None, None, None, None, None,
                     None, None, 0)


def best_ns(fn: Any, ev: FlowEvent, calls: int, repeats: int) -> float:
    """Best time of one ``fn(ev)`` over ``repeats`` runs of ``calls`` calls, in ns."""
    return min(timeit.repeat(lambda: fn(ev), number=calls, repeat=repeats)) / calls * 1e9


def allocated(fn: Any, ev: FlowEvent, calls: int) -> int:
    """Net bytes allocated over ``calls`` calls (tracemalloc)."""
    for _ in range(3):
        fn(ev)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(calls):
        fn(ev)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(s.size_diff for s in after.compare_to(before, "filename"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    plain = CidrFilter(PODS, CLUSTER)
    ruled = CidrFilter(PODS, CLUSTER)
    ruled.set_cidrs(PODS, CLUSTER, NatPolicy([_Subnet()]))
    cases = [
        ("kept", plain, event("10.16.0.5", "93.184.216.34")),
        ("source_not_pod", plain, event(NODE, "93.184.216.34")),
        ("destination_in_cluster", plain, event("10.16.0.5", "10.96.0.10")),
        ("not_snat", plain, event("10.16.0.5", "93.184.216.34", "10.16.0.5")),
        ("kept, NAT rules", ruled, event("10.16.0.5", "93.184.216.34")),
        ("nat_policy_forward", ruled, event("10.16.0.5", "8.8.8.8")),
    ]
    print(f"{'verdict':24s} {'ns/call':>8s} {'bytes/call':>10s}")
    for name, filt, ev in cases:
        got = filt.reason(ev)
        assert (got or "kept") == name.split(",")[0], (name, got)
        ns = best_ns(filt.reason, ev, a.calls, a.repeats)
        per = allocated(filt.reason, ev, 100_000) / 100_000
        print(f"{name:24s} {ns:8.0f} {per:10.3f}")


if __name__ == "__main__":
    main()
