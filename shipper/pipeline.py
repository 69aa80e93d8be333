"""Wires source -> filter -> enrich -> batch -> sink, and runs it.

The event path is one thread (``Pipeline.run``): receive a burst from the
conntrack socket, decode, filter, look up the pod, build and encode the
record, add it to the open batch. Closed batches go to the delivery worker
(``shipper.delivery``) through a bounded queue. Everything else runs beside
it and never blocks it: the pods-file reloader, the Kubernetes watch, the
metrics endpoint.

Attribution time: a flow is attributed to the pod that owned its source
address when the flow *started*: the kernel's start timestamp when it sent one
(``nf_conntrack_timestamp=1``), else the start remembered from the flow's
NEW/snapshot event (a bounded cache keyed by conntrack id and source), else
the time the event was read.

When pod metadata may lag (the pod source is stale, or a new flow's source has
no owner yet), records wait between attribution and encoding, bounded, in the
buffers of :mod:`shipper.enrich.hold`; the event loop drives them once per
iteration and never blocks on them. In steady state (source fresh, owner
known) the event path pays one attribute check for this.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from shipper import ecs
from shipper.batch import Batch, Batcher
from shipper.config import Config
from shipper.delivery import Delivery
from shipper.ecs_json import JsonLineEncoder
from shipper.enrich.hold import ResolveWait, SourceState, StaleHold
from shipper.enrich.inventory import InventoryWatcher
from shipper.enrich.kube_detect import kube_enabled
from shipper.enrich.pod_index import PodIndex
from shipper.enrich.pods import LabelPolicy
from shipper.enrich.state import StateFile, StateSaver
from shipper.errors import DecodeError, DependencyError, SourceError
from shipper.filters.cidr import CidrFilter
from shipper.health import Health
from shipper.memory import tune_malloc
from shipper.metrics import Metrics
from shipper.record import (
    ACTION_DESTROY,
    ACTION_NEW,
    ACTION_SNAPSHOT,
    ATTR_RESOLVED,
    ATTR_STALE,
    FlowEvent,
)
from shipper.sinks import Sink, build_sink
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.spool import open_spool
from shipper.sources import bpf, conntrack
from shipper.sources.decode import LayoutDecoder

log = logging.getLogger("shipper.pipeline")

HOUSEKEEPING_S = 1.0
DROPS_CHECK_S = 5.0
PRUNE_S = 60.0
MAX_BURST = 20000
# Reliable DESTROY at stop: the socket counts as drained once no redelivered DESTROY
# came for this long (the kernel redelivers at its own pace: about 390/s with a tiny
# buffer here, never more than 25 ms apart).
REDELIVERY_QUIET_S = 0.25
# Held records released per loop iteration once the pod source is fresh again
# (at least; more when more arrived meanwhile), so a big release never stops
# the socket from being read for long.
RELEASE_CHUNK = 5000
# Waiting flows are re-checked at most this often (seconds) after pod changes.
RECHECK_S = 0.05

# A record waiting in the hold or for an owner: (event, remembered flow start,
# attribution time).
Held = tuple[FlowEvent, "int | None", int]


def _conntrack_max() -> int | None:
    """``net.netfilter.nf_conntrack_max`` (None if unreadable): the most flows the table holds."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def kube_source_class(cfg: Config) -> Any:
    """``KubeSource`` when the Kubernetes API source is configured, else None.

    Raises DependencyError naming the missing package when it is configured
    but its client library cannot be imported: attribution must never be
    silently off while the operator asked for it.
    """
    if not kube_enabled(cfg):
        return None
    try:
        from shipper.enrich.kube import KubeSource
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0] or str(exc)
        raise DependencyError(
            f"Kubernetes is configured (kubernetes.kubeconfig, $KUBECONFIG or an in-cluster "
            f"service account) but its client cannot be imported: missing or incompatible "
            f"Python package '{missing}' ({exc}). Install flowlog-shipper with its declared "
            f"dependencies."
        ) from exc
    return KubeSource


class _LogLimit:
    """At most one log line per key and period: every occurrence is still counted in a
    metric, so a flood of bad input cannot flood the logs."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self._last: dict[str, float] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.per_s:
            return False
        self._last[key] = now
        return True


class Pipeline:
    """One shipper: build with a config and metrics, then :meth:`run` or :meth:`dump`."""

    def __init__(self, cfg: Config, metrics: Metrics, *, sink: Sink | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._kube_source = kube_source_class(cfg)  # DependencyError if it cannot load
        self.host = cfg.node_name
        self.filter = CidrFilter(
            cfg.filter.pod_cidrs, cfg.filter.cluster_cidrs, only_snat=cfg.filter.only_snat
        )
        self.index = PodIndex(
            retention_ns=int(cfg.enrich.retention_s * 1e9),
            max_tombstones=cfg.enrich.max_tombstones,
            skew_ns=int(cfg.enrich.clock_skew_s * 1e9),
        )
        self.policy = LabelPolicy.from_config(cfg.enrich)
        self.decoder = LayoutDecoder()
        self.sink = sink if sink is not None else build_sink(cfg, metrics)
        self.encode = self.sink.encode
        # NDJSON sinks get the fused encoder (same lines, half the CPU).
        ndjson = self.sink.entry_format == "ndjson"
        self._lines = JsonLineEncoder(self.host) if ndjson else None
        self.batcher = Batcher(
            max_records=cfg.batch.max_records,
            max_bytes=cfg.batch.max_bytes,
            max_age_s=cfg.batch.max_age_s,
        )
        self.delivery = Delivery(
            self.sink,
            metrics,
            max_batches=cfg.queue.max_batches,
            overflow=cfg.queue.overflow,
            retry=RetryPolicy(cfg.sink.retry_initial_s, cfg.sink.retry_max_s,
                              cfg.sink.max_retries),
            spool=open_spool(cfg.sink.spool, self.sink.name, metrics),
        )
        self.inventory: InventoryWatcher | None = None
        if cfg.inventory.pods_file is not None:
            self.inventory = InventoryWatcher(
                cfg.inventory.pods_file, self.index, self.policy, metrics,
                interval_s=cfg.inventory.reload_interval_s,
            )
        self.kube: Any = None
        # Pod history across restarts (docs/KUBERNETES.md, "State file").
        self.state = StateFile(cfg.state_dir, self.host, metrics) if cfg.state_dir else None
        self._state_saver: StateSaver | None = None
        # Flow start times from NEW/snapshot, for the flow's later events that
        # carry no kernel start timestamp. Sized at start (_size_starts).
        self._starts: dict[int, int] = {}
        self._max_starts = cfg.conntrack.flow_start_cache
        self._remember_new = True  # until _size_starts knows better
        self._n_starts_evicted = 0
        self._stop = threading.Event()
        self._sock: Any = None
        self._gap_since: int | None = None
        self._gap_overruns = 0
        self._last_drops: int | None = None
        self._last_ok_ns = time.time_ns()
        self._drops_checked_ns = self._last_ok_ns
        self._resync_at: float | None = None  # monotonic time of the next due resync
        self._last_resync = float("-inf")
        # Hot-path counters, folded into metrics at housekeeping.
        self._n_events: dict[str, int] = {}
        self._n_filtered: dict[str, int] = {}
        self._n_records: dict[str, int] = {}
        self._n_unresolved = 0
        self._n_uncertain = 0
        # Records waiting for pod metadata (shipper.enrich.hold).
        e = cfg.enrich
        self.hold = StaleHold(int(e.stale_hold_s * 1e9), e.stale_hold_records, cfg.queue.overflow)
        self.waiting = ResolveWait(int(e.resolve_wait_s * 1e9), e.resolve_wait_max_flows)
        self._waiting_flows = self.waiting.flows  # read on the event path: a plain dict
        self._pod_states: list[SourceState] = []
        # The one check on the event path: True while records must go to the hold
        # (a pod source is stale, or held records are still being released).
        self._holding = False
        self._pods_stale = False
        self._wait_version = -1
        self._wait_checked = 0.0
        self._n_held = 0
        self._n_released = 0
        self._held_since_tick = 0
        self._n_stale: dict[str, int] = {}
        self._n_waited: dict[str, int] = {}
        self._log_limit = _LogLimit(per_s=60.0)
        self.health = Health(cfg.health.stall_s)
        for name, reason in (
            ("subscribed", "conntrack event socket not subscribed yet"),
            ("pod_sync", "first pod sync not finished"),
            ("initial_dump", "initial table dump not done"),
            ("running", "event loop not started"),
        ):
            self.health.set_ready(name, False, reason)

    # ---- the event path -----------------------------------------------------

    def handle(self, ev: FlowEvent) -> None:
        """Filter, attribute, build, encode and batch one event."""
        action = ev.action
        self._n_events[action] = self._n_events.get(action, 0) + 1
        reason = self.filter.reason(ev)
        if reason is not None:
            self._n_filtered[reason] = self._n_filtered.get(reason, 0) + 1
            if action == ACTION_DESTROY:
                self._starts.pop(self._start_key(ev), None)
            return
        src = ev.orig_src
        key = self._start_key(ev)
        starts = self._starts
        remembered: int | None
        if action in (ACTION_NEW, ACTION_SNAPSHOT):
            remembered = starts.get(key)
            if remembered is None:
                remembered = ev.ts_start or ecs.event_time(ev)
                if self._max_starts and (
                    self._remember_new or (action == ACTION_SNAPSHOT and ev.ts_start is None)
                ):
                    starts[key] = remembered
                    if len(starts) > self._max_starts:
                        del starts[next(iter(starts))]
                        self._n_starts_evicted += 1
        elif action == ACTION_DESTROY:
            remembered = starts.pop(key, None)
        else:
            remembered = starts.get(key)
        t_attr = ev.ts_start or remembered or ev.received_ns
        if self._holding:
            self._hold_add((ev, remembered, t_attr))
            return
        pod, attribution = self.index.attribute(ev.family, src, t_attr)
        waiting_flows = self._waiting_flows
        if waiting_flows and key in waiting_flows:
            # This flow's NEW waits for its owner: stay behind it.
            waiting_flows[key].append((ev, remembered, t_attr))
            return
        if attribution != ATTR_RESOLVED:
            waiting = self.waiting
            if action in (ACTION_NEW, ACTION_SNAPSHOT) and waiting.wait_ns:
                if waiting.start(key, (ev, remembered, t_attr), ev.received_ns):
                    return
                self._n_waited["full"] = self._n_waited.get("full", 0) + 1
            if pod is None:
                self._n_unresolved += 1
            else:
                self._n_uncertain += 1
        self._n_records[action] = self._n_records.get(action, 0) + 1
        t_ev = ecs.event_time(ev)
        if self._lines is not None:
            entry = self._lines.encode(ev, pod, remembered, attribution)
        else:
            entry = self.encode(ecs.build_record(ev, pod, self.host, flow_start_ns=remembered,
                                                 attribution=attribution), t_ev)
        for b in self.batcher.add(entry, t_ev, time.monotonic()):
            self._submit(b)

    def _ship(self, item: Held, pod: Any, attribution: str) -> None:
        """Encode and batch a record that waited (the slow path of :meth:`handle`)."""
        ev, remembered, _ = item
        action = ev.action
        if attribution != ATTR_RESOLVED and attribution != ATTR_STALE:
            if pod is None:
                self._n_unresolved += 1
            else:
                self._n_uncertain += 1
        self._n_records[action] = self._n_records.get(action, 0) + 1
        t_ev = ecs.event_time(ev)
        if self._lines is not None:
            entry = self._lines.encode(ev, pod, remembered, attribution)
        else:
            entry = self.encode(ecs.build_record(ev, pod, self.host, flow_start_ns=remembered,
                                                 attribution=attribution), t_ev)
        for b in self.batcher.add(entry, t_ev, time.monotonic()):
            self._submit(b)

    def _ship_attributed(self, item: Held) -> None:
        ev, _, t_attr = item
        pod, attribution = self.index.attribute(ev.family, ev.orig_src, t_attr)
        self._ship(item, pod, attribution)

    def _ship_stale(self, item: Held, reason: str) -> None:
        """Ship a record the hold let go before the source recovered: the last known owner,
        flagged ``stale`` (also when no owner is known: the view is behind, so
        "unresolved" would claim more than we know)."""
        ev, _, t_attr = item
        pod, _ = self.index.attribute(ev.family, ev.orig_src, t_attr)
        self._n_stale[reason] = self._n_stale.get(reason, 0) + 1
        self._ship(item, pod, ATTR_STALE)

    def _hold_add(self, item: Held) -> None:
        self._n_held += 1
        self._held_since_tick += 1
        out = self.hold.add(item, item[0].received_ns)
        if out is not None:
            self._ship_stale(out, "full" if self.hold.enabled else "age")

    def _tick_hold(self, now_ns: int, now_m: float) -> None:
        """Once per loop iteration: follow the pod sources' freshness, release held records,
        end waits. Everything the event path defers is decided here."""
        stale = False
        for st in self._pod_states:
            if st.stale:
                stale = True
                break
        hold = self.hold
        if stale != self._pods_stale:
            self._pods_stale = stale
            self.metrics.set("shipper_pod_source_stale", 1 if stale else 0)
            self._report_pods_state()
            if stale:
                log.warning("pod metadata is stale: holding records until it is re-listed "
                            "(at most enrich.stale_hold_s, then shipped flagged stale)",
                            extra={"fields": {"sources": self._stale_reasons()}})
            else:
                log.info("pod metadata is current again: releasing held records",
                         extra={"fields": {"held": len(hold)}})
        if stale:
            for item in hold.expired(now_ns):
                self._ship_stale(item, "age")
        elif hold:
            n = max(RELEASE_CHUNK, 2 * self._held_since_tick)
            for item in hold.release(n):
                self._n_released += 1
                self._ship_attributed(item)
        self._held_since_tick = 0
        self._holding = stale or bool(hold)
        waiting = self.waiting
        if not waiting:
            return
        version = self.index.version
        if version != self._wait_version and now_m - self._wait_checked >= RECHECK_S:
            # Pods changed: flows whose owner is now known leave at once.
            self._wait_version = version
            self._wait_checked = now_m
            attribute = self.index.attribute
            for key, (ev, _, t_attr) in waiting.first():
                pod, attribution = attribute(ev.family, ev.orig_src, t_attr)
                if attribution == ATTR_RESOLVED:
                    self._n_waited["resolved"] = self._n_waited.get("resolved", 0) + 1
                    for item in waiting.pop(key):
                        self._ship(item, pod, attribution)
        for _, items in waiting.due(now_ns):
            self._n_waited["timeout"] = self._n_waited.get("timeout", 0) + 1
            for item in items:
                if self._holding:
                    self._hold_add(item)  # the view went stale meanwhile
                else:
                    self._ship_attributed(item)

    def _flush_waiting(self) -> None:
        """At shutdown: nothing may stay behind. Waiting flows ship as they stand; held
        records ship attributed if the source is fresh, else flagged stale."""
        for _, items in self.waiting.drain():
            for item in items:
                if self._pods_stale:
                    self._ship_stale(item, "shutdown")
                else:
                    self._ship_attributed(item)
        if self._pods_stale:
            for item in self.hold.release(len(self.hold)):
                self._ship_stale(item, "shutdown")
        else:
            for item in self.hold.release(len(self.hold)):
                self._n_released += 1
                self._ship_attributed(item)
        self._holding = False

    def _stale_reasons(self) -> dict[str, str]:
        return {st.name: st.reason for st in self._pod_states if st.stale}

    def _report_pods_state(self) -> None:
        """The pods-stale state for /readyz (information only: readiness is unaffected)."""
        self.health.set_info("pods", {
            "stale": self._pods_stale,
            "held": len(self.hold),
            "waiting_for_owner": len(self.waiting),
            "sources": {st.name: st.info() for st in self._pod_states},
        })

    @staticmethod
    def _start_key(ev: FlowEvent) -> int:
        """Key of a flow in the start-time cache: source address and conntrack id."""
        ct = ev.ct_id or 0
        return (ev.orig_src << 32 | ct) if ev.family == 4 else (ev.orig_src << 33 | ct << 1 | 1)

    def _emit(self, record: dict[str, Any], t_ns: int) -> None:
        for b in self.batcher.add(self.encode(record, t_ns), t_ns, time.monotonic()):
            self._submit(b)

    def _submit(self, b: Batch) -> None:
        """Hand a closed batch to delivery; a wait for room is backpressure, not a stall."""
        with self.health.blocked("the sink (queue or spool full)"):
            self.delivery.submit(b, self._stop)

    def _flush_counters(self) -> None:
        m = self.metrics
        for name, counts in (
            ("shipper_events_total", self._n_events),
            ("shipper_events_filtered_total", self._n_filtered),
            ("shipper_records_total", self._n_records),
        ):
            for label, n in counts.items():
                m.inc(name, label, n=n)
            counts.clear()
        if self._n_starts_evicted:
            m.inc("shipper_flow_starts_evicted_total", "full", n=self._n_starts_evicted)
            self._n_starts_evicted = 0
        if self._n_unresolved:
            m.inc("shipper_records_unresolved_total", n=self._n_unresolved)
            self._n_unresolved = 0
        if self._n_uncertain:
            m.inc("shipper_records_uncertain_total", n=self._n_uncertain)
            self._n_uncertain = 0
        if self._n_held:
            m.inc("shipper_records_held_total", n=self._n_held)
            self._n_held = 0
        if self._n_released:
            m.inc("shipper_records_released_total", n=self._n_released)
            self._n_released = 0
        for name, counts in (("shipper_records_stale_total", self._n_stale),
                             ("shipper_records_waited_total", self._n_waited)):
            for label, n in counts.items():
                m.inc(name, label, n=n)
            counts.clear()
        m.set("shipper_hold_records", len(self.hold))

    def _on_decode_error(self, exc: DecodeError) -> None:
        self.metrics.inc("shipper_decode_errors_total", "malformed")
        if self._log_limit.allow("decode"):
            log.warning("undecodable netlink message skipped (further ones this minute are "
                        "only counted)", extra={"fields": {"error": str(exc)}})

    def _on_handle_error(self, exc: Exception) -> None:
        self.metrics.inc("shipper_errors_total", "handle", type(exc).__name__)
        if self._log_limit.allow("handle"):
            log.exception("event could not be processed; skipped (further ones this minute "
                          "are only counted)")

    def handle_all(self, events: Iterable[FlowEvent]) -> int:
        """Handle a sequence of events (a dump); return how many."""
        n = 0
        beat = self.health.beat
        for ev in events:
            self.handle(ev)
            n += 1
            if not n & 1023:
                beat()  # a long dump is progress, not a stall
        return n

    def _dump(self) -> Iterable[FlowEvent]:
        """The conntrack table as snapshot events, filtered in the kernel where it can be.

        With ``conntrack.kernel_filter`` the kernel skips, before building a
        message, entries the CIDR filter would drop anyway: not source-NATed
        (with ``filter.only_snat``) and, when every pod CIDR is of one family, of
        the other family. The kernel cannot match address ranges in a dump
        (CTA_FILTER compares exact addresses), so the pod-CIDR match stays in
        userspace.
        """
        family = socket.AF_UNSPEC
        snat_only = False
        if self.cfg.conntrack.kernel_filter:
            snat_only = self.filter.only_snat
            fams = {":" in c for c in self.filter.pod_cidrs}
            if fams == {False}:
                family = socket.AF_INET
            elif fams == {True}:
                family = socket.AF_INET6
        return conntrack.dump_table(self.cfg.conntrack.netns, self.decoder,
                                    on_decode_error=self._on_decode_error,
                                    family=family, snat_only=snat_only)

    # ---- start-up -----------------------------------------------------------

    def _sysctls(self) -> None:
        ns = self.cfg.conntrack.netns
        before = conntrack.read_sysctls(ns)
        if self.cfg.conntrack.set_sysctls:
            want = {k: 1 for k in conntrack.SYSCTLS if before.get(k) != 1}
            if want:
                errors = conntrack.set_sysctls(ns, want)
                for k, err in errors.items():
                    log.error("cannot set sysctl", extra={"fields": {
                        "sysctl": f"net.netfilter.nf_conntrack_{k}", "error": err}})
            after = conntrack.read_sysctls(ns)
        else:
            after = before
        for k, v in after.items():
            if v is not None:
                self.metrics.set("shipper_conntrack_sysctl", v, k)
        log.info("conntrack sysctls", extra={"fields": {
            "netns": ns, "before": before, "now": after}})
        if after.get("events") != 1:
            log.warning("nf_conntrack_events is not 1: flows created while no listener "
                        "existed will never produce a DESTROY event")
        if after.get("acct") != 1:
            log.warning("nf_conntrack_acct is not 1: records carry no byte/packet counts")
        if after.get("timestamp") != 1:
            log.warning("nf_conntrack_timestamp is not 1: flow start/end times are "
                        "approximated by when events were read")
        self._size_starts(after.get("timestamp") == 1, conntrack.in_netns(ns, _conntrack_max))

    def _size_starts(self, kernel_timestamps: bool, table_max: int | None) -> None:
        """Size the flow-start cache by what it must remember.

        A remembered start is used only by a later event of the flow that
        carries no kernel start timestamp. With ``nf_conntrack_timestamp=1``,
        DESTROY and dumped entries carry one; NEW and UPDATE never do. So a
        NEW's start is remembered only when UPDATE is subscribed or the kernel
        stamps nothing (a snapshot without a timestamp, a flow from before the
        sysctl was set, is always remembered). The table never holds more than
        ``nf_conntrack_max`` flows, so more entries than that are dead flows
        (a lost DESTROY, or no DESTROY subscribed): the cache holds at most
        that many, and what it evicts to stay there is counted
        (``shipper_flow_starts_evicted_total{reason="full"}``).
        """
        c = self.cfg.conntrack
        self._remember_new = not kernel_timestamps or "update" in c.events
        limit = c.flow_start_cache
        if table_max:
            limit = min(limit, table_max)
        self._max_starts = limit
        while len(self._starts) > limit:
            del self._starts[next(iter(self._starts))]
            self._n_starts_evicted += 1
        log.info("flow start cache", extra={"fields": {
            "max_entries": limit, "remember_new": self._remember_new,
            "nf_conntrack_max": table_max}})

    def _start_enrichment(self, stop: threading.Event | None = None) -> None:
        if self.inventory is not None:
            self.inventory.start()
            self._pod_states.append(self.inventory.state)
        if self._kube_source is not None:
            self.kube = self._kube_source(self.cfg, self.index, self.filter, self.metrics,
                                          self.health)
            self._pod_states.append(self.kube.pods_state)
            self.kube.start()
            timeout = float(self.cfg.kubernetes.sync_timeout_s)
            # A bounded wait by design: /healthz reports it as such, not as a stall.
            with self.health.blocked("the first Kubernetes pod sync "
                                     f"(at most kubernetes.sync_timeout_s = {timeout:g} s)"):
                synced = self.kube.wait_synced(timeout, stop)
            if stop is not None and stop.is_set():
                return
            if not synced:
                log.warning("Kubernetes initial sync not finished; reading events anyway: "
                            "records are held until the pods are listed (at most "
                            "enrich.stale_hold_s, then shipped flagged stale)",
                            extra={"fields": {"waited_s": timeout}})
                self.health.set_ready("pod_sync", True, f"timed out after {timeout:g} s "
                                      "(kubernetes.sync_timeout_s); records held, then "
                                      "flagged stale")
            else:
                self.health.set_ready("pod_sync", True, "pods listed")
        else:
            self.health.set_ready("pod_sync", True, "no Kubernetes API configured" + (
                "; pods file loaded" if self.inventory is not None else ""))

    def _stop_enrichment(self) -> None:
        if self.inventory is not None:
            self.inventory.stop()
        if self.kube is not None:
            self.kube.stop()

    # ---- overruns -----------------------------------------------------------

    def _on_overrun(self) -> None:
        self.metrics.inc("shipper_overruns_total")
        self._gap_overruns += 1
        if self._gap_since is None:
            self._gap_since = self._last_ok_ns
            log.error("conntrack event socket overrun: the kernel is dropping events")

    def _check_drops(self, force_gap: bool) -> None:
        """Read the socket's drop counter; emit a gap record for new losses."""
        drops = conntrack.socket_drops(self.cfg.conntrack.netns, self._sock)
        now = time.time_ns()
        checked, self._drops_checked_ns = self._drops_checked_ns, now
        lost: int | None = None
        if drops is not None:
            lost = drops - (self._last_drops or 0)
            self._last_drops = drops
        if not force_gap and not lost:
            return
        # Without an ENOBUFS the losses happened some time since the last check.
        since = self._gap_since if self._gap_since is not None else checked
        if lost:
            self.metrics.inc("shipper_events_lost_total", n=lost)
        resync = self.cfg.conntrack.resync_on_overrun
        self._emit(
            ecs.gap_record(self.host, since_ns=since, until_ns=now, lost=lost,
                           overruns=self._gap_overruns, resync=resync),
            now,
        )
        self._n_records["gap"] = self._n_records.get("gap", 0) + 1
        log.error("events lost", extra={"fields": {
            "lost": lost, "overruns": self._gap_overruns, "resync": resync}})
        self._gap_since = None
        self._gap_overruns = 0
        if resync and self._resync_at is None:
            self._resync_at = max(
                time.monotonic(),
                self._last_resync + self.cfg.conntrack.resync_min_interval_s,
            )

    def _resync(self) -> None:
        self._resync_at = None
        self._last_resync = time.monotonic()
        try:
            n = self.handle_all(self._dump())
        except SourceError as exc:
            self.metrics.inc("shipper_errors_total", "source", type(exc).__name__)
            log.error("resync dump failed", extra={"fields": {"error": str(exc)}})
            return
        self.metrics.inc("shipper_resyncs_total")
        log.info("resynced from a table dump", extra={"fields": {"entries": n}})

    # ---- run ----------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set; flush within the grace period; return an exit code.

        0: stopped cleanly with everything delivered; 1: records were still
        undelivered when the grace period ended (they are counted as dropped).
        Raises SourceError if the conntrack socket cannot be opened.
        """
        self._stop = stop
        cfg = self.cfg
        tune_malloc()
        if self.state is not None:
            # Before any pod source writes to the index and before the first dump.
            self.state.load(self.index)
            self.health.beat()  # a long load is progress, not a stall
        self.delivery.start()  # recovers the spool first; raises SinkError if unusable
        try:
            self._sysctls()
            # Subscribe before dumping, so nothing falls between dump and events.
            self._sock = conntrack.open_event_socket(
                cfg.conntrack.netns, list(cfg.conntrack.events), cfg.conntrack.rcvbuf_bytes,
                reliable_destroy=cfg.conntrack.reliable_destroy,
            )
            if cfg.conntrack.kernel_filter:
                # The source's kernel filter follows the pod CIDRs in force.
                self.filter.subscribe(bpf.KernelFilter(self._sock, self.metrics).apply)
        except BaseException:
            if self._sock is not None:
                self._sock.close()
            self.delivery.close(cfg.shutdown_grace_s)
            raise
        self._last_drops = conntrack.socket_drops(cfg.conntrack.netns, self._sock)
        self.health.set_ready("subscribed", True)
        log.info("listening for conntrack events", extra={"fields": {
            "netns": cfg.conntrack.netns, "events": list(cfg.conntrack.events),
            "rcvbuf": conntrack.effective_rcvbuf(self._sock),
            "pod_cidrs": list(self.filter.pod_cidrs),
            "cluster_cidrs": list(self.filter.cluster_cidrs), "sink": self.sink.name}})
        try:
            if self.state is not None:
                self._state_saver = StateSaver(self.state, self.index, cfg.state_interval_s)
                self._state_saver.start()
            self._start_enrichment(stop)
            self._tick_hold(time.time_ns(), time.monotonic())
            if cfg.conntrack.dump_at_start and not stop.is_set():
                n = self.handle_all(self._dump())
                log.info("initial table dump", extra={"fields": {"entries": n}})
                self.health.set_ready("initial_dump", True, f"{n} entries")
            elif not cfg.conntrack.dump_at_start:
                self.health.set_ready("initial_dump", True, "conntrack.dump_at_start is false")
            self._loop(stop)
            self._drain_at_stop()
        finally:
            try:
                self._sock.close()
            finally:
                clean = self._shutdown()
        return 0 if clean else 1

    def _drain_at_stop(self) -> None:
        """On stop, ship what the kernel already queued for us, then report its drops.

        A stop can come while events wait on the socket: during the initial
        Kubernetes sync wait (nothing has read the socket yet) or between two
        loop iterations. They are read, handled and shipped like any other
        (attributed as well as the index allows, flagged otherwise), and the
        kernel's drop counter is checked one last time, so no event queued for
        us vanishes uncounted. Bounded: at most the socket buffer's size in
        bytes (all that can have been queued when the stop came; later events
        came after it) and half of ``shutdown_grace_s``; if time runs out first,
        a gap record says that events were left unread (count unknown).
        """
        sock = self._sock
        limit = conntrack.effective_rcvbuf(sock)
        deadline = time.monotonic() + self.cfg.shutdown_grace_s / 2
        since = time.time_ns()
        buf = bytearray(256 * 1024)
        read = events = 0
        unread = False
        while read < limit:
            if time.monotonic() >= deadline:
                unread = True
                break
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._on_overrun()
                    continue
                log.error("conntrack socket read failed while draining at stop",
                          extra={"fields": {"error": exc.strerror}})
                break
            read += n
            now = time.time_ns()
            off = 0
            while off < n:
                try:
                    ev, mlen = self.decoder.decode(buf, off, now)
                except DecodeError as exc:
                    self._on_decode_error(exc)
                    break
                if ev is not None:
                    events += 1
                    try:
                        self.handle(ev)
                    except Exception as exc:
                        self._on_handle_error(exc)
                off += (mlen + 3) & ~3
        if isinstance(sock, conntrack.ReliableEventSocket) and not unread:
            got, finished = self._drain_redelivered(sock.destroy, deadline, buf)
            events += got
            unread = not finished
        # Nothing more will come: records waiting for an owner or held leave now.
        self._flush_waiting()
        if events:
            log.info("events queued at stop were read and shipped",
                     extra={"fields": {"events": events}})
        self._check_drops(force_gap=self._gap_since is not None)
        if unread:
            now = time.time_ns()
            self._emit(ecs.gap_record(self.host, since_ns=since, until_ns=now, lost=None,
                                      overruns=0, resync=False), now)
            self._n_records["gap"] = self._n_records.get("gap", 0) + 1
            log.error("stop: events still queued on the socket after draining for half of "
                      "shutdown_grace_s were not read (gap record, count unknown)")

    def _drain_redelivered(self, dsock: Any, deadline: float, buf: bytearray
                           ) -> tuple[int, bool]:
        """Reliable DESTROY at stop: read the DESTROYs the kernel still holds for us.

        Those whose delivery failed while we were busy are retried by the kernel at
        its own pace; when our socket closes, the kernel frees them unshipped and
        tells nobody how many there were. So keep reading the DESTROY socket until
        it stays empty for REDELIVERY_QUIET_S, bounded by ``deadline``. Return how
        many events were read and whether it drained (False: the deadline came first).
        """
        poller = select.poll()
        poller.register(dsock.fileno(), select.POLLIN)
        events = 0
        while time.monotonic() < deadline:
            try:
                n = dsock.recv_into(buf)
            except BlockingIOError:
                wait = min(REDELIVERY_QUIET_S, max(0.0, deadline - time.monotonic()))
                if poller.poll(int(wait * 1000)):
                    continue
                return events, True
            except OSError as exc:
                log.error("conntrack DESTROY socket read failed while draining at stop",
                          extra={"fields": {"error": exc.strerror}})
                return events, True
            now = time.time_ns()
            off = 0
            while off < n:
                try:
                    ev, mlen = self.decoder.decode(buf, off, now)
                except DecodeError as exc:
                    self._on_decode_error(exc)
                    break
                if ev is not None:
                    events += 1
                    try:
                        self.handle(ev)
                    except Exception as exc:
                        self._on_handle_error(exc)
                off += (mlen + 3) & ~3
        return events, False

    def _shutdown(self) -> bool:
        self.health.set_ready("running", False, "stopping")
        self._flush_waiting()
        b = self.batcher.flush()
        if b is not None:
            self.delivery.submit(b, None)
        self._flush_counters()
        clean = self.delivery.close(self.cfg.shutdown_grace_s)
        self._stop_enrichment()
        if self._state_saver is not None:
            self._state_saver.stop()  # and a last save
        log.info("stopped", extra={"fields": {"clean": clean}})
        return clean

    def _loop(self, stop: threading.Event) -> None:
        sock = self._sock
        recv_into = sock.recv_into
        decode = self.decoder.decode
        handle = self.handle
        time_ns = time.time_ns
        monotonic = time.monotonic
        buf = bytearray(256 * 1024)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        drain_pause = self.cfg.conntrack.drain_interval_ms / 1000.0
        next_house = monotonic() + HOUSEKEEPING_S
        next_drops = monotonic() + DROPS_CHECK_S
        next_prune = monotonic() + PRUNE_S
        beat = self.health.beat
        self.health.set_ready("running", True)
        while not stop.is_set():
            beat()
            now_m = monotonic()
            deadline = min(next_house, self.batcher.deadline() or next_house)
            timeout_ms = max(0, int((deadline - now_m) * 1000) + 1)
            if self.hold and not self._pods_stale:
                timeout_ms = 0  # releasing held records: do not sleep between chunks
            if poller.poll(min(timeout_ms, 200)) and drain_pause:
                # Let a burst gather: draining many events per wake-up costs far
                # less CPU per event than waking for each one.
                time.sleep(drain_pause)
            if self._pod_states or self._holding or self.waiting:
                # Before the burst: a pod source that went stale (or recovered) while
                # we slept must decide where this burst's records go.
                self._tick_hold(time_ns(), monotonic())
            burst = 0
            while burst < MAX_BURST:
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        self._on_overrun()
                        continue
                    raise SourceError(f"conntrack socket read failed: {exc.strerror}") from exc
                now = time_ns()
                off = 0
                while off < n:
                    try:
                        ev, mlen = decode(buf, off, now)
                    except DecodeError as exc:
                        self._on_decode_error(exc)
                        break  # the rest of this datagram cannot be trusted
                    if ev is not None:
                        try:
                            handle(ev)
                        except Exception as exc:  # one bad event must not stop the node
                            self._on_handle_error(exc)
                    off += (mlen + 3) & ~3
                burst += 1
            if burst:
                self._last_ok_ns = time_ns()
            now_m = monotonic()
            if self._gap_since is not None and burst < MAX_BURST:
                self._check_drops(force_gap=True)  # queue drained: close the gap
            if self._resync_at is not None and now_m >= self._resync_at:
                self._resync()
            b = self.batcher.due(now_m)
            if b is not None:
                self._submit(b)
            if now_m >= next_house:
                next_house = now_m + HOUSEKEEPING_S
                self._housekeeping()
                if now_m >= next_drops:
                    next_drops = now_m + DROPS_CHECK_S
                    self._check_drops(force_gap=False)
                if now_m >= next_prune:
                    next_prune = now_m + PRUNE_S
                    self.index.prune(time_ns())

    def _housekeeping(self) -> None:
        self._flush_counters()
        m = self.metrics
        m.set("shipper_pods_live", self.index.live_pods())
        m.set("shipper_pod_tombstones", self.index.tombstones())
        evicted = self.index.evicted_total - m.value("shipper_pod_tombstones_evicted_total")
        if evicted > 0:
            m.inc("shipper_pod_tombstones_evicted_total", n=evicted)
        if self._pod_states:
            self._report_pods_state()

    # ---- one shot -----------------------------------------------------------

    def dump(self) -> int:
        """Dump the table once through filter, enrichment and encoding; return an exit code."""
        if self.state is not None:
            self.state.load(self.index)  # read only: the running daemon owns the file
        self.delivery.start()
        # One shot: no later event of these flows will come to use a remembered start,
        # so filling the start cache would only cost time and memory.
        self._max_starts = 0
        try:
            self._start_enrichment()
            self._tick_hold(time.time_ns(), time.monotonic())
            n = self.handle_all(self._dump())
            log.info("table dumped", extra={"fields": {"entries": n}})
        finally:
            clean = self._shutdown()
        return 0 if clean else 1
