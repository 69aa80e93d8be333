"""Time-aware pod index: which pod owned an IP at a given moment.

Pure data structure, no I/O. Writers (the inventory file reloader, the
Kubernetes watch) call :meth:`PodIndex.update`, :meth:`PodIndex.delete` and
:meth:`PodIndex.reconcile`; the event path calls :meth:`PodIndex.attribute`.

Every address maps to a short history of ownership intervals
``(start_ns, end_ns | None, PodMeta)``, oldest first, never overlapping: a new
owner's interval starts no earlier than the previous owner's ended, because
Kubernetes hands an IP to a new pod only after the old one released it. A flow
is attributed to the interval that contains the flow's *start* time, so a
DESTROY event that arrives days after its pod was deleted, and after the IP was
given to another pod, still names the pod that opened the flow.

Deleted pods stay as closed intervals ("tombstones") for ``retention_ns``
(default: five days, conntrack's longest default timeout, TCP established) and
at most ``max_tombstones`` of them are kept; older ones are evicted first and
counted.

Memory (docs/KUBERNETES.md, "Memory"): a tombstone is an address, a time
range and a reference to what the records of its flows need of the pod. When
an interval closes, its PodMeta is replaced by the pod's
:class:`~shipper.record.PodTombstone` (one per pod for all its addresses): the
same record objects, less than half the memory (no creation time, one address
as an integer, name and uid packed, the values pods have in common in one
shared tuple). Open intervals keep the live PodMeta. Record objects are built
only for pods that have records. An address's history is stored flat and
newest first, one tuple ``(start, end, pod, start, end, pod, ...)``: three
slots per interval rather than a tuple each, and the interval nearly every
lookup wants at fixed small indexes. The tombstones' closing order is a deque
of address keys alone: an address's intervals close oldest first, so its
oldest pending closure is always the oldest interval of its history.

Restarts: :meth:`snapshot` copies the history for the state file
(``shipper.enrich.state``) and :meth:`restore` loads it back at start. A pod
restored as live is only known to have lived until the file was written; if
the pod source then reports it gone (or its address taken), its interval
ends at that time, not at "now": flows that started while the shipper was
down are not given to a pod that may already have been deleted. The handover
windows of missed deletions are saved and restored too, so a flow that started
in one is as uncertain after a restart as before it.

Concurrency: writers serialise on a lock; readers take no lock. Each address's
history is an immutable tuple replaced as a whole, so a reader always sees
either the old or the new history, never a half-updated one; a reader that
got a pod's PodMeta just before the interval closed builds the same record
as from its tombstone.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from shipper.record import (
    ATTR_RESOLVED,
    ATTR_UNCERTAIN,
    ATTR_UNRESOLVED,
    IndexedPod,
    PodMeta,
    PodTombstone,
    ip_key,
)

Interval = tuple[int, "int | None", IndexedPod]
# Address key -> the missed-deletion handover windows ``((from_ns, until_ns), ...)``.
Handovers = dict[int, tuple[tuple[int, int], ...]]
# One address's history, flat and newest first: start, end (None while open),
# the pod (PodMeta, or PodTombstone once the pod is gone), repeated. Only the
# newest interval can be open.
Flat = tuple[Any, ...]

DEFAULT_RETENTION_NS = 5 * 24 * 3600 * 1_000_000_000
DEFAULT_SKEW_NS = 5 * 1_000_000_000
# metadata.creationTimestamp has one-second resolution (truncated).
CREATION_GRANULARITY_NS = 1_000_000_000
# Equal to EnrichConfig.max_tombstones' default; sized in docs/KUBERNETES.md (Memory).
DEFAULT_MAX_TOMBSTONES = 300_000


class PodIndex:
    """IP -> ownership history, looked up by time."""

    def __init__(
        self,
        *,
        retention_ns: int = DEFAULT_RETENTION_NS,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES,
        skew_ns: int = DEFAULT_SKEW_NS,
    ) -> None:
        """``skew_ns`` tolerates clock skew between the API server and this node.

        A flow that starts up to ``skew_ns`` before the first known owner's
        interval is still attributed to that owner.
        """
        self.retention_ns = retention_ns
        self.max_tombstones = max_tombstones
        self.skew_ns = skew_ns
        self._hist: dict[int, Flat] = {}
        self._live: dict[str, PodMeta] = {}
        # One address key per closed interval, in closing order, for pruning.
        self._closed_keys: deque[int] = deque()
        self._lock = threading.Lock()
        # uid -> until when a pod restored as live from the state file is known to
        # have lived (the file's write time); dropped once a source reports the pod.
        self._restored: dict[str, int] = {}
        # address key -> ((from_ns, until_ns), ...): the ends of old owners' intervals
        # cut by a new pod's creation after a deletion we never saw. Inside such a
        # window either pod may have used the address (creation times are whole
        # seconds), so a flow starting there is uncertain. Rare: outages only.
        self._handovers: Handovers = {}
        # The PodMeta whose tombstone _tombstone made last, and that tombstone.
        self._last_tombstone: tuple[PodMeta, PodTombstone] | None = None
        self.evicted_total = 0
        self.version = 0

    # ---- readers -------------------------------------------------------------

    def attribute(self, family: int, ip: int, t_ns: int) -> tuple[IndexedPod | None, str]:
        """Return the pod that owned ``ip`` at ``t_ns`` and how sure that is.

        ``(pod, ATTR_RESOLVED)``: ``t_ns`` lies in the pod's ownership interval.
        ``(pod, ATTR_UNCERTAIN)``: ``t_ns`` lies before the first interval known
        for the address, by no more than the clock-skew tolerance. The pod is
        the likely owner (its creation time comes from the API server's clock)
        but nothing rules out an earlier owner we never saw: the address has no
        earlier history here (a first start, a lost state file). Also: the pod
        was restored from the state file, no pod source has confirmed it yet,
        and ``t_ns`` is after the file was written (it may be gone since). Also:
        the pod's deletion was never seen and a new pod took the address, and
        ``t_ns`` lies in the second between the new pod's (truncated) creation
        time and the cut: either pod may have used the address then.
        ``(None, ATTR_UNRESOLVED)``: nobody is known to have owned it then.
        """
        key = ip if family == 4 else ip_key(family, ip)
        hist = self._hist.get(key)
        if hist is None:
            return None, ATTR_UNRESOLVED
        # The newest interval (almost every flow is from a live owner).
        if hist[0] <= t_ns:
            end = hist[1]
            if end is None:
                meta = hist[2]
                if self._restored and t_ns > self._restored.get(meta.uid, t_ns):
                    # Restored from the state file, not yet confirmed by a pod
                    # source, and the flow began after the file was written.
                    return meta, ATTR_UNCERTAIN
                return meta, ATTR_RESOLVED
            if t_ns < end:
                return hist[2], ATTR_RESOLVED
            return None, ATTR_UNRESOLVED
        n = len(hist)
        i = 3
        while i < n:  # older intervals, all closed
            if hist[i] <= t_ns:
                if t_ns < hist[i + 1]:
                    if self._handovers and self._in_handover(key, t_ns):
                        return hist[i + 2], ATTR_UNCERTAIN
                    return hist[i + 2], ATTR_RESOLVED
                return None, ATTR_UNRESOLVED
            i += 3
        if hist[-3] - t_ns <= self.skew_ns:  # before the oldest interval known
            return hist[-1], ATTR_UNCERTAIN
        return None, ATTR_UNRESOLVED

    def lookup(self, family: int, ip: int, t_ns: int) -> IndexedPod | None:
        """The pod :meth:`attribute` names (resolved or uncertain), or None."""
        return self.attribute(family, ip, t_ns)[0]

    def live_pods(self) -> int:
        """Number of pods currently owning at least one address."""
        return len(self._live)

    def addresses(self) -> int:
        """Number of addresses with any history."""
        return len(self._hist)

    def tombstones(self) -> int:
        """Number of closed intervals still kept."""
        return len(self._closed_keys)

    def history(self, family: int, ip: int) -> tuple[Interval, ...]:
        """The ownership history of one address, oldest first (for tests and debugging)."""
        h = self._hist.get(ip_key(family, ip), ())
        return tuple((h[i], h[i + 1], h[i + 2]) for i in range(len(h) - 3, -1, -3))

    def snapshot(self) -> tuple[dict[int, Flat], dict[str, PodMeta], Handovers]:
        """Copies of the history (address key -> flat intervals, newest first, see
        ``Flat``), of the live pods (by uid) and of the handover windows (address key
        -> ``((from_ns, until_ns), ...)``: where a flow is uncertain, see
        :meth:`attribute`).

        Taken under the writer lock, so they are consistent with each other; the
        copies are shallow (C-level dict copies, milliseconds at 100k pods):
        histories are immutable tuples and PodMeta/PodTombstone values never change.
        """
        with self._lock:
            return dict(self._hist), dict(self._live), dict(self._handovers)

    # ---- writers -------------------------------------------------------------

    def restore(
        self,
        hist: dict[int, Flat],
        live: dict[str, PodMeta],
        known_until_ns: int,
        now_ns: int,
        handovers: Handovers | None = None,
    ) -> int:
        """Replace the content with a saved history (as :meth:`snapshot` gives it).

        Returns how many intervals were kept.

        Meant for start-up, before any pod source writes. ``live`` pods are
        taken as alive until ``known_until_ns`` (when the state was saved):
        until a source reports them again, closing them (deletion, a missing
        pod in a full list, a newer pod taking the address) ends their
        interval there. Closed intervals are then pruned as usual (retention,
        ``max_tombstones``), and the handover windows with them: a flow that started
        in one stays uncertain after a restart, as it was before.
        """
        closed: list[tuple[int, int]] = []
        for key, flat in hist.items():
            for i in range(len(flat) - 2, 0, -3):  # the ends, oldest first
                if flat[i] is not None:
                    closed.append((flat[i], key))
        # Stable: an address's intervals stay oldest first (see the module docstring).
        closed.sort(key=lambda c: c[0])
        with self._lock:
            self._hist = dict(hist)
            self._live = dict(live)
            self._closed_keys = deque(c[1] for c in closed)
            self._restored = {uid: known_until_ns for uid in live}
            self._handovers = {k: w for k, w in (handovers or {}).items() if k in hist}
            self.version += 1
        self.prune(now_ns)
        return sum(len(h) for h in self._hist.values()) // 3

    def update(self, pod: PodMeta, now_ns: int) -> None:
        """Record the current state of one pod (a watch ADDED/MODIFIED, a file entry).

        A pod that is host-network, finished (Succeeded/Failed) or has no IP
        owns nothing: its open intervals are closed at ``now_ns``.
        """
        with self._lock:
            self._update_locked(pod, now_ns)
            self.version += 1

    def delete(self, uid: str, now_ns: int) -> None:
        """Record that a pod is gone: its addresses are released at ``now_ns``."""
        with self._lock:
            old = self._live.pop(uid, None)
            if old is not None:
                for fam, ip in old.ips:
                    self._close(ip_key(fam, ip), uid, now_ns)
            self._restored.pop(uid, None)
            self.version += 1

    def reconcile(self, pods: Iterable[PodMeta], now_ns: int) -> None:
        """Replace the live set with ``pods`` (a full list): missing pods are deleted."""
        with self._lock:
            seen: set[str] = set()
            for pod in pods:
                seen.add(pod.uid)
                self._update_locked(pod, now_ns)
            for uid in [u for u in self._live if u not in seen]:
                old = self._live.pop(uid)
                for fam, ip in old.ips:
                    self._close(ip_key(fam, ip), uid, now_ns)
                self._restored.pop(uid, None)
            self.version += 1

    def prune(self, now_ns: int) -> int:
        """Forget closed intervals older than the retention; return how many went."""
        removed = 0
        with self._lock:
            horizon = now_ns - self.retention_ns
            keys, hists = self._closed_keys, self._hist
            while keys:
                key = keys[0]
                hist = hists.get(key)
                # The oldest closure still pending for an address is the oldest
                # interval of its history (intervals close oldest first).
                end = hist[-2] if hist else None
                if end is None:  # nothing closed left there (not expected): skip
                    keys.popleft()
                    continue
                if end >= horizon and len(keys) <= self.max_tombstones:
                    break
                keys.popleft()
                if end >= horizon:
                    self.evicted_total += 1
                if len(hist) > 3:  # type: ignore[arg-type]
                    hists[key] = hist[:-3]  # type: ignore[index]
                else:
                    del hists[key]
                removed += 1
            if self._handovers:
                for k in [k for k, ws in self._handovers.items() if ws[-1][1] < horizon
                          or k not in hists]:
                    del self._handovers[k]
            if removed:
                self.version += 1
        return removed

    # ---- internals -----------------------------------------------------------

    def _in_handover(self, key: int, t_ns: int) -> bool:
        """True if ``t_ns`` lies in a missed-deletion handover window of ``key``."""
        return any(lo <= t_ns < hi for lo, hi in self._handovers.get(key, ()))

    @staticmethod
    def _owns_ips(pod: PodMeta) -> bool:
        return bool(pod.ips) and not pod.host_network and pod.phase not in ("Succeeded", "Failed")

    def _update_locked(self, pod: PodMeta, now_ns: int) -> None:
        uid = pod.uid
        old = self._live.get(uid)
        _share_ips(pod, old.ips if old is not None else self._previous_ips(pod))
        if self._restored:
            self._restored.pop(uid, None)  # a source reports it: alive until now
        new_keys = {ip_key(f, i) for f, i in pod.ips} if self._owns_ips(pod) else set()
        old_keys = {ip_key(f, i) for f, i in old.ips} if old is not None else set()
        for key in old_keys - new_keys:
            self._close(key, uid, now_ns)
        for key in new_keys & old_keys:
            # Same address, fresher metadata (labels may have changed).
            hist = self._hist[key]
            start, end, meta = hist[0], hist[1], hist[2]
            if meta.uid == uid and end is None and meta != pod:
                self._hist[key] = (start, None, pod, *hist[3:])
        first_seen = old is None
        owns = bool(new_keys & old_keys)
        for key in new_keys - old_keys:
            start = now_ns
            if first_seen and pod.created_ns is not None:
                # The pod may have owned the address since it was created.
                start = min(pod.created_ns, now_ns)
            owns = self._open(key, pod, start, now_ns) or owns
        if owns:
            self._live[uid] = pod
        else:
            self._live.pop(uid, None)

    def _previous_ips(self, pod: PodMeta) -> tuple[tuple[int, int], ...] | None:
        """The addresses of the newest pod known on ``pod``'s first address, if any."""
        if not pod.ips:
            return None
        hist = self._hist.get(ip_key(*pod.ips[0]))
        return hist[2].ips if hist else None

    def _open(self, key: int, pod: PodMeta, start: int, now_ns: int) -> bool:
        """Give ``key`` to ``pod`` from ``start``; False if another pod keeps it."""
        hist = self._hist.get(key, ())
        if hist:
            last_start, last_end, last_meta = hist[0], hist[1], hist[2]
            if last_end is None and last_meta.uid != pod.uid:
                # Two pods claim one address. Kubernetes hands an IP to a new pod
                # only after the old one released it, so the newer pod owns it; an
                # older claimant is a lagging view (a Terminating pod still lists
                # status.podIP, a list holds both): it gets nothing, and repeated
                # claims cost nothing (no interval churn).
                if not _newer(pod, last_meta):
                    return False
                # We did not see the old owner go. The new pod cannot have had the
                # address before it existed: cut there (after an API outage, "now"
                # would give the new pod's first flows to the old one). Kubernetes
                # creation times are whole seconds, rounded down: the pod really
                # began up to a second later, and the old owner may still have
                # used the address until then, so cut one second after.
                cut = now_ns
                if pod.created_ns is not None:
                    cut = min(now_ns, pod.created_ns + CREATION_GRANULARITY_NS)
                known_until = self._restored.get(last_meta.uid)
                if known_until is not None:
                    # Restored from the state file and not seen since: alive only
                    # as far as we know, not until the new pod came.
                    cut = min(cut, known_until)
                last_end = max(cut, last_start)
                if pod.created_ns is not None and pod.created_ns < last_end:
                    window = (max(pod.created_ns, last_start), last_end)
                    self._handovers[key] = (*self._handovers.get(key, ()), window)
                hist = (last_start, last_end, self._tombstone(last_meta), *hist[3:])
                self._closed_keys.append(key)
                stale = self._live.get(last_meta.uid)
                if stale is not None:
                    remaining = tuple(
                        (f, i) for f, i in stale.ips if ip_key(f, i) != key
                    )
                    if remaining:
                        self._live[last_meta.uid] = _with_ips(stale, remaining)
                    else:
                        del self._live[last_meta.uid]
                        self._restored.pop(last_meta.uid, None)
            if last_end is not None:
                start = max(start, last_end)
        self._hist[key] = (start, None, pod, *hist)
        return True

    def _close(self, key: int, uid: str, now_ns: int) -> None:
        hist = self._hist.get(key)
        if not hist:
            return
        start, end, meta = hist[0], hist[1], hist[2]
        if end is None and meta.uid == uid:
            known_until = self._restored.get(uid)
            if known_until is not None:
                now_ns = min(now_ns, known_until)  # see restore()
            self._hist[key] = (start, max(now_ns, start), self._tombstone(meta), *hist[3:])
            self._closed_keys.append(key)

    def _tombstone(self, meta: IndexedPod) -> IndexedPod:
        """The :class:`PodTombstone` a closing interval of ``meta`` keeps.

        A pod's addresses close one after another (``delete`` of a dual-stack
        pod): the last one made is remembered, so they share one tombstone.
        """
        if not isinstance(meta, PodMeta):
            return meta
        last = self._last_tombstone
        if last is not None and last[0] is meta:
            return last[1]
        tomb = PodTombstone(meta)
        self._last_tombstone = (meta, tomb)
        return tomb


def _share_ips(pod: PodMeta, ips: tuple[tuple[int, int], ...] | None) -> None:
    """Let ``pod`` hold the equal ``ips`` tuple another pod already holds.

    An address handed to a new pod (or a pod updated with unchanged addresses)
    then costs one ``ips`` tuple, not one per pod (about 140 bytes each, with
    its pairs and integers). The value is equal, so nothing observable
    changes; PodMeta is frozen, hence ``object.__setattr__``.
    """
    if ips is not None and ips is not pod.ips and ips == pod.ips:
        object.__setattr__(pod, "ips", ips)


def _newer(claimant: PodMeta, owner: IndexedPod) -> bool:
    """True if ``claimant`` may take an address from ``owner`` (newer, or age unknown)."""
    if claimant.created_ns is None or owner.created_ns is None:
        return True
    return claimant.created_ns >= owner.created_ns


def _with_ips(pod: PodMeta, ips: tuple[tuple[int, int], ...]) -> PodMeta:
    from dataclasses import replace

    return replace(pod, ips=ips)
