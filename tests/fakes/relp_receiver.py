"""A RELP server on 127.0.0.1 (port 0) that answers byte for byte like rsyslog's imrelp.

Profile: rsyslog 8.2302 with librelp 1.11 (Debian 12), captured from the real
server here:

* open  -> ``1 rsp 93 200 OK\\nrelp_version=0\\nrelp_software=librelp,1.11.0,
  http://librelp.adiscon.com\\ncommands=syslog\\n``
* syslog -> ``N rsp 6 200 OK\\n``
* close -> ``N rsp 0\\n`` followed by the hint ``0 serverclose 0\\n``

For the tests that need a misbehaving server it can, per connection, stop after
acking ``ack_then_close`` messages (sending ``0 serverclose 0`` and closing, as
imrelp does on shutdown) or answer message number ``reject_at`` with ``500 command disabled``
(what librelp's ``scsyslog.c`` sends when the command is not enabled).
The real tests against rsyslog itself are in ``tests/integration``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

from shipper.sinks.relp import FrameReader, RelpError, build_frame

OPEN_RSP = (b"200 OK\nrelp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\n"
            b"commands=syslog")


@dataclass
class Plan:
    """What one connection does; ``None`` means behave like rsyslog."""

    ack_then_close: int | None = None
    reject_at: int | None = None


@dataclass
class RelpReceiver:
    """Accepts connections in a thread; ``messages`` holds every syslog payload received
    (in order, across connections), ``acked`` those answered with 200."""

    plans: list[Plan] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    acked: list[bytes] = field(default_factory=list)
    opens: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lsock = socket.socket()
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(8)
        self._lsock.settimeout(0.1)
        self._address = f"127.0.0.1:{self._lsock.getsockname()[1]}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return self._address

    def close(self) -> None:
        """Stop accepting and join the thread."""
        self._stop.set()
        self._thread.join(5)
        self._lsock.close()

    def wait_acked(self, n: int, timeout: float = 10.0) -> None:
        """Poll until ``n`` messages were acked (bounded)."""
        deadline = time.monotonic() + timeout
        while len(self.acked) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.acked)} of {n} acked")
            time.sleep(0.01)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            plan = self.plans.pop(0) if self.plans else Plan()
            threading.Thread(target=self._serve, args=(conn, plan), daemon=True).start()

    def _serve(self, sock: socket.socket, plan: Plan) -> None:
        reader = FrameReader()
        n = 0
        sock.settimeout(0.1)
        try:
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                reader.feed(data)
                while (frame := reader.next()) is not None:
                    if frame.command == b"open":
                        self.opens.append(frame.data)
                        sock.sendall(build_frame(frame.txnr, b"rsp", OPEN_RSP))
                    elif frame.command == b"close":
                        sock.sendall(build_frame(frame.txnr, b"rsp") + b"0 serverclose 0\n")
                        return
                    elif frame.command == b"syslog":
                        n += 1
                        with self._lock:
                            self.messages.append(frame.data)
                        if plan.reject_at == n:
                            sock.sendall(build_frame(frame.txnr, b"rsp",
                                                     b"500 command disabled"))
                            continue
                        if plan.ack_then_close is not None and n > plan.ack_then_close:
                            sock.sendall(b"0 serverclose 0\n")
                            return
                        sock.sendall(build_frame(frame.txnr, b"rsp", b"200 OK"))
                        with self._lock:
                            self.acked.append(frame.data)
        except (OSError, RelpError) as exc:
            self.errors.append(str(exc))
        finally:
            with contextlib.suppress(OSError):
                sock.close()
