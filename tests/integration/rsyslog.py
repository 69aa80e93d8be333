"""A real rsyslog (Debian's ``rsyslogd``) as a test's own receiver.

:class:`Rsyslog` writes a self-contained configuration into a private
directory and runs ``rsyslogd -n -f CONF -i PIDFILE`` in the foreground as a
child of the test, so the system configuration (``/etc/rsyslog.conf``) is never
read. It loads only ``imtcp`` or ``imrelp`` (no ``imuxsock``/``imklog``: it does
not take ``/dev/log`` and writes nothing under ``/var/log``), listens on
127.0.0.1 only, routes network input through its own ruleset to an ``omfile``
whose lines are JSON (``option.jsonf``: the parsed RFC 5424 fields, ``msg``
and ``rawmsg``), and puts rsyslog's own messages into ``internal.log`` in the
same directory. It is stopped by its PID (SIGTERM, then SIGKILL).

rsyslog cannot listen on port 0, so :meth:`Rsyslog.start` picks a free port by
binding and releasing one, and retries with another port if rsyslog could not
bind it. A restart keeps the port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

_TEMPLATE = """\
template(name="fields" type="list" option.jsonf="on") {
  property(outname="pri" name="pri" format="jsonf")
  property(outname="timestamp" name="timestamp" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="rawmsg" name="rawmsg" format="jsonf")
  property(outname="input" name="inputname" format="jsonf")
}
"""


def require_rsyslog(*modules: str) -> None:
    """Skip unless rsyslogd and the named modules are installed; in CI (``CI=true``,
    where ``scripts/install.sh --test`` installs them) their absence is a failure."""
    missing = None
    if shutil.which("rsyslogd") is None:
        missing = "rsyslogd not installed (scripts/install.sh --test installs rsyslog)"
    else:
        for m in modules:
            if not any(Path(d, f"{m}.so").exists() for d in (
                    "/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/aarch64-linux-gnu/rsyslog",
                    "/usr/lib/rsyslog", "/usr/lib64/rsyslog")):
                missing = f"rsyslog module {m} not installed"
                break
    if missing is None:
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{missing}: the syslog sink must be tested against real rsyslog in CI")
    pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rsyslog:
    """One rsyslogd receiving on 127.0.0.1 (see the module docstring).

    ``protocol``: ``tcp`` (imtcp), ``tls`` (imtcp with the gtls or ossl driver) or
    ``relp`` (imrelp; ``relp_tls`` for RELP over TLS). ``pki`` is a directory with
    ``ca.crt``, ``server.crt``, ``server.key`` (see ``tests/integration/pki.py``);
    ``require_client_cert`` makes the receiver demand a client certificate signed
    by that CA; ``max_message_size`` is rsyslog's ``maxMessageSize``.
    """

    def __init__(self, workdir: Path, protocol: str, *, pki: Path | None = None,
                 driver: str = "gtls", relp_tls: bool = False,
                 require_client_cert: bool = False, max_message_size: str = "256k") -> None:
        self.dir = workdir
        self.max_message_size = max_message_size
        self.protocol = protocol
        self.pki = pki
        self.driver = driver
        self.relp_tls = relp_tls
        self.require_client_cert = require_client_cert
        self.port = 0
        self.out = workdir / "out.json"
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "work").mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def config(self) -> str:
        """The rsyslog configuration for the current port."""
        d = self.dir
        lines = [
            f'global(workDirectory="{d / "work"}" maxMessageSize="{self.max_message_size}")',
        ]
        tls = self.protocol == "tls" or self.relp_tls
        if tls and self.pki is None:
            raise ValueError("TLS needs pki")
        p = self.pki
        if self.protocol in ("tcp", "tls"):
            if self.protocol == "tls":
                assert p is not None
                lines.append(f'global(DefaultNetstreamDriverCAFile="{p / "ca.crt"}" '
                             f'DefaultNetstreamDriverCertFile="{p / "server.crt"}" '
                             f'DefaultNetstreamDriverKeyFile="{p / "server.key"}")')
                mode = "x509/certvalid" if self.require_client_cert else "anon"
                lines.append(f'module(load="imtcp" StreamDriver.Name="{self.driver}" '
                             f'StreamDriver.Mode="1" StreamDriver.AuthMode="{mode}")')
            else:
                lines.append('module(load="imtcp")')
            lines.append(f'input(type="imtcp" address="127.0.0.1" port="{self.port}" '
                         f'ruleset="net")')
        elif self.protocol == "relp":
            lines.append('module(load="imrelp")')
            opts = ""
            if self.relp_tls:
                assert p is not None
                opts = (f' tls="on" tls.caCert="{p / "ca.crt"}" tls.myCert="{p / "server.crt"}"'
                        f' tls.myPrivKey="{p / "server.key"}"')
                # Without an authMode imrelp wants permitted peers; certvalid accepts any
                # client certificate signed by the CA (and, like every mode, demands one).
                opts += ' tls.authMode="certvalid"'
            lines.append(f'input(type="imrelp" address="127.0.0.1" port="{self.port}" '
                         f'ruleset="net"{opts})')
        else:
            raise ValueError(f"unknown protocol {self.protocol!r}")
        lines.append(_TEMPLATE)
        lines.append(f'ruleset(name="net") {{ action(type="omfile" file="{self.out}" '
                     f'template="fields") }}')
        lines.append(f'action(type="omfile" file="{d / "internal.log"}")')
        return "\n".join(lines) + "\n"

    def start(self, *, keep_port: bool = False, attempts: int = 5) -> Rsyslog:
        """Start rsyslogd and wait until it accepts connections (bounded).

        Picks a new free port unless ``keep_port``; retries on a port collision.
        """
        assert self.proc is None, "already running"
        last = ""
        for _ in range(1 if keep_port else attempts):
            if not keep_port:
                self.port = _free_port()
            conf = self.dir / "rsyslog.conf"
            conf.write_text(self.config())
            log = open(self.dir / "rsyslogd.stderr", "ab")  # noqa: SIM115
            try:
                self.proc = subprocess.Popen(
                    ["rsyslogd", "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
            finally:
                log.close()
            if self._wait_listening(15.0):
                self._check_no_unix_sockets()
                return self
            last = self.stderr()
            self.stop()
        raise RuntimeError(f"rsyslogd did not start listening: {last}")

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            if self._bound():
                return True
            time.sleep(0.02)
        return False

    def _bound(self) -> bool:
        """True once the process owns a listening socket on our port (no test connection:
        a probe would show up in rsyslog's log and, for TLS, as a failed handshake)."""
        assert self.proc is not None
        inodes = self._socket_inodes()
        want = f"0100007F:{self.port:04X}"
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
                f = line.split()
                if f[1] == want and f[3] == "0A" and f[9] in inodes:
                    return True
        return False

    def _socket_inodes(self) -> set[str]:
        assert self.proc is not None
        out = set()
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        out.add(target[8:-1])
        return out

    def _check_no_unix_sockets(self) -> None:
        """rsyslog must not have taken the system log socket (no imuxsock)."""
        inodes = self._socket_inodes()
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[6] in inodes and f[7].startswith("/"):
                self.stop()
                raise RuntimeError(f"rsyslogd bound the unix socket {f[7]}: the test "
                                   "configuration must not load imuxsock")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by PID, wait (bounded), SIGKILL if needed."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to our rsyslogd (by PID); after SIGKILL it is reaped."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start(keep_port=True)

    def stderr(self) -> str:
        """The tail of rsyslogd's own output and internal log (for failure messages)."""
        parts = []
        for name in ("rsyslogd.stderr", "internal.log"):
            f = self.dir / name
            if f.exists():
                parts.append(f.read_text(errors="replace")[-1500:])
        return "\n".join(parts)

    def lines(self) -> list[dict[str, Any]]:
        """Every complete line of the output file, parsed."""
        if not self.out.exists():
            return []
        data = self.out.read_bytes()
        return [orjson.loads(line) for line in data.split(b"\n")[:-1]]

    def wait_lines(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll the output file until it has at least ``n`` lines (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.lines()
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"rsyslog wrote {len(got)} of {n} lines in {timeout}s; "
                                   f"its log: {self.stderr()}")
            time.sleep(0.02)

    def __enter__(self) -> Rsyslog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
