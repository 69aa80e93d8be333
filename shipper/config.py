"""Typed, closed configuration.

One YAML file, every option with a default and a one-line description (the
``description`` of each field is the documentation: ``docs/CONFIG.md`` and
``check-config`` are generated from it). Unknown keys are errors naming the key
and the file. :func:`load` reports every problem at once as one
:class:`~shipper.errors.ConfigError`.

pydantic does the parsing and validation (closed models with
``extra="forbid"``, every error collected with its location); CIDRs are
parsed by :mod:`shipper.cidrs` into :class:`~shipper.cidrs.Cidr` values (the
normal text, carrying the typed network) that the filter, subnet discovery and
the in-kernel filter take as they are.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shipper.cidrs import to_cidrs
from shipper.errors import ConfigError


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_cidrs(values: list[str]) -> list[str]:
    """Every value as a :class:`Cidr` (a ``str``); one ValueError naming every bad value."""
    return list(to_cidrs(values))  # CidrError is a ValueError: pydantic reports it per key


Event = Literal["new", "update", "destroy"]


#: Most reader processes (conntrack.workers): every socket's filter runs on every event
#: in the kernel, and each reader holds its own flow-start cache and pod index copy.
MAX_WORKERS = 16


class ConntrackConfig(_Closed):
    """Where and how conntrack events are read."""

    netns: str | None = Field(
        None,
        description="Network namespace to read conntrack in: a name under /run/netns or a path "
        "(e.g. /proc/PID/ns/net); unset means the shipper's own namespace.",
    )
    events: list[Event] = Field(
        ["new", "destroy"],
        description="Event types to subscribe to: new, destroy, update (update is noisy).",
    )
    dump_at_start: bool = Field(
        True, description="Dump the conntrack table at start; those records get action 'snapshot'."
    )
    rcvbuf_bytes: int = Field(
        64 * 1024 * 1024,
        ge=4096,
        description="Receive buffer of the event socket (SO_RCVBUFFORCE; needs CAP_NET_ADMIN). "
        "Each queued event costs about 1.3 KB.",
    )
    set_sysctls: bool = Field(
        True,
        description="At start set net.netfilter.nf_conntrack_events=1, _acct=1 and _timestamp=1 "
        "in the conntrack namespace (needed for DESTROY of old flows, byte counts and end times).",
    )
    kernel_filter: bool = Field(
        True,
        description="Attach an in-kernel BPF filter to the event socket that drops events whose "
        "original source is not in the pod CIDRs before they are queued (no CPU spent on them, "
        "no overruns caused by them; such events are then not counted as filtered). Table dumps "
        "ask the kernel to skip entries that are not source-NATed (with filter.only_snat) or "
        "not of the pod CIDRs' family.",
    )
    resync_on_overrun: bool = Field(
        True, description="After events were lost (ENOBUFS), dump the table to resync."
    )
    resync_min_interval_s: float = Field(
        30.0,
        ge=0,
        description="At most one resync dump per this many seconds: under sustained overload "
        "back-to-back dumps of a large table would only deepen the loss.",
    )
    drain_interval_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="Pause between socket drains; events are read in bursts, which costs "
        "less CPU per event than waking for each one (20 ms against 2 ms: about 10-20 % "
        "less CPU per event at 10-40k events/s, docs/BENCHMARK.md). No pause while a burst "
        "ends with events still queued. The queue must hold what arrives in one pause: "
        "at 200k events/s, 20 ms is 4,000 events, about 5 MiB of rcvbuf_bytes.",
    )
    flow_start_cache: int = Field(
        1_000_000,
        ge=0,
        description="At most this many flows' start times are remembered (from NEW/snapshot) to "
        "attribute their later events that carry no kernel start timestamp; also at most "
        "nf_conntrack_max. With nf_conntrack_timestamp=1 and no update events, NEW starts are "
        "not remembered (DESTROY carries the kernel's). Evictions: "
        "shipper_flow_starts_evicted_total.",
    )
    reliable_destroy: bool = Field(
        False,
        description="Read DESTROY on a second socket with NETLINK_BROADCAST_ERROR and "
        "NETLINK_NO_ENOBUFS: when it is full the kernel keeps the dead entry and retries the "
        "DESTROY until it fits instead of dropping it. Price: while the shipper does not "
        "read, dead entries stay allocated and count against nf_conntrack_max, so a stalled "
        "shipper can fill the table; pair it with the /healthz stall check (health.stall_s). "
        "Needs 'destroy' in events.",
    )

    workers: int = Field(
        1,
        ge=1,
        le=MAX_WORKERS,
        description="Reader processes (sharded readers, for more than one core's worth of "
        "events): each has its own event socket whose in-kernel filter keeps only its share "
        "of the flows (conntrack id modulo workers), and filters, attributes and encodes "
        "that share; the main process runs the pod sources, metrics and the one delivery. "
        f"1..{MAX_WORKERS}; 1 reads in the main process. In the one-shot dump, the processes "
        "that filter, attribute and encode the table's entries while the main process reads "
        "the table and delivers (1: the main process does it all).",
    )

    @model_validator(mode="after")
    def _reliable_needs_destroy(self) -> ConntrackConfig:
        if self.reliable_destroy and "destroy" not in self.events:
            raise ValueError("reliable_destroy needs 'destroy' in conntrack.events")
        return self


class FilterConfig(_Closed):
    """Which flows become records."""

    pod_cidrs: list[str] = Field(
        [], description="Pod CIDRs: a flow is kept only if its original source is in one."
    )
    cluster_cidrs: list[str] = Field(
        [],
        description="Cluster CIDRs (pods, join subnet, services, nodes): flows to these "
        "destinations are dropped.",
    )
    only_snat: bool = Field(
        True, description="Keep only flows whose source was NATed (MASQUERADE/SNAT)."
    )

    @field_validator("pod_cidrs", "cluster_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        return _check_cidrs(v)


class InventoryConfig(_Closed):
    """Pod metadata from a file in `kubectl get pods -A -o json` format."""

    pods_file: Path | None = Field(
        None, description="Path of a v1 PodList JSON file; reloaded when it changes."
    )
    reload_interval_s: float = Field(
        2.0, gt=0, description="How often the pods file is checked for changes."
    )


class EnrichConfig(_Closed):
    """How flows are attributed to pods."""

    retention_s: float = Field(
        432000.0,
        gt=0,
        description="How long a deleted pod's identity is kept to attribute late events "
        "(default 5 days: conntrack's longest default timeout).",
    )
    max_tombstones: int = Field(
        300_000, ge=0, description="At most this many deleted-pod address intervals are kept."
    )
    clock_skew_s: float = Field(
        5.0,
        ge=0,
        description="A flow starting this much before a pod's creation time still belongs to it.",
    )
    label_allowlist: list[str] = Field(
        [], description="If non-empty, only these label keys are shipped (glob patterns)."
    )
    label_denylist: list[str] = Field(
        [], description="Label keys never shipped (glob patterns), applied after the allowlist."
    )
    annotation_allowlist: list[str] = Field(
        [], description="Annotation keys shipped (glob patterns); empty ships none."
    )
    max_labels: int = Field(64, ge=0, description="At most this many labels per pod are shipped.")
    max_key_bytes: int = Field(253, ge=1, description="Longer label/annotation keys are dropped.")
    max_value_bytes: int = Field(
        1024, ge=1, description="Longer label/annotation values are truncated to this size."
    )
    stale_hold_s: float = Field(
        60.0,
        ge=0,
        description="While the pod source is stale (watch cut or failing, pods file unreadable), "
        "hold records up to this long for attribution after recovery; older ones ship flagged "
        "stale (0: never hold).",
    )
    stale_hold_records: int = Field(
        50_000,
        ge=0,
        description="At most this many records are held while the pod source is stale; past it "
        "one leaves early flagged stale, chosen by queue.overflow (0: never hold).",
    )
    resolve_wait_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="A NEW/snapshot record whose source has no (or an uncertain) owner waits up "
        "to this long for the pod's watch event (0: ship at once).",
    )
    resolve_wait_max_flows: int = Field(
        10_000,
        ge=0,
        description="At most this many flows wait for an owner at once; more ship at once.",
    )


class BatchConfig(_Closed):
    """When a batch is closed and handed to the sink."""

    max_records: int = Field(1000, ge=1, description="Close a batch at this many records.")
    max_bytes: int = Field(
        1024 * 1024, ge=1024, description="Close a batch before it passes this many bytes."
    )
    max_age_s: float = Field(1.0, gt=0, le=60, description="Close a batch this old (seconds).")


class QueueConfig(_Closed):
    """The bounded queue between the event path and the sink."""

    max_batches: int = Field(64, ge=1, description="Closed batches waiting for the sink.")
    overflow: Literal["block", "drop_newest", "drop_oldest"] = Field(
        "block",
        description="When the queue is full: block (stop reading; the kernel then drops and we "
        "count it as an overrun), drop_newest or drop_oldest (count the dropped records).",
    )


class FileSinkConfig(_Closed):
    """The file sink: NDJSON, appended, rotated by size."""

    path: Path = Field(Path("/var/log/flowlog/flows.json"), description="File to append to.")
    max_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="Rotate when the file reaches this size."
    )
    keep: int = Field(5, ge=0, description="Rotated files kept (path.1 ... path.N).")
    fsync: bool = Field(False, description="fsync after every batch.")


class TLSClientConfig(_Closed):
    """TLS client settings shared by the network sinks (forward, syslog)."""

    verify: bool = Field(
        True,
        description="Verify the receiver's certificate and name; false disables both "
        "(testing only: anyone on the path can then read and alter the stream).",
    )
    ca_file: Path | None = Field(
        None, description="PEM CA bundle to verify the receiver with; unset uses the system store."
    )
    cert_file: Path | None = Field(
        None, description="PEM client certificate for mutual TLS (may also hold the key)."
    )
    key_file: Path | None = Field(
        None, description="PEM private key of the client certificate, if not in cert_file."
    )
    server_name: str | None = Field(
        None,
        description="Name to send (SNI) and to verify in the receiver's certificate; "
        "unset uses the host part of each address.",
    )

    @model_validator(mode="after")
    def _key_needs_cert(self) -> Self:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not")
        return self


class ForwardTLSConfig(TLSClientConfig):
    """TLS for the forward sink. Certificates are verified whenever TLS is on, unless
    ``verify`` is explicitly false."""

    enabled: bool = Field(False, description="Connect to the receivers over TLS.")


def _check_addresses(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("at least one HOST:PORT is needed")
    problems = []
    for v in values:
        host, sep, port = str(v).rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"{v!r} is not HOST:PORT")
    if problems:
        raise ValueError("; ".join(problems))
    return [str(v) for v in values]


class _NetworkSinkConfig(_Closed):
    """What every network sink has: failover addresses (declared by each sink, with its
    default), a send timeout and the endpoint cooldown."""

    send_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of writing one batch to the socket."
    )
    endpoint_cooldown_s: float = Field(
        30.0,
        ge=0,
        description="After a failure an endpoint is tried last for this long (failover), "
        "then preferred again by its position in addresses (failback on reconnect).",
    )

    @field_validator("addresses", check_fields=False)
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        return _check_addresses(v)


class ForwardSinkConfig(_NetworkSinkConfig):
    """The Fluentd forward-protocol sink (Forward Protocol Specification v1)."""

    addresses: list[str] = Field(
        ["127.0.0.1:24224"],
        description="Receivers as HOST:PORT ([v6]:PORT for IPv6), tried in order (failover).",
    )
    tag: str = Field("flowlog", min_length=1, description="Fluentd tag of every record.")
    mode: Literal["forward", "packed_forward", "compressed_packed_forward", "message"] = Field(
        "packed_forward",
        description="Wire mode of a batch: packed_forward (default), forward, "
        "compressed_packed_forward (gzip) or message (one message per record, for old receivers).",
    )
    compression_level: int = Field(
        1, ge=1, le=9, description="gzip level for compressed_packed_forward (1 = fastest)."
    )
    ack: bool = Field(
        True,
        description="Send a chunk id with every batch and count it delivered only when the "
        "matching ack arrives; false is fire-and-forget (records can be lost silently).",
    )
    ack_timeout_s: float = Field(
        30.0, gt=0, description="How long to wait for a batch's ack before retrying it."
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one TCP connect, TLS handshake and shared_key handshake."
    )
    tls: ForwardTLSConfig = Field(default_factory=ForwardTLSConfig, description="TLS options.")
    shared_key_file: Path | None = Field(
        None,
        description="File holding the shared_key (e.g. a mounted Secret); enables the "
        "HELO/PING/PONG handshake. Re-read on every connection; never logged.",
    )
    self_hostname: str | None = Field(
        None,
        description="Hostname sent in PING and used in the handshake digest; "
        "unset uses $NODE_NAME, else the hostname.",
    )
    username: str | None = Field(
        None, description="User name for receivers that require user authentication."
    )
    password_file: Path | None = Field(
        None, description="File holding the password of username (never logged)."
    )

    @model_validator(mode="after")
    def _user_needs_password(self) -> ForwardSinkConfig:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file must be set together")
        if self.username is not None and self.shared_key_file is None:
            raise ValueError("username needs shared_key_file (user auth is part of the handshake)")
        return self


FACILITIES: dict[str, int] = {
    name: code for code, name in enumerate([
        "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
        "authpriv", "ftp", "ntp", "audit", "alert", "clock",
        "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
    ])
}
"""RFC 5424 facility names (rsyslog's spelling) -> codes."""

Facility = Literal[
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "ntp", "audit", "alert", "clock",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
]


class SyslogTLSConfig(TLSClientConfig):
    """TLS for the syslog sink (protocol tls, or relp with relp_tls). The receiver's
    certificate and name are verified unless ``verify`` is explicitly false."""


class SyslogSinkConfig(_NetworkSinkConfig):
    """The syslog sink: RFC 5424 messages (the JSON record as MSG) to rsyslog/syslog-ng."""

    addresses: list[str] = Field(
        ["127.0.0.1:2514"],
        description="Receivers as HOST:PORT ([v6]:PORT for IPv6), tried in order (failover).",
    )
    protocol: Literal["tcp", "tls", "relp"] = Field(
        "relp",
        description="relp (acknowledged: shipped only when the receiver answered 200), "
        "tls (RFC 5425) or tcp (RFC 6587 octet counting); tls and tcp have no acknowledgement.",
    )
    relp_tls: bool = Field(
        False, description="With protocol relp: RELP over TLS (rsyslog imrelp tls=\"on\")."
    )
    app_name: str = Field(
        "flowlog-shipper",
        min_length=1,
        max_length=48,
        pattern=r"^[\x21-\x7e]+$",
        description="APP-NAME of every message (1-48 printable ASCII characters, no spaces).",
    )
    facility: Facility = Field(
        "local0", description="Facility of every message (kern ... local7, rsyslog's names)."
    )
    max_message_bytes: int = Field(
        8192,
        ge=480,
        description="Largest message sent (header + JSON); larger records are not sent but "
        "dropped and counted (too_large). Set it to the receiver's limit: rsyslog's "
        "maxMessageSize (default 8k) truncates longer ones.",
    )
    relp_window: int = Field(
        128, ge=1, le=100_000,
        description="RELP: messages sent before their acks arrive (librelp's default is 128).",
    )
    ack_timeout_s: float = Field(
        30.0, gt=0, description="RELP: how long to wait for the next ack before retrying."
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of one TCP connect, TLS handshake and RELP open."
    )
    tls: SyslogTLSConfig = Field(
        default_factory=SyslogTLSConfig, description="TLS options (protocol tls, relp_tls)."
    )

    @model_validator(mode="after")
    def _relp_tls_needs_relp(self) -> SyslogSinkConfig:
        if self.relp_tls and self.protocol != "relp":
            raise ValueError("relp_tls needs protocol relp (protocol tls is already TLS)")
        return self


class SpoolConfig(_Closed):
    """The disk spool: a write-ahead log of closed batches in front of the sink."""

    enabled: bool = Field(
        False,
        description="Write every closed batch to disk (before it is queued) and remove it "
        "only once the sink confirmed it; pending batches survive restarts and crashes.",
    )
    dir: Path = Field(
        Path("/var/lib/flowlog/spool"), description="Directory of the spool segment files."
    )
    max_bytes: int = Field(
        512 * 1024 * 1024, ge=64 * 1024, description="Size cap of the spool on disk."
    )
    segment_bytes: int = Field(
        16 * 1024 * 1024,
        ge=4096,
        description="Start a new segment file past this size; space is freed a whole "
        "segment at a time (capped at max_bytes / 4).",
    )
    full_policy: Literal["block", "drop_oldest"] = Field(
        "block",
        description="When the spool is full: block (stop reading; the kernel then drops and we "
        "count overruns) or drop_oldest (drop the oldest segment, counting its records).",
    )
    fsync: bool = Field(
        True,
        description="fsync every batch before it is queued (survives power loss); "
        "false survives process crashes only.",
    )


class SinkConfig(_Closed):
    """Where records go."""

    type: Literal["stdout", "file", "forward", "syslog"] = Field(
        "stdout", description="The output."
    )
    file: FileSinkConfig = Field(default_factory=FileSinkConfig, description="File sink options.")
    forward: ForwardSinkConfig = Field(
        default_factory=ForwardSinkConfig, description="Forward sink options."
    )
    syslog: SyslogSinkConfig = Field(
        default_factory=SyslogSinkConfig, description="Syslog sink options."
    )
    spool: SpoolConfig = Field(
        default_factory=SpoolConfig, description="Disk spool in front of the sink."
    )
    retry_initial_s: float = Field(0.2, gt=0, description="First retry delay after a failure.")
    retry_max_s: float = Field(30.0, gt=0, description="Longest retry delay.")
    max_retries: int = Field(
        -1, ge=-1, description="Retries of one batch before it is dropped; -1 retries forever."
    )


class MetricsConfig(_Closed):
    """Prometheus metrics endpoint."""

    address: str | None = Field(
        "0.0.0.0:9808",
        description="HOST:PORT to serve /metrics, /healthz and /readyz on; null disables it.",
    )


class HealthConfig(_Closed):
    """Liveness and readiness probes (/healthz, /readyz on metrics.address)."""

    stall_s: float = Field(
        30.0, gt=0, description="/healthz answers 503 when the event loop completed no "
        "iteration for this long (seconds)."
    )


class KubernetesConfig(_Closed):
    """Pods, Nodes and Kube-OVN Subnets from the Kubernetes API (list + watch)."""

    kubeconfig: Path | None = Field(
        None,
        description="Kubeconfig file for running outside the cluster (default: $KUBECONFIG); "
        "with neither this nor an in-cluster service account the API source is off.",
    )
    context: str | None = Field(
        None, description="Kubeconfig context to use (default: the file's current-context)."
    )
    in_cluster: Literal["auto", "never"] = Field(
        "auto",
        description="auto: use the pod's service account when no kubeconfig is given and "
        "KUBERNETES_SERVICE_HOST is set; never: only a kubeconfig enables the API source.",
    )
    sync_timeout_s: float = Field(
        60.0,
        ge=0,
        description="At start, wait up to this long for the first pod (and Subnet/Node) lists "
        "before processing events; later unresolved records are flagged and counted.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Connect timeout, and read timeout of list requests."
    )
    watch_timeout_s: int = Field(
        290,
        ge=10,
        description="Server-side timeoutSeconds of one watch request; the watch then resumes "
        "from the last resourceVersion. A silent connection is dropped after this plus 30 s.",
    )
    list_page_size: int = Field(
        500, ge=1, description="Objects per list page (limit/continue paging)."
    )
    backoff_initial_s: float = Field(
        0.5, gt=0, description="First reconnect delay after an API error (jittered, doubling)."
    )
    backoff_max_s: float = Field(30.0, gt=0, description="Longest reconnect delay.")
    subnets_enabled: bool = Field(
        False,
        description="Discover the node role and the pod and cluster CIDRs from kubeovn.io/v1 "
        "Subnets at runtime (cluster CIDRs add to filter.cluster_cidrs; filter.pod_cidrs, "
        "if set, replace the discovered pod CIDRs).",
    )
    subnet_selection: Literal["nat_outgoing", "all"] = Field(
        "nat_outgoing",
        description="Which Subnets' cidrBlocks are pod CIDRs: those with natOutgoing: true, "
        "or all (the join subnet never is).",
    )
    subnet_vpcs: list[str] = Field(
        [], description="If non-empty, only Subnets of these VPCs (spec.vpc) give pod CIDRs."
    )
    join_subnet: str = Field(
        "join",
        description="Name of the Kube-OVN join (node) Subnet: excluded as a destination, "
        "never a pod CIDR.",
    )
    nat_policy_rules: bool = Field(
        True,
        description="Honour Subnets' natOutgoingPolicyRules: sources a rule forwards "
        "(no SNAT) are not pod CIDRs where that can be decided from the source alone.",
    )
    service_cidrs: list[str] = Field(
        [],
        description="Service CIDRs (in no CRD): excluded as destinations when Subnets are watched.",
    )
    watch_nodes: bool = Field(
        True, description="Watch Nodes and exclude their InternalIPs as destinations."
    )
    pod_scope: Literal["auto", "node", "cluster"] = Field(
        "auto",
        description="Which pods to watch: node (only this node's, fieldSelector "
        "spec.nodeName), cluster (all), or auto (with subnets_enabled: node unless the node "
        "role makes this node a centralized gateway, switching at runtime; else cluster).",
    )

    @field_validator("service_cidrs")
    @classmethod
    def _service_cidrs(cls, v: list[str]) -> list[str]:
        return _check_cidrs(v)


class Config(_Closed):
    """The whole configuration."""

    node_name: str = Field(
        default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname(),
        description="This node's name, shipped as host.name (default: $NODE_NAME, else hostname).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="The shipper's own log level (JSON lines on stderr)."
    )
    shutdown_grace_s: float = Field(
        10.0, gt=0, description="On SIGTERM/SIGINT, how long to flush before exiting."
    )
    state_dir: Path | None = Field(
        Path("/var/lib/flowlog"),
        description="Directory of the state file (pod-index.state: pod history kept across "
        "restarts); null: no state file.",
    )
    state_interval_s: float = Field(
        60.0, gt=0, description="How often the state file is written (and once at shutdown)."
    )
    conntrack: ConntrackConfig = Field(default_factory=ConntrackConfig, description="Source.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Filter.")
    inventory: InventoryConfig = Field(
        default_factory=InventoryConfig, description="Pod inventory file."
    )
    enrich: EnrichConfig = Field(default_factory=EnrichConfig, description="Attribution.")
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Batching.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="Queue.")
    sink: SinkConfig = Field(default_factory=SinkConfig, description="Output.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Metrics.")
    health: HealthConfig = Field(
        default_factory=HealthConfig, description="Health probes (/healthz, /readyz)."
    )
    kubernetes: KubernetesConfig = Field(
        default_factory=KubernetesConfig,
        description="Kubernetes API source (pods, nodes, Kube-OVN subnets).",
    )

    @model_validator(mode="after")
    def _needs_pod_cidrs(self) -> Config:
        if not self.filter.pod_cidrs and not _dynamic_cidrs(self):
            raise ValueError(
                "filter.pod_cidrs is empty: set at least one pod CIDR (or --pod-cidr)"
            )
        return self


def _dynamic_cidrs(cfg: Config) -> bool:
    """True when CIDRs come from a runtime source (Kube-OVN Subnets)."""
    kube = getattr(cfg, "kubernetes", None)
    return bool(kube is not None and getattr(kube, "subnets_enabled", False))


def _format_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            out.append(f"{loc}: unknown key")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            out.append(f"{loc}: {msg}")
    return out


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def load(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read, merge CLI overrides (dotted keys) and validate; raise ConfigError on any problem."""
    source = str(path) if path is not None else "command line"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"cannot read: {exc.strerror or exc}"], source) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"not UTF-8 text ({exc.reason} at byte {exc.start})"],
                              source) from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(["top level must be a mapping"], source)
        data = loaded
    for key, value in (overrides or {}).items():
        _set_path(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc), source) from exc


def effective(cfg: Config) -> dict[str, Any]:
    """The effective configuration as plain data (for ``check-config``)."""
    return cfg.model_dump(mode="json")


def reference(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, description)`` for every leaf option, for the docs."""
    rows: list[tuple[str, str, str]] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(reference(ann, key + "."))
            continue
        if f.default_factory is not None:
            try:
                default = repr(f.default_factory())  # type: ignore[call-arg]
            except TypeError:
                default = "(computed)"
            if name == "node_name":
                default = "$NODE_NAME or hostname"
        else:
            default = repr(f.default)
        rows.append((key, default, f.description or ""))
    return rows
