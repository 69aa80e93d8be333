"""bench/bench_events.py: counting each listener's output, finding its event socket, the
table. Not timed: the fixtures are real outputs captured in the lab (conntrack-tools
1.4.7, ulogd 2.0.8 NFCT -> IP2STR -> JSON, kernel 6.18), the numbers are made up."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "bench_events"
PODS = ["10.244.0.0/24", "fd00:10:244::/64"]
EXT = ["198.51.100.0/24", "2001:db8:100::/64"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_events",
                                                  REPO / "bench" / "bench_events.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_events"] = module
    spec.loader.exec_module(module)
    return module


# Captured in a lab gateway namespace while conntrack -E -b 8388608 ran (two sockets: the
# buffer went to the one without groups; the event socket, groups 0x5, kept the default).
PROC_NET_NETLINK = """\
sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
00000000dcba2b11 0   0          00000000 0        0        0     2        0        965049
00000000b1392953 4   0          00000000 0        0        0     2        0        965055
000000000bf654e9 12  0          00000000 0        0        0     2        0        965056
0000000091d3df69 12  6172       00000000 0        0        0     2        0        965111
0000000063737739 12  3693530148 00000005 0        0        0     2        32       965112
"""
SS_NETLINK = """\
Recv-Q Send-Q Local Address:Port           Peer Address:PortProcess
0      0               rtnl:kernel                     *     \t skmem:(r0,rb212992,t0,tb212992,f0,w0,o0,bl0,d0)
0      0                nft:kernel                     *     \t skmem:(r0,rb212992,t0,tb212992,f0,w0,o0,bl0,d0)
0      0                nft:conntrack/6172             *     \t skmem:(r0,rb16777216,t0,tb212992,f0,w0,o0,bl0,d0)
0      0                nft:-601437148                 *     \t skmem:(r0,rb212992,t0,tb212992,f0,w0,o0,bl0,d0)
"""  # noqa: E501 - ss's own lines


class TestCounting:
    def test_conntrack_lines_count_pod_to_ext_new_and_destroy_only(self, bench: ModuleType) -> None:
        """conntrack -E lines: NEW and DESTROY of pod->ext flows (v4 and v6) are counted;
        the gateway's own IGMP entry (source in the pod CIDR, not to ext) is not."""
        lines = (DATA / "conntrack-E.txt").read_bytes().splitlines(keepends=True)
        assert bench.count_conntrack_lines(lines, PODS, EXT) == (5, 2)

    def test_ulogd_json_counts_by_ct_event_and_skips_torn_lines(self, bench: ModuleType) -> None:
        """ulogd JSON lines: ct.event 1 is NEW, 4 is DESTROY, for pod->ext flows (v4 and v6);
        the gateway's IGMP entry and a torn last line are not counted."""
        lines = (DATA / "ulogd-nfct.json").read_bytes().splitlines(keepends=True)
        assert bench.count_ulogd_json(lines, PODS, EXT) == (3, 2)

    def test_table_listing_counts_entries_left(self, bench: ModuleType) -> None:
        """conntrack -L entries still in the table count when pod->ext, not otherwise."""
        listing = [
            "udp      17 0 src=10.244.0.10 dst=198.51.100.2 sport=1 dport=2 [UNREPLIED] "
            "src=198.51.100.2 dst=198.51.100.1 sport=2 dport=1 mark=0 use=1",
            "udp      17 0 src=198.51.100.1 dst=198.51.100.2 sport=1 dport=2 [UNREPLIED] "
            "src=198.51.100.2 dst=198.51.100.1 sport=2 dport=1 mark=0 use=1",
        ]
        assert bench.count_table_entries(listing, PODS, EXT) == 1


    def test_shipper_records_counted_once_per_event_id(self, bench: ModuleType,
                                                       tmp_path: Path) -> None:
        """Shipper output (the file and its rotated files): NEW and DESTROY records are
        counted by action, a record whose event.id was already seen counts as a duplicate,
        not as seen; other records (gap) are not counted."""
        import json

        import orjson

        from shipper.ecs import gap_record
        from shipper.ecs_json import JsonLineEncoder
        from shipper.sources.decode import LayoutDecoder

        msgs = json.loads((REPO / "tests" / "data" / "ctnetlink_messages.json").read_text())
        dec, enc = LayoutDecoder(), JsonLineEncoder("node-1")
        lines = []
        for m in msgs:
            raw = bytes.fromhex(m["hex"])
            ev, _ = dec.decode(raw, 0, 1_800_000_000_000_000_000)
            if ev is not None and ev.action in ("new", "destroy"):
                lines.append((ev.action, enc.encode(ev, None, None)))
        n_new = sum(a == "new" for a, _ in lines)
        n_destroy = len(lines) - n_new
        assert n_new and n_destroy
        gap = orjson.dumps(gap_record("node-1", since_ns=1, until_ns=2, lost=3, overruns=1,
                                      resync=False)) + b"\n"  # as the file sink writes it
        out = tmp_path / "flows.json"
        (tmp_path / "flows.json.1").write_bytes(b"".join(line for _, line in lines[:5]) + gap)
        out.write_bytes(b"".join(line for _, line in lines[3:]))  # 2 shipped twice
        got = bench.count_shipper_records(out)
        assert (got.new, got.destroy, got.duplicates) == (n_new, n_destroy, 2)
        assert got.gaps == bench.GapRecords(count=1, lost=3, lost_unknown=0)

    def test_gap_text_says_whether_the_gaps_account_for_every_missing_event(
            self, bench: ModuleType) -> None:
        """The run line compares the gap records' lost events with kernel minus seen."""
        r = bench.ListenerRun(row="new", listener="shipper", events=["new"], rate=1.0,
                              duration=1.0, kernel_new=100, seen_new=60,
                              gaps=bench.GapRecords(count=2, lost=40))
        assert bench._gap_text(r) == "  gaps 2: lost 40 = missing"
        r.gaps = bench.GapRecords(count=2, lost=30, lost_unknown=1)
        assert bench._gap_text(r) == "  gaps 2: lost 30 (+1 unknown), missing 40"
        r.seen_new, r.gaps = 100, bench.GapRecords()
        assert bench._gap_text(r) == ""  # nothing lost, nothing to say
        r.seen_new, r.gaps = 60, None
        assert bench._gap_text(r) == ""  # not the shipper: no gap records to compare


class TestEventSockets:
    def test_event_socket_is_the_one_with_groups(self, bench: ModuleType) -> None:
        """Of conntrack's two netfilter sockets, only the subscribed one (groups != 0) is
        its event socket: its signed portid and its kernel drop count."""
        socks = bench.netlink_event_sockets([PROC_NET_NETLINK], {965111, 965112})
        assert socks == {-601437148: 32}

    def test_event_socket_of_another_process_is_ignored(self, bench: ModuleType) -> None:
        """A socket whose inode the listener does not hold is not the listener's."""
        assert bench.netlink_event_sockets([PROC_NET_NETLINK], {965111}) == {}

    def test_ss_buffers_by_portid(self, bench: ModuleType) -> None:
        """ss -m: rb per netfilter portid, named (comm/pid) or bare (negative)."""
        rbs = bench.ss_receive_buffers(SS_NETLINK)
        assert rbs[6172] == 16777216
        assert rbs[-601437148] == 212992


class TestConfigs:
    def test_ulogd_event_mask_and_fixed_buffer(self, bench: ModuleType, tmp_path: Path) -> None:
        """ulogd's NFCT gets NEW only as event_mask 1, NEW+DESTROY as 5, no hash table (one
        line per event), and a max buffer one byte above the buffer so it never grows."""
        new = bench.ulogd_config(tmp_path, tmp_path / "log", tmp_path / "out", ["new"], 8388608,
                                 False)
        both = bench.ulogd_config(tmp_path, tmp_path / "log", tmp_path / "out",
                                  ["new", "destroy"], 8388608, False)
        assert "event_mask=1\n" in new and "event_mask=5\n" in both
        assert "hash_enable=0\n" in new
        assert "netlink_socket_buffer_size=8388608\n" in new
        assert "netlink_socket_buffer_maxsize=8388609\n" in new

    def test_shipper_config_sets_workers_only_for_the_workers_row(self,
                                                                   bench: ModuleType) -> None:
        """The shipper's YAML names conntrack.workers only when asked."""
        assert "workers" not in bench.shipper_config(1 << 23, ["new"], None)
        assert "  workers: 2\n" in bench.shipper_config(1 << 23, ["new", "destroy"], 2)


def _table(bench: ModuleType) -> object:
    machine = {"cpu": "AMD EPYC", "cores": "2", "kernel": "6.18", "python": "CPython 3.11.7",
               "conntrack": "conntrack v1.4.7", "ulogd": "ulogd Version 2.0.8",
               "shipper": "abc1234", "loadavg_start": "0.1 0.1 0.1"}
    t = bench.Table(rate=20000, machine=machine, load="test load")
    ev = ["new", "destroy"]
    t.runs = [
        bench.ListenerRun(row="new+destroy", listener="conntrack", events=ev, rate=20000,
                          duration=10, kernel_new=1000, kernel_destroy=1000, seen_new=1000,
                          seen_destroy=1000, loss=0.0, cpu_s=0.02, us_per_event=10.0),
        bench.ListenerRun(row="new+destroy", listener="shipper", events=ev, rate=20000,
                          duration=10, kernel_new=1000, kernel_destroy=1000, seen_new=1000,
                          seen_destroy=990, loss=0.005, cpu_s=0.03, us_per_event=15.0),
        bench.ListenerRun(row="workers", listener="shipper", events=ev, rate=20000, duration=10,
                          workers=2, rejected="conntrack.workers: extra inputs are not permitted",
                          error="the shipper rejected the config"),
    ]
    return t


class TestTable:
    def test_ratio_is_shipper_over_conntrack(self, bench: ModuleType) -> None:
        """The NEW+DESTROY row: loss and µs/event per listener and the µs ratio."""
        rows = {r[0]: r for r in bench.table_rows(_table(bench))}
        row = rows["NEW+DESTROY, 20k/s"]
        assert row[1] == "0.00 %, 10.0 µs/event"
        assert row[2] == "not run"
        assert row[3] == "0.50 %, 15.0 µs/event"
        assert row[4] == "1.50"

    def test_rejected_workers_config_is_said_not_measured(self, bench: ModuleType) -> None:
        """A shipper that rejects conntrack.workers gives a row saying so, no numbers and
        no ratio, and the run counts as failed."""
        t = _table(bench)
        row = next(r for r in bench.table_rows(t) if r[0].startswith("N=2 workers"))
        assert row[3].startswith("rejected the config (conntrack.workers")
        assert row[4] == "-"
        assert bench.failed(t)
        assert "| row |" in bench.format_table(t)


class TestRcvbufShim:
    """The LD_PRELOAD shim that gives conntrack -E's event socket the asked buffer."""

    def test_socket_bound_with_groups_gets_the_buffer(self, bench: ModuleType,
                                                      tmp_path: Path) -> None:
        """Under the shim a netlink socket that binds with multicast groups gets
        SO_RCVBUFFORCE of FLOWLOG_BENCH_RCVBUF bytes (the kernel reports twice that); one
        bound without groups keeps the default."""
        import os
        import shutil
        import subprocess

        if shutil.which("gcc") is None:
            pytest.skip("gcc is not installed")
        if os.geteuid() != 0:
            pytest.skip("SO_RCVBUFFORCE needs CAP_NET_ADMIN")
        lib = bench.rcvbuf_shim(tmp_path)
        assert lib is not None
        probe = (
            "import socket\n"
            "def rb(groups):\n"
            "    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)\n"
            "    s.bind((0, groups))\n"
            "    v = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)\n"
            "    s.close()\n"
            "    return v\n"
            "print(rb(1), rb(0))\n"
        )
        env = dict(os.environ, LD_PRELOAD=str(lib), FLOWLOG_BENCH_RCVBUF=str(3 << 20))
        res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, timeout=30, check=True)
        with_groups, without = (int(x) for x in res.stdout.split())
        assert with_groups == 2 * (3 << 20)
        assert without != with_groups


class TestPinning:
    """--pin: the load on one CPU, the listener (every thread, every process) on the rest."""

    def test_split_puts_the_load_on_the_first_cpu(self, bench: ModuleType) -> None:
        import os

        cpus = sorted(os.sched_getaffinity(0))
        split = bench.cpu_split(True)
        if len(cpus) < 2:
            assert split is None
            return
        assert split == ({cpus[0]}, set(cpus[1:]))
        assert bench.cpu_split(False) is None

    def test_every_thread_of_the_tree_is_bound(self, bench: ModuleType) -> None:
        """A child with a second thread, and its own child: all threads of both get the
        CPU set, and the bench's own affinity is untouched."""
        import os
        import subprocess

        cpu = min(os.sched_getaffinity(0))
        mine = os.sched_getaffinity(0)
        code = ("import subprocess, sys, threading, time\n"
                "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
                "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
                "print(c.pid, flush=True)\n"
                "time.sleep(30)\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            assert proc.stdout is not None
            grandchild = int(proc.stdout.readline())
            tids = [(p, int(t)) for p in (proc.pid, grandchild)
                    for t in os.listdir(f"/proc/{p}/task")]
            assert len(tids) >= 3  # the child's two threads and the grandchild
            assert bench.pin_tree(proc.pid, {cpu}) == len(tids)
            for _, tid in tids:
                assert os.sched_getaffinity(tid) == {cpu}
            assert os.sched_getaffinity(0) == mine
        finally:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
