"""Pure: Kubernetes v1 Pod objects -> :class:`~shipper.record.PodMeta`.

Shared by every pod source (the inventory file and the Kubernetes API watch),
so a pod looks the same in a record whichever way it was learnt.

Labels and annotations are untrusted input (anyone who can create a pod
chooses them). :class:`LabelPolicy` decides what is shipped: key allow- and
denylists (``fnmatch`` globs, case-sensitive), an annotation allowlist that is
empty (ships nothing) by default, a byte cap on keys (longer keys are dropped:
a truncated key would be a different key) and on values (truncated on a UTF-8
boundary), and a cap on how many entries a pod ships. The result is always a
plain ``dict[str, str]`` that ends up as structured JSON; nothing here is ever
spliced into a string.

Owner: the controller ``ownerReference``. A ReplicaSet owned by a Deployment
is named ``<deployment>-<pod-template-hash>``; when the pod carries the
``pod-template-hash`` label and the ReplicaSet's name ends with
``-<that hash>``, the record names the Deployment instead (kind
``Deployment``). This is derived from names only, without reading the
ReplicaSet, so a bare ReplicaSet whose name happens to end with its pods'
template hash is reported as a Deployment too; that is the accepted trade-off
for not watching ReplicaSets.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shipper.errors import EnrichError
from shipper.record import (
    IP_SOURCE_BOTH,
    IP_SOURCE_KUBE_OVN,
    IP_SOURCE_STATUS,
    PodMeta,
    ip_to_str,
    parse_ip,
)

if TYPE_CHECKING:
    from shipper.config import EnrichConfig

LOGICAL_SWITCH_ANNOTATION = "ovn.kubernetes.io/logical_switch"
# Kube-OVN's allocation annotations (pkg/util/const.go: IPAddressAnnotationTemplate,
# AllocatedAnnotationTemplate = "%s.kubernetes.io/ip_address" / "%s.kubernetes.io/allocated",
# one pair per provider; the default network's provider is "ovn"). The controller
# writes both in one patch when it allocates (pkg/controller/pod.go), the address
# as util.GetStringIP(v4, v6): "v4", "v6" or "v4,v6".
IP_ADDRESS_SUFFIX = ".kubernetes.io/ip_address"
ALLOCATED_SUFFIX = ".kubernetes.io/allocated"
DEFAULT_PROVIDER = "ovn"
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for a list of globs (None for an empty list)."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(frozen=True)
class LabelPolicy:
    """Which labels and annotations are shipped, and how big they may be.

    ``label_allowlist`` empty means every label key is allowed;
    ``annotation_allowlist`` empty means no annotation is shipped. The
    denylist applies to labels after the allowlist. The defaults equal
    :class:`shipper.config.EnrichConfig`'s.
    """

    label_allowlist: tuple[str, ...] = ()
    label_denylist: tuple[str, ...] = ()
    annotation_allowlist: tuple[str, ...] = ()
    max_labels: int = 64
    max_key_bytes: int = 253
    max_value_bytes: int = 1024
    _allow: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _deny: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _ann: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Compiled once; frozen dataclass, hence object.__setattr__.
        object.__setattr__(self, "_allow", _compile(self.label_allowlist))
        object.__setattr__(self, "_deny", _compile(self.label_denylist))
        object.__setattr__(self, "_ann", _compile(self.annotation_allowlist))

    @classmethod
    def from_config(cls, enrich: EnrichConfig) -> LabelPolicy:
        """Build from a :class:`shipper.config.EnrichConfig`."""
        return cls(
            label_allowlist=tuple(enrich.label_allowlist),
            label_denylist=tuple(enrich.label_denylist),
            annotation_allowlist=tuple(enrich.annotation_allowlist),
            max_labels=int(enrich.max_labels),
            max_key_bytes=int(enrich.max_key_bytes),
            max_value_bytes=int(enrich.max_value_bytes),
        )

    def labels(self, raw: Mapping[Any, Any] | None) -> dict[str, str]:
        """The labels of ``raw`` that may be shipped, capped, with sorted keys.

        Non-string keys or values and keys longer than ``max_key_bytes`` are
        dropped; values are truncated to ``max_value_bytes``; at most
        ``max_labels`` entries are kept (the first ones in key order, so the
        choice is deterministic).
        """
        allow, deny = self._allow, self._deny

        def wanted(key: str) -> bool:
            if allow is not None and allow.match(key) is None:
                return False
            return deny is None or deny.match(key) is None

        return self._select(raw, wanted)

    def annotations(self, raw: Mapping[Any, Any] | None) -> dict[str, str]:
        """The allowlisted annotations of ``raw``, with the same caps as labels."""
        ann = self._ann
        if ann is None or not raw:
            return {}
        return self._select(raw, lambda key: ann.match(key) is not None)

    def _select(
        self, raw: Mapping[Any, Any] | None, wanted: Callable[[str], bool]
    ) -> dict[str, str]:
        if not raw or not isinstance(raw, Mapping) or self.max_labels == 0:
            return {}
        out: dict[str, str] = {}
        for key in sorted(k for k in raw if isinstance(k, str)):
            value = raw[key]
            if not isinstance(value, str) or not key:
                continue
            if len(key) > self.max_key_bytes or len(key.encode("utf-8")) > self.max_key_bytes:
                continue
            if not wanted(key):
                continue
            out[key] = _truncate(value, self.max_value_bytes)
            if len(out) >= self.max_labels:
                break
        return out


def _truncate(value: str, max_bytes: int) -> str:
    """``value`` cut to at most ``max_bytes`` UTF-8 bytes, never inside a character."""
    if len(value) * 4 <= max_bytes:
        return value
    data = value.encode("utf-8")
    if len(data) <= max_bytes:
        return value
    return data[:max_bytes].decode("utf-8", "ignore")


_DEFAULT_POLICY = LabelPolicy()


def parse_time_ns(text: str) -> int:
    """RFC 3339 timestamp (``2024-05-01T10:00:00Z``, fraction optional) -> ns since the epoch.

    Raises ValueError on anything else. A timestamp without a zone is UTC.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an RFC 3339 string, got {type(text).__name__}")
    dt = datetime.fromisoformat(text.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _pod_ref(meta: Mapping[str, Any]) -> str:
    ns = meta.get("namespace")
    name = meta.get("name")
    if isinstance(ns, str) and isinstance(name, str):
        return f"{ns}/{name}"
    if isinstance(name, str):
        return name
    uid = meta.get("uid")
    return f"uid {uid}" if isinstance(uid, str) else "(unnamed pod)"


def _mapping(obj: Mapping[str, Any], key: str, ref: str, path: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise EnrichError(f"pod {ref}: {path} is not an object ({type(value).__name__})")
    return value


def _ips(status: Mapping[str, Any], ref: str) -> tuple[tuple[int, int], ...]:
    texts: list[str] = []
    pod_ips = status.get("podIPs")
    if pod_ips is not None:
        if not isinstance(pod_ips, list):
            raise EnrichError(f"pod {ref}: status.podIPs is not a list")
        for i, entry in enumerate(pod_ips):
            ip = entry.get("ip") if isinstance(entry, Mapping) else None
            if not isinstance(ip, str):
                raise EnrichError(f"pod {ref}: status.podIPs[{i}].ip is missing or not a string")
            texts.append(ip)
    if not texts:
        ip = status.get("podIP")
        if ip is not None and ip != "":
            if not isinstance(ip, str):
                raise EnrichError(f"pod {ref}: status.podIP is not a string")
            texts.append(ip)
    out: list[tuple[int, int]] = []
    for text in texts:
        try:
            pair = parse_ip(text)
        except ValueError as exc:
            raise EnrichError(f"pod {ref}: status.podIPs has a bad address {text!r}") from exc
        if pair not in out:
            out.append(pair)
    return tuple(out)


def _allocations(
    annotations: Mapping[str, Any], ref: str
) -> dict[str, tuple[tuple[int, int], ...]]:
    """Kube-OVN's allocated addresses per provider (``{"ovn": ((4, ip), (6, ip))}``).

    Only a provider whose ``<provider>.kubernetes.io/allocated`` is exactly
    ``"true"`` counts: an ``ip_address`` without it is a user's request for a
    static address, not yet an allocation.
    """
    out: dict[str, tuple[tuple[int, int], ...]] = {}
    for key, value in annotations.items():
        if not isinstance(key, str) or not key.endswith(IP_ADDRESS_SUFFIX):
            continue
        provider = key[: -len(IP_ADDRESS_SUFFIX)]
        if not provider or annotations.get(provider + ALLOCATED_SUFFIX) != "true":
            continue
        if not isinstance(value, str):
            raise EnrichError(f"pod {ref}: annotation {key} is not a string")
        addrs: list[tuple[int, int]] = []
        for text in value.split(","):
            if not text.strip():
                continue
            try:
                pair = parse_ip(text)
            except ValueError as exc:
                raise EnrichError(
                    f"pod {ref}: annotation {key} has a bad address {text.strip()!r}"
                ) from exc
            if pair not in addrs:
                addrs.append(pair)
        if addrs:
            out[provider] = tuple(addrs)
    return out


def _addresses(
    status_ips: tuple[tuple[int, int], ...],
    allocations: Mapping[str, tuple[tuple[int, int], ...]],
    ref: str,
    problems: list[str] | None,
) -> tuple[tuple[tuple[int, int], ...], tuple[str, ...]]:
    """The pod's addresses and, for each, how it was learnt.

    Kube-OVN's allocation counts from the moment it is written (before the
    sandbox exists and long before ``status.podIPs``). When both exist they
    are cross-checked for the default network (provider ``ovn``): for a family
    where they name different addresses, ``status.podIPs`` (what the kubelet
    reports the sandbox actually has) wins and the annotation's address is not
    claimed at all, reported through ``problems``; claiming both could name
    this pod for another pod's address. Addresses of other providers
    (attachment networks) never appear in ``status.podIPs`` and are taken from
    their allocation.
    """
    if not allocations:
        return status_ips, (IP_SOURCE_STATUS,) * len(status_ips)
    status_set = set(status_ips)
    status_families = {fam for fam, _ in status_ips}
    ips: list[tuple[int, int]] = list(status_ips)
    sources: list[str] = [IP_SOURCE_STATUS] * len(status_ips)
    for provider in sorted(allocations):
        for pair in allocations[provider]:
            if pair in status_set:
                sources[ips.index(pair)] = IP_SOURCE_BOTH
                continue
            if provider == DEFAULT_PROVIDER and pair[0] in status_families:
                if problems is not None:
                    problems.append(
                        f"pod {ref}: {provider}{IP_ADDRESS_SUFFIX} "
                        f"{ip_to_str(*pair)} disagrees with status.podIPs; "
                        "status.podIPs is used"
                    )
                continue
            if pair not in ips:
                ips.append(pair)
                sources.append(IP_SOURCE_KUBE_OVN)
    return tuple(ips), tuple(sources)


def _owner(
    meta: Mapping[str, Any], labels: Mapping[str, Any], ref: str
) -> tuple[str | None, str | None]:
    refs = meta.get("ownerReferences")
    if refs is None:
        return None, None
    if not isinstance(refs, list):
        raise EnrichError(f"pod {ref}: metadata.ownerReferences is not a list")
    for i, owner in enumerate(refs):
        if not isinstance(owner, Mapping):
            raise EnrichError(f"pod {ref}: metadata.ownerReferences[{i}] is not an object")
        if owner.get("controller") is not True:
            continue
        kind, name = owner.get("kind"), owner.get("name")
        if not isinstance(kind, str) or not isinstance(name, str) or not kind or not name:
            raise EnrichError(
                f"pod {ref}: metadata.ownerReferences[{i}] has no string kind and name"
            )
        if kind == "ReplicaSet":
            tmpl_hash = labels.get(POD_TEMPLATE_HASH_LABEL)
            suffix = f"-{tmpl_hash}" if isinstance(tmpl_hash, str) and tmpl_hash else None
            if suffix and name.endswith(suffix) and len(name) > len(suffix):
                return "Deployment", name[: -len(suffix)]
        return kind, name
    return None, None


def pod_from_dict(
    obj: Mapping[str, Any],
    policy: LabelPolicy | None = None,
    problems: list[str] | None = None,
) -> PodMeta:
    """Convert one v1 Pod object (list item or watch object) into a ready :class:`PodMeta`.

    The result has already been through :meth:`PodMeta.with_record_object`.
    ``metadata.namespace``, ``metadata.name`` and ``metadata.uid`` are
    required; everything else is optional. The Kube-OVN logical switch and
    allocation annotations are read whatever the annotation allowlist says.
    The pod's addresses are ``status.podIPs`` plus Kube-OVN's allocated
    addresses (see :func:`_addresses`); ``ip_sources`` says where each came
    from. A disagreement between the two is appended to ``problems`` (the
    pod is still converted). Raises :class:`~shipper.errors.EnrichError`
    naming the field and the pod when the object is malformed.
    """
    policy = policy or _DEFAULT_POLICY
    if not isinstance(obj, Mapping):
        raise EnrichError(f"pod object is not a JSON object ({type(obj).__name__})")
    kind = obj.get("kind")
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise EnrichError("pod (unnamed pod): metadata is missing or not an object")
    ref = _pod_ref(meta)
    if kind is not None and kind != "Pod":
        raise EnrichError(f"pod {ref}: kind is {kind!r}, expected 'Pod'")
    for key in ("namespace", "name", "uid"):
        value = meta.get(key)
        if not isinstance(value, str) or not value:
            raise EnrichError(f"pod {ref}: metadata.{key} is missing or not a string")
    spec = _mapping(obj, "spec", ref, "spec")
    status = _mapping(obj, "status", ref, "status")
    raw_labels = _mapping(meta, "labels", ref, "metadata.labels")
    raw_annotations = _mapping(meta, "annotations", ref, "metadata.annotations")

    node = spec.get("nodeName")
    if node is not None and not isinstance(node, str):
        raise EnrichError(f"pod {ref}: spec.nodeName is not a string")
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise EnrichError(f"pod {ref}: spec.hostNetwork is not a boolean")
    phase = status.get("phase")
    if phase is not None and not isinstance(phase, str):
        raise EnrichError(f"pod {ref}: status.phase is not a string")
    created = meta.get("creationTimestamp")
    created_ns: int | None = None
    if created is not None:
        try:
            created_ns = parse_time_ns(created)
        except ValueError as exc:
            raise EnrichError(
                f"pod {ref}: metadata.creationTimestamp {created!r} is not RFC 3339"
            ) from exc
    switch = raw_annotations.get(LOGICAL_SWITCH_ANNOTATION)
    logical_switch = (
        _truncate(switch, policy.max_value_bytes) if isinstance(switch, str) and switch else None
    )
    owner_kind, owner_name = _owner(meta, raw_labels, ref)
    ips, ip_sources = _addresses(
        _ips(status, ref), _allocations(raw_annotations, ref), ref, problems
    )

    return PodMeta(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta["uid"],
        ips=ips,
        ip_sources=ip_sources,
        node=node or None,
        labels=policy.labels(raw_labels),
        annotations=policy.annotations(raw_annotations),
        owner_kind=owner_kind,
        owner_name=owner_name,
        logical_switch=logical_switch,
        host_network=host_network,
        phase=phase,
        created_ns=created_ns,
    ).with_record_object()


def pods_from_list(
    obj: Mapping[str, Any],
    policy: LabelPolicy | None = None,
    problems: list[str] | None = None,
) -> tuple[list[PodMeta], list[str]]:
    """Convert a v1 PodList (``kubectl get pods -A -o json``) into pods and per-item errors.

    One bad item does not reject the list: it yields one error string (naming
    the item's index and the problem) and is skipped; the caller counts and
    logs them. Address disagreements of converted pods go to ``problems``
    (see :func:`pod_from_dict`). A document that is not a list at all (no
    ``items`` list) raises :class:`~shipper.errors.EnrichError`.
    """
    if not isinstance(obj, Mapping):
        raise EnrichError(f"pod list is not a JSON object ({type(obj).__name__})")
    kind = obj.get("kind")
    if kind is not None and kind not in ("PodList", "List"):
        raise EnrichError(f"pod list: kind is {kind!r}, expected 'PodList' or 'List'")
    items = obj.get("items")
    if not isinstance(items, list):
        raise EnrichError("pod list: items is missing or not a list")
    policy = policy or _DEFAULT_POLICY
    pods: list[PodMeta] = []
    errors: list[str] = []
    for i, item in enumerate(items):
        try:
            pods.append(pod_from_dict(item, policy, problems))
        except EnrichError as exc:
            errors.append(f"items[{i}]: {exc}")
    return pods, errors
