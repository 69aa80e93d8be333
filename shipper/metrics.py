"""Every metric, defined in one place.

The event path increments plain integers on a :class:`Metrics` object (a
``prometheus_client`` counter costs about a microsecond per ``inc`` because of
its lock; a dict increment costs tens of nanoseconds). A custom collector reads
them at scrape time. The registry is injected, so tests read values directly
with :meth:`Metrics.value` or ``registry.get_sample_value``.

Naming: ``shipper_<what>_<unit>_total``; every drop carries a ``reason``
label; a retry is never counted as a drop.
"""

from __future__ import annotations

import socket
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shipper.health import Health


@dataclass(frozen=True)
class MetricDef:
    """Name, kind, help text and label names of one metric."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()


# The catalogue. docs/METRICS.md lists the same; tests check that they agree.
DEFS: dict[str, MetricDef] = {
    d.name: d
    for d in [
        MetricDef("shipper_events_total", "counter", "Conntrack events read, by type.", ("type",)),
        MetricDef(
            "shipper_events_filtered_total",
            "counter",
            "Events not turned into records, by reason.",
            ("reason",),
        ),
        MetricDef(
            "shipper_decode_errors_total",
            "counter",
            "Netlink messages that could not be decoded, by reason.",
            ("reason",),
        ),
        MetricDef("shipper_records_total", "counter", "Records built, by action.", ("action",)),
        MetricDef(
            "shipper_records_unresolved_total",
            "counter",
            "Records whose source IP matched no pod at flow start (shipped, flagged).",
        ),
        MetricDef(
            "shipper_records_uncertain_total",
            "counter",
            "Records naming a pod matched only through enrich.clock_skew_s, with no "
            "earlier history of the address (flowlog.attribution: uncertain).",
        ),
        MetricDef(
            "shipper_records_shipped_total",
            "counter",
            "Records confirmed delivered by a sink.",
            ("sink",),
        ),
        MetricDef(
            "shipper_batches_shipped_total", "counter", "Batches confirmed delivered.", ("sink",)
        ),
        MetricDef(
            "shipper_records_dropped_total",
            "counter",
            "Records accepted and then dropped, by reason.",
            ("reason",),
        ),
        MetricDef(
            "shipper_delivery_retries_total",
            "counter",
            "Delivery attempts that failed and will be retried.",
            ("sink", "error"),
        ),
        MetricDef(
            "shipper_overruns_total",
            "counter",
            "Times the event socket overflowed (ENOBUFS).",
        ),
        MetricDef(
            "shipper_events_lost_total",
            "counter",
            "Events the kernel dropped because the socket was full (socket drop counter).",
        ),
        MetricDef("shipper_resyncs_total", "counter", "Table dumps done to resync after a loss."),
        MetricDef(
            "shipper_errors_total",
            "counter",
            "Runtime errors, by stage and error type (stage worker: a reader process of "
            "conntrack.workers failed, exited unasked or did not stop in time).",
            ("stage", "error"),
        ),
        MetricDef(
            "shipper_worker_events_total",
            "counter",
            "Conntrack events read by each reader process (conntrack.workers > 1), by worker "
            "index: how evenly the shares spread. shipper_events_total is their sum.",
            ("worker",),
        ),
        MetricDef(
            "shipper_conntrack_sysctl",
            "gauge",
            "Value of net.netfilter.nf_conntrack_<name> in the conntrack namespace.",
            ("name",),
        ),
        MetricDef("shipper_queue_batches", "gauge", "Closed batches waiting for the sink."),
        MetricDef("shipper_pods_live", "gauge", "Pods currently owning an address."),
        MetricDef(
            "shipper_pod_source_stale",
            "gauge",
            "1 while the pod source (watch or pods file) may be behind and records are held.",
        ),
        MetricDef(
            "shipper_records_held_total",
            "counter",
            "Records held because the pod source was stale.",
        ),
        MetricDef("shipper_hold_records", "gauge", "Records held right now (pod source stale)."),
        MetricDef(
            "shipper_records_released_total",
            "counter",
            "Held records attributed and shipped after the pod source recovered.",
        ),
        MetricDef(
            "shipper_records_stale_total",
            "counter",
            "Records shipped flagged stale (last known owner), by why they left the hold: "
            "age (stale_hold_s), full (stale_hold_records; overflow), shutdown.",
            ("reason",),
        ),
        MetricDef(
            "shipper_records_waited_total",
            "counter",
            "Records that waited for an unknown or uncertain owner (resolve_wait_s), by outcome: "
            "resolved, timeout, full (too many waiting: not delayed).",
            ("result",),
        ),
        MetricDef(
            "shipper_pod_ip_conflicts_total",
            "counter",
            "Pod addresses where Kube-OVN's allocation annotation disagreed with "
            "status.podIPs (status.podIPs was used).",
        ),
        MetricDef(
            "shipper_flow_starts_evicted_total",
            "counter",
            "Remembered flow start times dropped before their flow's last event, by reason: "
            "full (conntrack.flow_start_cache or nf_conntrack_max entries held; the oldest "
            "went). A later event of that flow without a kernel start timestamp is then "
            "attributed by its own time.",
            ("reason",),
        ),
        MetricDef("shipper_pod_tombstones", "gauge", "Deleted-pod address intervals kept."),
        MetricDef(
            "shipper_pod_tombstones_evicted_total",
            "counter",
            "Deleted-pod intervals evicted before their retention ended (memory cap).",
        ),
        MetricDef(
            "shipper_state_load_errors_total",
            "counter",
            "State files ignored at start (the shipper started without pod history), "
            "by reason: truncated, corrupt, version, foreign_node, unreadable.",
            ("reason",),
        ),
        MetricDef(
            "shipper_state_saves_total",
            "counter",
            "State file writes, by result (ok, error).",
            ("result",),
        ),
        MetricDef("shipper_state_bytes", "gauge", "Size of the last state file written."),
        MetricDef(
            "shipper_state_save_seconds",
            "gauge",
            "Duration of the last state file save (snapshot, serialise, write, fsync).",
        ),
        MetricDef(
            "shipper_inventory_reloads_total",
            "counter",
            "Pod inventory file reloads, by result.",
            ("result",),
        ),
        MetricDef(
            "shipper_batch_latency_seconds",
            "histogram",
            "From a batch's first record to its confirmed delivery.",
            ("sink",),
        ),
        MetricDef(
            "shipper_records_retried_total",
            "counter",
            "Records in delivery attempts that failed and will be retried.",
            ("sink",),
        ),
        MetricDef(
            "shipper_forward_batches_sent_total",
            "counter",
            "Batches written to a forward receiver (acked or not).",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_forward_records_sent_total",
            "counter",
            "Records written to a forward receiver (acked or not).",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_forward_batches_acked_total",
            "counter",
            "Batches whose matching ack arrived.",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_forward_records_acked_total",
            "counter",
            "Records in batches whose matching ack arrived.",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_forward_errors_total",
            "counter",
            "Forward failures by endpoint and kind (connect, tls, auth, send, ack_timeout, "
            "ack_mismatch, protocol, closed).",
            ("endpoint", "error"),
        ),
        MetricDef(
            "shipper_forward_connections_total",
            "counter",
            "Connections established (after TLS and handshake).",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_forward_connected",
            "gauge",
            "1 while a connection to the endpoint is open, else 0.",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_forward_ack_latency_seconds",
            "histogram",
            "From the end of a batch's write to its ack.",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_syslog_records_sent_total",
            "counter",
            "Records written to a syslog receiver (acked or not).",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_syslog_records_acked_total",
            "counter",
            "RELP: records the receiver answered with 200 OK.",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_syslog_records_lost_total",
            "counter",
            "tcp/tls: records counted as shipped whose bytes the receiver's TCP had not "
            "acknowledged when the connection broke (with TLS: whole batches).",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_syslog_errors_total",
            "counter",
            "Syslog failures by endpoint and kind (connect, tls, open, send, ack_timeout, "
            "rejected, protocol, closed).",
            ("endpoint", "error"),
        ),
        MetricDef(
            "shipper_syslog_connections_total",
            "counter",
            "Connections established (after TLS and the RELP open).",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_syslog_connected",
            "gauge",
            "1 while a connection to the endpoint is open, else 0.",
            ("endpoint",),
        ),
        MetricDef(
            "shipper_syslog_ack_latency_seconds",
            "histogram",
            "RELP: from the first write of a batch to its last ack.",
            ("endpoint",),
        ),
        MetricDef("shipper_spool_bytes", "gauge", "Bytes of spool segment files on disk."),
        MetricDef(
            "shipper_spool_pending_batches", "gauge", "Batches in the spool not yet confirmed."
        ),
        MetricDef(
            "shipper_spool_pending_records", "gauge", "Records in the spool not yet confirmed."
        ),
        MetricDef(
            "shipper_spool_batches_total",
            "counter",
            "Spool operations on batches: spooled (written), replayed (read back from disk for "
            "delivery), removed (confirmed or dropped).",
            ("op",),
        ),
        MetricDef(
            "shipper_spool_records_total",
            "counter",
            "Spool operations on records (same ops as shipper_spool_batches_total).",
            ("op",),
        ),
        MetricDef(
            "shipper_spool_torn_frames_total",
            "counter",
            "Spool frames found torn or corrupt at recovery (a crash mid-write) and cut off.",
        ),
        MetricDef(
            "shipper_kube_events_total",
            "counter",
            "Kubernetes watch events applied, by resource and type (ADDED, BOOKMARK, ...).",
            ("resource", "type"),
        ),
        MetricDef(
            "shipper_kube_lists_total",
            "counter",
            "Full Kubernetes lists, by resource and result (ok, error).",
            ("resource", "result"),
        ),
        MetricDef(
            "shipper_kube_watch_restarts_total",
            "counter",
            "Kubernetes watches restarted, by resource and reason (gone, expired, error, scope: "
            "the watch scope changed with the node role).",
            ("resource", "reason"),
        ),
        MetricDef(
            "shipper_kube_objects_invalid_total",
            "counter",
            "Kubernetes objects skipped because they could not be converted, by resource.",
            ("resource",),
        ),
        MetricDef(
            "shipper_kube_cache_stale",
            "gauge",
            "1 while the cached objects of a resource may be out of date (API unreachable).",
            ("resource",),
        ),
        MetricDef(
            "shipper_node_role",
            "gauge",
            "1 for each Kube-OVN Subnet whose egress this node NATs, by subnet and mode "
            "(distributed: this node's pods; centralized: this node is a gateway, every node's "
            "pods).",
            ("subnet", "mode"),
        ),
        MetricDef(
            "shipper_kube_pod_scope",
            "gauge",
            "1 for the pod watch scope in force: node (spec.nodeName=this node) or cluster.",
            ("scope",),
        ),
        MetricDef(
            "shipper_kube_cidrs",
            "gauge",
            "CIDRs in force after Kube-OVN discovery, by kind (pod, cluster).",
            ("kind",),
        ),
    ]
}

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Plain counters and gauges, exposed to Prometheus by a collector.

    ``inc``/``set``/``observe`` take the metric name and label values in the
    order of the metric's label names. Integer increments from several threads
    are safe enough under the GIL for counters that only grow (a lost update
    would need two threads incrementing the same key at the same instant; the
    event path is a single thread and the others use ``lock``).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.values: dict[str, dict[tuple[str, ...], float]] = defaultdict(
            lambda: defaultdict(float)
        )
        self._hist: dict[tuple[str, ...], list[float]] = {}
        self.lock = threading.Lock()
        self.registry = registry
        for d in DEFS.values():
            if d.kind == "histogram":
                continue
            if not d.labels:
                self.values[d.name][()] = 0.0
        if registry is not None:
            registry.register(_Collector(self))

    def inc(self, name: str, *labels: str, n: float = 1) -> None:
        """Add ``n`` to a counter."""
        self.values[name][labels] += n

    def set(self, name: str, value: float, *labels: str) -> None:
        """Set a gauge."""
        self.values[name][labels] = value

    def remove(self, name: str, *labels: str) -> None:
        """Drop one labelled series of a gauge (a subnet that left the node role)."""
        self.values[name].pop(labels, None)

    def observe(self, name: str, value: float, *labels: str) -> None:
        """Record one histogram observation."""
        with self.lock:
            h = self._hist.get((name, *labels))
            if h is None:
                h = [0.0] * (len(_BUCKETS) + 2)  # buckets..., +Inf, sum
                self._hist[(name, *labels)] = h
            for i, b in enumerate(_BUCKETS):
                if value <= b:
                    h[i] += 1
            h[len(_BUCKETS)] += 1
            h[len(_BUCKETS) + 1] += value

    def value(self, name: str, *labels: str) -> float:
        """Current value of a counter or gauge (0 if never touched)."""
        return self.values[name].get(labels, 0.0) if name in self.values else 0.0

    def total(self, name: str) -> float:
        """Sum of a metric over all its label values."""
        return sum(self.values[name].values())

    def histogram_count(self, name: str, *labels: str) -> float:
        """Number of observations of a histogram."""
        h = self._hist.get((name, *labels))
        return 0.0 if h is None else h[len(_BUCKETS)]

    def collect(self) -> Iterator[object]:
        """Yield prometheus metric families (used by the registered collector)."""
        for d in DEFS.values():
            if d.kind == "histogram":
                fam_h = HistogramMetricFamily(d.name, d.help, labels=list(d.labels))
                with self.lock:
                    items = [(k[1:], list(v)) for k, v in self._hist.items() if k[0] == d.name]
                for labels, h in items:
                    buckets = [(str(b), h[i]) for i, b in enumerate(_BUCKETS)]
                    buckets.append(("+Inf", h[len(_BUCKETS)]))
                    fam_h.add_metric(list(labels), buckets, h[len(_BUCKETS) + 1])
                yield fam_h
                continue
            base = d.name.removesuffix("_total") if d.kind == "counter" else d.name
            fam = (
                CounterMetricFamily(base, d.help, labels=list(d.labels))
                if d.kind == "counter"
                else GaugeMetricFamily(d.name, d.help, labels=list(d.labels))
            )
            for labels, v in list(self.values[d.name].items()):
                fam.add_metric(list(labels), v)
            yield fam


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[object]:  # type: ignore[override]
        yield from self._m.collect()


class _QuietHandler(WSGIRequestHandler):
    """Request handler that does not log every probe and scrape to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow scrape never delays a probe."""

    daemon_threads = True


def serve(registry: CollectorRegistry, address: str, health: Health | None = None) -> WSGIServer:
    """Serve ``/metrics`` (and ``/healthz``, ``/readyz`` when ``health`` is given) on
    ``HOST:PORT`` from one HTTP server in a daemon thread; return the server.

    prometheus_client's WSGI app answers every other path with the metrics, as
    ``start_http_server`` does; the server is built here only so that the probes
    share its address.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    app = make_wsgi_app(registry)
    if health is not None:
        app = health.wsgi(app)
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_Server):
        address_family = family

    httpd = make_server(str(sockaddr[0]), int(port), app, Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd
