"""A fake Kubernetes API server speaking the real list + watch protocol, on 127.0.0.1 port 0.

Serves ``/api/v1/pods``, ``/api/v1/nodes`` and ``/apis/kubeovn.io/v1/subnets``:

* ``fieldSelector`` on list and watch (``spec.nodeName``, ``metadata.name``,
  ``metadata.namespace`` on pods; ``metadata.name`` elsewhere; ``=``, ``==``,
  ``!=``); an unsupported field answers 400 ``field label not supported``.
  A watch sees an object that starts matching as ADDED and one that stops
  matching as DELETED, as the API server's watch cache sends them;

* **list**: ``{"kind": "<X>List", "metadata": {"resourceVersion", "continue"}, "items"}``
  with ``limit``/``continue`` paging (an expired continue token answers 410);
* **watch** (``?watch=1&resourceVersion=X&allowWatchBookmarks=true&timeoutSeconds=N``):
  a chunked ``application/json`` stream of ``{"type", "object"}`` lines holding
  every change after X, then live changes; ``BOOKMARK`` events on demand;
  a resourceVersion older than the compaction point answers 410 Gone, as an
  ``ERROR`` event with a ``Status`` of code 410 (what a real API server does)
  or, with ``gone_as_http=True``, as an HTTP 410;
* test controls: add/modify/delete objects, compact history (:meth:`compact`),
  send 410 to open watches (:meth:`gone`), send bookmarks, drop every open
  connection (:meth:`drop_connections`), go down and come back on the same
  port (:meth:`stop` / :meth:`start`: while down, connections are refused),
  end open watches cleanly as a server-side timeout does (:meth:`end_watches`),
  hold back watch events for a while (:meth:`delay_events`: watch latency; a
  watch stream stays in order, so later events wait behind a delayed one,
  while lists show the stored objects at once), and a request log.

All resource versions come from one counter, like etcd's revision.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

RESOURCES: dict[str, tuple[str, bool]] = {
    # path -> (list kind, namespaced)
    "/api/v1/pods": ("PodList", True),
    "/api/v1/nodes": ("NodeList", False),
    "/apis/kubeovn.io/v1/subnets": ("SubnetList", False),
}
PODS = "/api/v1/pods"
NODES = "/api/v1/nodes"
SUBNETS = "/apis/kubeovn.io/v1/subnets"

_ITEM_KIND = {PODS: ("v1", "Pod"), NODES: ("v1", "Node"), SUBNETS: ("kubeovn.io/v1", "Subnet")}


def _meta(field: str) -> Callable[[dict[str, Any]], str]:
    return lambda o: str((o.get("metadata") or {}).get(field) or "")


# Field selectors each collection supports (a subset of the real API server's:
# pods also have spec.nodeName; custom resources only metadata.name/namespace).
FIELDS: dict[str, dict[str, Callable[[dict[str, Any]], str]]] = {
    PODS: {
        "metadata.name": _meta("name"),
        "metadata.namespace": _meta("namespace"),
        "spec.nodeName": lambda o: str((o.get("spec") or {}).get("nodeName") or ""),
    },
    NODES: {"metadata.name": _meta("name")},
    SUBNETS: {"metadata.name": _meta("name")},
}

_Selector = list[tuple[str, bool, str]]  # (field, equal?, value)


def parse_field_selector(path: str, text: str | None) -> _Selector:
    """``a=b,c!=d`` -> terms; raises ValueError with the API server's message when unsupported."""
    terms: _Selector = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "!=" in part:
            field, _, value = part.partition("!=")
            eq = False
        elif "==" in part:
            field, _, value = part.partition("==")
            eq = True
        elif "=" in part:
            field, _, value = part.partition("=")
            eq = True
        else:
            raise ValueError(f"invalid selector: '{text}'; can't understand '{part}'")
        if field not in FIELDS[path]:
            raise ValueError(f'field label not supported: {field}')
        terms.append((field, eq, value))
    return terms


def _selects(path: str, terms: _Selector, obj: dict[str, Any] | None) -> bool:
    if obj is None:
        return False
    return all((FIELDS[path][f](obj) == v) == eq for f, eq, v in terms)


def _status_410(message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Expired",
        "code": 410,
    }


class _Watch:
    """One open watch connection."""

    def __init__(
        self, path: str, bookmarks: bool, sock: socket.socket, terms: _Selector | None = None
    ) -> None:
        self.path = path
        self.terms = terms or []
        self.bookmarks = bookmarks
        self.sock = sock
        self.inject: list[dict[str, Any]] = []  # events to send now (bookmarks, errors)
        self.close = False  # end the stream cleanly
        self.dead = False  # the connection was cut: write nothing more


class FakeKubeApi:
    """The fake server. Thread-safe; every mutator wakes the open watches."""

    def __init__(self, *, gone_as_http: bool = False) -> None:
        """``gone_as_http`` answers too-old watches with HTTP 410 instead of an ERROR event."""
        self.gone_as_http = gone_as_http
        self._cond = threading.Condition()
        self._rv = 100
        self._objects: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in RESOURCES}
        # (resourceVersion, type, object, previous object or None)
        self._events: dict[str, list[tuple[int, str, dict[str, Any], dict[str, Any] | None]]] = {
            p: [] for p in RESOURCES
        }
        self._compacted = 0
        # First-page list results by (path, fieldSelector, resourceVersion), for paging.
        self._snapshots: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        self._watches: list[_Watch] = []
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        # Response bytes sent, by (path, "list" | "watch"): the API load a client causes.
        self.bytes_sent: dict[tuple[str, str], int] = {}
        self.expired_continue = False
        self.fail_with: int | None = None  # answer every request with this HTTP status
        self._delay_s = 0.0  # watch latency for events recorded from now on
        self._visible_at: dict[int, float] = {}  # resource version -> monotonic time

    # ---- lifecycle ----

    def start(self) -> FakeKubeApi:
        """Listen (on port 0 the first time, then on the same port again)."""
        api = self

        class Handler(_Handler):
            fake = api

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True, name="fake-kube")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (the API "goes away")."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self.drop_connections()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeKubeApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- objects ----

    @property
    def resource_version(self) -> int:
        """The current (latest) resource version."""
        with self._cond:
            return self._rv

    @staticmethod
    def _key(path: str, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        return f"{meta['namespace']}/{meta['name']}" if RESOURCES[path][1] else meta["name"]

    def put(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED); returns the stored copy."""
        obj = copy.deepcopy(obj)
        api_version, kind = _ITEM_KIND[path]
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        meta = obj.setdefault("metadata", {})
        with self._cond:
            key = self._key(path, obj)
            old = self._objects[path].get(key)
            if old is not None and "uid" not in meta:
                meta["uid"] = old["metadata"]["uid"]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self._rv += 1
            meta["resourceVersion"] = str(self._rv)
            same = old is not None and old["metadata"]["uid"] == meta["uid"]
            etype = "MODIFIED" if same else "ADDED"
            if old is not None and etype == "ADDED":
                # Same name, new uid: the old object was deleted first.
                self._events[path].append((self._rv, "DELETED", old, old))
                self._rv += 1
                meta["resourceVersion"] = str(self._rv)
            self._objects[path][key] = obj
            prev = old if etype == "MODIFIED" else None
            self._events[path].append((self._rv, etype, copy.deepcopy(obj), prev))
            if self._delay_s:
                self._visible_at[self._rv] = time.monotonic() + self._delay_s
            self._cond.notify_all()
            return copy.deepcopy(obj)

    def delete(self, path: str, key: str) -> None:
        """Delete an object by ``namespace/name`` (pods) or ``name``."""
        with self._cond:
            obj = self._objects[path].pop(key)
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._events[path].append((self._rv, "DELETED", obj, obj))
            self._cond.notify_all()

    def delete_quietly(self, path: str, key: str) -> None:
        """Delete without any event being retrievable (as if it happened during an outage
        and history was compacted since): watches must re-list to notice."""
        with self._cond:
            self._objects[path].pop(key)
            self._rv += 1
            self._compacted = self._rv

    def objects(self, path: str) -> list[dict[str, Any]]:
        """Current objects of a collection."""
        with self._cond:
            return copy.deepcopy(list(self._objects[path].values()))

    # ---- failure injection ----

    def compact(self) -> None:
        """Forget history: any watch or list continuation older than now answers 410."""
        with self._cond:
            self._compacted = self._rv
            for path in self._events:
                self._events[path].clear()

    def gone(self, path: str | None = None) -> None:
        """Send an ERROR 410 event to open watches (of ``path``, or all) and end them."""
        with self._cond:
            self.compact()
            for w in self._watches:
                if path is None or w.path == path:
                    w.inject.append({"type": "ERROR", "object": _status_410("too old")})
                    w.close = True
            self._cond.notify_all()

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current resource version to watches that asked for them."""
        with self._cond:
            for w in self._watches:
                if w.bookmarks:
                    api_version, kind = _ITEM_KIND[w.path]
                    w.inject.append(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": api_version,
                                "kind": kind,
                                "metadata": {"resourceVersion": str(self._rv)},
                            },
                        }
                    )
            self._cond.notify_all()

    def delay_events(self, seconds: float) -> None:
        """Watch streams deliver changes made from now on ``seconds`` late (0: no delay)."""
        with self._cond:
            self._delay_s = seconds

    def end_watches(self, path: str | None = None) -> None:
        """End open watch streams (of ``path``, or all) cleanly, as ``timeoutSeconds`` does."""
        with self._cond:
            for w in self._watches:
                if path is None or w.path == path:
                    w.close = True
            self._cond.notify_all()

    def drop_connections(self) -> None:
        """Cut every open connection abruptly (no end of stream)."""
        with self._cond:
            conns = list(self._conns)
            for w in self._watches:
                w.dead = True
            self._cond.notify_all()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def open_watches(self, path: str | None = None) -> int:
        """Number of watch streams currently open (of ``path``, or all)."""
        with self._cond:
            return sum(1 for w in self._watches if path is None or w.path == path)

    def watch_requests(self, path: str) -> list[dict[str, str]]:
        """Query parameters of every watch request made on ``path``, in order."""
        return [q for p, q in list(self.requests) if p == path and q.get("watch") in ("1", "true")]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeKubeApi

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._cond:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.fake._cond:
            self.fake._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    _kind = ("", "list")

    def _count(self, n: int) -> None:
        sent = self.fake.bytes_sent
        with self.fake._cond:
            sent[self._kind] = sent.get(self._kind, 0) + n

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = orjson.dumps(body)
        self._count(len(data))
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        fake = self.fake
        fake.requests.append((parts.path, query))
        self._kind = (parts.path, "watch" if query.get("watch") in ("1", "true") else "list")
        if fake.fail_with is not None:
            self._json(fake.fail_with, {"kind": "Status", "code": fake.fail_with})
            return
        if parts.path not in RESOURCES:
            self._json(404, {"kind": "Status", "code": 404, "message": "not found"})
            return
        try:
            terms = parse_field_selector(parts.path, query.get("fieldSelector"))
        except ValueError as exc:
            self._json(400, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                             "status": "Failure", "message": str(exc),
                             "reason": "BadRequest", "code": 400})
            return
        try:
            if query.get("watch") in ("1", "true"):
                self._watch(parts.path, query, terms)
            else:
                self._list(parts.path, query, terms)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _list(self, path: str, query: dict[str, str], terms: _Selector) -> None:
        fake = self.fake
        limit = int(query.get("limit", "0") or 0)
        cont = query.get("continue")
        with fake._cond:
            snap_key = (path, query.get("fieldSelector") or "")
            items: list[dict[str, Any]] | None = None
            if cont:
                rv_s, _, off_s = cont.partition(":")
                if fake.expired_continue or int(rv_s) < fake._compacted:
                    self._json(410, _status_410("continue token expired"))
                    return
                # Later pages come from the first page's snapshot, as a real server
                # lists at one resourceVersion.
                offset = int(off_s)
                rv = int(rv_s)
                items = fake._snapshots.get((*snap_key, rv))
            else:
                offset, rv = 0, fake._rv
            if items is None:
                items = [o for _, o in sorted(fake._objects[path].items())
                         if _selects(path, terms, o)]
                if limit and len(items) > limit:
                    while len(fake._snapshots) >= 8:
                        fake._snapshots.pop(next(iter(fake._snapshots)))
                    fake._snapshots[(*snap_key, rv)] = items
            page = items[offset : offset + limit] if limit else items[offset:]
            more = limit and offset + limit < len(items)
            # Stored objects are never mutated (put and delete store new copies), so the
            # page can be serialised from them directly.
            body: dict[str, Any] = {
                "kind": RESOURCES[path][0],
                "apiVersion": _ITEM_KIND[path][0],
                "metadata": {"resourceVersion": str(rv)},
                "items": page,
            }
            if more:
                body["metadata"]["continue"] = f"{rv}:{offset + limit}"
        self._json(200, body)

    def _chunk(self, data: bytes) -> None:
        self._count(len(data))
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, path: str, query: dict[str, str], terms: _Selector) -> None:
        fake = self.fake
        rv_s = query.get("resourceVersion") or "0"
        since = int(rv_s)
        timeout = float(query.get("timeoutSeconds", "1800"))
        deadline = time.monotonic() + timeout
        with fake._cond:
            too_old = since != 0 and since < fake._compacted
            if too_old and fake.gone_as_http:
                self._json(410, _status_410(f"too old resource version: {since}"))
                return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if too_old:
            self._chunk(
                orjson.dumps(
                    {"type": "ERROR", "object": _status_410(f"too old resource version: {since}")}
                )
                + b"\n"
            )
            self._chunk(b"")
            self.close_connection = True
            return
        w = _Watch(path, query.get("allowWatchBookmarks") == "true", self.connection, terms)
        with fake._cond:
            fake._watches.append(w)
            if since == 0:
                # "Get state and start at most recent": synthetic ADDED for everything.
                pending = [
                    ("ADDED", o) for o in fake._objects[path].values() if _selects(path, terms, o)
                ]
                since = fake._rv
            else:
                pending = []
        try:
            for line in self._stream(w, since, pending, deadline):
                self._chunk(line)
            if not w.dead:
                self._chunk(b"")
        finally:
            with fake._cond:
                if w in fake._watches:
                    fake._watches.remove(w)
        # A stream that ended normally leaves the HTTP/1.1 connection usable for the
        # next request, as a real API server's does; a cut one is gone.
        self.close_connection = w.dead or fake._server is None

    def _stream(
        self,
        w: _Watch,
        since: int,
        pending: list[tuple[str, dict[str, Any]]],
        deadline: float,
    ) -> Iterator[bytes]:
        fake = self.fake
        for etype, obj in pending:
            yield orjson.dumps({"type": etype, "object": obj}) + b"\n"
        while True:
            with fake._cond:
                while True:
                    new = []
                    held_back = False
                    now = time.monotonic()
                    for e in fake._events[w.path]:
                        if e[0] <= since:
                            continue
                        if fake._visible_at.get(e[0], 0.0) > now:
                            held_back = True  # in order: later events wait behind it
                            break
                        new.append(e)
                    if w.dead:
                        return
                    if new or w.inject or w.close or fake._server is None:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    fake._cond.wait(min(left, 0.02 if held_back else 0.5))
                inject, w.inject = w.inject, []
                close = w.close or fake._server is None
            for rv, etype, obj, prev in new:
                since = rv
                ev = _filtered(w, rv, etype, obj, prev)
                if ev is not None:
                    yield orjson.dumps(ev) + b"\n"
            for ev in inject:
                yield orjson.dumps(ev) + b"\n"
            if close:
                return


def _filtered(
    w: _Watch, rv: int, etype: str, obj: dict[str, Any], prev: dict[str, Any] | None
) -> dict[str, Any] | None:
    """One stored event as a watch with a field selector sees it (the API server's rule).

    An object that starts matching arrives as ADDED, one that stops matching
    as DELETED carrying its previous content at the event's resourceVersion.
    """
    if not w.terms:
        return {"type": etype, "object": obj}
    now = etype != "DELETED" and _selects(w.path, w.terms, obj)
    before = _selects(w.path, w.terms, prev)
    if now and not before:
        return {"type": "ADDED", "object": obj}
    if now and before:
        return {"type": "MODIFIED", "object": obj}
    if before:
        gone = copy.deepcopy(prev)
        assert gone is not None
        gone["metadata"]["resourceVersion"] = str(rv)
        return {"type": "DELETED", "object": gone}
    return None


def write_kubeconfig(path: Path, server: str, *, context: str = "fake") -> Path:
    """Write a kubeconfig for ``server`` (plain http, no auth); returns ``path``."""
    import yaml

    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "anonymous", "user": {}}],
        "contexts": [{"name": context, "context": {"cluster": "fake", "user": "anonymous"}}],
        "current-context": context,
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def pod(
    name: str,
    ip: str | list[str] | None,
    *,
    namespace: str = "default",
    uid: str | None = None,
    labels: dict[str, str] | None = None,
    node: str = "node-1",
    phase: str = "Running",
    created: str | None = None,
    host_network: bool = False,
    logical_switch: str = "ovn-default",
) -> dict[str, Any]:
    """A v1 Pod object for the fake server (and for tests of the converters)."""
    ips = [] if ip is None else [ip] if isinstance(ip, str) else list(ip)
    meta: dict[str, Any] = {
        "namespace": namespace,
        "name": name,
        "labels": dict(labels or {"app": name}),
        "annotations": {"ovn.kubernetes.io/logical_switch": logical_switch},
    }
    if uid:
        meta["uid"] = uid
    if created:
        meta["creationTimestamp"] = created
    status: dict[str, Any] = {"phase": phase}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": i} for i in ips]
    return {
        "metadata": meta,
        "spec": {"nodeName": node, "hostNetwork": host_network},
        "status": status,
    }


def subnet(
    name: str,
    cidr: str,
    *,
    nat_outgoing: bool = True,
    vpc: str = "ovn-cluster",
    rules: list[dict[str, Any]] | None = None,
    gateway_type: str | None = None,
    gateway_node: str | None = None,
    gateway_node_selectors: list[dict[str, Any]] | None = None,
    enable_ecmp: bool | None = None,
    activate_gateway: str | None = None,
) -> dict[str, Any]:
    """A kubeovn.io/v1 Subnet object (spec field names as in Kube-OVN's subnet.go).

    ``gateway_type`` None leaves ``gatewayType`` out (Kube-OVN then means
    distributed); ``activate_gateway`` sets ``status.activateGateway``.
    """
    spec: dict[str, Any] = {"cidrBlock": cidr, "natOutgoing": nat_outgoing, "vpc": vpc}
    if rules is not None:
        spec["natOutgoingPolicyRules"] = rules
    if gateway_type is not None:
        spec["gatewayType"] = gateway_type
    if gateway_node is not None:
        spec["gatewayNode"] = gateway_node
    if gateway_node_selectors is not None:
        spec["gatewayNodeSelectors"] = gateway_node_selectors
    if enable_ecmp is not None:
        spec["enableEcmp"] = enable_ecmp
    obj: dict[str, Any] = {"metadata": {"name": name}, "spec": spec}
    if activate_gateway is not None:
        obj["status"] = {"activateGateway": activate_gateway}
    return obj


def node(
    name: str, internal_ip: str | list[str], *, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A v1 Node object with InternalIP addresses (and ``metadata.labels``)."""
    ips = [internal_ip] if isinstance(internal_ip, str) else internal_ip
    addrs = [{"type": "InternalIP", "address": i} for i in ips]
    addrs.append({"type": "Hostname", "address": name})
    meta: dict[str, Any] = {"name": name}
    if labels is not None:
        meta["labels"] = dict(labels)
    return {"metadata": meta, "status": {"addresses": addrs}}
