"""The pod sources' lifecycle: the state file, the pods file and the Kubernetes API.

The pods file and the API write into the :class:`~shipper.enrich.pod_index.PodIndex`
from their own threads; their freshness (:class:`~shipper.enrich.hold.SourceState`)
goes to the :class:`~shipper.enrich.waiting.WaitStage`, which holds records while one
is stale. The state file (:mod:`shipper.enrich.state`) gives the index its history
from before a restart: loaded before the others start, saved by its own thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from shipper.config import Config
from shipper.enrich.hold import SourceState
from shipper.enrich.inventory import InventoryWatcher
from shipper.enrich.kube_detect import kube_enabled
from shipper.enrich.pod_index import PodIndex
from shipper.enrich.pods import LabelPolicy
from shipper.enrich.state import StateFile, StateSaver
from shipper.errors import DependencyError
from shipper.filters.cidr import CidrFilter
from shipper.health import Health
from shipper.metrics import Metrics

log = logging.getLogger("shipper.pipeline")  # the log lines keep their logger name


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


class PodSources:
    """The configured pod sources. Built at once (DependencyError if the Kubernetes
    client cannot load); :meth:`start` starts them and waits for the first sync."""

    def __init__(self, cfg: Config, index: PodIndex, filt: CidrFilter, metrics: Metrics,
                 health: Health) -> None:
        self.cfg = cfg
        self.index = index
        self.filter = filt
        self.metrics = metrics
        self.health = health
        self._kube_source = kube_source_class(cfg)  # DependencyError if it cannot load
        self.policy = LabelPolicy.from_config(cfg.enrich)
        self.inventory: InventoryWatcher | None = None
        if cfg.inventory.pods_file is not None:
            self.inventory = InventoryWatcher(
                cfg.inventory.pods_file, index, self.policy, metrics,
                interval_s=cfg.inventory.reload_interval_s,
            )
        self.kube: Any = None
        # Pod history across restarts (docs/KUBERNETES.md, "State file").
        self.state = StateFile(cfg.state_dir, cfg.node_name, metrics) if cfg.state_dir else None
        self._state_saver: StateSaver | None = None

    def load_state(self) -> None:
        """The pod history saved before a restart into the index (before anything else
        writes to it, and before the first dump)."""
        if self.state is not None:
            self.state.load(self.index)
            self.health.beat()  # a long load is progress, not a stall

    def start(self, states: list[SourceState], stop: threading.Event | None = None, *,
              save: bool = True) -> None:
        """Start the state saver (with ``save``; a one-shot dump only reads the state
        file, the running daemon owns it) and the sources, adding each one's freshness
        to ``states``; wait (bounded) for the first Kubernetes sync."""
        if save and self.state is not None:
            self._state_saver = StateSaver(self.state, self.index, self.cfg.state_interval_s)
            self._state_saver.start()
        if self.inventory is not None:
            self.inventory.start()
            states.append(self.inventory.state)
        if self._kube_source is None:
            self.health.set_ready("pod_sync", True, "no Kubernetes API configured" + (
                "; pods file loaded" if self.inventory is not None else ""))
            return
        self.kube = self._kube_source(self.cfg, self.index, self.filter, self.metrics,
                                      self.health)
        states.append(self.kube.pods_state)
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

    def stop(self) -> None:
        """Stop the sources, then the state saver (which saves one last time)."""
        if self.inventory is not None:
            self.inventory.stop()
        if self.kube is not None:
            self.kube.stop()
        if self._state_saver is not None:
            self._state_saver.stop()  # and a last save
