"""The one data model: decoded conntrack events and pod metadata.

Two immutable types flow through the pipeline:

* :class:`FlowEvent` - what the kernel said about one conntrack entry, decoded
  from one netlink message. A ``NamedTuple`` rather than a frozen dataclass:
  it is built once per event on the hot path and tuple construction is several
  times cheaper than a frozen dataclass ``__init__``.
* :class:`PodMeta` - who owned an IP: namespace, name, uid, labels, owner, node.

Addresses are plain integers (``family`` says 4 or 6); string forms are made
only when a record is built. ``ip_key`` folds the family into the integer so
that IPv4 and IPv6 addresses never collide in one dictionary.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# The action names of the record schema (`event.action`).
ACTION_NEW = "new"
ACTION_UPDATE = "update"
ACTION_DESTROY = "destroy"
ACTION_SNAPSHOT = "snapshot"
ACTION_GAP = "gap"

_V6_TAG = 1 << 128


def ip_key(family: int, ip: int) -> int:
    """Return a dictionary key for an address that cannot collide across families."""
    return ip if family == 4 else ip | _V6_TAG


_ip_text: dict[int, str] = {}


def ip_to_str(family: int, ip: int) -> str:
    """Return the canonical text form of an integer address (cached: addresses repeat)."""
    key = ip if family == 4 else ip | _V6_TAG
    text = _ip_text.get(key)
    if text is None:
        if family == 4:
            text = socket.inet_ntop(socket.AF_INET, ip.to_bytes(4, "big"))
        else:
            text = socket.inet_ntop(socket.AF_INET6, ip.to_bytes(16, "big"))
        if len(_ip_text) >= 65536:
            _ip_text.clear()
        _ip_text[key] = text
    return text


def parse_ip(text: str) -> tuple[int, int]:
    """Parse an address into ``(family, integer)``; raises ValueError on garbage."""
    addr = ipaddress.ip_address(text.strip())
    return addr.version, int(addr)


class FlowEvent(NamedTuple):
    """One conntrack event (or one entry of a table dump), decoded.

    Ports are None for protocols without ports; for ICMP/ICMPv6 ``icmp_type``,
    ``icmp_code`` and ``icmp_id`` are set instead. Counters and timestamps are
    None when the kernel did not send them (``nf_conntrack_acct`` /
    ``nf_conntrack_timestamp`` off, or an event type that never carries them).
    Times are nanoseconds since the Unix epoch.
    """

    action: str
    family: int
    proto: int
    orig_src: int
    orig_dst: int
    orig_sport: int | None
    orig_dport: int | None
    reply_src: int
    reply_dst: int
    reply_sport: int | None
    reply_dport: int | None
    icmp_type: int | None
    icmp_code: int | None
    icmp_id: int | None
    ct_id: int | None
    status: int | None
    tcp_state: int | None
    mark: int | None
    zone: int | None
    timeout: int | None
    orig_packets: int | None
    orig_bytes: int | None
    reply_packets: int | None
    reply_bytes: int | None
    ts_start: int | None
    ts_stop: int | None
    ts_event: int | None
    received_ns: int


@dataclass(frozen=True, slots=True)
class PodMeta:
    """Identity of the pod that owns an address during some interval.

    ``ips`` holds ``(family, integer)`` pairs. ``labels`` and ``annotations``
    are already filtered and capped by whoever built the value; they are never
    mutated after construction. ``kubernetes`` is the pre-built ``kubernetes``
    object of the record without ``pod.ip``; ``kubernetes_by_ip`` holds the
    finished object for each of the pod's addresses (by :func:`ip_key`), with
    ``pod.ip`` set. Both are filled by :meth:`with_record_object` and shared by
    every record of the pod: they must never be mutated.
    """

    namespace: str
    name: str
    uid: str
    ips: tuple[tuple[int, int], ...]
    node: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    owner_kind: str | None = None
    owner_name: str | None = None
    logical_switch: str | None = None
    host_network: bool = False
    phase: str | None = None
    created_ns: int | None = None
    kubernetes: dict[str, Any] = field(default_factory=dict, compare=False)
    kubernetes_by_ip: dict[int, dict[str, Any]] = field(default_factory=dict, compare=False)

    def with_record_object(self) -> PodMeta:
        """Return a copy whose ``kubernetes`` field holds the record's object for this pod."""
        pod: dict[str, Any] = {"name": self.name, "uid": self.uid}
        obj: dict[str, Any] = {"namespace": self.namespace, "pod": pod}
        if self.labels:
            obj["labels"] = dict(self.labels)
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        if self.node:
            obj["node"] = {"name": self.node}
        if self.owner_kind and self.owner_name:
            obj["owner"] = {"kind": self.owner_kind, "name": self.owner_name}
        if self.logical_switch:
            obj["ovn"] = {"logical_switch": self.logical_switch}
        # One finished object per address (with kubernetes.pod.ip), built once
        # here rather than copied per record. Records share them: never mutate.
        by_ip = {
            ip_key(fam, ip): {**obj, "pod": {**pod, "ip": ip_to_str(fam, ip)}}
            for fam, ip in self.ips
        }
        return PodMeta(
            namespace=self.namespace,
            name=self.name,
            uid=self.uid,
            ips=self.ips,
            node=self.node,
            labels=self.labels,
            annotations=self.annotations,
            owner_kind=self.owner_kind,
            owner_name=self.owner_name,
            logical_switch=self.logical_switch,
            host_network=self.host_network,
            phase=self.phase,
            created_ns=self.created_ns,
            kubernetes=obj,
            kubernetes_by_ip=by_ip,
        )
