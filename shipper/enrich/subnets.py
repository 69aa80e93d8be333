"""Pure: Kube-OVN Subnets + Nodes + static config -> (pod CIDRs, cluster CIDRs, NAT policy).

No I/O. :mod:`shipper.enrich.kube` feeds the objects it watches through
:func:`subnet_from_dict` / :func:`node_from_dict` and calls :func:`compute`
after every change; the result goes to
:meth:`shipper.filters.cidr.CidrFilter.set_cidrs`.

Rules (kubeovn.io/v1 ``Subnet.spec``):

* **Pod CIDRs** are the ``cidrBlock``\\ s (``"v4"``, ``"v6"`` or dual-stack
  ``"v4,v6"``) of the selected Subnets: by default those with
  ``natOutgoing: true`` (the ones MASQUERADEd to a node), or all of them;
  optionally only those of some VPCs. The join subnet never is one.
* **Cluster CIDRs** (destinations that are dropped) are every Subnet's CIDRs,
  the join subnet's, every Node's InternalIPs (as host routes) and the
  configured service CIDRs.
* **natOutgoingPolicyRules** (only meaningful with ``natOutgoing: true``):
  rules are matched in order, the first match decides ``nat`` or
  ``forward`` (no SNAT), and traffic that matches no rule is NATed, as
  Kube-OVN documents. ``match.srcIPs`` and ``match.dstIPs`` are
  comma-separated IPs/CIDRs, an empty one matches everything; so every rule
  can be evaluated exactly on a flow's original source and destination,
  which :class:`NatPolicy` does. Where the answer depends on the source only
  (a leading run of ``forward`` rules without ``dstIPs``), those sources are
  also removed from the pod CIDRs, so the CIDR filter alone already drops
  them. Rules the gateway could not apply either (a malformed address) make
  the whole Subnet invalid: it is skipped and counted, never half-applied.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import netaddr

from shipper.errors import EnrichError

Action = Literal["nat", "forward"]

_Ranges = tuple[tuple[int, ...], tuple[int, ...]]  # sorted starts, inclusive ends


def _name(obj: Mapping[str, Any], kind: str) -> str:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise EnrichError(f"{kind}: metadata.name is missing or not a string")
    return name


def _parse_nets(text: Any, where: str) -> tuple[netaddr.IPNetwork, ...]:
    """Comma-separated IPs/CIDRs -> networks; raises EnrichError naming ``where``."""
    if text is None or text == "":
        return ()
    if not isinstance(text, str):
        raise EnrichError(f"{where} is not a string")
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(netaddr.IPNetwork(part).cidr)
        except (netaddr.AddrFormatError, ValueError, TypeError) as exc:
            raise EnrichError(f"{where}: {part!r} is not an IP or CIDR") from exc
    return tuple(out)


def _ranges(nets: Iterable[netaddr.IPNetwork]) -> tuple[_Ranges, _Ranges]:
    """(v4 ranges, v6 ranges) of ``nets``, merged and sorted for bisect."""
    out = []
    nets = list(nets)
    for version in (4, 6):
        merged = netaddr.cidr_merge([n for n in nets if n.version == version])
        pairs = sorted((int(n.first), int(n.last)) for n in merged)
        out.append((tuple(a for a, _ in pairs), tuple(b for _, b in pairs)))
    return out[0], out[1]


def _contains(r: _Ranges, ip: int) -> bool:
    i = bisect_right(r[0], ip) - 1
    return i >= 0 and ip <= r[1][i]


@dataclass(frozen=True)
class NatRule:
    """One natOutgoingPolicyRule; empty ``src``/``dst`` match any address."""

    action: Action
    src: tuple[netaddr.IPNetwork, ...]
    dst: tuple[netaddr.IPNetwork, ...]


@dataclass(frozen=True)
class SubnetInfo:
    """What the shipper needs from one Subnet."""

    name: str
    cidrs: tuple[netaddr.IPNetwork, ...]
    nat_outgoing: bool
    vpc: str | None
    rules: tuple[NatRule, ...] = ()


def subnet_from_dict(obj: Mapping[str, Any]) -> SubnetInfo:
    """Convert one kubeovn.io/v1 Subnet object; raises EnrichError naming the field and Subnet."""
    if not isinstance(obj, Mapping):
        raise EnrichError(f"subnet object is not a JSON object ({type(obj).__name__})")
    name = _name(obj, "subnet")
    ref = f"subnet {name}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise EnrichError(f"{ref}: spec is missing or not an object")
    cidrs = _parse_nets(spec.get("cidrBlock"), f"{ref}: spec.cidrBlock")
    if not cidrs:
        raise EnrichError(f"{ref}: spec.cidrBlock is empty")
    nat = spec.get("natOutgoing", False)
    if not isinstance(nat, bool):
        raise EnrichError(f"{ref}: spec.natOutgoing is not a boolean")
    vpc = spec.get("vpc")
    if vpc is not None and not isinstance(vpc, str):
        raise EnrichError(f"{ref}: spec.vpc is not a string")
    raw_rules = spec.get("natOutgoingPolicyRules") or []
    if not isinstance(raw_rules, list):
        raise EnrichError(f"{ref}: spec.natOutgoingPolicyRules is not a list")
    rules = []
    for i, raw in enumerate(raw_rules):
        where = f"{ref}: spec.natOutgoingPolicyRules[{i}]"
        if not isinstance(raw, Mapping):
            raise EnrichError(f"{where} is not an object")
        action = raw.get("action")
        if action not in ("nat", "forward"):
            raise EnrichError(f"{where}.action is {action!r}, expected 'nat' or 'forward'")
        match = raw.get("match") or {}
        if not isinstance(match, Mapping):
            raise EnrichError(f"{where}.match is not an object")
        rules.append(
            NatRule(
                action,
                _parse_nets(match.get("srcIPs"), f"{where}.match.srcIPs"),
                _parse_nets(match.get("dstIPs"), f"{where}.match.dstIPs"),
            )
        )
    return SubnetInfo(name, cidrs, nat, vpc or None, tuple(rules))


def node_from_dict(obj: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """``(name, InternalIPs as host CIDRs)`` of one v1 Node; raises EnrichError if malformed."""
    if not isinstance(obj, Mapping):
        raise EnrichError(f"node object is not a JSON object ({type(obj).__name__})")
    name = _name(obj, "node")
    status = obj.get("status") or {}
    addresses = status.get("addresses") if isinstance(status, Mapping) else None
    if addresses is None:
        return name, ()
    if not isinstance(addresses, list):
        raise EnrichError(f"node {name}: status.addresses is not a list")
    out: list[str] = []
    for i, entry in enumerate(addresses):
        if not isinstance(entry, Mapping) or entry.get("type") != "InternalIP":
            continue
        try:
            ip = netaddr.IPAddress(str(entry.get("address", "")).strip())
        except (netaddr.AddrFormatError, ValueError) as exc:
            raise EnrichError(
                f"node {name}: status.addresses[{i}].address {entry.get('address')!r} "
                "is not an IP"
            ) from exc
        cidr = f"{ip}/{32 if ip.version == 4 else 128}"
        if cidr not in out:
            out.append(cidr)
    return name, tuple(out)


class NatPolicy:
    """Evaluates the natOutgoingPolicyRules of the selected pod Subnets on a flow.

    Immutable once built. :meth:`forwards` answers "would Kube-OVN send this
    flow out without SNAT?" for a flow from a pod CIDR: True only when the
    flow's source lies in a Subnet with rules and the first rule matching
    (source, destination) says ``forward``.
    """

    def __init__(self, subnets: Iterable[SubnetInfo]) -> None:
        """Compile the rules of ``subnets`` (those without rules cost nothing)."""
        entries = []
        for s in subnets:
            if not s.rules:
                continue
            compiled = tuple(
                (r.action == "forward", _ranges(r.src) if r.src else None,
                 _ranges(r.dst) if r.dst else None)
                for r in s.rules
            )
            entries.append((_ranges(s.cidrs), compiled))
        self._entries = tuple(entries)

    def __bool__(self) -> bool:
        """False when no Subnet has rules (the caller can skip evaluation)."""
        return bool(self._entries)

    def forwards(self, family: int, src: int, dst: int) -> bool:
        """True if the flow ``src -> dst`` leaves without SNAT according to its Subnet's rules."""
        fi = 0 if family == 4 else 1
        for subnet, rules in self._entries:
            if not _contains(subnet[fi], src):
                continue
            for forward, src_r, dst_r in rules:
                if src_r is not None and not _contains(src_r[fi], src):
                    continue
                if dst_r is not None and not _contains(dst_r[fi], dst):
                    continue
                return forward
            return False
        return False


@dataclass(frozen=True)
class CidrSets:
    """The outcome of :func:`compute`: what the CIDR filter should use."""

    pod_cidrs: tuple[str, ...]
    cluster_cidrs: tuple[str, ...]
    nat_policy: NatPolicy


def _forwarded_sources(s: SubnetInfo) -> list[netaddr.IPNetwork]:
    """Sources that a leading run of destination-independent forward rules always forwards."""
    out: list[netaddr.IPNetwork] = []
    for rule in s.rules:
        if rule.action != "forward" or rule.dst:
            break
        if not rule.src:  # forward everything
            return list(s.cidrs)
        out.extend(rule.src)
    return out


def compute(
    subnets: Iterable[SubnetInfo],
    node_cidrs: Iterable[str],
    *,
    selection: Literal["nat_outgoing", "all"] = "nat_outgoing",
    vpcs: Iterable[str] = (),
    join_subnet: str = "join",
    honour_rules: bool = True,
    service_cidrs: Iterable[str] = (),
    static_pod_cidrs: Iterable[str] = (),
    static_cluster_cidrs: Iterable[str] = (),
) -> CidrSets:
    """Pod and cluster CIDRs (sorted, merged, as strings) plus the NAT policy of the pod Subnets.

    Static CIDRs are always included. ``vpcs`` empty means every VPC.
    """
    vpc_set = set(vpcs)
    pod: list[netaddr.IPNetwork] = [netaddr.IPNetwork(c).cidr for c in static_pod_cidrs]
    cluster: list[netaddr.IPNetwork] = [
        netaddr.IPNetwork(c).cidr
        for c in (*static_cluster_cidrs, *service_cidrs, *node_cidrs)
    ]
    removed = netaddr.IPSet()
    chosen: list[SubnetInfo] = []
    for s in sorted(subnets, key=lambda x: x.name):
        cluster.extend(s.cidrs)
        if s.name == join_subnet:
            continue
        if selection == "nat_outgoing" and not s.nat_outgoing:
            continue
        if vpc_set and (s.vpc or "ovn-cluster") not in vpc_set:
            continue
        chosen.append(s)
        pod.extend(s.cidrs)
        if honour_rules and s.nat_outgoing:
            for net in _forwarded_sources(s):
                removed.add(net)
    pod_set = netaddr.IPSet(pod)
    if removed:
        # Static pod CIDRs are the operator's word: never shrink them.
        pod_set = (pod_set - removed) | netaddr.IPSet(
            netaddr.IPNetwork(c) for c in static_pod_cidrs
        )
    policy = NatPolicy(s for s in chosen if s.nat_outgoing) if honour_rules else NatPolicy(())
    return CidrSets(
        tuple(str(n) for n in pod_set.iter_cidrs()),
        tuple(str(n) for n in netaddr.cidr_merge(cluster)),
        policy,
    )
