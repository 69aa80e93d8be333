"""Records waiting for pod metadata: the stale hold and the resolve wait, driven together.

When pod metadata may lag (a pod source is stale, or a new flow's source has
no owner yet), records wait between attribution and encoding, bounded, in the
buffers of :mod:`shipper.enrich.hold`. :class:`WaitStage` decides where a record
goes and when it leaves: the event loop calls :meth:`WaitStage.tick` once per
iteration (never blocking on it), and a record that leaves goes to the
``ship(item, pod, attribution)`` callable it was built with (the encoder).
In steady state (sources fresh, owner known) the event path pays one attribute
check (:attr:`WaitStage.holding`) and one dict-emptiness check (``flows``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shipper.config import Config
from shipper.counts import fold
from shipper.enrich.hold import ResolveWait, SourceState, StaleHold
from shipper.enrich.pod_index import PodIndex
from shipper.health import Health
from shipper.metrics import Metrics
from shipper.record import ATTR_RESOLVED, ATTR_STALE, FlowEvent

log = logging.getLogger("shipper.pipeline")  # the log lines keep their logger name

# Held records released per loop iteration once the pod source is fresh again
# (at least; more when more arrived meanwhile), so a big release never stops
# the socket from being read for long.
RELEASE_CHUNK = 5000
# Waiting flows are re-checked at most this often (seconds) after pod changes.
RECHECK_S = 0.05

# A record waiting in the hold or for an owner: (event, remembered flow start,
# attribution time).
Held = tuple[FlowEvent, "int | None", int]
Ship = Callable[[Held, Any, str], None]


class WaitStage:
    """The stale hold and the resolve wait between attribution and encoding."""

    def __init__(self, cfg: Config, index: PodIndex, metrics: Metrics, health: Health,
                 ship: Ship) -> None:
        e = cfg.enrich
        self.index = index
        self.metrics = metrics
        self.health = health
        self._ship = ship
        self.hold = StaleHold(int(e.stale_hold_s * 1e9), e.stale_hold_records,
                              cfg.queue.overflow)
        self.waiting = ResolveWait(int(e.resolve_wait_s * 1e9), e.resolve_wait_max_flows)
        self.flows = self.waiting.flows  # read on the event path: a plain dict
        self.states: list[SourceState] = []
        # The one check on the event path: True while records must go to the hold
        # (a pod source is stale, or held records are still being released).
        self.holding = False
        self.stale = False
        self._wait_version = -1
        self._wait_checked = 0.0
        self._n_held = 0
        self._n_released = 0
        self._held_since_tick = 0
        self._n_stale: dict[str, int] = {}
        self._n_waited: dict[str, int] = {}

    def busy(self) -> bool:
        """True if :meth:`tick` has anything to do."""
        return bool(self.states) or self.holding or bool(self.waiting)

    def releasing(self) -> bool:
        """True while held records are being released (the loop must not sleep)."""
        return bool(self.hold) and not self.stale

    def wait_for_owner(self, key: int, item: Held) -> bool:
        """A NEW/snapshot whose owner is not known for sure: wait for it (True) if the
        wait is on and has room."""
        waiting = self.waiting
        if waiting.wait_ns:
            if waiting.start(key, item, item[0].received_ns):
                return True
            self._n_waited["full"] = self._n_waited.get("full", 0) + 1
        return False

    def ship_attributed(self, item: Held) -> None:
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

    def add(self, item: Held) -> None:
        """Hold a record while pod metadata is stale (or held records are released)."""
        self._n_held += 1
        self._held_since_tick += 1
        out = self.hold.add(item, item[0].received_ns)
        if out is not None:
            self._ship_stale(out, "full" if self.hold.enabled else "age")

    def tick(self, now_ns: int, now_m: float) -> None:
        """Once per loop iteration: follow the pod sources' freshness, release held records,
        end waits. Everything the event path defers is decided here."""
        stale = False
        for st in self.states:
            if st.stale:
                stale = True
                break
        hold = self.hold
        if stale != self.stale:
            self.stale = stale
            self.metrics.set("shipper_pod_source_stale", 1 if stale else 0)
            self.report()
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
                self.ship_attributed(item)
        self._held_since_tick = 0
        self.holding = stale or bool(hold)
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
                if self.holding:
                    self.add(item)  # the view went stale meanwhile
                else:
                    self.ship_attributed(item)

    def flush(self) -> None:
        """At shutdown: nothing may stay behind. Waiting flows ship as they stand; held
        records ship attributed if the source is fresh, else flagged stale."""
        for _, items in self.waiting.drain():
            for item in items:
                if self.stale:
                    self._ship_stale(item, "shutdown")
                else:
                    self.ship_attributed(item)
        if self.stale:
            for item in self.hold.release(len(self.hold)):
                self._ship_stale(item, "shutdown")
        else:
            for item in self.hold.release(len(self.hold)):
                self._n_released += 1
                self.ship_attributed(item)
        self.holding = False

    def _stale_reasons(self) -> dict[str, str]:
        return {st.name: st.reason for st in self.states if st.stale}

    def report(self) -> None:
        """The pods-stale state for /readyz (information only: readiness is unaffected)."""
        self.health.set_info("pods", {
            "stale": self.stale,
            "held": len(self.hold),
            "waiting_for_owner": len(self.waiting),
            "sources": {st.name: st.info() for st in self.states},
        })

    def fold_counters(self) -> None:
        """Add the counts gathered since the last call to the metrics."""
        m = self.metrics
        if self._n_held:
            m.inc("shipper_records_held_total", n=self._n_held)
            self._n_held = 0
        if self._n_released:
            m.inc("shipper_records_released_total", n=self._n_released)
            self._n_released = 0
        fold(m, (("shipper_records_stale_total", self._n_stale),
                 ("shipper_records_waited_total", self._n_waited)))
        m.set("shipper_hold_records", len(self.hold))
