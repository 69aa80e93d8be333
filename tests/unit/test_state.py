"""The state file: pod history saved and restored across restarts."""

from __future__ import annotations

import ipaddress
import os
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from shipper import ecs
from shipper.config import Config
from shipper.enrich.pod_index import PodIndex
from shipper.enrich.state import (
    _HEADER,
    FILE_NAME,
    FORMAT_VERSION,
    MAGIC,
    StateFile,
    StateSaver,
)
from shipper.metrics import Metrics
from shipper.record import (
    ACTION_DESTROY,
    ATTR_RESOLVED,
    ATTR_UNCERTAIN,
    ATTR_UNRESOLVED,
    IP_SOURCE_BOTH,
    IP_SOURCE_STATUS,
    FlowEvent,
    PodMeta,
    PodTombstone,
    ip_key,
)

S = 1_000_000_000
T = 1_795_766_400 * S
A4, A6 = "10.16.0.5", "fd00:10:16::5"
LABELS = {"app": "checkout", "pod-template-hash": "7d9f8b6c5d"}


def ipi(text: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(text)
    return addr.version, int(addr)


def pod(uid: str, *addrs: str, created: int | None = None, **over: Any) -> PodMeta:
    fields: dict[str, Any] = {
        "namespace": "shop", "name": f"pod-{uid}", "uid": uid,
        "ips": tuple(ipi(a) for a in addrs), "node": "node-a", "labels": dict(LABELS),
        "owner_kind": "Deployment", "owner_name": "checkout", "logical_switch": "ovn-default",
        "phase": "Running", "created_ns": created,
    }
    fields.update(over)
    return PodMeta(**fields).with_record_object()


def late_destroy(fam: int, ip: int, start: int) -> FlowEvent:
    """A DESTROY, read an hour after ``start``, of a UDP flow from ``ip`` that began then."""
    return FlowEvent(
        action=ACTION_DESTROY, family=fam, proto=17, orig_src=ip, orig_dst=ip + 1,
        orig_sport=1000, orig_dport=53, reply_src=ip + 1, reply_dst=ip, reply_sport=53,
        reply_dport=1000, icmp_type=None, icmp_code=None, icmp_id=None, ct_id=5, status=None,
        tcp_state=None, mark=None, zone=None, timeout=None, orig_packets=1, orig_bytes=70,
        reply_packets=1, reply_bytes=110, ts_start=start, ts_stop=start + S, ts_event=None,
        received_ns=start + 3600 * S)


def who(index: PodIndex, addr: str, t: int) -> tuple[str | None, str]:
    meta, status = index.attribute(*ipi(addr), t)
    return (None if meta is None else meta.uid), status


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def state(tmp_path: Path, metrics: Metrics, node: str = "node-a") -> StateFile:
    return StateFile(tmp_path / "state", node, metrics)


def saved_index() -> PodIndex:
    """Pod a (v4+v6) deleted at T+100 s, b took its addresses at T+200 s and is live."""
    idx = PodIndex(skew_ns=5 * S)
    idx.update(pod("a", A4, A6, created=T), T)
    idx.delete("a", T + 100 * S)
    idx.update(pod("b", A4, A6, created=T + 200 * S), T + 200 * S)
    idx.update(pod("c", "10.16.0.9", created=T, labels={"x": "y"}, annotations={"k": "v"},
                   owner_kind=None, owner_name=None, node=None, logical_switch=None), T)
    return idx


class TestRoundTrip:
    def test_history_and_live_pods_come_back_equal(self, tmp_path: Path, metrics: Metrics) -> None:
        """A saved index restores to the same histories, live pods and attributions."""
        old = saved_index()
        sf = state(tmp_path, metrics)
        assert sf.save(old, T + 300 * S)
        new = PodIndex(skew_ns=5 * S)
        assert sf.load(new, T + 400 * S)
        for addr in (A4, A6, "10.16.0.9"):
            assert new.history(*ipi(addr)) == old.history(*ipi(addr))
        assert new.live_pods() == 2 and new.tombstones() == 2
        assert who(new, A4, T + 50 * S) == ("a", ATTR_RESOLVED)
        assert who(new, A6, T + 250 * S) == ("b", ATTR_RESOLVED)
        assert who(new, A4, T + 150 * S) == (None, ATTR_UNRESOLVED)
        assert metrics.value("shipper_state_saves_total", "ok") == 1
        assert metrics.value("shipper_state_bytes") == (tmp_path / "state" / FILE_NAME).stat(
            ).st_size

    def test_restored_pods_share_objects(self, tmp_path: Path, metrics: Metrics) -> None:
        """One PodMeta per pod for all its addresses, one labels dict for equal labels, and
        record objects ready (kubernetes_by_ip) for every address."""
        sf = state(tmp_path, metrics)
        sf.save(saved_index(), T + 300 * S)
        new = PodIndex()
        sf.load(new, T + 300 * S)
        a4 = new.history(*ipi(A4))[0][2]
        a6 = new.history(*ipi(A6))[0][2]
        b4 = new.history(*ipi(A4))[1][2]
        assert a4 is a6
        assert a4.labels is b4.labels
        assert set(a4.kubernetes_by_ip) == {ip_key(*ipi(A4)), ip_key(*ipi(A6))}
        assert a4.kubernetes_by_ip[ip_key(*ipi(A6))]["pod"]["ip"] == A6
        assert new.history(*ipi("10.16.0.9"))[0][2].annotations == {"k": "v"}
        for addr in (A4, A6, "10.16.0.9"):
            for _, _, meta in new.history(*ipi(addr)):
                # The record objects are exactly what with_record_object builds.
                assert meta.kubernetes_by_ip == meta.with_record_object().kubernetes_by_ip
                assert list(meta.kubernetes_by_ip[ip_key(*ipi(addr))]) == list(
                    meta.with_record_object().kubernetes_by_ip[ip_key(*ipi(addr))])

    def test_tombstones_come_back_as_tombstones(self, tmp_path: Path, metrics: Metrics) -> None:
        """Deleted pods are restored as the tombstones the index kept (equal, one per pod for
        all its addresses), live pods as PodMeta."""
        sf = state(tmp_path, metrics)
        old = saved_index()
        sf.save(old, T + 300 * S)
        new = PodIndex()
        sf.load(new, T + 300 * S)
        a4, b4 = (m for _, _, m in new.history(*ipi(A4)))
        assert isinstance(a4, PodTombstone) and a4 is new.history(*ipi(A6))[0][2]
        assert a4 == old.history(*ipi(A4))[0][2]
        assert type(b4) is PodMeta

    def test_late_records_identical_after_restart(
        self, tmp_path: Path, metrics: Metrics
    ) -> None:
        """A late DESTROY of a deleted pod's flow (and a live pod's flow) gives byte for byte
        the record it gave before the restart, ip_source included."""
        idx = PodIndex()
        sources = (IP_SOURCE_STATUS, IP_SOURCE_BOTH)
        idx.update(pod("a", A4, A6, created=T, ip_sources=sources,
                       annotations={"k": "v"}), T)
        idx.delete("a", T + 100 * S)
        idx.update(pod("b", A4, A6, created=T + 200 * S, ip_sources=sources),
                   T + 200 * S)

        def records(index: PodIndex) -> list[bytes]:
            out = []
            for addr, t in ((A4, T + 50 * S), (A6, T + 50 * S), (A6, T + 250 * S)):
                fam, ip = ipi(addr)
                ev = late_destroy(fam, ip, t)
                out.append(orjson.dumps(ecs.build_record(ev, index.lookup(fam, ip, t), "n")))
            return out

        before = records(idx)
        assert b'"ip_source":"kube-ovn+status"' in before[1]
        sf = state(tmp_path, metrics)
        sf.save(idx, T + 300 * S)
        new = PodIndex()
        sf.load(new, T + 300 * S)
        assert records(new) == before

    def test_file_written_before_ip_sources_still_loads(
        self, tmp_path: Path, metrics: Metrics
    ) -> None:
        """A file as shippers wrote it before ip_sources were saved (no source_sets or
        pod_sources, "live" after "pods") loads: pods without ip_sources, deleted ones as
        tombstones."""
        import zlib

        sf = state(tmp_path, metrics)
        idx = PodIndex()
        idx.update(pod("a", A4, created=T, ip_sources=(IP_SOURCE_STATUS,)), T)
        idx.delete("a", T + 5 * S)
        idx.update(pod("b", A4, created=T + 6 * S, ip_sources=(IP_SOURCE_STATUS,)), T + 6 * S)
        sf.save(idx, T + 10 * S)
        path = tmp_path / "state" / FILE_NAME
        doc = msgpack.unpackb(path.read_bytes()[_HEADER.size:], raw=False)
        assert doc.pop("source_sets") and doc.pop("pod_sources") == [1, 1]
        assert doc.pop("handovers") == []  # added later too; nothing was missed here
        old_order = ("node", "written_ns", "strings", "maps", "pods", "live", "addrs")
        assert sorted(doc) == sorted(old_order)
        payload = msgpack.packb({k: doc[k] for k in old_order}, use_bin_type=True)
        path.write_bytes(_HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload))
                         + payload)
        new = PodIndex()
        assert sf.load(new, T + 10 * S)
        a, b = (m for _, _, m in new.history(*ipi(A4)))
        assert a == PodTombstone(pod("a", A4)) and a.ip_sources == ()
        assert b == pod("b", A4, created=T + 6 * S) and b.ip_sources == ()
        assert who(new, A4, T + S) == ("a", ATTR_RESOLVED)

    def test_no_temp_file_left_and_private_mode(self, tmp_path: Path, metrics: Metrics) -> None:
        """After a save only the state file exists in the directory, readable by root only."""
        sf = state(tmp_path, metrics)
        sf.save(saved_index(), T)
        sf.save(saved_index(), T + S)
        assert os.listdir(tmp_path / "state") == [FILE_NAME]
        assert (tmp_path / "state" / FILE_NAME).stat().st_mode & 0o777 == 0o600


def missed_deletion_index() -> PodIndex:
    """a (v4+v6, created T) whose deletion was never seen; b (created T+100 s) took its
    addresses, learnt at T+1000 s: the second after b's creation is a handover window."""
    idx = PodIndex(skew_ns=5 * S)
    idx.update(pod("a", A4, A6, created=T), T)
    idx.update(pod("b", A4, A6, created=T + 100 * S), T + 1000 * S)
    return idx


class TestHandovers:
    """The uncertain second of a missed deletion stays uncertain across a restart."""

    def test_window_survives_a_restart(self, tmp_path: Path, metrics: Metrics) -> None:
        """Before and after the restart: a flow in the window is uncertain (a, not claimed
        as resolved), one on either side of it resolved to its owner."""
        idx = missed_deletion_index()
        sf = state(tmp_path, metrics)
        sf.save(idx, T + 1001 * S)
        new = PodIndex(skew_ns=5 * S)
        assert sf.load(new, T + 1002 * S)
        for index in (idx, new):
            for addr in (A4, A6):
                assert who(index, addr, T + 99 * S) == ("a", ATTR_RESOLVED)
                assert who(index, addr, T + 100 * S + S // 2) == ("a", ATTR_UNCERTAIN)
                assert who(index, addr, T + 102 * S) == ("b", ATTR_RESOLVED)
        assert new.snapshot()[2] == idx.snapshot()[2]

    def test_windows_past_retention_are_not_written(self, tmp_path: Path,
                                                    metrics: Metrics) -> None:
        """A window older than the retention is left out of the file (its tombstone too)."""
        idx = missed_deletion_index()
        sf = state(tmp_path, metrics)
        sf.save(idx, T + 6 * 24 * 3600 * S)  # past the 5-day retention
        doc = msgpack.unpackb((tmp_path / "state" / FILE_NAME).read_bytes()[_HEADER.size:],
                              raw=False)
        assert doc["handovers"] == []

    def test_file_without_windows_loads_without_them(self, tmp_path: Path,
                                                     metrics: Metrics) -> None:
        """A file written before the windows were saved loads; the second after b's
        creation then looks like a plain handover (resolved), as it did before."""
        import zlib

        sf = state(tmp_path, metrics)
        sf.save(missed_deletion_index(), T + 1001 * S)
        path = tmp_path / "state" / FILE_NAME
        doc = msgpack.unpackb(path.read_bytes()[_HEADER.size:], raw=False)
        assert doc.pop("handovers")
        payload = msgpack.packb(doc, use_bin_type=True)
        path.write_bytes(_HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload))
                         + payload)
        new = PodIndex(skew_ns=5 * S)
        assert sf.load(new, T + 1002 * S)
        assert who(new, A4, T + 100 * S + S // 2) == ("a", ATTR_RESOLVED)
        assert new.snapshot()[2] == {}

    @pytest.mark.parametrize("bad", [
        [1], ["not an address", [1, 2]], [1, [5, 3]], [1, [1, 2, 3]], [1, []], [1, ["x", 2]],
        [b"short", [1, 2]],
    ])
    def test_malformed_windows_make_the_file_corrupt(self, tmp_path: Path, metrics: Metrics,
                                                     bad: list[Any]) -> None:
        """A handover table that is not address/[from, until, ...] pairs with from < until
        is 'corrupt' (the file is ignored, counted)."""
        import zlib

        sf = state(tmp_path, metrics)
        sf.save(missed_deletion_index(), T + 1001 * S)
        path = tmp_path / "state" / FILE_NAME
        doc = msgpack.unpackb(path.read_bytes()[_HEADER.size:], raw=False)
        doc["handovers"] = bad
        payload = msgpack.packb(doc, use_bin_type=True)
        path.write_bytes(_HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload))
                         + payload)
        assert not sf.load(PodIndex(), T + 1002 * S)
        assert metrics.value("shipper_state_load_errors_total", "corrupt") == 1


class TestRestoreSemantics:
    """Pods restored as live are known alive only until the state was written."""

    def test_address_taken_while_down_keeps_old_flows_with_old_pod(
        self, tmp_path: Path, metrics: Metrics
    ) -> None:
        """Saved with a live; at restart the source lists only b (a's addresses): flows that
        started before the save are a's, b's own are b's, nothing in between is guessed."""
        idx = PodIndex(skew_ns=5 * S)
        idx.update(pod("a", A4, A6, created=T), T)
        sf = state(tmp_path, metrics)
        sf.save(idx, T + 100 * S)
        new = PodIndex(skew_ns=5 * S)
        sf.load(new, T + 300 * S)
        new.reconcile([pod("b", A4, A6, created=T + 200 * S)], T + 300 * S)
        for addr in (A4, A6):
            assert who(new, addr, T + 99 * S) == ("a", ATTR_RESOLVED)
            assert who(new, addr, T + 150 * S) == (None, ATTR_UNRESOLVED)
            assert who(new, addr, T + 199 * S) == (None, ATTR_UNRESOLVED)
            assert who(new, addr, T + 201 * S) == ("b", ATTR_RESOLVED)
        assert new.live_pods() == 1

    def test_without_state_the_same_flow_is_only_uncertain(self) -> None:
        """The same restart without a state file: a's old flow near b's creation is given to
        b only as uncertain."""
        new = PodIndex(skew_ns=5 * S)
        new.reconcile([pod("b", A4, A6, created=T + 200 * S)], T + 300 * S)
        assert who(new, A4, T + 198 * S) == ("b", ATTR_UNCERTAIN)

    def test_restored_pod_missing_from_source_ends_at_save_time(
        self, tmp_path: Path, metrics: Metrics
    ) -> None:
        """A restored live pod absent from the first full list ends when the state was
        written, not at the restart: flows in between are unresolved."""
        idx = PodIndex()
        idx.update(pod("a", A4, created=T), T)
        sf = state(tmp_path, metrics)
        sf.save(idx, T + 100 * S)
        new = PodIndex()
        sf.load(new, T + 300 * S)
        new.reconcile([], T + 300 * S)
        assert new.history(*ipi(A4))[0][1] == T + 100 * S
        assert who(new, A4, T + 200 * S) == (None, ATTR_UNRESOLVED)

    def test_restored_pod_reported_again_lives_on(self, tmp_path: Path, metrics: Metrics) -> None:
        """A restored pod that the source still lists keeps one open interval, and a later
        deletion ends it at the deletion time."""
        idx = PodIndex()
        idx.update(pod("a", A4, created=T), T)
        sf = state(tmp_path, metrics)
        sf.save(idx, T + 100 * S)
        new = PodIndex()
        sf.load(new, T + 300 * S)
        new.reconcile([pod("a", A4, created=T)], T + 300 * S)
        assert new.history(*ipi(A4)) == ((T, None, new.history(*ipi(A4))[0][2]),)
        new.delete("a", T + 500 * S)
        assert new.history(*ipi(A4))[0][1] == T + 500 * S
        assert who(new, A4, T + 400 * S) == ("a", ATTR_RESOLVED)

    def test_unconfirmed_restored_pod_is_uncertain_after_the_save(
        self, tmp_path: Path, metrics: Metrics
    ) -> None:
        """Until a source confirms a restored pod, flows that began after the state was
        written are only 'uncertain' for it; once confirmed, they are resolved."""
        idx = PodIndex()
        idx.update(pod("a", A4, created=T), T)
        sf = state(tmp_path, metrics)
        sf.save(idx, T + 100 * S)
        new = PodIndex()
        sf.load(new, T + 300 * S)
        assert who(new, A4, T + 50 * S) == ("a", ATTR_RESOLVED)
        assert who(new, A4, T + 200 * S) == ("a", ATTR_UNCERTAIN)
        new.reconcile([pod("a", A4, created=T)], T + 300 * S)
        assert who(new, A4, T + 200 * S) == ("a", ATTR_RESOLVED)

    def test_entries_past_retention_are_dropped(self, tmp_path: Path, metrics: Metrics) -> None:
        """Tombstones older than the retention are neither written nor restored."""
        idx = PodIndex(retention_ns=1000 * S)
        idx.update(pod("a", A4, created=T), T)
        idx.delete("a", T + 10 * S)
        idx.update(pod("b", "10.16.0.7", created=T), T)
        idx.delete("b", T + 900 * S)
        sf = state(tmp_path, metrics)
        sf.save(idx, T + 1500 * S)  # a ended 1490 s before: past retention
        new = PodIndex(retention_ns=1000 * S)
        sf.load(new, T + 1500 * S)
        assert new.history(*ipi(A4)) == ()
        assert new.tombstones() == 1
        later = PodIndex(retention_ns=1000 * S)
        sf.load(later, T + 2000 * S)  # b now past retention too
        assert later.tombstones() == 0 and later.addresses() == 0

    def test_max_tombstones_applies_on_restore(self, tmp_path: Path, metrics: Metrics) -> None:
        """Restoring more tombstones than max_tombstones keeps the newest, counted evicted."""
        idx = PodIndex()
        for i in range(5):
            idx.update(pod(f"p{i}", f"10.16.1.{i}", created=T), T)
            idx.delete(f"p{i}", T + (i + 1) * S)
        sf = state(tmp_path, metrics)
        sf.save(idx, T + 10 * S)
        new = PodIndex(max_tombstones=3)
        sf.load(new, T + 10 * S)
        assert new.tombstones() == 3 and new.evicted_total == 2
        assert new.history(*ipi("10.16.1.4")) and not new.history(*ipi("10.16.1.0"))


class TestBadFiles:
    """A state file that cannot be used is logged, counted by reason and ignored."""

    def _saved(self, tmp_path: Path, metrics: Metrics) -> tuple[StateFile, Path]:
        sf = state(tmp_path, metrics)
        sf.save(saved_index(), T)
        return sf, tmp_path / "state" / FILE_NAME

    def _ignored(self, sf: StateFile, metrics: Metrics, reason: str) -> None:
        idx = PodIndex()
        assert sf.load(idx, T) is False
        assert idx.addresses() == 0 and idx.live_pods() == 0
        assert metrics.value("shipper_state_load_errors_total", reason) == 1

    def test_missing_file_is_a_first_start(self, tmp_path: Path, metrics: Metrics) -> None:
        """No file: nothing restored, no error counted."""
        assert state(tmp_path, metrics).load(PodIndex(), T) is False
        assert metrics.total("shipper_state_load_errors_total") == 0

    @pytest.mark.parametrize("keep", [0, 5, _HEADER.size, _HEADER.size + 10])
    def test_truncated(self, tmp_path: Path, metrics: Metrics, keep: int) -> None:
        """A file cut short anywhere (even empty) is 'truncated'."""
        sf, path = self._saved(tmp_path, metrics)
        path.write_bytes(path.read_bytes()[:keep])
        self._ignored(sf, metrics, "truncated")

    def test_flipped_byte_fails_the_crc(self, tmp_path: Path, metrics: Metrics) -> None:
        """One changed payload byte is 'corrupt' (CRC)."""
        sf, path = self._saved(tmp_path, metrics)
        data = bytearray(path.read_bytes())
        data[_HEADER.size + len(data) // 3] ^= 0x40
        path.write_bytes(bytes(data))
        self._ignored(sf, metrics, "corrupt")

    def test_not_a_state_file(self, tmp_path: Path, metrics: Metrics) -> None:
        """Some other file under the name (bad magic) is 'corrupt'."""
        sf, path = self._saved(tmp_path, metrics)
        path.write_bytes(b'{"pods": []}\n' * 10)
        self._ignored(sf, metrics, "corrupt")

    def test_valid_crc_but_garbage_payload(self, tmp_path: Path, metrics: Metrics) -> None:
        """A well-framed payload that is not our structure is 'corrupt'."""
        sf, path = self._saved(tmp_path, metrics)
        import zlib

        payload = b"\x93\x01\x02\x03"  # msgpack [1, 2, 3]
        path.write_bytes(_HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload))
                         + payload)
        self._ignored(sf, metrics, "corrupt")

    @pytest.mark.parametrize("cut", ["trailing", "short_table"])
    def test_payload_framed_but_inconsistent(
        self, tmp_path: Path, metrics: Metrics, cut: str
    ) -> None:
        """A payload whose CRC matches but has bytes after its map, or whose values end
        inside a table (a writer bug, not disk damage), is 'corrupt'."""
        import zlib

        sf, path = self._saved(tmp_path, metrics)
        payload = path.read_bytes()[_HEADER.size:]
        payload = payload + b"\xc0" if cut == "trailing" else payload[:-1]
        path.write_bytes(_HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload))
                         + payload)
        self._ignored(sf, metrics, "corrupt")

    def test_ip_sources_not_matching_the_pods_is_corrupt(
        self, tmp_path: Path, metrics: Metrics
    ) -> None:
        """A pod_sources list whose length is not the pod table's is 'corrupt'."""
        import zlib

        sf, path = self._saved(tmp_path, metrics)
        doc = msgpack.unpackb(path.read_bytes()[_HEADER.size:], raw=False)
        doc["pod_sources"].append(0)
        payload = msgpack.packb(doc, use_bin_type=True)
        path.write_bytes(_HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), zlib.crc32(payload))
                         + payload)
        self._ignored(sf, metrics, "corrupt")

    def test_other_format_version(self, tmp_path: Path, metrics: Metrics) -> None:
        """A file of another format version is 'version'."""
        sf, path = self._saved(tmp_path, metrics)
        data = bytearray(path.read_bytes())
        struct.pack_into(">I", data, len(MAGIC), FORMAT_VERSION + 1)
        path.write_bytes(bytes(data))
        self._ignored(sf, metrics, "version")

    def test_other_node(self, tmp_path: Path, metrics: Metrics) -> None:
        """A file written by another node's shipper is 'foreign_node'."""
        self._saved(tmp_path, metrics)
        self._ignored(state(tmp_path, metrics, node="node-b"), metrics, "foreign_node")

    def test_unreadable(self, tmp_path: Path, metrics: Metrics) -> None:
        """A path that cannot be read (a directory here) is 'unreadable'."""
        (tmp_path / "state" / FILE_NAME).mkdir(parents=True)
        self._ignored(state(tmp_path, metrics), metrics, "unreadable")

    def test_unwritable_directory_is_counted(self, tmp_path: Path, metrics: Metrics) -> None:
        """A save that cannot write returns False and counts an error; nothing raises."""
        (tmp_path / "state").write_text("a file where the directory should be")
        assert state(tmp_path, metrics).save(saved_index(), T) is False
        assert metrics.value("shipper_state_saves_total", "error") == 1


class TestSaver:
    def test_periodic_and_final_save(self, tmp_path: Path, metrics: Metrics) -> None:
        """The saver writes every interval from its thread, and once more at stop()."""
        idx = saved_index()
        saver = StateSaver(state(tmp_path, metrics), idx, interval_s=0.05)
        saver.start()
        deadline = time.monotonic() + 5
        while metrics.value("shipper_state_saves_total", "ok") < 2:
            assert time.monotonic() < deadline, "no periodic saves within 5 s"
            time.sleep(0.01)
        idx.delete("b", time.time_ns())
        assert saver.stop()
        n = metrics.value("shipper_state_saves_total", "ok")
        new = PodIndex()
        state(tmp_path, metrics).load(new)
        assert new.live_pods() == 1  # b's deletion made it into the last save
        time.sleep(0.15)
        assert metrics.value("shipper_state_saves_total", "ok") == n  # stopped for good


class TestConfig:
    def test_defaults_and_off(self) -> None:
        """state_dir defaults to the DaemonSet's hostPath; null turns the state file off."""
        cfg = Config(filter={"pod_cidrs": ["10.16.0.0/16"]})
        assert cfg.state_dir == Path("/var/lib/flowlog") and cfg.state_interval_s == 60.0
        off = Config(filter={"pod_cidrs": ["10.16.0.0/16"]}, state_dir=None)
        assert off.state_dir is None
