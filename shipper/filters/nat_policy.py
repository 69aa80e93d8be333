"""Pure: Kube-OVN ``natOutgoingPolicyRules`` evaluated on a flow (part of the filter decision).

Subnet discovery (:func:`shipper.enrich.subnets.compute`) builds a
:class:`NatPolicy` from the selected pod Subnets and publishes it, with the
CIDRs, to :meth:`shipper.filters.cidr.CidrFilter.set_cidrs`; the filter asks
it for every flow it would otherwise keep. Rules are matched in order, the
first match decides ``nat`` or ``forward`` (no SNAT); no match means NAT, as
Kube-OVN documents. An empty ``src`` / ``dst`` matches every address.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from shipper.cidrs import Cidr, Ranges, in_ranges, ranges

Action = Literal["nat", "forward"]

#: The filter's reason (``shipper_events_filtered_total{reason}``) for a flow a rule forwards.
REASON_NAT_POLICY_FORWARD = "nat_policy_forward"


@dataclass(frozen=True)
class NatRule:
    """One natOutgoingPolicyRule; empty ``src``/``dst`` match any address."""

    action: Action
    src: tuple[Cidr, ...]
    dst: tuple[Cidr, ...]


class RuledSubnet(Protocol):
    """What :class:`NatPolicy` needs of a Subnet (:class:`shipper.enrich.subnets.SubnetInfo`)."""

    @property
    def cidrs(self) -> tuple[Cidr, ...]:
        """The Subnet's CIDRs."""

    @property
    def rules(self) -> tuple[NatRule, ...]:
        """Its natOutgoingPolicyRules, in order."""


_Family = tuple[Ranges, Ranges]  # (v4, v6)


class NatPolicy:
    """Evaluates the natOutgoingPolicyRules of the selected pod Subnets on a flow.

    Immutable once built. :meth:`forwards` answers "would Kube-OVN send this
    flow out without SNAT?" for a flow from a pod CIDR: True only when the
    flow's source lies in a Subnet with rules and the first rule matching
    (source, destination) says ``forward``. Two policies compiled from the same
    rules are equal.
    """

    def __init__(self, subnets: Iterable[RuledSubnet]) -> None:
        """Compile the rules of ``subnets`` (those without rules cost nothing)."""
        entries = []
        for s in subnets:
            if not s.rules:
                continue
            compiled = tuple(
                (r.action == "forward", ranges(r.src) if r.src else None,
                 ranges(r.dst) if r.dst else None)
                for r in s.rules
            )
            entries.append((ranges(s.cidrs), compiled))
        self._entries: tuple[tuple[_Family, tuple[tuple[bool, _Family | None,
                                                         _Family | None], ...]], ...]
        self._entries = tuple(entries)

    def __bool__(self) -> bool:
        """False when no Subnet has rules (the caller can skip evaluation)."""
        return bool(self._entries)

    def __eq__(self, other: object) -> bool:
        """Same compiled rules."""
        return isinstance(other, NatPolicy) and other._entries == self._entries

    def __hash__(self) -> int:
        """Hash of the compiled rules."""
        return hash(self._entries)

    def forwards(self, family: int, src: int, dst: int) -> bool:
        """True if the flow ``src -> dst`` leaves without SNAT according to its Subnet's rules."""
        fi = 0 if family == 4 else 1
        for subnet, rules in self._entries:
            if not in_ranges(subnet[fi], src):
                continue
            for forward, src_r, dst_r in rules:
                if src_r is not None and not in_ranges(src_r[fi], src):
                    continue
                if dst_r is not None and not in_ranges(dst_r[fi], dst):
                    continue
                return forward
            return False
        return False
