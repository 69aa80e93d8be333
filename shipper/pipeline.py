"""Wires source -> filter -> attribute -> [wait] -> output, and runs it.

The event path is one thread (``Pipeline.run``): the source
(:mod:`shipper.sources.events`) receives a burst from the conntrack socket and
decodes it; :meth:`Pipeline.handle` filters each event
(:mod:`shipper.filters.cidr`), finds its attribution time
(:mod:`shipper.enrich.attribute`) and pod, lets it wait for pod metadata if it
must (:mod:`shipper.enrich.waiting`), and hands it to the output
(:mod:`shipper.output`: encode, batch, delivery). Everything else runs beside it
and never blocks it: the pod sources and state saver (:mod:`shipper.enrich.sources`),
the delivery worker, the metrics endpoint. Hot-path counters are plain dicts
(:mod:`shipper.counts`) folded into the metrics once a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from shipper.config import Config
from shipper.counts import EventCounts
from shipper.enrich.attribute import FlowStarts
from shipper.enrich.pod_index import PodIndex
from shipper.enrich.sources import PodSources, kube_source_class
from shipper.enrich.waiting import Held, WaitStage
from shipper.filters.cidr import CidrFilter
from shipper.health import Health
from shipper.log import LogLimit
from shipper.memory import tune_malloc
from shipper.metrics import Metrics
from shipper.output import RecordOutput
from shipper.record import (
    ACTION_DESTROY,
    ACTION_NEW,
    ACTION_SNAPSHOT,
    ATTR_RESOLVED,
    ATTR_STALE,
    FlowEvent,
)
from shipper.sinks import Sink, build_sink
from shipper.sources.events import ConntrackSource

__all__ = ["Pipeline", "kube_source_class"]

log = logging.getLogger("shipper.pipeline")

HOUSEKEEPING_S = 1.0
PRUNE_S = 60.0
READINESS = (("subscribed", "conntrack event socket not subscribed yet"),
             ("pod_sync", "first pod sync not finished"),
             ("initial_dump", "initial table dump not done"),
             ("running", "event loop not started"))


class Pipeline:
    """One shipper: build with a config and metrics, then :meth:`run` or :meth:`dump`."""

    def __init__(self, cfg: Config, metrics: Metrics, *, sink: Sink | None = None) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.health = Health(cfg.health.stall_s)
        for name, reason in READINESS:
            self.health.set_ready(name, False, reason)
        f, e = cfg.filter, cfg.enrich
        self.filter = CidrFilter(f.pod_cidrs, f.cluster_cidrs, only_snat=f.only_snat)
        self.index = PodIndex(retention_ns=int(e.retention_s * 1e9),
                              max_tombstones=e.max_tombstones, skew_ns=int(e.clock_skew_s * 1e9))
        self.pods = PodSources(cfg, self.index, self.filter, metrics, self.health)
        self.starts = FlowStarts(cfg.conntrack.flow_start_cache, self.index,
                                 update_subscribed="update" in cfg.conntrack.events)
        self.wait = WaitStage(cfg, self.index, metrics, self.health, self._ship)
        self.hold, self.waiting = self.wait.hold, self.wait.waiting
        # Hot-path counters, folded into metrics at housekeeping; the dicts bound here too.
        self.counts = c = EventCounts()
        self._n_events, self._n_filtered = c.events, c.filtered
        self.sink = sink if sink is not None else build_sink(cfg, metrics)
        self.out = RecordOutput(cfg, self.sink, metrics, self.health, c.records)
        self.batcher, self.delivery = self.out.batcher, self.out.delivery
        self.source = ConntrackSource(cfg.conntrack, self.filter, metrics, self.out.gap,
                                      self._on_handle_error)
        self._log_limit = LogLimit(per_s=60.0)

    # ---- the event path -----------------------------------------------------

    def handle(self, ev: FlowEvent) -> None:
        """Filter, attribute, build, encode and batch one event."""
        action = ev.action
        self._n_events[action] += 1  # every label is there from the start (EventCounts)
        reason = self.filter.reason(ev)
        if reason is not None:
            self._n_filtered[reason] += 1
            if action == ACTION_DESTROY:
                self.starts.forget(ev)
            return
        key, remembered, t_attr = self.starts.when(ev)
        wait = self.wait
        if wait.holding:
            wait.add((ev, remembered, t_attr))
            return
        pod, attribution = self.index.attribute(ev.family, ev.orig_src, t_attr)
        flows = wait.flows
        if flows and key in flows:
            flows[key].append((ev, remembered, t_attr))  # stay behind the flow's waiting NEW
            return
        if attribution != ATTR_RESOLVED:
            if action in (ACTION_NEW, ACTION_SNAPSHOT) and wait.wait_for_owner(
                    key, (ev, remembered, t_attr)):
                return
            if pod is None:
                self.counts.unresolved += 1
            else:
                self.counts.uncertain += 1
        self.out.record(ev, pod, remembered, attribution)

    def _ship(self, item: Held, pod: Any, attribution: str) -> None:
        """Hand on a record that waited (the slow path of :meth:`handle`)."""
        if attribution != ATTR_RESOLVED and attribution != ATTR_STALE:
            if pod is None:
                self.counts.unresolved += 1
            else:
                self.counts.uncertain += 1
        self.out.record(item[0], pod, item[1], attribution)

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

    # ---- run ----------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set; flush within the grace period; return an exit code.

        0: stopped cleanly with everything delivered; 1: records were still
        undelivered when the grace period ended (they are counted as dropped).
        Raises SourceError if the conntrack socket cannot be opened.
        """
        self.out.stop, cfg, src = stop, self.cfg, self.source
        tune_malloc()
        self.pods.load_state()  # before any pod source writes to the index, and the dump
        self.delivery.start()  # recovers the spool first; raises SinkError if unusable
        try:
            self.starts.size(*src.sysctls())
            src.open()  # before the first dump, so nothing falls between dump and events
        except BaseException:
            self.delivery.close(cfg.shutdown_grace_s)
            raise
        self.health.set_ready("subscribed", True)
        log.info("listening for conntrack events", extra={"fields": {
            "netns": cfg.conntrack.netns, "events": list(cfg.conntrack.events),
            "rcvbuf": src.rcvbuf(), "pod_cidrs": list(self.filter.pod_cidrs),
            "cluster_cidrs": list(self.filter.cluster_cidrs), "sink": self.sink.name}})
        try:
            self.pods.start(self.wait.states, stop)
            self.wait.tick(time.time_ns(), time.monotonic())
            if cfg.conntrack.dump_at_start and not stop.is_set():
                n = self.handle_all(src.dump())
                log.info("initial table dump", extra={"fields": {"entries": n}})
                self.health.set_ready("initial_dump", True, f"{n} entries")
            elif not cfg.conntrack.dump_at_start:
                self.health.set_ready("initial_dump", True, "conntrack.dump_at_start is false")
            self._loop(stop)
            self._drain_at_stop()
        finally:
            try:
                src.close()
            finally:
                clean = self._shutdown()
        return 0 if clean else 1

    def _drain_at_stop(self) -> None:
        """On stop, ship what the kernel already queued, within half of the grace period;
        nothing more will come, so waiting and held records leave then too."""
        self.source.drain_at_stop(self.handle, self.cfg.shutdown_grace_s / 2, self.wait.flush)

    def _loop(self, stop: threading.Event) -> None:
        src, wait, out = self.source, self.wait, self.out
        handle, beat, monotonic = self.handle, self.health.beat, time.monotonic
        next_house = monotonic() + HOUSEKEEPING_S
        next_prune = monotonic() + PRUNE_S
        self.health.set_ready("running", True)
        while not stop.is_set():
            beat()
            deadline = min(next_house, out.batcher.deadline() or next_house)
            timeout_ms = max(0, int((deadline - monotonic()) * 1000) + 1)
            src.wait(0 if wait.releasing() else min(timeout_ms, 200))
            if wait.busy():
                # Before the burst: a pod source that went stale (or recovered) while
                # we slept must decide where this burst's records go.
                wait.tick(time.time_ns(), monotonic())
            src.after_burst(src.read_burst(handle), self.handle_all)
            now_m = monotonic()
            out.due(now_m)
            if now_m >= next_house:
                next_house = now_m + HOUSEKEEPING_S
                self._housekeeping()
                if now_m >= next_prune:
                    next_prune = now_m + PRUNE_S
                    self.index.prune(time.time_ns())

    def _housekeeping(self) -> None:
        self._flush_counters()
        m = self.metrics
        m.set("shipper_pods_live", self.index.live_pods())
        m.set("shipper_pod_tombstones", self.index.tombstones())
        evicted = self.index.evicted_total - m.value("shipper_pod_tombstones_evicted_total")
        if evicted > 0:
            m.inc("shipper_pod_tombstones_evicted_total", n=evicted)
        if self.wait.states:
            self.wait.report()

    def _flush_counters(self) -> None:
        self.counts.fold(self.metrics)
        if self.starts.evicted:
            self.metrics.inc("shipper_flow_starts_evicted_total", "full", n=self.starts.evicted)
            self.starts.evicted = 0
        self.wait.fold_counters()

    def _shutdown(self, grace_s: float | None = None) -> bool:
        """Flush and stop delivery within ``grace_s`` (default ``shutdown_grace_s``)."""
        self.health.set_ready("running", False, "stopping")
        self.wait.flush()
        self._flush_counters()
        clean = self.out.close(self.cfg.shutdown_grace_s if grace_s is None else grace_s)
        self.pods.stop()  # and the state saver, with a last save
        log.info("stopped", extra={"fields": {"clean": clean}})
        return clean

    # ---- one shot -----------------------------------------------------------

    def dump(self) -> int:
        """Dump the table once through filter, enrichment and encoding; return an exit code."""
        self.pods.load_state()  # read only: the running daemon owns the file
        self.delivery.start()
        # One shot: no later event of these flows will come to use a remembered start,
        # so filling the start cache would only cost time and memory.
        self.starts.max_entries = 0
        try:
            self.pods.start(self.wait.states, save=False)
            self.wait.tick(time.time_ns(), time.monotonic())
            n = self.handle_all(self.source.dump())
            log.info("table dumped", extra={"fields": {"entries": n}})
        finally:
            clean = self._shutdown()
        return 0 if clean else 1
