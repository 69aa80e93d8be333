"""Command line: ``flowlog-shipper {run,dump,check-config,demo,lookup}``.

Exit codes: 0 success; 1 stopped with undelivered records (counted as
dropped); 2 bad configuration or usage, or a configured feature whose Python
package cannot be imported (e.g. Kubernetes without its client); 3 the conntrack source failed (no
permission, no such namespace, netlink unavailable); 4 the sink could not be
set up. ``demo`` (see ``shipper.lab.demo``): 0 every connection attributed right,
1 one was not, 2 it could not run (not root, a host command missing: named with
how to install it). ``lookup`` has its own codes (see ``shipper.lookup``): 0 one answer,
1 no flow found, 3 ambiguous, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

import orjson

from shipper import __version__
from shipper import config as config_mod
from shipper.errors import ConfigError, DependencyError, SinkError, SourceError

EXIT_OK = 0
EXIT_UNDELIVERED = 1
EXIT_CONFIG = 2
EXIT_SOURCE = 3
EXIT_SINK = 4

log = logging.getLogger("shipper.cli")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration (flags override the file)")
    g.add_argument("--config", "-c", metavar="FILE",
                   help="YAML configuration file (see config/flowlog-shipper.yaml).")
    g.add_argument("--netns", metavar="NAME|PATH",
                   help="Network namespace to read conntrack in (conntrack.netns): a name "
                        "under /run/netns or a path like /proc/PID/ns/net.")
    g.add_argument("--pod-cidr", action="append", metavar="CIDR", default=None,
                   help="Pod CIDR (repeatable; replaces filter.pod_cidrs): flows whose "
                        "original source is in one are kept.")
    g.add_argument("--exclude-cidr", action="append", metavar="CIDR", default=None,
                   help="Cluster CIDR to exclude as a destination (repeatable; replaces "
                        "filter.cluster_cidrs): pods, join subnet, services, nodes.")
    g.add_argument("--pods-file", metavar="FILE",
                   help="Pod inventory: output of `kubectl get pods -A -o json`, reloaded "
                        "when it changes (inventory.pods_file).")
    g.add_argument("--kubeconfig", metavar="FILE",
                   help="Watch pods (and Kube-OVN subnets) through the Kubernetes API using "
                        "this kubeconfig (kubernetes.kubeconfig; $KUBECONFIG also works).")
    g.add_argument("--sink", choices=["stdout", "file", "forward", "syslog"],
                   help="Output (sink.type): stdout (NDJSON), file (NDJSON, rotated), "
                        "forward (Fluentd forward protocol) or syslog (RFC 5424 over "
                        "RELP, TLS or TCP).")
    g.add_argument("--output", "-o", metavar="FILE",
                   help="File for the file sink (sink.file.path); implies --sink file "
                        "unless --sink is given.")
    g.add_argument("--forward-address", action="append", metavar="HOST:PORT", default=None,
                   help="Fluentd/Fluent Bit forward receiver (repeatable, tried in order for "
                        "failover; sink.forward.addresses); implies --sink forward unless "
                        "--sink is given.")
    g.add_argument("--syslog-address", action="append", metavar="HOST:PORT", default=None,
                   help="Syslog receiver, e.g. rsyslog (repeatable, tried in order for "
                        "failover; sink.syslog.addresses); implies --sink syslog unless "
                        "--sink is given.")
    g.add_argument("--syslog-protocol", choices=["tcp", "tls", "relp"],
                   help="Syslog transport (sink.syslog.protocol): relp (acknowledged, the "
                        "default), tls (RFC 5425) or tcp (RFC 6587 octet counting); tls and "
                        "tcp have no acknowledgement.")
    g.add_argument("--node-name", metavar="NAME",
                   help="This node's name, shipped as host.name (node_name).")
    g.add_argument("--metrics-address", metavar="HOST:PORT|none",
                   help="Serve Prometheus metrics here (metrics.address); 'none' disables.")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="Level of the shipper's own JSON logs on stderr (log_level).")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document every flag)."""
    p = argparse.ArgumentParser(
        prog="flowlog-shipper",
        description="Ship conntrack flow records attributed to Kubernetes pods, so a remote "
                    "service's log line (node-ip:port after MASQUERADE) can be joined to the "
                    "pod that made the connection, by source.nat.ip and source.nat.port.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="Run the shipper daemon.",
                       description="Subscribe to conntrack events (and dump the table at "
                                   "start), filter, attribute and ship records until "
                                   "SIGTERM/SIGINT; then flush within shutdown_grace_s.")
    _common(r)
    r.add_argument("--workers", type=int, metavar="N", default=None,
                   help="Reader processes, each reading its share of the flows "
                        "(conntrack.workers; default 1).")
    d = sub.add_parser("dump", help="Ship the current conntrack table once, then exit.",
                       description="Like `conntrack -L`, but as records: every current entry "
                                   "through the same filter, attribution and encoding "
                                   "(action 'snapshot'), to the configured sink (stdout by "
                                   "default).")
    _common(d)
    d.add_argument("--workers", type=int, metavar="N", default=None,
                   help="Processes that filter, attribute and encode the table's entries, "
                        "while this one reads the table and delivers (conntrack.workers; "
                        "default 1: one process does it all).")
    c = sub.add_parser("check-config", help="Validate the configuration and print it.",
                       description="Validate the configuration (file + flags) and print the "
                                   "effective configuration as JSON. Exit 2 and list every "
                                   "problem if it is invalid. With --kubeconfig, also read "
                                   "the Kube-OVN Subnets and this Node once and print (on "
                                   "stderr) the node role this node would have: which "
                                   "Subnets it NATs and the pod watch scope (exit 2 if the "
                                   "API cannot be read).")
    _common(c)
    m = sub.add_parser("demo", help="Run a self-contained lab proving attribution (root).",
                       description="As root on a Linux box with netfilter: build a throwaway "
                                   "lab in network namespaces (gateway with MASQUERADE, pods, "
                                   "an external server), make connections including pods "
                                   "sharing one source port, run the pipeline and print what "
                                   "the server saw next to the pod the records name. Removes "
                                   "everything afterwards.")
    m.add_argument("--pods", type=int, default=4, help="Number of pods in the lab (2-20).")
    m.add_argument("--keep-output", metavar="FILE",
                   help="Also copy the records the demo shipped to this file.")
    _lookup_parser(sub)
    return p


def _lookup_parser(sub: Any) -> None:
    lk = sub.add_parser(
        "lookup", help="Find the pod behind a NAT address:port at a time, in record files.",
        description="Answer a remote log line (time, the node's address and port after "
                    "MASQUERADE) from the shipper's NDJSON output: the flow that held that "
                    "source.nat.ip/source.nat.port then (the join rule in docs/SCHEMA.md), "
                    "its pod, namespace, labels, owner and node, start, end, bytes and "
                    "packets. Ambiguity (port reuse, NAT_CLASH, a gap, an unresolved pod) "
                    "is reported, never hidden. Exit 0 one answer, 1 no flow found, "
                    "3 ambiguous, 2 bad input.")
    lk.add_argument("--nat", metavar="IP:PORT",
                    help="Post-NAT source address and port from the remote log "
                         "([addr]:port for IPv6).")
    lk.add_argument("--at", metavar="TIME",
                    help="Time of the remote log line: RFC 3339 with a zone "
                         "(2026-11-27T08:03:31Z), Common Log Format time or Unix seconds.")
    lk.add_argument("--dst", metavar="IP[:PORT]",
                    help="Destination as the pod addressed it (narrows the answer).")
    lk.add_argument("--proto", choices=["tcp", "udp"], help="Transport protocol.")
    lk.add_argument("--window", default="5m", metavar="DURATION",
                    help="Clock-skew tolerance around --at (default 5m; e.g. 90s, 1h, 0).")
    lk.add_argument("--queries", metavar="FILE",
                    help="Answer many queries in one pass: CSV (time,nat[,dst[,proto]], or "
                         "columns named in a header row) or NDJSON objects with those keys; "
                         "one answer per query line, in order.")
    lk.add_argument("--json", action="store_true",
                    help="One JSON object per answer (NDJSON) instead of text.")
    lk.add_argument("files", nargs="+", metavar="FILE",
                    help="Record files: file-sink NDJSON (rotated files and .gz included) or "
                         "Fluent Bit file output (format plain); a directory means every file "
                         "in it.")


# Flags that set one config key each, as given.
_FLAG_KEYS = {
    "netns": "conntrack.netns",
    "pod_cidr": "filter.pod_cidrs",
    "exclude_cidr": "filter.cluster_cidrs",
    "pods_file": "inventory.pods_file",
    "kubeconfig": "kubernetes.kubeconfig",
    "output": "sink.file.path",
    "forward_address": "sink.forward.addresses",
    "syslog_address": "sink.syslog.addresses",
    "syslog_protocol": "sink.syslog.protocol",
    "node_name": "node_name",
    "log_level": "log_level",
}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Map CLI flags to dotted config keys."""
    o: dict[str, Any] = {
        key: getattr(args, flag) for flag, key in _FLAG_KEYS.items() if getattr(args, flag)
    }
    if getattr(args, "workers", None) is not None:  # run and dump; 0 is an error, not unset
        o["conntrack.workers"] = args.workers
    if args.sink:
        o["sink.type"] = args.sink
    elif args.output:
        o["sink.type"] = "file"
    elif args.forward_address:
        o["sink.type"] = "forward"
    elif args.syslog_address:
        o["sink.type"] = "syslog"
    if args.metrics_address:
        o["metrics.address"] = None if args.metrics_address.lower() == "none" else (
            args.metrics_address)
    return o


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config, overrides_from_args(args))


def _print_config_error(exc: ConfigError) -> None:
    print(f"flowlog-shipper: invalid configuration ({exc.source}):", file=sys.stderr)
    for p in exc.problems:
        print(f"  - {p}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flowlog-shipper`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        # The lab is not part of the runtime: imported only here, its errors mapped here.
        from shipper.lab import LabError, demo

        try:
            return int(demo.main(args))
        except LabError as exc:
            print(f"flowlog-shipper demo: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.command == "lookup":
        from shipper import lookup

        return lookup.main(args)
    from shipper import log as log_mod

    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    if args.command == "check-config":
        sys.stdout.buffer.write(
            orjson.dumps(config_mod.effective(cfg), option=orjson.OPT_INDENT_2) + b"\n"
        )
        if args.kubeconfig:
            return _print_role(cfg)
        return EXIT_OK
    log_mod.setup(cfg.log_level)
    return _run(cfg, args.command)


def _print_role(cfg: config_mod.Config) -> int:
    """check-config --kubeconfig: print (stderr) the node role this node would have."""
    from shipper.enrich.kube import probe_role
    from shipper.errors import EnrichError

    try:
        role, n = probe_role(cfg)
    except EnrichError as exc:
        print(f"node role: cannot be read: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    k = cfg.kubernetes
    lines = [f"node role of {role.node} (from {n} Subnets): NATs {role.summary()}"]
    for e in role.entries:
        extra = ""
        if e.mode == "centralized":
            extra = {True: " active", False: " standby", None: " gateway"}[e.active]
            if e.egress_ip:
                extra += f" egress {e.egress_ip}"
        lines.append(f"  {e.subnet}: {e.mode} {','.join(e.cidrs)}{extra}")
    if not role.node_known:
        lines.append(f"  warning: no Node named {role.node!r}: gatewayNodeSelectors cannot "
                     "match (check node_name / --node-name / $NODE_NAME)")
    scope = role.pod_scope if k.pod_scope == "auto" and k.subnets_enabled else (
        k.pod_scope if k.pod_scope != "auto" else "cluster")
    lines.append(f"pod watch scope: {scope} (kubernetes.pod_scope: {k.pod_scope})")
    if not k.subnets_enabled:
        lines.append("kubernetes.subnets_enabled is false: the role is not used; the filter "
                     "keeps filter.pod_cidrs")
    elif cfg.filter.pod_cidrs:
        lines.append("filter.pod_cidrs is set by hand and wins: the role is only reported")
    print("\n".join(lines), file=sys.stderr)
    return EXIT_OK


def _run(cfg: config_mod.Config, command: str) -> int:
    from prometheus_client import CollectorRegistry

    from shipper.metrics import Metrics, serve
    from shipper.pipeline import Pipeline

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    try:
        pipeline = Pipeline(cfg, metrics)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    except DependencyError as exc:
        print(f"flowlog-shipper: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SinkError as exc:
        log.error("cannot set up the sink", extra={"fields": {"error": str(exc)}})
        return EXIT_SINK
    if command == "dump":
        try:
            if cfg.conntrack.workers > 1:
                from shipper.shards import Shards

                shards = Shards(pipeline)
                shards.fork(one_shot=True)  # before any thread exists
                return shards.dump()
            return pipeline.dump()
        except SourceError as exc:
            log.error("conntrack source failed", extra={"fields": {"error": str(exc)}})
            return EXIT_SOURCE
        except SinkError as exc:
            log.error("sink failed", extra={"fields": {"error": str(exc)}})
            return EXIT_SINK
    runner: Any = pipeline
    if cfg.conntrack.workers > 1:
        from shipper.shards import Shards

        runner = Shards(pipeline)
        try:
            runner.fork()  # before any thread exists: the metrics server below is one
        except SourceError as exc:
            log.error("conntrack source failed", extra={"fields": {"error": str(exc)}})
            return EXIT_SOURCE
    server = None
    if cfg.metrics.address:
        try:
            server = serve(registry, cfg.metrics.address, pipeline.health)
        except OSError as exc:
            log.error("cannot serve metrics", extra={"fields": {
                "address": cfg.metrics.address, "error": str(exc)}})
            return EXIT_CONFIG
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal received, stopping", extra={"fields": {"signal": signum}})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return int(runner.run(stop))
    except SourceError as exc:
        log.error("conntrack source failed", extra={"fields": {"error": str(exc)}})
        return EXIT_SOURCE
    except SinkError as exc:
        log.error("sink failed", extra={"fields": {"error": str(exc)}})
        return EXIT_SINK
    finally:
        if server is not None:
            shutdown = getattr(server, "shutdown", None)
            if shutdown is not None:
                shutdown()
