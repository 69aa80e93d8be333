"""Pod inventory file: a v1 PodList (``kubectl get pods -A -o json``) reloaded on change.

The file is parsed off the event path, in a background thread, and the result
is applied to the :class:`~shipper.enrich.pod_index.PodIndex` with
``reconcile`` (pods missing from a new version of the file are deleted at the
reload time, which is what keeps attribution right when a pod IP is reused).

Bad input never stops the shipper: an unreadable or unparsable file keeps the
previous state and counts ``shipper_inventory_reloads_total{result="error"}``;
a single bad pod entry is skipped, logged with its name and counted
(``result="partial"``). A missing, unreadable or unparsable file also makes the
source stale (:attr:`InventoryWatcher.state`): records are then held
(``shipper.enrich.hold``) until a version of the file loads again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import orjson

from shipper.enrich.hold import SourceState
from shipper.enrich.pod_index import PodIndex
from shipper.enrich.pods import LabelPolicy, pods_from_list
from shipper.errors import EnrichError
from shipper.metrics import Metrics
from shipper.record import PodMeta

log = logging.getLogger("shipper.inventory")


def load_file(
    path: Path, policy: LabelPolicy, conflicts: list[str] | None = None
) -> tuple[list[PodMeta], list[str]]:
    """Parse a PodList file; return ``(pods, problems)``. Raises EnrichError if unusable.

    Address conflicts of converted pods (see :func:`~shipper.enrich.pods.pod_from_dict`)
    are appended to ``conflicts``.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EnrichError(f"pods file {path}: cannot read: {exc.strerror}") from exc
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EnrichError(f"pods file {path}: not valid JSON: {exc}") from exc
    try:
        return pods_from_list(obj, policy, conflicts)
    except EnrichError as exc:
        raise EnrichError(f"pods file {path}: {exc}") from exc


class InventoryWatcher:
    """Loads the pods file now, then reloads it whenever its mtime, size or inode change."""

    def __init__(
        self,
        path: Path,
        index: PodIndex,
        policy: LabelPolicy,
        metrics: Metrics,
        *,
        interval_s: float = 2.0,
    ) -> None:
        self.path = Path(path)
        self.index = index
        self.policy = policy
        self.metrics = metrics
        self.interval_s = interval_s
        self._sig: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.loaded = threading.Event()
        self.state = SourceState("pods_file", now_ns=time.time_ns())

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Reload if the file changed since the last successful load; True if it did."""
        sig = self._signature()
        if sig is None:
            self.state.mark_stale("pods file missing", time.time_ns())
            if self._sig is not None or not self.loaded.is_set():
                self.metrics.inc("shipper_inventory_reloads_total", "error")
                log.error("pods file missing; keeping the last known pods",
                          extra={"fields": {"path": str(self.path)}})
                self._sig = None
                self.loaded.set()  # do not hold up start-up for a file that is not there
            return False
        if sig == self._sig:
            return False
        conflicts: list[str] = []
        try:
            pods, problems = load_file(self.path, self.policy, conflicts)
        except EnrichError as exc:
            news = self.state.mark_stale(str(exc), time.time_ns())
            self.metrics.inc("shipper_inventory_reloads_total", "error")
            if news or not isinstance(exc.__cause__, OSError):
                log.error("pods file rejected; keeping the last known pods (records are held "
                          "until it loads)",
                          extra={"fields": {"path": str(self.path), "error": str(exc)}})
            if not isinstance(exc.__cause__, OSError):
                # Do not parse the same broken content in a loop. A read error
                # (permissions, I/O) is retried: fixing it need not change the
                # file's mtime, size or inode.
                self._sig = sig
            self.loaded.set()
            return False
        self.index.reconcile(pods, time.time_ns())
        self.state.mark_fresh(time.time_ns())
        self._sig = sig
        if conflicts:
            self.metrics.inc("shipper_pod_ip_conflicts_total", n=len(conflicts))
            for c in conflicts[:20]:
                log.warning("pods file: %s", c)
        result = "partial" if problems else "ok"
        self.metrics.inc("shipper_inventory_reloads_total", result)
        for p in problems[:20]:
            log.warning("pods file entry skipped", extra={"fields": {"path": str(self.path),
                                                                     "problem": p}})
        log.info("pods file loaded", extra={"fields": {
            "path": str(self.path), "pods": len(pods), "skipped": len(problems)}})
        self.loaded.set()
        return True

    def start(self) -> None:
        """Load once now (synchronously) and start the reload thread."""
        self.reload_if_changed()
        self._thread = threading.Thread(target=self._run, name="inventory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reload_if_changed()
            except Exception as exc:  # never let the reloader die silently
                self.metrics.inc("shipper_errors_total", "inventory", type(exc).__name__)
                log.exception("pods file reload failed")

    def stop(self) -> None:
        """Stop the reload thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
