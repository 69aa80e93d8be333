"""The only module that talks to the Kubernetes API: list + watch of Pods, Nodes, Subnets.

One background thread per resource runs a *reflector* loop:

1. **List** (paged with ``limit``/``continue``), convert every item, hand the
   whole set to the consumer (pods: :meth:`PodIndex.reconcile`, so pods
   deleted while we were not watching become tombstones, never ghosts).
2. **Watch** from the list's ``resourceVersion`` with
   ``allowWatchBookmarks=true`` and a server-side ``timeoutSeconds``. Every
   event, bookmarks included, advances the resume point.
3. When the watch ends (server timeout, dropped connection) it **resumes from
   the last resourceVersion**; on **410 Gone** (HTTP status or an ``ERROR``
   event with code 410, also for an expired ``continue`` token) it goes back
   to 1. Connection errors and other API errors back off exponentially with
   jitter before retrying.

The event path never waits for any of this: it reads the pod index and the
CIDR filter, which are swapped atomically by these threads. While a resource
cannot be listed or watched its cached state keeps serving and the
``shipper_kube_cache_stale{resource}`` gauge is 1 (with a warning log line on
the transition).

lightkube provides the configuration side (kubeconfig parsing, in-cluster
service account with token refresh, exec/cert/token auth, TLS) and the HTTP
client it builds; the list/watch loop is ours because lightkube's watch helper
neither surfaces bookmarks nor lets us re-list and reconcile on 410 (it
silently restarts from "now", which turns pods deleted in the gap into
ghosts). Objects are decoded with orjson into plain dicts, which is what the
pure converters (:mod:`~shipper.enrich.pods`, :mod:`~shipper.enrich.subnets`)
take. See docs/ARCHITECTURE.md, "Kubernetes API client".
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import httpx2 as httpx
import orjson
from lightkube.config.client_adapter import Client as _lightkube_http_client
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.core.exceptions import ConfigError as LightkubeConfigError

from shipper.enrich import subnets as subnet_rules
from shipper.enrich.hold import SourceState
from shipper.enrich.kube_detect import SERVICE_ACCOUNT_DIR
from shipper.enrich.kube_detect import in_cluster_available as _in_cluster_available
from shipper.enrich.kube_detect import kube_enabled as kube_enabled  # re-exported
from shipper.enrich.kube_detect import kubeconfig_path as _kubeconfig_path
from shipper.enrich.pods import LabelPolicy, pod_from_dict
from shipper.errors import EnrichError
from shipper.record import PodMeta

if TYPE_CHECKING:
    from shipper.config import Config
    from shipper.enrich.pod_index import PodIndex
    from shipper.filters.cidr import CidrFilter
    from shipper.metrics import Metrics

log = logging.getLogger("shipper.kube")

PODS_PATH = "/api/v1/pods"
NODES_PATH = "/api/v1/nodes"
SUBNETS_PATH = "/apis/kubeovn.io/v1/subnets"

# Extra read time past the server-side watch timeout before a silent
# connection is declared dead.
WATCH_READ_GRACE_S = 30.0
# A watch that ends this fast without delivering anything is treated as an
# error (backoff) so a misbehaving server cannot make us spin.
MIN_HEALTHY_WATCH_S = 1.0

T = TypeVar("T")


# ---- configuration ---------------------------------------------------------------


def load_connection(cfg: Config) -> SingleConfig:
    """Resolve the cluster, user and context to talk to; raises EnrichError when impossible."""
    path = _kubeconfig_path(cfg)
    try:
        if path is not None:
            single = KubeConfig.from_file(path).get(context_name=cfg.kubernetes.context)
            source = str(path)
        elif cfg.kubernetes.in_cluster == "auto" and _in_cluster_available():
            single = KubeConfig.from_service_account(SERVICE_ACCOUNT_DIR).get()
            source = "in-cluster service account"
        else:
            raise EnrichError("no kubeconfig and no in-cluster service account")
    except EnrichError:
        raise
    except (LightkubeConfigError, OSError, KeyError, ValueError, TypeError) as exc:
        raise EnrichError(f"kubernetes: cannot load {path or 'in-cluster config'}: {exc}") from exc
    if single is None or single.cluster is None or not single.cluster.server:
        raise EnrichError(f"kubernetes: {source} names no cluster server")
    if single.user is None:
        # lightkube needs a user entry; an anonymous one is valid for kubeconfigs without auth.
        from lightkube.config.models import User

        single = single._replace(user=User())
    return single


# ---- one list+watch loop -------------------------------------------------------


class _ApiStatus(Exception):
    """A non-2xx answer or an ERROR watch event; ``code`` is the HTTP/Status code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class _Gone(Exception):
    """410 Gone: the resourceVersion (or continue token) expired; re-list."""


class Consumer(Protocol[T]):
    """Where a reflector delivers objects. Called from the reflector's thread only."""

    def convert(self, obj: Mapping[str, Any]) -> T:
        """Convert one API object; raise EnrichError if it is malformed."""

    def replace(self, items: list[T]) -> None:
        """A full list: this is now the complete set."""

    def apply(self, event: str, obj: Mapping[str, Any]) -> None:
        """One ADDED/MODIFIED/DELETED watch event (raise EnrichError if malformed)."""


class Reflector(Generic[T]):
    """List + watch one collection in a thread, keeping a consumer up to date.

    ``client_factory`` returns a fresh HTTP client (one per reflector; closed
    by the reflector). Thread-safe surface: :attr:`synced`, :attr:`stale`,
    :meth:`start`, :meth:`stop`.
    """

    def __init__(
        self,
        resource: str,
        path: str,
        consumer: Consumer[T],
        client_factory: Callable[[], httpx.Client],
        metrics: Metrics,
        *,
        page_size: int = 500,
        request_timeout_s: float = 30.0,
        watch_timeout_s: int = 290,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        selector: Callable[[], str | None] | None = None,
        relist_after_error: bool = False,
    ) -> None:
        """Nothing happens until :meth:`start`.

        ``selector`` (called in the reflector's thread before every list)
        returns the ``fieldSelector`` of the collection, or None for all of
        it; the watch that follows uses the same one. It may block (bounded)
        until it knows the answer.

        ``relist_after_error``: after a failed or cut watch, re-list instead of
        resuming, and call :attr:`state` fresh only once a list was handed to
        the consumer. A resumed watch replays the missed events but never says
        when it has caught up, and a replayed DELETED is applied at replay
        time, which would stretch the old owner's claim over an address's new
        owner; a list reconciled into the index gives a complete view at a
        known moment (the pod index then cuts a missed deletion at the new
        owner's creation).
        """
        self.resource = resource
        self.path = path
        self.consumer = consumer
        self.metrics = metrics
        self.page_size = page_size
        self.request_timeout_s = request_timeout_s
        self.watch_timeout_s = watch_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.synced = threading.Event()
        self._selector_fn = selector
        self.field_selector: str | None = None  # the one in force
        self._rescope = threading.Event()
        self._client_factory = client_factory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp_lock = threading.Lock()
        self._resp: httpx.Response | None = None
        self._stale = True
        self._failures = 0
        self.relist_after_error = relist_after_error
        # Freshness for the hold (shipper.enrich.hold): stale until the first list.
        self.state = SourceState(resource, now_ns=time.time_ns())
        self.resource_version: str | None = None
        metrics.set("shipper_kube_cache_stale", 1, resource)

    # ---- lifecycle ----

    def start(self) -> None:
        """Start the background thread (returns at once)."""
        self._thread = threading.Thread(target=self._run, name=f"kube-{self.resource}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread: abort any request in flight and join within ``timeout``."""
        self._stop.set()
        self._abort_response()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("kube %s reflector did not stop within %.1fs", self.resource, timeout)

    def rescope(self, stale: bool = False) -> None:
        """Re-list now with a fresh ``selector()`` (the scope changed): ends the open watch.

        ``stale`` marks the cache stale until the re-list is applied (a scope
        that widens: the cache lacks objects that are now in scope).
        """
        self._rescope.set()
        self.metrics.inc("shipper_kube_watch_restarts_total", self.resource, "scope")
        if stale:
            self._set_stale(True, "watch scope widened; re-listing")
        self._abort_response()

    @property
    def stale(self) -> bool:
        """True until the first list succeeded and whenever the API cannot be reached."""
        return self._stale

    def _set_stale(self, stale: bool, why: str = "") -> None:
        if stale:
            self.state.mark_stale(why, time.time_ns())
        if stale == self._stale:
            return
        self._stale = stale
        self.metrics.set("shipper_kube_cache_stale", 1 if stale else 0, self.resource)
        if stale:
            log.warning(
                "kube %s cache is stale (cached metadata keeps serving): %s", self.resource, why
            )
        else:
            log.info("kube %s cache is current again", self.resource)

    # ---- the loop ----

    def _run(self) -> None:
        client = self._client_factory()
        try:
            need_list = True
            gone_streak = 0
            while not self._stop.is_set():
                try:
                    if self._rescope.is_set():
                        need_list = True
                    if need_list:
                        self._list(client)
                        need_list = False
                        if self._stop.is_set():
                            break
                    self._watch(client)
                    gone_streak = 0
                except _Gone:
                    need_list = True
                    gone_streak += 1
                    # Events were compacted away: the view is behind until the re-list.
                    self._set_stale(True, "resourceVersion expired (410 Gone)")
                    self.metrics.inc("shipper_kube_watch_restarts_total", self.resource, "gone")
                    log.info("kube %s: resourceVersion expired (410), re-listing", self.resource)
                    if gone_streak > 1:
                        # 410 again right after a re-list (e.g. an expiring continue
                        # token): back off instead of hammering the API server.
                        self._failures += 1
                        self._sleep_backoff()
                    continue
                except (_ApiStatus, httpx.HTTPError, OSError, ValueError, EnrichError) as exc:
                    if self._stop.is_set():
                        break
                    if self._rescope.is_set():
                        continue  # we cut the connection ourselves: re-list at once
                    self._failures += 1
                    self.metrics.inc("shipper_kube_watch_restarts_total", self.resource, "error")
                    self._set_stale(True, f"{type(exc).__name__}: {exc}")
                    if self.relist_after_error:
                        need_list = True
                    self._sleep_backoff()
        finally:
            client.close()

    def _sleep_backoff(self) -> None:
        cap = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(self._failures - 1, 30))
        # "Equal jitter": at least half the delay, so many shippers never all retry at once.
        self._stop.wait(random.uniform(cap / 2, cap))

    def _list(self, client: httpx.Client) -> None:
        self._rescope.clear()
        rescoped = self.synced.is_set() and self._selector_fn is not None
        selector = self._selector_fn() if self._selector_fn is not None else None
        if self._stop.is_set():
            return
        base: dict[str, str] = {"fieldSelector": selector} if selector else {}
        items: list[T] = []
        params: dict[str, str] = {"limit": str(self.page_size), **base}
        invalid = 0
        rv: str | None = None
        try:
            while True:
                body = self._get_json(client, params)
                meta = body.get("metadata") or {}
                raw_items = body.get("items")
                if not isinstance(raw_items, list) or not isinstance(meta, Mapping):
                    raise ValueError(f"list of {self.resource} has no items list")
                for obj in raw_items:
                    try:
                        items.append(self.consumer.convert(obj))
                    except EnrichError as exc:
                        invalid += 1
                        log.warning("kube %s: skipping invalid object: %s", self.resource, exc)
                rv = meta.get("resourceVersion") or rv
                cont = meta.get("continue")
                if not cont:
                    break
                params = {"limit": str(self.page_size), "continue": str(cont), **base}
        except (_Gone, _ApiStatus, httpx.HTTPError, OSError, ValueError):
            self.metrics.inc("shipper_kube_lists_total", self.resource, "error")
            raise
        if invalid:
            self.metrics.inc("shipper_kube_objects_invalid_total", self.resource, n=invalid)
        if not rv:
            raise ValueError(f"list of {self.resource} carries no resourceVersion")
        if rescoped and selector != self.field_selector:
            log.info("kube %s: watch scope now %s", self.resource, selector or "all")
        self.field_selector = selector
        self.consumer.replace(items)
        self.state.mark_fresh(time.time_ns())
        self.resource_version = rv
        self.metrics.inc("shipper_kube_lists_total", self.resource, "ok")
        self._failures = 0
        self._set_stale(False)
        self.synced.set()
        log.info("kube %s: listed %d objects at resourceVersion %s", self.resource, len(items), rv)

    def _get_json(self, client: httpx.Client, params: dict[str, str]) -> dict[str, Any]:
        with self._open(client, params, read_timeout=self.request_timeout_s) as resp:
            data = resp.read()
        body = orjson.loads(data)
        if not isinstance(body, dict):
            raise ValueError(f"list of {self.resource} is not a JSON object")
        return body

    def _open(
        self, client: httpx.Client, params: dict[str, str], read_timeout: float
    ) -> _Stream:
        timeout = httpx.Timeout(self.request_timeout_s, read=read_timeout)
        req = client.build_request("GET", self.path, params=params, timeout=timeout)
        resp = client.send(req, stream=True)
        if resp.status_code != 200:
            try:
                text = resp.read()[:500].decode("utf-8", "replace")
            finally:
                resp.close()
            if resp.status_code == 410:
                raise _Gone()
            raise _ApiStatus(resp.status_code, text)
        return _Stream(self, resp)

    def _watch(self, client: httpx.Client) -> None:
        assert self.resource_version is not None
        params = {
            "watch": "1",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout_s),
        }
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        started = time.monotonic()
        events = 0
        with self._open(client, params, self.watch_timeout_s + WATCH_READ_GRACE_S) as resp:
            self._failures = 0
            if not self._rescope.is_set():  # a pending re-list clears staleness itself
                if not self.relist_after_error:
                    self.state.mark_fresh(time.time_ns())
                self._set_stale(False)
            for line in resp.iter_lines():
                if self._stop.is_set() or self._rescope.is_set():
                    return
                if not line.strip():
                    continue
                events += 1
                self._handle_line(line)
        if self._stop.is_set() or self._rescope.is_set():
            return
        if events == 0 and time.monotonic() - started < MIN_HEALTHY_WATCH_S:
            raise _ApiStatus(0, "watch closed immediately without events")
        self.metrics.inc("shipper_kube_watch_restarts_total", self.resource, "expired")

    def _handle_line(self, line: str) -> None:
        ev = orjson.loads(line)
        etype = ev.get("type") if isinstance(ev, dict) else None
        obj = ev.get("object") if isinstance(ev, dict) else None
        if not isinstance(etype, str) or not isinstance(obj, dict):
            raise ValueError(f"malformed watch event for {self.resource}")
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone()
            raise _ApiStatus(int(code or 0), str(obj.get("message", "watch error")))
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        self.metrics.inc("shipper_kube_events_total", self.resource, etype)
        if etype in ("ADDED", "MODIFIED", "DELETED"):
            try:
                self.consumer.apply(etype, obj)
            except EnrichError as exc:
                self.metrics.inc("shipper_kube_objects_invalid_total", self.resource)
                log.warning("kube %s: skipping invalid %s event: %s", self.resource, etype, exc)
        elif etype != "BOOKMARK":
            log.warning("kube %s: unknown watch event type %r", self.resource, etype)
        if isinstance(rv, str) and rv:
            self.resource_version = rv

    def _abort_response(self) -> None:
        """Unblock a thread stuck reading a response (shutdown its socket)."""
        with self._resp_lock:
            resp = self._resp
        if resp is None:
            return
        try:
            stream = resp.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Stream:
    """A streaming response registered with its reflector so :meth:`Reflector.stop` can abort it."""

    def __init__(self, owner: Reflector[Any], resp: httpx.Response) -> None:
        self._owner = owner
        self._resp = resp

    def __enter__(self) -> _Stream:
        with self._owner._resp_lock:
            self._owner._resp = self._resp
        if self._owner._stop.is_set() or self._owner._rescope.is_set():
            self._owner._abort_response()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._owner._resp_lock:
            self._owner._resp = None
        self._resp.close()

    def read(self) -> bytes:
        return self._resp.read()

    def iter_lines(self) -> Iterator[str]:
        return self._resp.iter_lines()


# ---- consumers -------------------------------------------------------------------


class PodConsumer:
    """Pods -> the time-aware :class:`~shipper.enrich.pod_index.PodIndex`."""

    def __init__(self, index: PodIndex, policy: LabelPolicy, metrics: Metrics) -> None:
        """``policy`` filters labels and annotations of every pod."""
        self.index = index
        self.policy = policy
        self.metrics = metrics

    def convert(self, obj: Mapping[str, Any]) -> PodMeta:
        """One API Pod -> PodMeta (EnrichError if malformed); address conflicts are counted."""
        problems: list[str] = []
        meta = pod_from_dict(obj, self.policy, problems)
        if problems:
            self.metrics.inc("shipper_pod_ip_conflicts_total", n=len(problems))
            for p in problems:
                log.warning("kube pods: %s", p)
        return meta

    def replace(self, items: list[PodMeta]) -> None:
        """Reconcile the index with a full list."""
        self.index.reconcile(items, time.time_ns())
        self._gauges()

    def apply(self, event: str, obj: Mapping[str, Any]) -> None:
        """ADDED/MODIFIED update the index, DELETED releases the pod's addresses."""
        now = time.time_ns()
        if event == "DELETED":
            meta = obj.get("metadata")
            uid = meta.get("uid") if isinstance(meta, Mapping) else None
            if not isinstance(uid, str) or not uid:
                raise EnrichError("pod DELETED event without metadata.uid")
            self.index.delete(uid, now)
        else:
            self.index.update(self.convert(obj), now)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.set("shipper_pods_live", self.index.live_pods())
        self.metrics.set("shipper_pod_tombstones", self.index.tombstones())


class HealthLike(Protocol):
    """The part of :class:`shipper.health.Health` the API source uses."""

    def set_info(self, key: str, value: Any) -> None:
        """Show ``value`` under ``key`` in /readyz's body."""


class CidrConsumer:
    """Subnets and Nodes -> node role -> CIDRs and NAT policy -> :meth:`CidrFilter.set_cidrs`.

    Two reflectors (subnets, nodes) share one instance; :meth:`for_kind` gives
    each its view. The lock serialises their recomputations. The node role
    (:func:`~shipper.enrich.subnets.compute_role`) needs this node's labels,
    taken from the Node object named ``cfg.node_name``; it is logged at the
    first computation and on every change, exported as
    ``shipper_node_role{subnet,mode}``, shown in /readyz (``health``), and
    ``on_role`` callbacks get every new role (the pod watch scope follows it).
    """

    def __init__(
        self,
        cfg: Config,
        cidr_filter: CidrFilter,
        metrics: Metrics,
        health: HealthLike | None = None,
        *,
        nodes_watched: bool = True,
    ) -> None:
        """Static CIDRs come from ``cfg.filter``; discovery settings from ``cfg.kubernetes``.

        ``nodes_watched`` False: no Node reflector feeds this (the role is then
        known once the Subnets are, without labels).
        """
        self.cfg = cfg
        self.cidr_filter = cidr_filter
        self.metrics = metrics
        self.health = health
        self.subnets: dict[str, subnet_rules.SubnetInfo] = {}
        self.nodes: dict[str, tuple[str, ...]] = {}
        self.node_labels: dict[str, str] | None = None  # this node's, once seen
        self.nat_policy = subnet_rules.NatPolicy(())
        self.role: subnet_rules.NodeRole | None = None
        self.role_known = threading.Event()
        self.on_role: list[Callable[[subnet_rules.NodeRole], None]] = []
        self._listed: set[str] = set() if nodes_watched else {"nodes"}
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._reported: subnet_rules.NodeRole | None = None
        self._last: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._last_policy: subnet_rules.NatPolicy | None = None

    def for_kind(self, kind: str) -> Consumer[Any]:
        """The consumer for ``"subnets"`` or ``"nodes"``."""
        return _CidrView(self, kind)

    def recompute(self) -> None:
        """Install the role and CIDRs implied by the current Subnets and Nodes (if they changed)."""
        k = self.cfg.kubernetes
        with self._lock:
            role = subnet_rules.compute_role(
                self.subnets.values(),
                self.cfg.node_name,
                self.node_labels,
                selection=k.subnet_selection,
                vpcs=k.subnet_vpcs,
                join_subnet=k.join_subnet,
            )
            result = subnet_rules.compute(
                self.subnets.values(),
                [c for cidrs in self.nodes.values() for c in cidrs],
                selection=k.subnet_selection,
                vpcs=k.subnet_vpcs,
                join_subnet=k.join_subnet,
                honour_rules=k.nat_policy_rules,
                service_cidrs=k.service_cidrs,
                static_pod_cidrs=self.cfg.filter.pod_cidrs,
                static_cluster_cidrs=self.cfg.filter.cluster_cidrs,
                role=role,
            )
            self.nat_policy = result.nat_policy
            self.role = role
            known = self._listed >= {"subnets", "nodes"}
            pair = (result.pod_cidrs, result.cluster_cidrs)
            changed = pair != self._last
            if changed or result.nat_policy != self._last_policy:
                # The filter decides with both, so both are published together.
                self.cidr_filter.set_cidrs(*pair, result.nat_policy)
                self._last = pair
                self._last_policy = result.nat_policy
        if changed:
            self.metrics.set("shipper_kube_cidrs", len(pair[0]), "pod")
            self.metrics.set("shipper_kube_cidrs", len(pair[1]), "cluster")
            log.info("kube: pod CIDRs now %s; cluster CIDRs now %s",
                     list(pair[0]), list(pair[1]))
        if not known:
            return
        # Report outside the compute lock, in order: always the latest role, once.
        with self._report_lock:
            with self._lock:
                role = self.role
            old = self._reported
            if old is not None and role == old:
                return
            self._reported = role
            self._report_role(role, old)
            self.role_known.set()
            for fn in list(self.on_role):
                fn(role)

    def _report_role(
        self, role: subnet_rules.NodeRole, old: subnet_rules.NodeRole | None
    ) -> None:
        hand_set = bool(self.cfg.filter.pod_cidrs)
        if old is not None:
            for e in old.entries:
                self.metrics.remove("shipper_node_role", e.subnet, e.mode)
        for e in role.entries:
            self.metrics.set("shipper_node_role", 1, e.subnet, e.mode)
        info = role.describe()
        info["filter"] = "filter.pod_cidrs (set by hand)" if hand_set else "node role"
        if self.health is not None:
            self.health.set_info("node_role", info)
        log.info(
            "kube: node role %s %s: NATs %s; pod watch scope %s%s",
            role.node, "at start" if old is None else "changed",
            role.summary(), role.pod_scope,
            "; filter.pod_cidrs is set by hand and wins (the role is only reported)"
            if hand_set else "",
            extra={"fields": {"node_role": info}},
        )
        if role.gateway and self.cfg.kubernetes.pod_scope == "node":
            log.warning(
                "kube: this node is a gateway of a centralized Subnet, but "
                "kubernetes.pod_scope is node: flows of pods on other nodes stay unresolved "
                "(use auto or cluster)"
            )
        if not role.node_known:
            log.warning(
                "kube: node %r not found among the Nodes: gatewayNodeSelectors cannot match "
                "it (check node_name / $NODE_NAME)", role.node,
            )


class _CidrView:
    def __init__(self, owner: CidrConsumer, kind: str) -> None:
        self.owner = owner
        self.kind = kind

    def convert(self, obj: Mapping[str, Any]) -> Any:
        if self.kind == "subnets":
            return subnet_rules.subnet_from_dict(obj)
        name, ips = subnet_rules.node_from_dict(obj)
        # Labels are kept for this node only (the role needs them; others do not).
        labels = subnet_rules.node_labels(obj) if name == self.owner.cfg.node_name else None
        return name, ips, labels

    def _put(self, item: Any) -> None:
        if self.kind == "subnets":
            self.owner.subnets[item.name] = item
            return
        name, ips, labels = item
        self.owner.nodes[name] = ips
        if name == self.owner.cfg.node_name:
            self.owner.node_labels = labels

    def replace(self, items: list[Any]) -> None:
        with self.owner._lock:
            if self.kind == "subnets":
                self.owner.subnets.clear()
            else:
                self.owner.nodes.clear()
                self.owner.node_labels = None
            for item in items:
                self._put(item)
            self.owner._listed.add(self.kind)
        self.owner.recompute()

    def apply(self, event: str, obj: Mapping[str, Any]) -> None:
        if event == "DELETED":
            meta = obj.get("metadata")
            name = meta.get("name") if isinstance(meta, Mapping) else None
            if not isinstance(name, str):
                raise EnrichError(f"{self.kind} DELETED event without metadata.name")
            with self.owner._lock:
                if self.kind == "subnets":
                    self.owner.subnets.pop(name, None)
                else:
                    self.owner.nodes.pop(name, None)
                    if name == self.owner.cfg.node_name:
                        self.owner.node_labels = None
        else:
            item = self.convert(obj)
            with self.owner._lock:
                self._put(item)
        self.owner.recompute()


# ---- one-shot role (check-config) -------------------------------------------------


def probe_role(cfg: Config) -> tuple[subnet_rules.NodeRole, int]:
    """Read the Subnets and this Node once; return (the node role, how many Subnets).

    For ``check-config --kubeconfig``: no watch, no threads. Invalid Subnets
    are skipped as the running shipper skips them (and logged). Raises
    EnrichError when the API cannot be read.
    """
    conn = load_connection(cfg)
    k = cfg.kubernetes
    timeout = httpx.Timeout(k.request_timeout_s)
    client = _lightkube_http_client(conn, ConnectionParams(timeout=timeout))

    def items(path: str, extra: dict[str, str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        params = {"limit": str(k.list_page_size), **extra}
        while True:
            resp = client.get(path, params=params)
            if resp.status_code != 200:
                raise EnrichError(
                    f"kubernetes: GET {path} answered {resp.status_code}: "
                    f"{resp.text[:300]}"
                )
            body = orjson.loads(resp.content)
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise EnrichError(f"kubernetes: GET {path} returned no items list")
            out.extend(body["items"])
            cont = (body.get("metadata") or {}).get("continue")
            if not cont:
                return out
            params = {"limit": str(k.list_page_size), "continue": str(cont), **extra}

    try:
        with client:
            raw_subnets = items(SUBNETS_PATH, {})
            raw_nodes = items(NODES_PATH, {"fieldSelector": f"metadata.name={cfg.node_name}"})
    except (httpx.HTTPError, OSError, ValueError) as exc:
        raise EnrichError(f"kubernetes: cannot read Subnets/Node at {conn.cluster.server}: "
                          f"{exc}") from exc
    subnets = []
    for obj in raw_subnets:
        try:
            subnets.append(subnet_rules.subnet_from_dict(obj))
        except EnrichError as exc:
            log.warning("kube subnets: skipping invalid object: %s", exc)
    labels = None
    for obj in raw_nodes:
        if subnet_rules.node_from_dict(obj)[0] == cfg.node_name:
            labels = subnet_rules.node_labels(obj)
    role = subnet_rules.compute_role(
        subnets, cfg.node_name, labels, selection=k.subnet_selection, vpcs=k.subnet_vpcs,
        join_subnet=k.join_subnet,
    )
    return role, len(raw_subnets)


# ---- the source ------------------------------------------------------------------


class KubeSource:
    """Keeps the pod index and the CIDR filter in sync with the cluster.

    Build it only when :func:`kube_enabled` is true. The constructor resolves
    the connection (raising :class:`EnrichError` on a bad kubeconfig) but does
    no network I/O; :meth:`start` launches one thread per resource; the event
    path only ever reads ``index`` and ``cidr_filter``.
    """

    def __init__(
        self,
        cfg: Config,
        index: PodIndex,
        cidr_filter: CidrFilter,
        metrics: Metrics,
        health: HealthLike | None = None,
    ) -> None:
        """Raises EnrichError when no usable kubeconfig / in-cluster config is found.

        ``health`` (optional) gets the node role as ``set_info("node_role", ...)``.
        """
        self.cfg = cfg
        self.index = index
        self.cidr_filter = cidr_filter
        self.metrics = metrics
        k = cfg.kubernetes
        self._conn = load_connection(cfg)
        # Without the cluster-wide Node watch, the role still needs this node's labels:
        # watch this one Node only.
        own_node = k.subnets_enabled and not k.watch_nodes
        self._cidrs = CidrConsumer(
            cfg, cidr_filter, metrics, health, nodes_watched=k.watch_nodes or own_node
        )
        pods = PodConsumer(index, LabelPolicy.from_config(cfg.enrich), metrics)
        self.pods = self._reflector("pods", PODS_PATH, pods, selector=self._pod_selector)
        self.reflectors: list[Reflector[Any]] = [self.pods]
        if k.subnets_enabled:
            self.reflectors.append(
                self._reflector("subnets", SUBNETS_PATH, self._cidrs.for_kind("subnets"))
            )
        if k.watch_nodes or own_node:
            node_sel = f"metadata.name={cfg.node_name}" if own_node else None
            self.reflectors.append(
                self._reflector("nodes", NODES_PATH, self._cidrs.for_kind("nodes"),
                                selector=(lambda: node_sel) if node_sel else None)
            )
        self._scope: str | None = None  # the pod scope last chosen
        self._scope_lock = threading.Lock()
        if k.pod_scope == "auto" and k.subnets_enabled:
            self._cidrs.on_role.append(self._on_role)
        self._started = False
        # Attribution must know when the pod view is complete again (hold.py).
        for r in self.reflectors:
            if r.resource == "pods":
                r.relist_after_error = True

    # ---- pod watch scope ----

    def _pod_selector(self) -> str | None:
        """fieldSelector for the pod list+watch, per ``kubernetes.pod_scope`` and the role.

        In ``auto`` mode the first call waits (bounded by ``sync_timeout_s``)
        for the node role; if it is still unknown then, every pod is watched
        (the safe superset) until the role arrives.
        """
        k = self.cfg.kubernetes
        auto = k.pod_scope == "auto" and k.subnets_enabled
        if auto and self._scope is None:
            deadline = time.monotonic() + k.sync_timeout_s
            while not self._cidrs.role_known.wait(0.1):
                if self.pods._stop.is_set():
                    return None
                if time.monotonic() >= deadline:
                    log.warning("kube: node role unknown after %.1fs; watching every pod "
                                "until it is known", k.sync_timeout_s)
                    break
        with self._scope_lock:
            scope: str = k.pod_scope
            if scope == "auto":
                role = self._cidrs.role if self._cidrs.role_known.is_set() else None
                scope = role.pod_scope if auto and role is not None else "cluster"
            if scope != self._scope:
                if self._scope is not None:
                    self.metrics.remove("shipper_kube_pod_scope", self._scope)
                self.metrics.set("shipper_kube_pod_scope", 1, scope)
                self._scope = scope
        return f"spec.nodeName={self.cfg.node_name}" if scope == "node" else None

    def _on_role(self, role: subnet_rules.NodeRole) -> None:
        """Switch the pod watch scope when the role needs another one (from a CIDR thread).

        The role is assigned before this runs, and the pod thread reads it under
        the same lock, so a scope chosen concurrently is either already the new
        one or is followed by this re-list.
        """
        with self._scope_lock:
            if self._scope is None or role.pod_scope == self._scope:
                return
            old = self._scope
        log.info("kube: pod watch scope %s -> %s (node role changed); re-listing pods",
                 old, role.pod_scope)
        self.pods.rescope(stale=role.pod_scope == "cluster")

    @property
    def node_role(self) -> subnet_rules.NodeRole | None:
        """The node role in force (None until the Subnets, and Nodes, are listed)."""
        return self._cidrs.role if self._cidrs.role_known.is_set() else None

    def _client(self) -> httpx.Client:
        params = ConnectionParams(timeout=httpx.Timeout(self.cfg.kubernetes.request_timeout_s))
        return _lightkube_http_client(self._conn, params)

    def _reflector(
        self,
        resource: str,
        path: str,
        consumer: Consumer[Any],
        selector: Callable[[], str | None] | None = None,
    ) -> Reflector[Any]:
        k = self.cfg.kubernetes
        return Reflector(
            resource,
            path,
            consumer,
            self._client,
            self.metrics,
            page_size=k.list_page_size,
            request_timeout_s=k.request_timeout_s,
            watch_timeout_s=k.watch_timeout_s,
            backoff_initial_s=k.backoff_initial_s,
            backoff_max_s=k.backoff_max_s,
            selector=selector,
        )

    @property
    def server(self) -> str:
        """The API server URL in use (for logs)."""
        return str(self._conn.cluster.server)

    def start(self) -> None:
        """Start every reflector thread; returns at once."""
        if self._started:
            return
        self._started = True
        log.info("kube: watching %s at %s",
                 ", ".join(r.resource for r in self.reflectors), self.server)
        for r in self.reflectors:
            r.start()

    def wait_synced(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Wait up to ``timeout`` s for the first list of every watched resource; True if all done.

        Nodes are not waited for: they only add destinations to exclude. When
        ``stop`` is set the wait ends at once (False, no warning): a SIGTERM
        during start-up must not wait for an API that does not answer.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        for r in self.reflectors:
            if r.resource == "nodes":
                continue
            while not r.synced.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                if stop is not None and stop.is_set():
                    return False
                if time.monotonic() < deadline:
                    continue
                log.warning(
                    "kube: %s not listed within %.1fs; starting anyway, records are held "
                    "(then flagged stale)", r.resource, timeout,
                )
                return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every thread (bounded by ``timeout`` in total)."""
        deadline = time.monotonic() + timeout
        for r in self.reflectors:
            r._stop.set()
            r._abort_response()
        for r in self.reflectors:
            r.stop(max(0.1, deadline - time.monotonic()))

    @property
    def stale(self) -> bool:
        """True while any watched resource's cache may be out of date."""
        return any(r.stale for r in self.reflectors)

    @property
    def pods_state(self) -> SourceState:
        """Freshness of the pod view: stale from a watch error, a 410 or a failing list until
        a re-list was reconciled into the index (``stale_since_ns``, ``recovered_ns``)."""
        for r in self.reflectors:
            if r.resource == "pods":
                return r.state
        raise RuntimeError("no pods reflector")  # pragma: no cover - always built

    @property
    def nat_policy(self) -> subnet_rules.NatPolicy:
        """The natOutgoingPolicyRules last computed: ``nat_policy.forwards(family, src, dst)``.

        Falsy when no pod Subnet has rules. Sources forwarded for every
        destination are already removed from the pod CIDRs; the policy is
        published with the CIDRs to the CIDR filter, whose ``reason`` applies
        destination-dependent rules too (``nat_policy_forward``).
        """
        return self._cidrs.nat_policy
