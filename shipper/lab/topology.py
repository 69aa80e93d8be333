"""A throwaway Kube-OVN-gateway-like lab built from network namespaces.

Used by the ``demo`` subcommand, the integration tests and the benchmark.
Needs root, ``iptables``/``ip6tables`` (see :mod:`shipper.lab.host`) and a kernel
with netfilter NAT; it works from an installed package (no checkout assumed).
Nothing is ever configured in the caller's (root) namespace: every link is created
through a netlink socket opened inside a lab namespace (pyroute2, its veth peer
moved straight into the other lab namespace) and every sysctl is written inside a
lab namespace.

How each part is done, and why:

* namespaces, links, addresses, routes: pyroute2 (``pyroute2.netns`` and
  ``IPRoute(netns=...)``), netlink requests whose errors come back as exceptions,
  instead of one ``ip`` process per step;
* sysctls: written to ``/proc/sys`` by a short-lived thread that has entered the
  namespace (``setns`` changes only the calling thread), instead of ``sysctl``;
* processes in a namespace (agents, ``iptables``, a test's own commands): forked by
  a short-lived thread that entered the namespace (a child inherits the forking
  thread's namespace), instead of ``ip netns exec``;
* NAT rules: ``iptables``/``ip6tables`` commands, as a node's own tooling writes them
  (nftables through netlink would need a library of its own and not read the same).

Topology (``P`` is the prefix, unique per lab)::

      P-p0 (10.244.0.10, fd00:10:244::10) --eth0==vp0--+
      P-p1 (10.244.0.11, fd00:10:244::11) --eth0==vp1--+ br0 10.244.0.1/24
      ...                                               |     fd00:10:244::1/64
                                                P-gw (the node, conntrack + MASQUERADE)
                                                   ext0 198.51.100.1/24, 2001:db8:100::1/64
                                                     ||
                                        P-ext eth0 198.51.100.2/24, 2001:db8:100::2/64

Pod egress to the ext network is MASQUERADEd to the node address by
``iptables``/``ip6tables`` in ``P-gw``, so ``conntrack`` in ``P-gw`` sees
``orig src = pod`` and ``reply dst = node ip:port`` exactly as on a Kube-OVN
gateway node.

Contract of :class:`Lab`:

* the constructor builds everything or, if any step fails, removes what it
  built and raises :class:`LabError`;
* :meth:`Lab.close` (also ``__exit__`` and an ``atexit`` hook) kills every
  process the lab started, then deletes every namespace the lab created; it is
  idempotent and never raises;
* every subprocess has a timeout, every wait is a bounded poll, every agent
  has a hard lifetime and exits when the Python process that started it dies.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from shipper.lab.errors import LabError
from shipper.lab.host import missing_tools, missing_tools_message

_NETNS_DIR = Path("/run/netns")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_AGENTS = (sys.executable, "-m", "shipper.lab.agents")
T = TypeVar("T")
_counter = itertools.count()
_counter_lock = threading.Lock()

#: Hard lifetime of every agent process (seconds); a safety net, not a schedule.
AGENT_MAX_SECONDS = 1800.0
#: Bound on one netlink or sysctl step inside a namespace (seconds).
_STEP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """The Kubernetes identity a lab pod pretends to have (for inventory files)."""

    namespace: str
    name: str
    uid: str
    created: datetime
    netns: str


@dataclass(frozen=True, slots=True)
class FloodResult:
    """What a UDP flood sender reported: datagrams sent and the seconds it took."""

    sent: int
    seconds: float


class Server:
    """An echo server in the ext namespace that logs every peer it sees.

    ``seen()`` returns ``(peer ip, peer port)`` for every TCP accept / UDP
    datagram so far, in arrival order. After MASQUERADE the peer is the node
    address and the (possibly rewritten) port: what a real remote server sees.
    """

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, proto: str, family: int,
                 port: int) -> None:
        """Wrap a started server agent; ``log`` is the file it appends peers to."""
        self.proc = proc
        self.log = log
        self.proto = proto
        self.family = family
        self.port = port

    def seen(self) -> list[tuple[str, int]]:
        """Return every peer logged so far (complete lines only)."""
        try:
            text = self.log.read_text(encoding="ascii")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # a line being written right now
            if line.startswith("D "):
                continue
            ip, _, port = line.strip().partition(" ")
            out.append((ip, int(port)))
        return out

    def payloads(self) -> dict[tuple[str, int], bytes]:
        """Return the first data (up to 64 bytes) received from each peer, by peer.

        Clients of :meth:`Lab.connect` can put their identity in the payload,
        which gives ground truth independent of arrival order.
        """
        try:
            text = self.log.read_text(encoding="ascii")
        except FileNotFoundError:
            return {}
        out: dict[tuple[str, int], bytes] = {}
        for line in text.splitlines(keepends=True):
            if line.startswith("D ") and line.endswith("\n"):
                _, ip, port, data = [*line.strip().split(" "), ""][:4]
                out.setdefault((ip, int(port)), bytes.fromhex(data))
        return out

    def wait_seen(self, n: int, timeout: float = 10.0) -> list[tuple[str, int]]:
        """Poll until at least ``n`` peers were seen or ``timeout`` passed; return ``seen()``."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.seen()
            if len(seen) >= n or time.monotonic() >= deadline:
                return seen
            time.sleep(0.02)


class Flood:
    """A running UDP flood sender (see :meth:`Lab.start_udp_flood`)."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Wrap a started flood agent that should finish within ``timeout`` seconds."""
        self.proc = proc
        self.timeout = timeout

    def wait(self) -> FloodResult:
        """Wait (bounded) for the sender to finish and return what it sent."""
        try:
            out, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            self.proc.kill()
            self.proc.communicate()
            raise LabError(f"flood sender did not finish within {self.timeout:.0f}s") from exc
        m = re.search(rb"^sent (\d+) ([0-9.]+)$", out, re.M)
        if self.proc.returncode != 0 or m is None:
            raise LabError(f"flood sender failed ({self.proc.returncode}): {err.decode()[-500:]}")
        return FloodResult(int(m.group(1)), float(m.group(2)))


class Lab:
    """A gateway node, N pods and one external host in network namespaces.

    Use as a context manager. Namespace names are ``<prefix>-gw``,
    ``<prefix>-ext`` and ``<prefix>-p<i>``; the default prefix
    ``fl<pid>x<n>`` is unique across concurrent runs.
    """

    pod_cidr4 = "10.244.0.0/24"
    pod_cidr6 = "fd00:10:244::/64"
    gw_ip4 = "10.244.0.1"
    gw_ip6 = "fd00:10:244::1"
    node_ip4 = "198.51.100.1"
    ext_ip4 = "198.51.100.2"
    node_ip6 = "2001:db8:100::1"
    ext_ip6 = "2001:db8:100::2"
    ext_cidr4 = "198.51.100.0/24"
    ext_cidr6 = "2001:db8:100::/64"
    #: Name of the gw's link towards the ext namespace (the MASQUERADE out-interface).
    ext_link = "ext0"
    #: Name of the node's pod bridge.
    bridge = "br0"
    #: Kubernetes namespace of the pretend pods.
    kube_namespace = "shop"
    #: Node name used in inventory files.
    node_name = "lab-node"
    MAX_PODS = 200

    def __init__(self, prefix: str | None = None, pods: int = 3, ipv6: bool = True) -> None:
        """Build the whole lab; on any failure clean up and raise :class:`LabError`."""
        if not 1 <= pods <= self.MAX_PODS:
            raise LabError(f"pods must be 1..{self.MAX_PODS}, got {pods}")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, iptables)")
        missing = missing_tools(ipv6)
        if missing:
            raise LabError(missing_tools_message(missing))
        self.prefix = self._choose_prefix(prefix)
        self.ipv6 = ipv6
        self.gw = f"{self.prefix}-gw"
        self.ext = f"{self.prefix}-ext"
        self.pod_ns: list[str] = []
        self.identities: list[PodIdentity] = []
        self.workdir = Path(f"/tmp/{self.prefix}-lab")
        self._namespaces: list[str] = []  # every netns we created, in creation order
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._veth_gen = itertools.count()
        self._iprs: dict[str, IPRoute] = {}  # open during a set-up step, see _rtnl
        # pyroute2 forks helper processes (netns creation, netlink sockets in a namespace);
        # a fork that runs Python's exit handlers (e.g. SIGTERM turned into an exception by
        # the demo) inherits this hook: only the process that built the lab may tear it down.
        self._owner_pid = os.getpid()
        atexit.register(self.close)
        try:
            self.workdir.mkdir(mode=0o700)
            try:
                self._build(pods)
            finally:
                self._close_rtnl()
        except BaseException as exc:
            self.close()
            if isinstance(exc, LabError | KeyboardInterrupt | SystemExit):
                raise
            raise LabError(f"lab setup failed: {exc}") from exc

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _choose_prefix(prefix: str | None) -> str:
        if prefix is not None:
            if not _PREFIX_RE.match(prefix):
                raise LabError(f"bad lab prefix {prefix!r}: use [A-Za-z0-9_.-], at most 40")
            if any(p.name.startswith(prefix + "-") for p in _iter_netns()):
                raise LabError(f"namespaces with prefix {prefix!r} already exist")
            return prefix
        existing = {p.name for p in _iter_netns()}
        while True:
            with _counter_lock:
                n = next(_counter)
            candidate = f"fl{os.getpid()}x{n}"
            if not any(e.startswith(candidate + "-") for e in existing) and not Path(
                f"/tmp/{candidate}-lab"
            ).exists():
                return candidate

    def _add_netns(self, name: str) -> None:
        # Tracked before it exists: a creation failing halfway is still cleaned up.
        self._namespaces.append(name)
        try:
            pyroute2_netns.create(name)
        except OSError as exc:
            raise LabError(f"cannot create network namespace {name}: {exc}") from exc
        # Set before any link arrives: new and moved links copy `default`.
        self.set_sysctl(name, "net.ipv6.conf.default.accept_dad", "0")
        self.set_sysctl(name, "net.ipv6.conf.all.accept_dad", "0")
        with self._rtnl(name) as ipr:
            ipr.link("set", index=_index(ipr, "lo"), state="up")

    @contextlib.contextmanager
    def _rtnl(self, ns: str) -> Iterator[IPRoute]:
        """An rtnetlink socket inside lab namespace ``ns``; netlink errors become LabError.

        Opening one forks a pyroute2 helper, so a socket is kept for the rest of the
        set-up step (:meth:`_close_rtnl`), e.g. the gw's across all pods.
        """
        self._check_ns(ns)
        try:
            ipr = self._iprs.get(ns)
            if ipr is None:
                # flags=0: never create a namespace here; groups=0: no event subscription.
                ipr = self._iprs[ns] = IPRoute(netns=ns, flags=0, groups=0)
            yield ipr
        except (NetlinkError, OSError) as exc:
            raise LabError(f"netlink in {ns}: {exc}") from exc

    def _close_rtnl(self) -> None:
        """Close the set-up step's rtnetlink sockets (never raises)."""
        iprs, self._iprs = self._iprs, {}
        for ipr in iprs.values():
            with contextlib.suppress(Exception):  # a socket that fails to close is gone anyway
                ipr.close()

    def _build(self, pods: int) -> None:
        self._add_netns(self.gw)
        self._add_netns(self.ext)
        gw = self.gw
        with self._rtnl(gw) as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge", br_forward_delay=0,
                     br_stp_state=0)
            br = _index(ipr, self.bridge)
            _add_addrs(ipr, br, [(self.gw_ip4, 24)] + ([(self.gw_ip6, 64)] if self.ipv6 else []))
            ipr.link("set", index=br, state="up")
            # gw <-> ext: the peer is created straight inside the ext namespace.
            ipr.link("add", ifname=self.ext_link, kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": self.ext})
            link = _index(ipr, self.ext_link)
            _add_addrs(ipr, link, [(self.node_ip4, 24)]
                       + ([(self.node_ip6, 64)] if self.ipv6 else []))
            ipr.link("set", index=link, state="up")
        with self._rtnl(self.ext) as ipr:
            eth0 = _index(ipr, "eth0")
            _add_addrs(ipr, eth0, [(self.ext_ip4, 24)]
                       + ([(self.ext_ip6, 64)] if self.ipv6 else []))
            ipr.link("set", index=eth0, state="up")
        self.set_sysctl(gw, "net.ipv4.ip_forward", "1")
        if self.ipv6:
            self.set_sysctl(gw, "net.ipv6.conf.all.forwarding", "1")
        self.run(gw, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s", self.pod_cidr4,
                 "-o", self.ext_link, "-j", "MASQUERADE")
        if self.ipv6:
            self.run(gw, "ip6tables", "-w", "-t", "nat", "-A", "POSTROUTING", "-s",
                     self.pod_cidr6, "-o", self.ext_link, "-j", "MASQUERADE")
        for i in range(pods):
            ns = f"{self.prefix}-p{i}"
            self.pod_ns.append(ns)
            self.identities.append(self._new_identity(i, ns))
            self._add_pod_ns(i, ns)

    def _new_identity(self, i: int, ns: str) -> PodIdentity:
        app = ["checkout", "cart", "payments", "catalog", "search", "ads"][i % 6]
        suffix = uuid.uuid4().hex
        return PodIdentity(
            namespace=self.kube_namespace,
            name=f"{app}-{suffix[:10]}-{suffix[10:15]}",
            uid=str(uuid.uuid4()),
            created=datetime.now(UTC),
            netns=ns,
        )

    def _add_pod_ns(self, i: int, ns: str) -> None:
        self._add_netns(ns)
        veth = f"vp{i}g{next(self._veth_gen)}"
        with self._rtnl(self.gw) as ipr:
            ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            ipr.link("set", index=_index(ipr, veth), master=_index(ipr, self.bridge),
                     state="up")
        with self._rtnl(ns) as ipr:
            eth0 = _index(ipr, "eth0")
            _add_addrs(ipr, eth0, [(self.pod_ip(i, 4), 24)]
                       + ([(self.pod_ip(i, 6), 64)] if self.ipv6 else []))
            ipr.link("set", index=eth0, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=self.gw_ip4)
            if self.ipv6:
                ipr.route("add", dst="::/0", gateway=self.gw_ip6, family=socket.AF_INET6)

    def reassign_ip(self, pod: int) -> str:
        """Give pod ``pod``'s addresses to a brand-new pod namespace (pod IP reuse).

        The old pod namespace (and every process in it) is removed first, as
        when Kubernetes deletes a pod and hands its IP to a new one; the new
        namespace gets a fresh :class:`PodIdentity` (new name, uid, creation
        time). Returns the new namespace name, also stored in ``pod_ns[pod]``.
        """
        old = self.pod_ns[pod]
        self._delete_ns(old)
        gen = sum(1 for n in self._namespaces if n.startswith(f"{self.prefix}-p{pod}r"))
        new = f"{self.prefix}-p{pod}r{gen + 1}"
        self.pod_ns[pod] = new
        self.identities[pod] = self._new_identity(pod, new)
        try:
            self._add_pod_ns(pod, new)
        finally:
            self._close_rtnl()
        return new

    # ------------------------------------------------------------ accessors
    def pod_ip(self, i: int, family: int = 4) -> str:
        """Return pod ``i``'s address: 10.244.0.(10+i) or fd00:10:244::(10+i, written decimal)."""
        if not 0 <= i < self.MAX_PODS:
            raise LabError(f"pod index out of range: {i}")
        return f"10.244.0.{10 + i}" if family == 4 else f"fd00:10:244::{10 + i}"

    def ext_ip(self, family: int = 4) -> str:
        """Return the external host's address for ``family``."""
        return self.ext_ip4 if family == 4 else self.ext_ip6

    def node_ip(self, family: int = 4) -> str:
        """Return the node's (MASQUERADE) address for ``family``."""
        return self.node_ip4 if family == 4 else self.node_ip6

    def pod_cidrs(self) -> list[str]:
        """Return the pod CIDRs in use (v4, plus v6 when enabled)."""
        return [self.pod_cidr4, self.pod_cidr6] if self.ipv6 else [self.pod_cidr4]

    def cluster_cidrs(self) -> list[str]:
        """Return CIDRs that are 'inside the cluster' here (only the pod CIDRs)."""
        return self.pod_cidrs()

    def pod_list(self) -> dict[str, Any]:
        """Return a v1 PodList (as ``kubectl get pods -A -o json``) for the current pods.

        Creation times are the moments the pod namespaces were made, so a
        time-aware pod index attributes flows correctly, also after
        :meth:`reassign_ip`.
        """
        items = []
        for i, ident in enumerate(self.identities):
            ips = [self.pod_ip(i, 4)] + ([self.pod_ip(i, 6)] if self.ipv6 else [])
            app = ident.name.split("-")[0]
            rs = ident.name.rsplit("-", 1)[0]
            items.append({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": ident.name,
                    "namespace": ident.namespace,
                    "uid": ident.uid,
                    "creationTimestamp": ident.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "labels": {"app": app, "pod-template-hash": rs.rsplit("-", 1)[-1]},
                    "annotations": {"ovn.kubernetes.io/logical_switch": "ovn-default",
                                    "ovn.kubernetes.io/ip_address": ips[0]},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                         "name": rs, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS,
                                                                           rs)),
                                         "controller": True}],
                },
                "spec": {"nodeName": self.node_name, "containers": [{"name": app,
                                                                      "image": "busybox"}]},
                "status": {"phase": "Running", "podIP": ips[0],
                           "podIPs": [{"ip": ip} for ip in ips]},
            })
        return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
                "items": items}

    def write_pod_list(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`pod_list` atomically (write + rename) to ``path``; return the path."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.pod_list(), indent=1), encoding="utf-8")
        tmp.replace(target)
        return target

    # ------------------------------------------------------------ commands
    def _check_ns(self, ns: str) -> None:
        if ns not in self._namespaces:
            raise LabError(f"{ns!r} is not a namespace of this lab")

    def run(self, ns: str, *argv: str, check: bool = True, timeout: float = 30,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside lab namespace ``ns`` (text output captured).

        The environment is the caller's, unchanged. Raises :class:`LabError` when
        ``argv[0]`` cannot be started, on timeout, and on a non-zero exit when ``check``.
        """
        proc = self._start(ns, list(argv), dict(stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True))
        with proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                proc.communicate()
                raise LabError(f"timed out after {timeout}s in {ns}: {' '.join(argv)}") from exc
        res = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and res.returncode != 0:
            raise LabError(f"{' '.join(argv)} in {ns} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-500:]}")
        return res

    def popen(self, ns: str, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside lab namespace ``ns``; the process is killed on :meth:`close`.

        The child gets its own session (so its whole process group can be
        signalled) and the caller's environment. Keyword arguments go to
        :class:`subprocess.Popen`. Raises :class:`LabError` when ``argv[0]`` cannot be
        started.
        """
        if self._closed:
            raise LabError("lab is closed")
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = self._start(ns, list(argv), kw)
        with self._lock:
            self._procs.append(proc)
        return proc

    def _start(self, ns: str, argv: list[str], kw: dict[str, Any]) -> subprocess.Popen[Any]:
        """Start ``argv`` in lab namespace ``ns``: forked from a thread inside ``ns``.

        A child inherits the network namespace of the thread that forks it, so no
        ``ip netns exec`` and no extra process is needed.
        """
        return self._in_netns(ns, lambda: subprocess.Popen(argv, **kw), f"starting {argv[0]}")

    def _agent(self, ns: str, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
        return self.popen(ns, *_AGENTS, "--parent-pid", str(os.getpid()),
                          "--max-seconds", str(AGENT_MAX_SECONDS), *argv, **kw)

    def set_sysctl(self, ns: str, key: str, value: str | int) -> None:
        """Set sysctl ``key`` (dotted, as ``sysctl -w``) inside lab namespace ``ns``.

        Written to ``/proc/sys`` by a thread inside ``ns``, never in the caller's
        namespace. Raises :class:`LabError` naming the key when it cannot be set.
        """
        path = Path("/proc/sys", *key.split("."))
        self._in_netns(ns, lambda: path.write_text(f"{value}\n", encoding="ascii"),
                       f"sysctl {key}={value}")

    def _in_netns(self, ns: str, fn: Callable[[], T], what: str) -> T:
        """Return ``fn()`` run in a new thread that entered lab namespace ``ns`` (bounded).

        ``setns`` changes only the calling thread, and this thread ends afterwards, so
        nothing else in the process ever leaves the caller's namespace.
        """
        self._check_ns(ns)
        errors: list[BaseException] = []
        results: list[T] = []

        def run() -> None:
            try:
                pyroute2_netns.setns(str(_NETNS_DIR / ns), flags=0)  # flags=0: never create
                results.append(fn())
            except BaseException as exc:  # reported by the caller
                errors.append(exc)

        thread = threading.Thread(target=run, name=f"lab-netns-{ns}", daemon=True)
        thread.start()
        thread.join(_STEP_TIMEOUT_S)
        if thread.is_alive():
            raise LabError(f"{what} in {ns}: no answer within {_STEP_TIMEOUT_S:.0f}s")
        if errors:
            raise LabError(f"{what} in {ns}: {errors[0]}") from errors[0]
        return results[0]

    def conntrack_stats(self) -> dict[str, int]:
        """Return the gw's ``conntrack -S`` counters summed over CPUs.

        Note: kernels since 5.x keep ``insert`` at 0; count new flows with
        :meth:`nat_new_flows` instead.
        """
        out = self.run(self.gw, "conntrack", "-S").stdout
        stats: dict[str, int] = {}
        for key, value in re.findall(r"\b([a-z_]+)=(\d+)", out):
            if key != "cpu":
                stats[key] = stats.get(key, 0) + int(value)
        return stats

    def nat_new_flows(self) -> int:
        """Return how many new pod->ext flows the gw has NATed (v4 + v6), per the kernel.

        The nat table sees only the first packet of each new conntrack entry,
        so the packet counters of the MASQUERADE rules count exactly the NEW
        entries a shipper filtering on the pod CIDRs should report.
        """
        total = 0
        tools = ["iptables", "ip6tables"] if self.ipv6 else ["iptables"]
        for tool in tools:
            out = self.run(self.gw, tool, "-w", "-t", "nat", "-L", "POSTROUTING", "-v", "-x",
                           "-n").stdout
            for line in out.splitlines():
                fields = line.split()
                if "MASQUERADE" in fields and fields[0].isdigit():
                    total += int(fields[0])
        return total

    # ------------------------------------------------------------- traffic
    def start_server(self, proto: str = "tcp", port: int = 8080, family: int = 4) -> Server:
        """Start an echo server in the ext namespace and wait (bounded) until it listens."""
        log = self.workdir / f"server-{proto}{family}-{port}.log"
        log.touch()
        proc = self._agent(self.ext, "server", "--proto", proto, "--family", str(family),
                           "--port", str(port), "--log", str(log),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = _readline(proc, 10.0)
        if line != "ready":
            err = _drain_stderr(proc)
            self._stop(proc)
            raise LabError(f"server {proto}/{family} :{port} did not start: {line!r} {err}")
        return Server(proc, log, proto, family, port)

    def _client_argv(self, pod: int, proto: str, family: int, dport: int, sport: int | None,
                     payload: bytes, hold_s: float, wait_go: bool) -> list[str]:
        argv = ["client", "--proto", proto, "--family", str(family), "--dst",
                self.ext_ip(family), "--dport", str(dport), "--sport", str(sport or 0),
                "--payload-hex", payload.hex(), "--hold", str(hold_s)]
        if wait_go:
            argv.append("--wait-go")
        return argv

    def connect(self, pod: int, proto: str = "tcp", family: int = 4, dport: int = 8080,
                sport: int | None = None, payload: bytes = b"hello", hold_s: float = 0.0,
                timeout: float = 10.0) -> int:
        """Open one connection (TCP) or exchange one datagram (UDP) from pod ``pod`` to ext.

        Returns the pod-side source port. With ``hold_s`` 0 the client has
        finished (payload echoed) when this returns; otherwise it keeps the
        connection open for ``hold_s`` more seconds in the background.
        """
        proc = self._agent(self.pod_ns[pod], *self._client_argv(
            pod, proto, family, dport, sport, payload, hold_s, False),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        port = self._await_connected(proc, timeout)
        if hold_s <= 0:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                self._stop(proc)
                raise LabError(f"client in pod {pod} did not finish") from exc
            self._forget(proc)
        return port

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        """Reap a finished process, close its pipes and stop tracking it."""
        self._stop(proc)
        with self._lock, contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def connect_many(self, pods: list[int], sport: int, proto: str = "tcp", family: int = 4,
                     dport: int = 8080, hold_s: float = 2.0, payload: bytes = b"hello",
                     timeout: float = 15.0, payloads: Sequence[bytes] | None = None,
                     stagger_s: float | None = None) -> list[int]:
        """Connect from several pods with the SAME source port at the same moment.

        All clients bind ``sport`` first, then get one "go" together, so their
        conntrack entries exist concurrently and MASQUERADE must rewrite the
        port of all but one. Returns once every client is connected (bounded by
        ``timeout``); the connections stay open for ``hold_s`` seconds. The
        returned list holds each pod's local source port (all ``sport``).
        ``payloads`` (one per pod, optional) replaces ``payload`` per client.

        ``stagger_s`` spaces the "go"s (default 50 ms for UDP, none for TCP).
        Truly simultaneous UDP sends race inside NAT, and the kernel resolves
        such a clash by letting both entries keep the *same* node port (status
        NAT_CLASH, replies go to one pod only); staggering makes MASQUERADE see
        the first entry and pick another port, which is what this helper is for.
        """
        if stagger_s is None:
            stagger_s = 0.05 if proto == "udp" else 0.0
        if payloads is not None and len(payloads) != len(pods):
            raise LabError("connect_many: one payload per pod expected")
        each = list(payloads) if payloads is not None else [payload] * len(pods)
        procs = [self._agent(self.pod_ns[p], *self._client_argv(
            p, proto, family, dport, sport, data, hold_s, True),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for p, data in zip(pods, each, strict=True)]
        deadline = time.monotonic() + timeout
        for p, proc in zip(pods, procs, strict=True):
            line = _readline(proc, max(0.1, deadline - time.monotonic()))
            if line != "ready":
                for q in procs:
                    self._stop(q)
                raise LabError(f"client in pod {p} not ready: {line!r} {_drain_stderr(proc)}")
        for i, proc in enumerate(procs):
            assert proc.stdin is not None
            if i and stagger_s:
                time.sleep(stagger_s)
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        ports = []
        for proc in procs:
            ports.append(self._await_connected(proc, max(0.1, deadline - time.monotonic())))
        return ports

    def _await_connected(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        line = _readline(proc, timeout)
        m = re.fullmatch(r"connected (\d+)", line or "")
        if m is None:
            err = _drain_stderr(proc)
            self._stop(proc)
            raise LabError(f"client failed: {line!r} {err}")
        return int(m.group(1))

    def ping(self, pod: int, family: int = 4, count: int = 1) -> None:
        """Ping the ext host from pod ``pod`` (bounded); raise :class:`LabError` on loss."""
        self.run(self.pod_ns[pod], *_AGENTS, "--parent-pid", "0", "--max-seconds",
                 str(10 + 3 * count), "ping", "--family", str(family), "--dst",
                 self.ext_ip(family), "--count", str(count), "--wait", "2",
                 timeout=10 + 3 * count)

    def start_udp_flood(self, pod: int, rate: float, duration: float, family: int = 4,
                        max_count: int = 10_000_000, sockets: int = 16) -> Flood:
        """Start a sender in pod ``pod`` making one new UDP flow per datagram to ext.

        Each datagram goes to the next destination port (1024-65535), cycling
        through ``sockets`` source ports, at ``rate`` datagrams/s for
        ``duration`` seconds and at most ``max_count`` datagrams.
        """
        proc = self._agent(self.pod_ns[pod], "flood", "--family", str(family), "--dst",
                           self.ext_ip(family), "--rate", str(rate), "--duration",
                           str(duration), "--max-count", str(max_count), "--sockets",
                           str(sockets), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return Flood(proc, duration + 30.0)

    def udp_flood(self, pod: int, rate: float, duration: float, family: int = 4,
                  max_count: int = 10_000_000) -> FloodResult:
        """Run :meth:`start_udp_flood` and wait for it; return what was sent."""
        return self.start_udp_flood(pod, rate, duration, family, max_count).wait()

    # ------------------------------------------------------------- teardown
    def _stop(self, proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
        """SIGTERM the process group, wait ``grace`` s, then SIGKILL; reap; close pipes."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _delete_ns(self, ns: str) -> None:
        """Kill what still runs in ``ns`` (all of it was started through this lab), delete it.

        Deleting the namespace deletes its links; a veth pair goes with either end.
        """
        for pid in pyroute2_netns.ns_pids(str(_NETNS_DIR)).get(ns, []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pyroute2_netns.remove(ns)

    def close(self) -> None:
        """Stop every process, delete every namespace and the work dir. Idempotent, never raises.

        A no-op in any process but the one that built the lab (a forked child).
        """
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._procs = self._procs, []
        for proc in procs:
            with contextlib.suppress(Exception):  # teardown must go on
                self._stop(proc)
        for ns in reversed(self._namespaces):
            with contextlib.suppress(Exception):  # teardown must go on
                if (_NETNS_DIR / ns).exists():
                    self._delete_ns(ns)
        with contextlib.suppress(OSError):
            for f in self.workdir.iterdir():
                f.unlink()
            self.workdir.rmdir()
        atexit.unregister(self.close)

    def __enter__(self) -> Lab:
        """Return the (already built) lab."""
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Tear everything down."""
        self.close()


def _index(ipr: IPRoute, ifname: str) -> int:
    """The interface index of ``ifname`` in ``ipr``'s namespace (LabError if absent)."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"no link {ifname!r} in {ipr.status.get('netns')}")
    return int(found[0])


def _add_addrs(ipr: IPRoute, index: int, addrs: list[tuple[str, int]]) -> None:
    """Add ``(address, prefix length)``s to link ``index``; IPv6 without DAD (``nodad``)."""
    for address, prefixlen in addrs:
        flags = IFA_F_NODAD if ":" in address else 0
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=flags)


def _iter_netns() -> list[Path]:
    try:
        return list(_NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Read one stdout line of ``proc`` within ``timeout`` s; None on timeout or EOF."""
    stream: IO[bytes] | None = proc.stdout
    if stream is None:
        return None
    fd = stream.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    # Byte-wise os.read on the raw fd: no Python-level buffering can hide a line from select().
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        ch = os.read(fd, 1)
        if not ch:
            return None
        buf += ch
    return buf.decode(errors="replace").strip()


def _drain_stderr(proc: subprocess.Popen[bytes]) -> str:
    """Return what ``proc`` wrote to stderr so far (non-blocking, last 500 chars)."""
    stream = proc.stderr
    if stream is None:
        return ""
    fd = stream.fileno()
    chunks = []
    with contextlib.suppress(OSError):
        while select.select([fd], [], [], 0.2)[0]:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")[-500:]
