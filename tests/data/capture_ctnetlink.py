"""Regenerate ``ctnetlink_messages.json``: real conntrack messages from this kernel.

Run as root: ``python3 tests/data/capture_ctnetlink.py``. It builds a lab
(gateway with MASQUERADE, pods, an external host), subscribes to every event
group in the gateway, makes TCP, UDP, ICMP, ICMPv6, SCTP and raw-protocol
(253) flows over IPv4 and IPv6, with accounting and timestamps off and on,
flushes the table (DESTROY events) and also dumps it, then writes every
message with a label. The decoder tests replay these bytes through our
decoder and through pyroute2's, so the two are compared on what the kernel
really sends.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shipper.lab import Lab
from shipper.sources import conntrack
from shipper.sources.decode import LayoutDecoder

RAW = r"""
import socket, sys
fam = socket.AF_INET if sys.argv[1] == "4" else socket.AF_INET6
proto, dst = int(sys.argv[2]), sys.argv[3]
s = socket.socket(fam, socket.SOCK_RAW, proto)
if proto == 132:  # SCTP INIT: common header + INIT chunk (checksum not checked: sysctl off)
    import struct
    chunk = struct.pack(">BBHIIHHI", 1, 0, 20, 0x1234, 65535, 1, 1, 0x42)
    pkt = struct.pack(">HHII", 40000, 7777, 0, 0) + chunk
else:
    pkt = b"flowlog-raw"
s.sendto(pkt, (dst, 0))
"""


def main() -> None:
    out: list[dict[str, str]] = []
    with Lab(pods=2) as lab:
        gw = lab.gw
        lab.set_sysctl(gw, "net.netfilter.nf_conntrack_checksum", "0")
        sock = conntrack.open_event_socket(gw, ["new", "update", "destroy"], 8 << 20)
        buf = bytearray(1 << 16)

        def drain(label: str) -> None:
            time.sleep(0.3)
            while True:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    return
                out.append({"label": label, "hex": bytes(buf[:n]).hex()})

        srv4 = lab.start_server("tcp", 8080, 4)
        srv6 = lab.start_server("tcp", 8080, 6)
        usrv = lab.start_server("udp", 9000, 4)
        for acct in (0, 1):
            conntrack.set_sysctls(gw, {"events": 1, "acct": acct, "timestamp": acct})
            tag = "acct+ts" if acct else "plain"
            lab.connect(0, "tcp", 4, 8080)
            lab.connect(1, "tcp", 6, 8080)
            lab.connect(0, "udp", 4, 9000)
            lab.connect(1, "udp", 6, 9000)
            lab.ping(0, 4)
            lab.ping(1, 6)
            for fam, dst in ((4, lab.ext_ip4), (6, lab.ext_ip6)):
                for proto in (132, 253):
                    lab.run(lab.pod_ns[0], sys.executable, "-c", RAW, str(fam), str(proto), dst)
            drain(f"events/{tag}")
            if acct:
                dec = LayoutDecoder()
                n_before = len(out)
                # Dump through the real code path, but keep the raw bytes: re-dump raw.
                raw = _raw_dump(gw)
                out.extend({"label": "dump/acct+ts", "hex": h} for h in raw)
                assert len(list(conntrack.dump_table(gw, dec))) >= len(out) - n_before - 1
            lab.run(gw, "conntrack", "-F", check=False)
            drain(f"destroy/{tag}")
        srv4.seen(), srv6.seen(), usrv.seen()
        sock.close()
    path = Path(__file__).with_name("ctnetlink_messages.json")
    path.write_text(json.dumps(out, indent=0) + "\n")
    print(f"wrote {len(out)} messages to {path}")


def _raw_dump(netns: str) -> list[str]:
    """The dump's flow messages as hex (one per entry)."""
    import socket

    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST

    def mk() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
        s.bind((0, 0))
        return s

    s = conntrack.in_netns(netns, mk)
    req = (20).to_bytes(4, "little") + (0x101).to_bytes(2, "little")
    req += (NLM_F_REQUEST | NLM_F_DUMP).to_bytes(2, "little") + (1).to_bytes(4, "little")
    req += bytes(4) + bytes(4)
    s.sendto(req, (0, 0))
    msgs: list[str] = []
    while True:
        data = s.recv(1 << 20)
        off = 0
        while off < len(data):
            ln = int.from_bytes(data[off:off + 4], "little")
            ty = int.from_bytes(data[off + 4:off + 6], "little")
            if ty == 3:
                s.close()
                return msgs
            msgs.append(data[off:off + ln].hex())
            off += (ln + 3) & ~3


if __name__ == "__main__":
    main()
