"""Tests for shipper.sources.conntrack parts that need no kernel conntrack (sockets faked
with datagram socket pairs; the kernel behaviour is in
tests/integration/test_reliable_destroy_kernel.py)."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest

from shipper.sources.conntrack import ReliableEventSocket


@pytest.fixture
def pair() -> Iterator[tuple[ReliableEventSocket, socket.socket, socket.socket]]:
    main_r, main_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dest_r, dest_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    main_r.setblocking(False)
    dest_r.setblocking(False)
    rs = ReliableEventSocket(main_r, dest_r)
    yield rs, main_w, dest_w
    rs.close()
    main_w.close()
    dest_w.close()


class TestReliableEventSocket:
    def test_main_socket_is_drained_first(
            self, pair: tuple[ReliableEventSocket, socket.socket, socket.socket]) -> None:
        """Datagrams queued on the NEW/UPDATE socket are read before any DESTROY."""
        rs, main_w, dest_w = pair
        dest_w.send(b"destroy-1")
        main_w.send(b"new-1")
        main_w.send(b"new-2")
        buf = bytearray(64)
        got = []
        for _ in range(3):
            n = rs.recv_into(buf)
            got.append(bytes(buf[:n]))
        assert got == [b"new-1", b"new-2", b"destroy-1"]
        with pytest.raises(BlockingIOError):
            rs.recv_into(buf)

    def test_fileno_polls_readable_for_either_socket(
            self, pair: tuple[ReliableEventSocket, socket.socket, socket.socket]) -> None:
        """The descriptor the event loop polls is readable when only the DESTROY socket has
        data, and not readable when both are empty."""
        rs, _main_w, dest_w = pair
        p = select.poll()
        p.register(rs.fileno(), select.POLLIN)
        assert p.poll(0) == []
        dest_w.send(b"destroy")
        assert p.poll(1000)
        rs.recv_into(bytearray(16))
        assert p.poll(0) == []

    def test_setsockopt_applies_to_both(
            self, pair: tuple[ReliableEventSocket, socket.socket, socket.socket]) -> None:
        """Socket options (the BPF filter) are set on both sockets."""
        rs, _m, _d = pair
        rs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert rs.main.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == \
            rs.destroy.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert rs.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 65536


class TestProtocolConstants:
    def test_written_out_constants_match_pyroute2(self) -> None:
        """The netlink numbers the source writes out (so the shipper need not import
        pyroute2) equal pyroute2's, the independent reference."""
        import pyroute2.netlink as nl
        from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
        from pyroute2.netlink.nfnetlink import nfctsocket as ct

        from shipper.sources import conntrack, decode

        ours = {
            "NETLINK_NETFILTER": conntrack.NETLINK_NETFILTER,
            "NLM_F_REQUEST": conntrack.NLM_F_REQUEST,
            "NLM_F_DUMP": conntrack.NLM_F_DUMP,
            "SOL_NETLINK": conntrack.SOL_NETLINK,
            "NETLINK_ADD_MEMBERSHIP": conntrack.NETLINK_ADD_MEMBERSHIP,
            "NETLINK_BROADCAST_ERROR": conntrack.NETLINK_BROADCAST_ERROR,
            "NETLINK_NO_ENOBUFS": conntrack.NETLINK_NO_ENOBUFS,
            "IPS_SRC_NAT": conntrack.IPS_SRC_NAT,
            "CTA_STATUS_MASK": conntrack.CTA_STATUS_MASK,
            "NFNL_SUBSYS_CTNETLINK": decode.NFNL_SUBSYS_CTNETLINK,
            "IPCTNL_MSG_CT_GET": decode.IPCTNL_MSG_CT_GET,
        }
        attrs = [name for name, _ in ct.nfct_msg.nla_map]
        reference = {
            "NETLINK_NETFILTER": nl.NETLINK_NETFILTER,
            "NLM_F_REQUEST": nl.NLM_F_REQUEST,
            "NLM_F_DUMP": nl.NLM_F_DUMP,
            "SOL_NETLINK": nl.SOL_NETLINK,
            "NETLINK_ADD_MEMBERSHIP": nl.NETLINK_ADD_MEMBERSHIP,
            "NETLINK_BROADCAST_ERROR": nl.NETLINK_BROADCAST_ERROR,
            "NETLINK_NO_ENOBUFS": nl.NETLINK_NO_ENOBUFS,
            "IPS_SRC_NAT": ct.IPS_SRC_NAT,
            "CTA_STATUS_MASK": attrs.index("CTA_STATUS_MASK"),
            "NFNL_SUBSYS_CTNETLINK": NFNL_SUBSYS_CTNETLINK,
            "IPCTNL_MSG_CT_GET": ct.IPCTNL_MSG_CT_GET,
        }
        assert ours == reference
