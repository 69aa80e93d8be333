"""Pure: Kube-OVN Subnets + Nodes + static config -> (pod CIDRs, cluster CIDRs, NAT policy).

No I/O. :mod:`shipper.enrich.kube` feeds the objects it watches through
:func:`subnet_from_dict` / :func:`node_from_dict` and calls :func:`compute`
after every change; the result (CIDRs and NAT policy) goes to
:meth:`shipper.filters.cidr.CidrFilter.set_cidrs`. Every CIDR text is parsed
by :mod:`shipper.cidrs` (the one CIDR type); the NAT rules are evaluated by
:mod:`shipper.filters.nat_policy`.

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
* **Node role** (:func:`compute_role`): where Kube-OVN NATs a Subnet's egress
  depends on ``spec.gatewayType``. ``distributed`` (the default, also when the
  field is empty) NATs on the pod's own node, so every node NATs its own
  pods. ``centralized`` NATs on the gateway nodes only, for the pods of every
  node. A node is a gateway of a centralized Subnet when ``spec.gatewayNode``
  (comma-separated ``node`` or ``node:egress-ip`` entries) names it, or, only
  when ``gatewayNode`` is empty, when one of ``spec.gatewayNodeSelectors``
  (``metav1.LabelSelector``\\ s) matches the node's labels; this is how
  Kube-OVN's own controller and daemon decide it (``util.GatewayContains``,
  ``util.MatchLabelSelectors``). Without ``enableEcmp`` only one gateway (the
  Subnet's ``status.activateGateway``) NATs at a time and the others stand by;
  a standby gateway still counts as one (it takes over without notice), and
  the role says whether it is the active one.
* With a role, the pod CIDRs are those of the Subnets in the role. CIDRs set
  by hand (``filter.pod_cidrs``) win over discovered ones: then the role is
  only reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from shipper.cidrs import Cidr, CidrError, host_cidr, merge, split_cidrs, subtract, to_cidrs
from shipper.errors import EnrichError
from shipper.filters.nat_policy import Action, NatPolicy, NatRule

__all__ = [
    "Action", "CidrSets", "LabelSelector", "NatPolicy", "NatRule", "NodeRole", "RoleEntry",
    "SubnetInfo", "compute", "compute_role", "node_from_dict", "node_labels",
    "parse_gateway_node", "subnet_from_dict",
]

GatewayType = Literal["distributed", "centralized"]
PodScope = Literal["node", "cluster"]


def _name(obj: Mapping[str, Any], kind: str) -> str:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise EnrichError(f"{kind}: metadata.name is missing or not a string")
    return name


def _parse_nets(text: Any, where: str) -> tuple[Cidr, ...]:
    """Comma-separated IPs/CIDRs -> CIDRs; raises EnrichError naming ``where``."""
    try:
        return split_cidrs(text)
    except CidrError as exc:
        raise EnrichError(f"{where}: {exc.values[0]!r} is not an IP or CIDR "
                          f"({exc.problems[0]})") from exc


_SELECTOR_OPS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True)
class LabelSelector:
    """A ``metav1.LabelSelector``: every matchLabels pair and every expression must hold.

    Same semantics as ``metav1.LabelSelectorAsSelector``: an empty selector
    matches every node; ``NotIn`` and ``DoesNotExist`` also match a node
    without the key.
    """

    match_labels: tuple[tuple[str, str], ...] = ()
    # (key, operator, values)
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True if ``labels`` satisfy the selector."""
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        for key, op, values in self.match_expressions:
            present = key in labels
            if op == "In":
                ok = present and labels[key] in values
            elif op == "NotIn":
                ok = not present or labels[key] not in values
            elif op == "Exists":
                ok = present
            else:  # DoesNotExist
                ok = not present
            if not ok:
                return False
        return True


def _selector_from_dict(raw: Any, where: str) -> LabelSelector:
    """One LabelSelector object; raises EnrichError naming ``where`` for what Kubernetes rejects."""
    if not isinstance(raw, Mapping):
        raise EnrichError(f"{where} is not an object")
    ml = raw.get("matchLabels") or {}
    if not isinstance(ml, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ml.items()
    ):
        raise EnrichError(f"{where}.matchLabels is not a map of strings")
    exprs = raw.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise EnrichError(f"{where}.matchExpressions is not a list")
    out = []
    for i, e in enumerate(exprs):
        w = f"{where}.matchExpressions[{i}]"
        if not isinstance(e, Mapping):
            raise EnrichError(f"{w} is not an object")
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if not isinstance(key, str) or not key:
            raise EnrichError(f"{w}.key is missing or not a string")
        if op not in _SELECTOR_OPS:
            raise EnrichError(f"{w}.operator is {op!r}, expected one of {', '.join(_SELECTOR_OPS)}")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise EnrichError(f"{w}.values is not a list of strings")
        if op in ("In", "NotIn") and not values:
            raise EnrichError(f"{w}: operator {op} needs values")
        if op in ("Exists", "DoesNotExist") and values:
            raise EnrichError(f"{w}: operator {op} takes no values")
        out.append((key, op, tuple(values)))
    return LabelSelector(tuple(sorted(ml.items())), tuple(out))


def parse_gateway_node(text: str) -> tuple[tuple[str, str | None], ...]:
    """``spec.gatewayNode`` -> ((node, egress IP or None), ...), as Kube-OVN splits it.

    Entries are comma-separated, each ``node`` or ``node:egress-ip`` (the part
    before the first colon is the node name); blanks are ignored.
    """
    out = []
    for entry in text.split(","):
        name, sep, ip = entry.partition(":")
        name = name.strip()
        if name:
            out.append((name, (ip.strip() or None) if sep else None))
    return tuple(out)


@dataclass(frozen=True)
class SubnetInfo:
    """What the shipper needs from one Subnet."""

    name: str
    cidrs: tuple[Cidr, ...]
    nat_outgoing: bool
    vpc: str | None
    rules: tuple[NatRule, ...] = ()
    gateway_type: GatewayType = "distributed"
    # spec.gatewayNode as written (Kube-OVN tests it against "" before using selectors).
    gateway_node: str = ""
    gateway_nodes: tuple[tuple[str, str | None], ...] = ()
    gateway_selectors: tuple[LabelSelector, ...] = ()
    ecmp: bool = False
    active_gateway: str | None = None  # status.activateGateway

    def gateway_entry(
        self, node: str, labels: Mapping[str, str] | None
    ) -> tuple[bool, str | None]:
        """(is ``node`` a gateway of this Subnet, its egress IP from ``node:ip`` if any).

        ``labels`` None (the Node object is unknown) matches no selector.
        """
        if self.gateway_node != "":
            for name, ip in self.gateway_nodes:
                if name == node:
                    return True, ip
            return False, None
        if labels is None:
            return False, None
        return any(sel.matches(labels) for sel in self.gateway_selectors), None


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
    gw_type: GatewayType
    raw_type = spec.get("gatewayType") or "distributed"  # Kube-OVN's default for ""
    if raw_type == "distributed":
        gw_type = "distributed"
    elif raw_type == "centralized":
        gw_type = "centralized"
    else:
        raise EnrichError(
            f"{ref}: spec.gatewayType is {raw_type!r}, expected 'distributed' or 'centralized'"
        )
    gw_node = spec.get("gatewayNode") or ""
    if not isinstance(gw_node, str):
        raise EnrichError(f"{ref}: spec.gatewayNode is not a string")
    raw_sel = spec.get("gatewayNodeSelectors") or []
    if not isinstance(raw_sel, list):
        raise EnrichError(f"{ref}: spec.gatewayNodeSelectors is not a list")
    selectors = tuple(
        _selector_from_dict(raw, f"{ref}: spec.gatewayNodeSelectors[{i}]")
        for i, raw in enumerate(raw_sel)
    )
    ecmp = spec.get("enableEcmp", False)
    if not isinstance(ecmp, bool):
        raise EnrichError(f"{ref}: spec.enableEcmp is not a boolean")
    status = obj.get("status")
    active = status.get("activateGateway") if isinstance(status, Mapping) else None
    return SubnetInfo(
        name, cidrs, nat, vpc or None, tuple(rules),
        gateway_type=gw_type,
        gateway_node=gw_node,
        gateway_nodes=parse_gateway_node(gw_node),
        gateway_selectors=selectors,
        ecmp=ecmp,
        active_gateway=active if isinstance(active, str) and active else None,
    )


def node_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    """``metadata.labels`` of one v1 Node (empty if none); raises EnrichError if malformed."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    if labels is None:
        return {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise EnrichError(f"node {_name(obj, 'node')}: metadata.labels is not a map of strings")
    return dict(labels)


def node_from_dict(obj: Mapping[str, Any]) -> tuple[str, tuple[Cidr, ...]]:
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
    out: list[Cidr] = []
    for i, entry in enumerate(addresses):
        if not isinstance(entry, Mapping) or entry.get("type") != "InternalIP":
            continue
        try:
            cidr = host_cidr(str(entry.get("address", "")))
        except ValueError as exc:
            raise EnrichError(
                f"node {name}: status.addresses[{i}].address {entry.get('address')!r} "
                "is not an IP"
            ) from exc
        if cidr not in out:
            out.append(cidr)
    return name, tuple(out)


@dataclass(frozen=True)
class CidrSets:
    """The outcome of :func:`compute`: what the CIDR filter should use."""

    pod_cidrs: tuple[Cidr, ...]
    cluster_cidrs: tuple[Cidr, ...]
    nat_policy: NatPolicy


def _forwarded_sources(s: SubnetInfo) -> list[Cidr]:
    """Sources that a leading run of destination-independent forward rules always forwards."""
    out: list[Cidr] = []
    for rule in s.rules:
        if rule.action != "forward" or rule.dst:
            break
        if not rule.src:  # forward everything
            return list(s.cidrs)
        out.extend(rule.src)
    return out


def _selected(
    s: SubnetInfo, selection: str, vpc_set: set[str], join_subnet: str
) -> bool:
    """True if ``s`` is a pod Subnet under the selection settings (role not applied)."""
    if s.name == join_subnet:
        return False
    if selection == "nat_outgoing" and not s.nat_outgoing:
        return False
    return not (vpc_set and (s.vpc or "ovn-cluster") not in vpc_set)


@dataclass(frozen=True)
class RoleEntry:
    """One Subnet this node NATs, and how."""

    subnet: str
    mode: GatewayType  # distributed: this node's pods; centralized: every node's pods
    cidrs: tuple[Cidr, ...]
    # centralized only: True with ECMP or when this node is status.activateGateway,
    # False when another gateway is the active one, None when the status names none.
    active: bool | None = None
    egress_ip: str | None = None  # from a "node:ip" gatewayNode entry


@dataclass(frozen=True)
class NodeRole:
    """What one node NATs, computed from the Subnets and the node's name and labels."""

    node: str
    entries: tuple[RoleEntry, ...]
    # False when the Node object was not found: gatewayNodeSelectors could not be matched.
    node_known: bool = True

    @property
    def gateway(self) -> bool:
        """True if this node is a gateway of at least one centralized Subnet."""
        return any(e.mode == "centralized" for e in self.entries)

    @property
    def pod_scope(self) -> PodScope:
        """Whose pods this node must know: a gateway NATs pods of every node."""
        return "cluster" if self.gateway else "node"

    @property
    def subnets(self) -> frozenset[str]:
        """Names of the Subnets in the role."""
        return frozenset(e.subnet for e in self.entries)

    def describe(self) -> dict[str, Any]:
        """JSON-able form (logs, /readyz, check-config)."""
        return {
            "node": self.node,
            "node_known": self.node_known,
            "gateway": self.gateway,
            "pod_scope": self.pod_scope,
            "subnets": [_describe_entry(e) for e in self.entries],
        }

    def summary(self) -> str:
        """One line for humans, e.g. ``ovn-default (centralized, standby), snat (distributed)``."""
        if not self.entries:
            return "nothing (no Subnet is NATed on this node)"
        parts = []
        for e in self.entries:
            if e.mode == "centralized":
                state = {True: "active", False: "standby", None: "gateway"}[e.active]
                parts.append(f"{e.subnet} (centralized, {state})")
            else:
                parts.append(f"{e.subnet} (distributed)")
        return ", ".join(parts)


def _describe_entry(e: RoleEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"name": e.subnet, "mode": e.mode, "cidrs": list(e.cidrs)}
    if e.mode == "centralized":
        out["active"] = e.active
        if e.egress_ip is not None:
            out["egress_ip"] = e.egress_ip
    return out


def compute_role(
    subnets: Iterable[SubnetInfo],
    node: str,
    labels: Mapping[str, str] | None,
    *,
    selection: Literal["nat_outgoing", "all"] = "nat_outgoing",
    vpcs: Iterable[str] = (),
    join_subnet: str = "join",
) -> NodeRole:
    """The role of ``node``: the selected Subnets it NATs (see the module doc).

    ``labels`` None means the Node object is unknown: no selector can match.
    """
    vpc_set = set(vpcs)
    entries = []
    for s in sorted(subnets, key=lambda x: x.name):
        if not _selected(s, selection, vpc_set, join_subnet):
            continue
        cidrs = s.cidrs
        if s.gateway_type == "distributed":
            entries.append(RoleEntry(s.name, "distributed", cidrs))
            continue
        is_gw, egress = s.gateway_entry(node, labels)
        if not is_gw:
            continue
        active: bool | None = True
        if not s.ecmp:
            active = None if s.active_gateway is None else s.active_gateway == node
        entries.append(RoleEntry(s.name, "centralized", cidrs, active, egress))
    return NodeRole(node, tuple(entries), labels is not None)


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
    role: NodeRole | None = None,
) -> CidrSets:
    """Pod and cluster CIDRs (sorted, merged) plus the NAT policy of the pod Subnets.

    Static cluster CIDRs are always included. Static pod CIDRs, when given,
    are the pod CIDRs (the operator's word wins over discovery). With a
    ``role``, only the Subnets in it give pod CIDRs. ``vpcs`` empty means
    every VPC.
    """
    vpc_set = set(vpcs)
    static_pod = to_cidrs(static_pod_cidrs)
    pod: list[Cidr] = []
    cluster: list[Cidr] = list(to_cidrs((*static_cluster_cidrs, *service_cidrs, *node_cidrs)))
    in_role = role.subnets if role is not None else None
    removed: list[Cidr] = []
    chosen: list[SubnetInfo] = []
    for s in sorted(subnets, key=lambda x: x.name):
        cluster.extend(s.cidrs)
        if not _selected(s, selection, vpc_set, join_subnet):
            continue
        if in_role is not None and s.name not in in_role:
            continue
        chosen.append(s)
        pod.extend(s.cidrs)
        if honour_rules and s.nat_outgoing:
            removed.extend(_forwarded_sources(s))
    # Static pod CIDRs are the operator's word: they replace discovery, never shrink.
    pod_set = merge(static_pod) if static_pod else subtract(pod, removed)
    policy = NatPolicy(s for s in chosen if s.nat_outgoing) if honour_rules else NatPolicy(())
    return CidrSets(pod_set, merge(cluster), policy)
