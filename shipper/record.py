"""The one data model: decoded conntrack events and pod metadata.

Two immutable types flow through the pipeline:

* :class:`FlowEvent` - what the kernel said about one conntrack entry, decoded
  from one netlink message. A ``NamedTuple`` rather than a frozen dataclass:
  it is built once per event on the hot path and tuple construction is several
  times cheaper than a frozen dataclass ``__init__``.
* :class:`PodMeta` - who owned an IP: namespace, name, uid, labels, owner, node.
  Once the pod's interval on an address has closed, the pod index keeps a
  :class:`PodTombstone` instead: the same record objects in less memory.

Addresses are plain integers (``family`` says 4 or 6); string forms are made
only when a record is built. ``ip_key`` folds the family into the integer so
that IPv4 and IPv6 addresses never collide in one dictionary.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import FrozenInstanceError, dataclass, field
from itertools import chain
from typing import Any, NamedTuple

# The action names of the record schema (`event.action`).
ACTION_NEW = "new"
ACTION_UPDATE = "update"
ACTION_DESTROY = "destroy"
ACTION_SNAPSHOT = "snapshot"
ACTION_GAP = "gap"

# The attribution statuses of the record schema (`flowlog.attribution`), see
# docs/SCHEMA.md. RESOLVED: the pod that owned the source address when the flow
# started. UNCERTAIN: a pod is named, but it was matched only through the
# clock-skew tolerance (the flow started before the only known owner's
# interval and nothing earlier is known about the address, e.g. after a first
# start or a lost state file): the address may have belonged to an earlier pod
# we never saw. UNRESOLVED: no pod is named. STALE: released by the hold while
# pod metadata was known to be behind.
ATTR_RESOLVED = "resolved"
ATTR_UNCERTAIN = "uncertain"
ATTR_UNRESOLVED = "unresolved"
ATTR_STALE = "stale"
ATTRIBUTIONS = (ATTR_RESOLVED, ATTR_UNCERTAIN, ATTR_UNRESOLVED, ATTR_STALE)

_V6_TAG = 1 << 128

# How a pod's address was learnt (``kubernetes.pod.ip_source``, docs/SCHEMA.md).
IP_SOURCE_STATUS = "status"  # status.podIPs only
IP_SOURCE_KUBE_OVN = "kube-ovn"  # Kube-OVN's allocation annotation only (status not set yet)
IP_SOURCE_BOTH = "kube-ovn+status"  # both, and they agree


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


# Sub-objects of pods' record objects that many pods have in common (the labels
# of a Deployment's replicas, ``{"name": node}``, owner and logical switch
# objects, the usually empty annotations) are shared through these bounded
# caches rather than copied per pod: at 100k pods plus tombstones, per-pod
# copies were most of the pod index's memory. Everything in them is reachable
# from records and PodMeta values, which never mutate them. When a cache is
# full it is cleared (cheap, and safe: pods keep their objects; only sharing
# with later pods is lost), so a cluster where every pod has unique labels
# costs at most the keys of one full cache.
_SHARED_MAX = 16384
_shared_maps: dict[tuple[str, ...], dict[str, str]] = {}
_shared_objs: dict[tuple[str, ...], dict[str, str]] = {}


def _intern(text: str) -> str:
    """``sys.intern`` for exact strings; anything else is returned as it is."""
    return _sys_intern(text) if text.__class__ is str else text


_sys_intern = sys.intern


def _shared_map(items: dict[str, str]) -> dict[str, str]:
    """The shared dict equal to ``items`` (labels or annotations), with interned strings.

    Equal means equal including order, so records keep their key order.
    """
    try:
        key = tuple(chain.from_iterable(items.items()))
        shared = _shared_maps.get(key)
    except TypeError:  # an unhashable value: not ours to share
        return dict(items)
    if shared is None:
        if len(_shared_maps) >= _SHARED_MAX:
            _shared_maps.clear()
        # A copy the cache owns (the caller's dict is never shared), keyed by
        # its own interned strings so the key keeps no duplicate alive. Two
        # threads may race here: the worst outcome is two equal dicts.
        shared = {_intern(k): _intern(v) for k, v in items.items()}
        _shared_maps[tuple(chain.from_iterable(shared.items()))] = shared
    return shared


def _shared_obj(*pairs: str) -> dict[str, str]:
    """The shared dict ``{pairs[0]: pairs[1], ...}`` (node, owner, ovn objects)."""
    shared = _shared_objs.get(pairs)
    if shared is None:
        if len(_shared_objs) >= _SHARED_MAX:
            _shared_objs.clear()
        pairs = tuple(_intern(p) for p in pairs)
        it = iter(pairs)
        shared = dict(zip(it, it, strict=True))
        _shared_objs[pairs] = shared
    return shared


@dataclass(frozen=True, slots=True)
class PodMeta:
    """Identity of the pod that owns an address during some interval.

    ``ips`` holds ``(family, integer)`` pairs. ``labels`` and ``annotations``
    are already filtered and capped by whoever built the value; they are never
    mutated after construction. :meth:`kubernetes_for` gives the finished
    ``kubernetes`` object of the record for one of the pod's addresses (by
    :func:`ip_key`), with ``pod.ip`` set: built on the pod's first record
    and shared by every later one (``record_objects``).
    :attr:`kubernetes` is the same object without ``pod.ip``, built on access.

    Sharing: after :meth:`with_record_object`, ``labels``, ``annotations`` and
    the ``node``/``owner``/``ovn`` sub-objects are the very dicts inside the
    record objects, and pods with equal values share one dict (see
    ``_shared_map``). None of them may ever be mutated: build a new value
    (``dataclasses.replace(...).with_record_object()``) instead.
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
    # Parallel to ``ips``: how each address was learnt (``IP_SOURCE_*``), or
    # empty when the builder did not say (then no ``kubernetes.pod.ip_source``).
    ip_sources: tuple[str, ...] = ()
    # The finished record objects built so far, by ip_key (see kubernetes_for).
    # Not an init field (dataclasses.replace starts a copy without any); starts
    # as the shared empty dict and is replaced whole, never mutated.
    record_objects: dict[int, dict[str, Any]] = field(
        default_factory=lambda: _NO_OBJECTS, compare=False, init=False, repr=False
    )

    @property
    def kubernetes_by_ip(self) -> dict[int, dict[str, Any]]:
        """The finished ``kubernetes`` object for each of the pod's addresses, by :func:`ip_key`.

        Builds those :meth:`kubernetes_for` has not built yet (all of them at
        once), so it is for tests and tools; the event path calls
        :meth:`kubernetes_for` for the one address it needs.
        """
        return _kubernetes_by_ip(self)

    def kubernetes_for(self, key: int, ip_text: str) -> dict[str, Any]:
        """The record's ``kubernetes`` object for the pod's address ``key`` (text ``ip_text``).

        For a listed address the object is built on the first call and kept in
        :attr:`record_objects`, so every later record of the pod shares it (the
        event path reads ``record_objects`` first and calls this only on a
        miss). Building it on demand rather than with the pod keeps its memory
        (about 0.7 KB per address) to the pods that have records: a cluster-wide
        index holds 100k pods and hundreds of thousands of deleted ones, of
        which a node's flows name few. An address the pod does not list (it
        should not happen) gets a new object each time, not kept.
        """
        return _kubernetes_for(self, key, ip_text)

    @property
    def kubernetes(self) -> dict[str, Any]:
        """The record's ``kubernetes`` object for this pod without ``pod.ip`` (a new dict).

        Built on each access rather than stored: the event path reads
        ``kubernetes_by_ip`` and needs this only for an address the pod does
        not list, which does not happen in practice. Its sub-objects are the
        shared ones: do not mutate them.
        """
        return _kubernetes(self)

    def with_record_object(self) -> PodMeta:
        """Return a copy whose repeated values are shared with other pods.

        The copy equals ``self`` (``==``) and yields the same records; its
        strings that repeat across pods (namespace, node, owner, switch,
        phase, label keys and values) are interned, its ``labels`` and
        ``annotations`` are the shared dicts equal to the originals and its
        ``ip_sources`` the shared tuple. Its record objects are built on first
        use (:meth:`kubernetes_for`), not here.
        """
        return PodMeta(
            namespace=_intern(self.namespace),
            name=self.name,
            uid=self.uid,
            ips=self.ips,
            node=_intern(self.node) if self.node else self.node,
            labels=_shared_map(self.labels) if self.labels else _EMPTY,
            annotations=_shared_map(self.annotations) if self.annotations else _EMPTY,
            owner_kind=_intern(self.owner_kind) if self.owner_kind else self.owner_kind,
            owner_name=_intern(self.owner_name) if self.owner_name else self.owner_name,
            logical_switch=(
                _intern(self.logical_switch) if self.logical_switch else self.logical_switch
            ),
            host_network=self.host_network,
            phase=_intern(self.phase) if self.phase else self.phase,
            created_ns=self.created_ns,
            ip_sources=_shared_tuple(self.ip_sources) if self.ip_sources else (),
        )


def _shared_tuple(items: tuple[str, ...]) -> tuple[str, ...]:
    """The shared tuple equal to ``items`` (``ip_sources``: a handful of distinct values)."""
    shared = _shared_tuples.get(items)
    if shared is None:
        if len(_shared_tuples) >= _SHARED_MAX:
            _shared_tuples.clear()
        shared = tuple(_intern(x) for x in items)
        _shared_tuples[shared] = shared
    return shared


_shared_tuples: dict[tuple[str, ...], tuple[str, ...]] = {}

# The record objects of a pod none were built for yet (shared: never mutate).
_NO_OBJECTS: dict[int, dict[str, Any]] = {}

# The labels/annotations of every pod that has none (shared: never mutate).
_EMPTY: dict[str, str] = {}


class PodTombstone:
    """A pod whose interval on an address has closed, kept as the records of its
    past flows need it (usually a deleted pod).

    When an interval closes (the pod was deleted or finished, or lost the
    address) the pod index (:class:`~shipper.enrich.pod_index.PodIndex`) keeps
    this instead of the interval's :class:`PodMeta` (one per pod for all its
    addresses closing together). It reads like that PodMeta (``namespace``, ``name``, ``uid``,
    ``ips``, ``labels``, ``annotations``, ``node``, ``owner_*``,
    ``logical_switch``, ``phase``, ``host_network``, ``ip_sources``) and yields
    the same ``kubernetes`` objects (:meth:`kubernetes_for`, the same code), so
    a late DESTROY's record is byte for byte what it was while the pod lived;
    it inherits the record objects already built. Not kept:
    ``created_ns`` (None: only a live pod's address claims compare creation
    times).

    Smaller than the PodMeta (about 180 bytes rather than 450 for a pod with
    one address): seven slots instead of fifteen; the values that repeat across
    pods (namespace, annotations, owner kind, switch, phase, host network,
    ``ip_sources``) in one shared tuple; name and a canonical UUID uid in one
    bytes object (16 raw bytes + the name), their strings made on access;
    one address as its integer key (:func:`ip_key`) rather than a tuple of
    pairs. Read-only; equal to a tombstone of equal values, never to a PodMeta.
    """

    __slots__ = ("_addrs", "_common", "_id", "labels", "node", "owner_name", "record_objects")

    _id: bytes | tuple[str, str]
    _addrs: int | tuple[tuple[int, int], ...]
    node: str | None
    labels: dict[str, str]
    owner_name: str | None
    _common: tuple[Any, ...]
    record_objects: dict[int, dict[str, Any]]

    def __init__(self, pod: PodMeta) -> None:
        """The tombstone of ``pod`` (a PodMeta whose values are shared already)."""
        self._set(pod.namespace, pod.name, pod.uid, pod.ips, pod.node, pod.labels,
                  pod.annotations, pod.owner_kind, pod.owner_name, pod.logical_switch,
                  pod.host_network, pod.phase, pod.ip_sources, pod.record_objects)

    @classmethod
    def of(
        cls, namespace: str, name: str, uid: str, ips: tuple[tuple[int, int], ...],
        node: str | None, labels: dict[str, str], annotations: dict[str, str],
        owner_kind: str | None, owner_name: str | None, logical_switch: str | None,
        host_network: bool, phase: str | None, ip_sources: tuple[str, ...],
    ) -> PodTombstone:
        """The tombstone of the PodMeta with these values (without making that PodMeta:
        the state file's loader makes hundreds of thousands)."""
        tomb = cls.__new__(cls)
        tomb._set(namespace, name, uid, ips, node, labels, annotations, owner_kind,
                  owner_name, logical_switch, host_network, phase, ip_sources, _NO_OBJECTS)
        return tomb

    def _set(
        self, namespace: str, name: str, uid: str, ips: tuple[tuple[int, int], ...],
        node: str | None, labels: dict[str, str], annotations: dict[str, str],
        owner_kind: str | None, owner_name: str | None, logical_switch: str | None,
        host_network: bool, phase: str | None, ip_sources: tuple[str, ...],
        record_objects: dict[int, dict[str, Any]],
    ) -> None:
        init = object.__setattr__
        init(self, "_id", _pack_id(name, uid))
        init(self, "_addrs", ip_key(*ips[0]) if len(ips) == 1 else ips)
        init(self, "node", node)
        init(self, "labels", labels)
        init(self, "owner_name", owner_name)
        init(self, "_common", _shared_common(
            namespace, annotations, owner_kind, logical_switch, phase, host_network, ip_sources))
        init(self, "record_objects", record_objects)

    @property
    def name(self) -> str:
        """``metadata.name``."""
        i = self._id
        return i[16:].decode("ascii") if isinstance(i, bytes) else i[0]

    @property
    def uid(self) -> str:
        """``metadata.uid``."""
        i = self._id
        return _uid_text(i) if isinstance(i, bytes) else i[1]

    @property
    def ips(self) -> tuple[tuple[int, int], ...]:
        """The pod's ``(family, integer)`` addresses, as its PodMeta listed them."""
        a = self._addrs
        if isinstance(a, int):
            return ((4, a),) if a < _V6_TAG else ((6, a ^ _V6_TAG),)
        return a

    @property
    def namespace(self) -> str:
        """``metadata.namespace``."""
        ns: str = self._common[0]
        return ns

    @property
    def annotations(self) -> dict[str, str]:
        """The shipped annotations (shared: never mutate)."""
        a: dict[str, str] = self._common[1]
        return a

    @property
    def owner_kind(self) -> str | None:
        """The owner's kind (``Deployment`` for a ReplicaSet's pods)."""
        k: str | None = self._common[2]
        return k

    @property
    def logical_switch(self) -> str | None:
        """Kube-OVN's logical switch."""
        s: str | None = self._common[3]
        return s

    @property
    def phase(self) -> str | None:
        """``status.phase`` as last seen."""
        p: str | None = self._common[4]
        return p

    @property
    def host_network(self) -> bool:
        """``spec.hostNetwork``."""
        h: bool = self._common[5]
        return h

    @property
    def ip_sources(self) -> tuple[str, ...]:
        """Parallel to ``ips``: how each address was learnt (see PodMeta)."""
        s: tuple[str, ...] = self._common[6]
        return s

    @property
    def created_ns(self) -> None:
        """Not kept in a tombstone (see the class docstring)."""
        return None

    @property
    def kubernetes_by_ip(self) -> dict[int, dict[str, Any]]:
        """As :attr:`PodMeta.kubernetes_by_ip`."""
        return _kubernetes_by_ip(self)

    def kubernetes_for(self, key: int, ip_text: str) -> dict[str, Any]:
        """As :meth:`PodMeta.kubernetes_for`: the same object the pod's PodMeta gives."""
        return _kubernetes_for(self, key, ip_text)

    @property
    def kubernetes(self) -> dict[str, Any]:
        """As :attr:`PodMeta.kubernetes`."""
        return _kubernetes(self)

    def with_record_object(self) -> PodMeta:
        """A PodMeta with this tombstone's values (``created_ns`` None), values shared."""
        return PodMeta(
            namespace=self.namespace, name=self.name, uid=self.uid, ips=self.ips,
            node=self.node, labels=self.labels, annotations=self.annotations,
            owner_kind=self.owner_kind, owner_name=self.owner_name,
            logical_switch=self.logical_switch, host_network=self.host_network,
            phase=self.phase, ip_sources=self.ip_sources,
        ).with_record_object()

    def _values(self) -> tuple[Any, ...]:
        return (self._id, self._addrs, self.node, self.labels, self.owner_name, self._common)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PodTombstone):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # like PodMeta: its dicts are not hashable

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from the equal PodMeta (pickle, copy); record objects are not carried.
        return (PodTombstone, (self.with_record_object(),))

    def __repr__(self) -> str:
        return (f"PodTombstone(namespace={self.namespace!r}, name={self.name!r}, "
                f"uid={self.uid!r}, ips={self.ips!r}, node={self.node!r}, "
                f"labels={self.labels!r}, annotations={self.annotations!r}, "
                f"owner_kind={self.owner_kind!r}, owner_name={self.owner_name!r}, "
                f"logical_switch={self.logical_switch!r}, phase={self.phase!r}, "
                f"ip_sources={self.ip_sources!r})")


#: A pod as the pod index names an address's owner: live (or not yet buried)
#: :class:`PodMeta`, or the :class:`PodTombstone` of a deleted one. Both give
#: ``record_objects``, ``kubernetes_for`` and the PodMeta attributes.
IndexedPod = PodMeta | PodTombstone


def _pack_id(name: str, uid: str) -> bytes | tuple[str, str]:
    """``name`` and ``uid`` in one bytes object when both round-trip exactly, else a pair."""
    if (len(uid) == 36 and uid[8] == uid[13] == uid[18] == uid[23] == "-"
            and name.isascii()):
        digits = uid.replace("-", "")
        try:
            raw = bytes.fromhex(digits)
        except ValueError:
            raw = b""
        # Only the canonical lowercase form packs (fromhex also takes upper case, spaces).
        if raw.hex() == digits:
            return raw + name.encode("ascii")
    return (name, uid)


def _uid_text(packed: bytes) -> str:
    """The canonical UUID text of ``packed``'s first 16 bytes."""
    h = packed[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _shared_common(
    namespace: str, annotations: dict[str, str], owner_kind: str | None,
    logical_switch: str | None, phase: str | None, host_network: bool,
    ip_sources: tuple[str, ...],
) -> tuple[Any, ...]:
    """The shared tuple of the values tombstones have in common (see PodTombstone)."""
    common = (namespace, annotations, owner_kind, logical_switch, phase, host_network,
              ip_sources)
    try:
        key = (namespace, owner_kind, logical_switch, phase, host_network, ip_sources,
               *chain.from_iterable(annotations.items()))
        shared = _shared_commons.get(key)
    except TypeError:  # an unhashable value: not ours to share
        return common
    if shared is None:
        if len(_shared_commons) >= _SHARED_MAX:
            _shared_commons.clear()
        shared = _shared_commons[key] = common
    return shared


_shared_commons: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def _kubernetes_by_ip(pod: IndexedPod) -> dict[int, dict[str, Any]]:
    for fam, ip in pod.ips:
        key = ip_key(fam, ip)
        if key not in pod.record_objects:
            _kubernetes_for(pod, key, ip_to_str(fam, ip))
    return pod.record_objects


def _kubernetes_for(pod: IndexedPod, key: int, ip_text: str) -> dict[str, Any]:
    """PodMeta.kubernetes_for's work, for PodMeta and PodTombstone alike."""
    objs = pod.record_objects
    obj = objs.get(key)
    if obj is not None:
        return obj
    ips = pod.ips
    for i, (fam, ip) in enumerate(ips):
        if ip_key(fam, ip) != key:
            continue
        pod_obj: dict[str, Any] = {"name": pod.name, "uid": pod.uid, "ip": ip_text}
        sources = pod.ip_sources
        if len(sources) == len(ips):
            pod_obj["ip_source"] = sources[i]
        obj = {"namespace": pod.namespace, "pod": pod_obj}
        obj.update(_parts(pod))
        # Copy, add, replace: a reader on another thread sees the old dict or
        # the new one, never one being changed. Read-only types: this cache is
        # the one attribute ever set after construction.
        object.__setattr__(pod, "record_objects", {**objs, key: obj})
        return obj
    k = _kubernetes(pod)
    return {**k, "pod": {**k["pod"], "ip": ip_text}}


def _kubernetes(pod: IndexedPod) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "namespace": pod.namespace,
        "pod": {"name": pod.name, "uid": pod.uid},
    }
    obj.update(_parts(pod))
    return obj


def _parts(pod: IndexedPod) -> dict[str, Any]:
    """The record object's keys after ``namespace`` and ``pod``, in the schema's order."""
    parts: dict[str, Any] = {}
    if pod.labels:
        parts["labels"] = pod.labels
    if pod.annotations:
        parts["annotations"] = pod.annotations
    if pod.node:
        parts["node"] = _shared_obj("name", pod.node)
    if pod.owner_kind and pod.owner_name:
        parts["owner"] = _shared_obj("kind", pod.owner_kind, "name", pod.owner_name)
    if pod.logical_switch:
        parts["ovn"] = _shared_obj("logical_switch", pod.logical_switch)
    return parts
