"""``flowlog-shipper lookup`` answers the join on generated multi-file record output."""

from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper import lookup
from tests.data.flowlog_gen import (
    T0,
    Flow,
    S,
    file_sink_lines,
    fluent_bit_plain_lines,
    gap,
    pod,
    write_file_sink,
    write_fluent_bit,
)

ROOT = Path(__file__).resolve().parents[2]
M = 60 * S
NA, NB = "198.51.100.1", "198.51.100.2"
WEB = "203.0.113.7"


def _at(ns: int) -> str:
    from shipper.ecs import rfc3339

    return rfc3339(ns)


def _flows() -> tuple[list[Flow], list[dict[str, Any]]]:
    checkout = pod("checkout-7d9f8b6c5d-x2x7q", "10.244.0.10", app="checkout",
                   owner="checkout")
    cart = pod("cart-5b6c7d8e9f-abcde", "10.244.0.11", app="cart")
    old = pod("old-job-xyz", "10.244.0.12", ns="batch")
    new = pod("new-api-123", "10.244.0.12", ns="api")
    billing = pod("billing-0", "10.244.1.5", ns="billing", node="node-b")
    flows = [
        # port reuse: the same NAT port and destination, one pod after the other
        Flow("node-a", 101, checkout, "10.244.0.10", 40000, NA, 28958, WEB, 443, T0, T0 + M),
        Flow("node-a", 102, cart, "10.244.0.11", 40001, NA, 28958, WEB, 443,
             T0 + 3 * M, T0 + 5 * M),
        # pod IP reuse: 10.244.0.12 belongs to one pod, later to another
        Flow("node-a", 103, old, "10.244.0.12", 41000, NA, 31000, WEB, 443,
             T0 + 9 * M, T0 + 10 * M),
        Flow("node-a", 104, new, "10.244.0.12", 41000, NA, 31000, WEB, 443,
             T0 + 20 * M, T0 + 21 * M),
        # the same port on another node's address
        Flow("node-b", 105, billing, "10.244.1.5", 41000, NB, 31000, WEB, 443,
             T0 + 9 * M, T0 + 10 * M),
        # a UDP NAT clash: two pods, one node port, at once
        Flow("node-a", 106, pod("dns-a", "10.244.0.13"), "10.244.0.13", 5353, NA, 5353,
             "198.51.100.53", 53, T0 + 30 * M, T0 + 30 * M + 30 * S, proto=17),
        Flow("node-a", 107, pod("dns-b", "10.244.0.14"), "10.244.0.14", 5353, NA, 5353,
             "198.51.100.53", 53, T0 + 30 * M + 100_000, T0 + 30 * M + 30 * S, proto=17,
             clash=True),
        # an open flow whose end may be lost in the gap at 08:40
        Flow("node-a", 108, pod("stream-1", "10.244.0.15"), "10.244.0.15", 42000, NA, 33000,
             WEB, 443, T0 + 39 * M),
        # unresolved, and uncertain (another helper's attribution value)
        Flow("node-a", 109, None, "10.244.0.16", 42001, NA, 35000, WEB, 443,
             T0 + 50 * M, T0 + 51 * M),
        Flow("node-a", 110, pod("late-1", "10.244.0.20"), "10.244.0.20", 42002, NA, 35001,
             WEB, 443, T0 + 50 * M, T0 + 51 * M, attribution="uncertain"),
        Flow("node-a", 117, pod("held-1", "10.244.0.23"), "10.244.0.23", 42003, NA, 35002,
             WEB, 443, T0 + 50 * M, T0 + 51 * M, attribution="stale"),
        # one NAT port, two destinations at once
        Flow("node-a", 111, pod("h-1", "10.244.0.17"), "10.244.0.17", 43000, NA, 36000,
             "203.0.113.8", 443, T0 + 55 * M, T0 + 56 * M),
        Flow("node-a", 112, pod("i-1", "10.244.0.18"), "10.244.0.18", 43001, NA, 36000,
             "203.0.113.9", 443, T0 + 55 * M, T0 + 56 * M),
        # long-lived, never destroyed in these files
        Flow("node-a", 113, pod("ws-1", "10.244.0.19"), "10.244.0.19", 43002, NA, 37000,
             WEB, 443, T0 + 10 * S),
        # destroy lost: a later flow on the same tuple bounds it
        Flow("node-a", 114, pod("k-1", "10.244.0.21"), "10.244.0.21", 43003, NA, 38000,
             WEB, 443, T0 + 5 * M),
        Flow("node-a", 115, pod("l-1", "10.244.0.22"), "10.244.0.22", 43003, NA, 38000,
             WEB, 443, T0 + 15 * M, T0 + 25 * M),
        # shipper restart: a flow whose destroy fell in the downtime, then a flow on the
        # same tuple first seen by the start-up dump, its start unknown (no kernel
        # timestamps); and one whose dump carries the kernel's start
        Flow("node-a", 118, pod("prev-1", "10.244.0.24"), "10.244.0.24", 44000, NA, 39000,
             WEB, 443, T0 + 2 * M),
        Flow("node-a", 119, pod("snap-1", "10.244.0.25"), "10.244.0.25", 44001, NA, 39000,
             WEB, 443, T0 + 25 * M, T0 + 35 * M, snapshot_at=T0 + 30 * M, kernel_ts=False),
        Flow("node-a", 120, pod("snap-2", "10.244.0.26"), "10.244.0.26", 44002, NA, 39001,
             WEB, 443, T0 + 10 * M, T0 + 35 * M, snapshot_at=T0 + 30 * M),
        # IPv6
        Flow("node-a", 116, pod("v6-1", "fd00:10:244::10"), "fd00:10:244::10", 40000,
             "2001:db8::1", 28958, "2001:db8:ffff::7", 443, T0 + 3 * M, T0 + 4 * M),
    ]
    rnd = random.Random(9)
    for i in range(1500):  # background traffic, spread over the hour and both nodes
        host, nat = rnd.choice([("node-a", NA), ("node-b", NB)])
        start = T0 + rnd.randrange(0, 60 * M)
        flows.append(Flow(host, 1000 + i, pod(f"bg-{i % 40}", f"10.244.2.{i % 40 + 1}"),
                          f"10.244.2.{i % 40 + 1}", 30000 + i, nat, 50000 + i,
                          "203.0.113.50", 443, start, start + rnd.randrange(1, 120) * S))
    gaps = [gap("node-a", T0 + 40 * M, T0 + 40 * M + 2 * S)]
    return flows, gaps


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same records as file-sink output and as Fluent Bit file output."""
    flows, gaps = _flows()
    base = tmp_path_factory.mktemp("lookup")
    sink_lines = file_sink_lines(flows, gaps)
    # at-least-once delivery: one batch written twice
    dup = next(i for i, ln in enumerate(sink_lines) if b"node-a:102:destroy" in ln)
    sink_lines.insert(dup + 1, sink_lines[dup])
    write_file_sink(base / "sink", sink_lines, files=4, gzip_from=2)
    write_fluent_bit(base / "fluent-bit", fluent_bit_plain_lines(flows, gaps), files=3)
    return {"file_sink": base / "sink", "fluent_bit": base / "fluent-bit"}


FORMATS = ["file_sink", "fluent_bit"]


def ask(path: Path, nat: str, at: int, *, window: str = "5m", dst: str | None = None,
        proto: str | None = None) -> tuple[int, dict[str, Any]]:
    """One lookup through lookup.run (JSON output); returns (exit code, answer)."""
    q = lookup.make_query(_at(at), nat, dst, proto, lookup.parse_window(window))
    out = io.StringIO()
    code = lookup.run([q], [str(path)], as_json=True, out=out, err=io.StringIO())
    return code, orjson.loads(out.getvalue())


def pods(ans: dict[str, Any]) -> list[str | None]:
    """Pod names of the answer's flows (None for a flow without a pod)."""
    return [f["kubernetes"]["pod"]["name"] if f["kubernetes"] else None for f in ans["flows"]]


class TestFixtures:
    """The generated output really spans rotated and gzip-compressed files."""

    def test_rotated_and_gzip_files(self, outputs: dict[str, Path]) -> None:
        """Both outputs have several files, some gzip-compressed, with flows split across."""
        sink = sorted(p.name for p in outputs["file_sink"].iterdir())
        assert sink == ["flows.json", "flows.json.1", "flows.json.2.gz", "flows.json.3.gz"]
        fb = sorted(p.name for p in outputs["fluent_bit"].iterdir())
        assert len(fb) == 3 and sum(n.endswith(".gz") for n in fb) == 2
        oldest = gzip.decompress((outputs["file_sink"] / "flows.json.3.gz").read_bytes())
        newer = (outputs["file_sink"] / "flows.json.1").read_bytes()
        assert b"node-a:101:new" in oldest
        assert b"node-a:108:new" in newer and b"node-a:108:new" not in oldest
        opened = {ln.split(b'"id":"')[1].split(b":")[1] for ln in oldest.splitlines()
                  if b'"action":"new"' in ln}
        closed_later = {ln.split(b'"id":"')[1].split(b":")[1]
                        for ln in gzip.decompress((outputs["file_sink"] / "flows.json.2.gz")
                                                  .read_bytes()).splitlines()
                        if b'"action":"destroy"' in ln}
        assert opened & closed_later  # flows whose records span two files


@pytest.mark.parametrize("fmt", FORMATS)
class TestSingle:
    """One lookup, on file-sink output and on Fluent Bit plain output alike."""

    def test_found_with_everything_known(self, outputs: dict[str, Path], fmt: str) -> None:
        """A clean answer names pod, namespace, labels, owner, node, start, end, counters."""
        code, a = ask(outputs[fmt], f"{NA}:28958", T0 + 30 * S, window="1m")
        assert code == 0 and a["result"] == "found" and a["reasons"] == []
        (f,) = a["flows"]
        k = f["kubernetes"]
        assert k["namespace"] == "shop" and k["pod"]["name"] == "checkout-7d9f8b6c5d-x2x7q"
        assert k["labels"] == {"app": "checkout"} and k["node"]["name"] == "node-a"
        assert k["owner"]["name"].startswith("checkout")
        assert f["start"] == "2026-11-27T08:00:00.000000Z"
        assert f["end"] == "2026-11-27T08:01:00.000000Z"
        assert f["source"] == {"ip": "10.244.0.10", "port": 40000, "bytes": 1200,
                               "packets": 12}
        assert f["destination"]["bytes"] == 5400 and f["destination"]["packets"] == 54

    def test_port_reuse_inside_window_is_ambiguous(self, outputs: dict[str, Path],
                                                   fmt: str) -> None:
        """Two flows on the port within ±window: exit 3 with both candidates."""
        code, a = ask(outputs[fmt], f"{NA}:28958", T0 + 3 * M + 31 * S, window="5m")
        assert code == 3 and a["result"] == "ambiguous"
        assert pods(a) == ["checkout-7d9f8b6c5d-x2x7q", "cart-5b6c7d8e9f-abcde"]
        assert "port reuse" in a["reasons"][0]

    def test_port_reuse_outside_window_picks_the_later_flow(
            self, outputs: dict[str, Path], fmt: str) -> None:
        """With a narrow window the flow holding the port at that time is the answer."""
        code, a = ask(outputs[fmt], f"{NA}:28958", T0 + 3 * M + 31 * S, window="30s")
        assert code == 0 and pods(a) == ["cart-5b6c7d8e9f-abcde"]

    def test_duplicate_records_count_once(self, outputs: dict[str, Path], fmt: str) -> None:
        """A record delivered twice (same event.id) does not make a second flow."""
        code, a = ask(outputs[fmt], f"{NA}:28958", T0 + 4 * M, window="30s")
        assert code == 0 and len(a["flows"][0]["records"]) == 2

    def test_pod_ip_reuse(self, outputs: dict[str, Path], fmt: str) -> None:
        """One pod IP, two pods over time: each time gets the pod of its flow."""
        assert pods(ask(outputs[fmt], f"{NA}:31000", T0 + 9 * M + 30 * S, window="1m")[1]) == [
            "old-job-xyz"]
        assert pods(ask(outputs[fmt], f"{NA}:31000", T0 + 20 * M + 30 * S, window="1m")[1]) == [
            "new-api-123"]

    def test_nat_address_is_part_of_the_key(self, outputs: dict[str, Path], fmt: str) -> None:
        """The same port on another node's address is another flow."""
        code, a = ask(outputs[fmt], f"{NB}:31000", T0 + 9 * M + 30 * S, window="1m")
        assert code == 0 and pods(a) == ["billing-0"]

    def test_nat_clash_is_ambiguous(self, outputs: dict[str, Path], fmt: str) -> None:
        """A NAT_CLASH pair: both flows reported, exit 3."""
        code, a = ask(outputs[fmt], f"{NA}:5353", T0 + 30 * M + 10 * S, window="0",
                      proto="udp")
        assert code == 3 and sorted(pods(a), key=str) == ["dns-a", "dns-b"]
        assert any("NAT_CLASH" in r for r in a["reasons"])

    def test_gap_before_an_open_flow_is_ambiguous(self, outputs: dict[str, Path],
                                                  fmt: str) -> None:
        """A gap between an open flow's start and the time: its end may be lost."""
        code, a = ask(outputs[fmt], f"{NA}:33000", T0 + 41 * M, window="30s")
        assert code == 3 and pods(a) == ["stream-1"] and len(a["gaps"]) == 1

    def test_gap_with_no_flow_is_ambiguous_not_absent(self, outputs: dict[str, Path],
                                                      fmt: str) -> None:
        """No flow found, but events were lost at that time: exit 3, not 1."""
        code, a = ask(outputs[fmt], f"{NA}:34000", T0 + 40 * M + S, window="0")
        assert code == 3 and a["flows"] == [] and a["gaps"][0]["lost_events"] == 10

    def test_not_found(self, outputs: dict[str, Path], fmt: str) -> None:
        """No flow and no gap: exit 1."""
        code, a = ask(outputs[fmt], f"{NA}:44444", T0 + 30 * M, window="5m")
        assert code == 1 and a["result"] == "not_found"

    def test_unresolved_pod_is_ambiguous(self, outputs: dict[str, Path], fmt: str) -> None:
        """The only flow names no pod: exit 3, the flow still shown."""
        code, a = ask(outputs[fmt], f"{NA}:35000", T0 + 50 * M + 30 * S, window="0")
        assert code == 3 and a["flows"][0]["attribution"] == "unresolved"

    @pytest.mark.parametrize("port,pod_name,status", [(35001, "late-1", "uncertain"),
                                                      (35002, "held-1", "stale")])
    def test_uncertain_or_stale_pod_is_ambiguous(self, outputs: dict[str, Path], fmt: str,
                                                 port: int, pod_name: str, status: str) -> None:
        """Any attribution other than resolved is not a clean answer."""
        code, a = ask(outputs[fmt], f"{NA}:{port}", T0 + 50 * M + 30 * S, window="0")
        assert code == 3 and pods(a) == [pod_name]
        assert a["flows"][0]["attribution"] == status and status in a["reasons"][0]

    def test_destination_narrows_concurrent_flows(self, outputs: dict[str, Path],
                                                  fmt: str) -> None:
        """One port to two destinations at once: ambiguous until --dst names one."""
        p = outputs[fmt]
        at = T0 + 55 * M + 30 * S
        code, a = ask(p, f"{NA}:36000", at, window="0")
        assert code == 3 and "different destinations" in a["reasons"][0]
        assert pods(ask(p, f"{NA}:36000", at, window="0", dst="203.0.113.9")[1]) == ["i-1"]
        code, a = ask(p, f"{NA}:36000", at, window="0", dst="203.0.113.9:443", proto="tcp")
        assert code == 0 and pods(a) == ["i-1"]
        assert ask(p, f"{NA}:36000", at, window="0", dst="203.0.113.9:80")[0] == 1
        assert ask(p, f"{NA}:36000", at, window="0", proto="udp")[0] == 1

    def test_open_flow_answer_says_end_unknown(self, outputs: dict[str, Path],
                                               fmt: str) -> None:
        """A flow without a destroy in the files is found; its end is null."""
        code, a = ask(outputs[fmt], f"{NA}:37000", T0 + 30 * M, window="1m")
        assert code == 0 and pods(a) == ["ws-1"] and a["flows"][0]["end"] is None

    def test_later_flow_on_same_tuple_ends_an_open_one(self, outputs: dict[str, Path],
                                                       fmt: str) -> None:
        """A flow whose destroy is missing ended when the tuple's next flow began."""
        code, a = ask(outputs[fmt], f"{NA}:38000", T0 + 20 * M, window="1m")
        assert code == 0 and pods(a) == ["l-1"]
        code, a = ask(outputs[fmt], f"{NA}:38000", T0 + 10 * M, window="1m")
        assert code == 0 and pods(a) == ["k-1"]
        assert a["flows"][0]["ended_before"] == "2026-11-27T08:15:00.000000Z"

    def test_flow_of_unknown_start_is_not_ruled_out(self, outputs: dict[str, Path],
                                                    fmt: str) -> None:
        """Before a dumped flow of unknown start was seen, it and the old flow are candidates."""
        code, a = ask(outputs[fmt], f"{NA}:39000", T0 + 20 * M, window="1m")
        assert code == 3 and pods(a) == ["prev-1", "snap-1"]
        assert a["flows"][1]["start"] is None
        assert a["flows"][1]["first_seen"] == "2026-11-27T08:30:00.000000Z"
        assert any("start is unknown" in r for r in a["reasons"])

    def test_flow_seen_in_dump_answers_after_it_was_seen(self, outputs: dict[str, Path],
                                                         fmt: str) -> None:
        """Once the dump saw it, the dumped flow is the answer (the old one had ended)."""
        code, a = ask(outputs[fmt], f"{NA}:39000", T0 + 32 * M, window="1m")
        assert code == 0 and pods(a) == ["snap-1"]

    def test_kernel_start_in_a_dump_is_the_start(self, outputs: dict[str, Path],
                                                 fmt: str) -> None:
        """A dump with the kernel's start timestamp proves when the flow began."""
        code, a = ask(outputs[fmt], f"{NA}:39001", T0 + 15 * M, window="1m")
        assert code == 0 and pods(a) == ["snap-2"]
        assert a["flows"][0]["start"] == "2026-11-27T08:10:00.000000Z"

    def test_ipv6(self, outputs: dict[str, Path], fmt: str) -> None:
        """[addr]:port for IPv6 NAT addresses; the address is matched normalised."""
        code, a = ask(outputs[fmt], "[2001:0db8::0001]:28958", T0 + 3 * M + 31 * S,
                      window="0")
        assert code == 0 and pods(a) == ["v6-1"]
        assert a["query"]["nat"] == "[2001:db8::1]:28958"


def _batch_rows() -> list[tuple[str, str, str, str]]:
    return [
        (_at(T0 + 30 * S), f"{NA}:28958", "", ""),
        (_at(T0 + 3 * M + 31 * S), f"{NA}:28958", "", ""),
        (_at(T0 + 9 * M + 30 * S), f"{NB}:31000", f"{WEB}:443", "tcp"),
        (_at(T0 + 30 * M + 10 * S), f"{NA}:5353", "", "udp"),
        (_at(T0 + 40 * M + S), f"{NA}:34000", "", ""),
        (_at(T0 + 55 * M + 30 * S), f"{NA}:36000", "203.0.113.9", ""),
        (_at(T0 + 3 * M + 31 * S), "[2001:db8::1]:28958", "", ""),
        (_at(T0 + 30 * M), f"{NA}:44444", "", ""),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
class TestBatch:
    """Many queries, one pass, one answer per query line in order."""

    def _run(self, path: Path, qfile: Path, window: str = "1m"
             ) -> tuple[int, list[dict[str, Any]]]:
        qs = lookup.read_queries(qfile, lookup.parse_window(window))
        out = io.StringIO()
        code = lookup.run(qs, [str(path)], as_json=True, out=out,
                          err=io.StringIO())
        return code, [orjson.loads(x) for x in out.getvalue().splitlines()]

    def test_batch_matches_single_lookups(self, outputs: dict[str, Path], fmt: str,
                                          tmp_path: Path) -> None:
        """Each batch answer equals the single lookup of the same line, in order."""
        rows = _batch_rows()
        q = tmp_path / "q.csv"
        q.write_text("time,nat,dst,proto\n" + "\n".join(",".join(r) for r in rows) + "\n")
        qs = lookup.read_queries(q, lookup.parse_window("1m"))
        out = io.StringIO()
        code = lookup.run(qs, [str(outputs[fmt])], as_json=True, out=out, err=io.StringIO())
        answers = [orjson.loads(x) for x in out.getvalue().splitlines()]
        assert [a["query"]["line"] for a in answers] == list(range(2, 2 + len(rows)))
        for row, a in zip(rows, answers, strict=True):
            at = lookup.parse_time(row[0]) * 1000
            single = ask(outputs[fmt], row[1], at, window="1m", dst=row[2] or None,
                         proto=row[3] or None)[1]
            assert a["result"] == single["result"] and pods(a) == pods(single), row
        assert [a["exit_code"] for a in answers] == [0, 0, 0, 3, 3, 0, 0, 1]
        assert code == 3  # the worst: ambiguous beats not found

    def test_ndjson_queries_and_bad_line(self, outputs: dict[str, Path], fmt: str,
                                         tmp_path: Path) -> None:
        """NDJSON queries; a bad line is answered as bad input in its place, exit 2."""
        q = tmp_path / "q.ndjson"
        q.write_text("\n".join([
            json.dumps({"time": _at(T0 + 30 * S), "nat": f"{NA}:28958"}),
            json.dumps({"time": "2026-11-27T08:00:30", "nat": f"{NA}:28958"}),
            json.dumps({"at": _at(T0 + 9 * M + 30 * S), "nat": f"{NB}:31000",
                        "dst": WEB, "proto": "tcp"}),
        ]) + "\n")
        code, answers = self._run(outputs[fmt], q)
        assert [a["result"] for a in answers] == ["found", "bad_input", "found"]
        assert "no time zone" in answers[1]["error"]
        assert code == 2

    def test_one_pass_over_the_files(self, outputs: dict[str, Path], fmt: str,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every file is read once for the whole batch, whatever the number of queries."""
        opened: list[Path] = []
        real = lookup.read_blocks

        def spy(path: Path, size: int = lookup.CHUNK) -> Any:
            opened.append(path)
            return real(path, size)

        monkeypatch.setattr(lookup, "read_blocks", spy)
        q = tmp_path / "q.csv"
        q.write_text("\n".join(",".join(r) for r in _batch_rows() * 50) + "\n")
        code, answers = self._run(outputs[fmt], q)
        assert len(answers) == 400 and code == 3
        assert sorted(opened) == sorted(outputs[fmt].iterdir())

    def test_only_queried_keys_are_kept(self, outputs: dict[str, Path], fmt: str) -> None:
        """Memory is bounded by the candidates: records of other keys are not kept."""
        keys = [(NA, 28958), (NA, 5353), (NB, 31000), (NA, 36000), (NA, 37000), (NA, 38000)]
        scan = lookup.Scanner(keys).run(lookup.expand_paths([str(outputs[fmt])]))
        assert set(scan.recs) <= set(keys)
        # records kept per key (the file sink's copy has one destroy written twice)
        assert {k: len(v) for k, v in scan.recs.items()} == {
            (NA, 28958): 5 if fmt == "file_sink" else 4, (NA, 5353): 4, (NB, 31000): 2,
            (NA, 36000): 4, (NA, 37000): 1, (NA, 38000): 3}
        assert len(scan.gaps) == 1


class TestFormats:
    """Records in another JSON layout are still found (the pre-filter's slow path)."""

    @pytest.mark.parametrize("n_ports", [1, 6])
    def test_spaced_json(self, tmp_path: Path, n_ports: int) -> None:
        """json.dumps with spaces (no compact "nat" object) gives the same answers."""
        flows, gaps = _flows()
        lines = [json.dumps(orjson.loads(x), indent=None).encode() + b"\n"
                 for x in file_sink_lines(flows[:20], gaps)]
        assert b'"nat": {' in lines[0]
        (tmp_path / "spaced.json").write_bytes(b"".join(lines))
        keys = [(NA, 28958), *[(NA, p) for p in (5353, 36000, 37000, 38000, 33000)]]
        scan = lookup.Scanner(keys[:n_ports]).run([tmp_path / "spaced.json"])
        assert len(scan.recs[(NA, 28958)]) == 4 and len(scan.gaps) == 1

    def test_needle_is_a_whole_port(self, tmp_path: Path) -> None:
        """Port 2895 does not match records of port 28958."""
        flows, _ = _flows()
        (tmp_path / "f").write_bytes(b"".join(file_sink_lines(flows[:2])))
        assert lookup.Scanner([(NA, 2895)]).run([tmp_path / "f"]).recs == {}

    def test_malformed_lines_are_reported(self, tmp_path: Path) -> None:
        """A torn line that passed the pre-filter is counted and warned about, not hidden."""
        flows, _ = _flows()
        lines = file_sink_lines(flows[:1])
        torn = lines[1][:lines[1].index(b'"destination"')]  # has the NAT port, no end
        (tmp_path / "f").write_bytes(lines[0] + torn + b"\n")
        err = io.StringIO()
        q = lookup.make_query(_at(T0 + 30 * S), f"{NA}:28958", None, None, 60_000_000)
        code = lookup.run([q], [str(tmp_path / "f")], as_json=True, out=io.StringIO(), err=err)
        assert code == 0 and "1 line(s) that are not flow records" in err.getvalue()


class TestCompression:
    """Rotated files compressed by logrotate's other compressors are read too."""

    @pytest.mark.parametrize("ext", ["bz2", "xz"])
    def test_bz2_and_xz(self, tmp_path: Path, ext: str) -> None:
        """bzip2 and xz files (detected by magic bytes) answer like the plain file."""
        import bz2
        import lzma

        flows, _ = _flows()
        data = b"".join(file_sink_lines(flows[:2]))
        comp = bz2.compress(data) if ext == "bz2" else lzma.compress(data)
        (tmp_path / f"flows.json.3.{ext}").write_bytes(comp)
        code, a = ask(tmp_path, f"{NA}:28958", T0 + 30 * S, window="1m")
        assert code == 0 and pods(a) == ["checkout-7d9f8b6c5d-x2x7q"]

    def test_zstd_is_bad_input(self, tmp_path: Path) -> None:
        """A zstd file (not in the standard library) is refused by name, not misread."""
        (tmp_path / "flows.json.2.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 64)
        with pytest.raises(lookup.LookupInputError, match="zstd"):
            ask(tmp_path, f"{NA}:28958", T0, window="1m")


class TestParsing:
    """Query texts: every accepted form, and a clear message for the rest."""

    def test_times(self) -> None:
        """RFC 3339 with zone, Common Log Format and Unix seconds agree."""
        us = 1_795_766_611_000_000
        assert lookup.parse_time("2026-11-27T08:03:31Z") == us
        assert lookup.parse_time("2026-11-27T09:03:31+01:00") == us
        assert lookup.parse_time("27/Nov/2026:08:03:31 +0000") == us
        assert lookup.parse_time("1795766611") == us
        assert lookup.parse_time("1795766611.25") == us + 250_000

    @pytest.mark.parametrize("text,msg", [
        ("2026-11-27T08:03:31", "no time zone"), ("yesterday", "cannot read time")])
    def test_bad_times(self, text: str, msg: str) -> None:
        """A time without zone or unreadable is refused with a message."""
        with pytest.raises(lookup.LookupInputError, match=msg):
            lookup.parse_time(text)

    def test_endpoints(self) -> None:
        """IPv4:port, [IPv6]:port, bare IPv6 and IPv4 destinations."""
        assert lookup.parse_endpoint("198.51.100.1:28958", "nat", port_required=True) == (
            "198.51.100.1", 28958)
        assert lookup.parse_endpoint("[2001:DB8::1]:443", "nat", port_required=True) == (
            "2001:db8::1", 443)
        assert lookup.parse_endpoint("2001:db8::7", "dst", port_required=False) == (
            "2001:db8::7", None)
        assert lookup.parse_endpoint("203.0.113.7", "dst", port_required=False) == (
            "203.0.113.7", None)

    @pytest.mark.parametrize("text,msg", [
        ("198.51.100.1", "has no port"), ("198.51.100.1:0", "1 to 65535"),
        ("198.51.100.1:70000", "1 to 65535"), ("host:80", "not an IP address"),
        ("2001:db8::1", "has no port"), ("[2001:db8::1]443", "IPv6 as")])
    def test_bad_nat(self, text: str, msg: str) -> None:
        """Each malformed --nat gets a message naming the problem."""
        with pytest.raises(lookup.LookupInputError, match=msg):
            lookup.parse_endpoint(text, "nat", port_required=True)

    def test_windows(self) -> None:
        """5m, 90s, 1h, 500ms, bare seconds."""
        assert [lookup.parse_window(w) for w in ("5m", "90s", "1h", "500ms", "0", "2")] == [
            300_000_000, 90_000_000, 3_600_000_000, 500_000, 0, 2_000_000]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shipper", "lookup", *args],
                          capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


class TestCli:
    """The installed command: flags, text output and every exit code."""

    def test_exit_codes(self, outputs: dict[str, Path]) -> None:
        """0 found, 1 not found, 3 ambiguous, 2 bad input, each with its output."""
        d = str(outputs["file_sink"])
        r = _cli("--nat", f"{NA}:28958", "--at", "2026-11-27T08:00:30Z", "--window", "1m", d)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("FOUND") and "shop/checkout-7d9f8b6c5d-x2x7q" in r.stdout
        assert "out 1200 (12 packets), in 5400 (54 packets)" in r.stdout
        r = _cli("--nat", f"{NA}:44444", "--at", "2026-11-27T08:30:00Z", d)
        assert r.returncode == 1 and r.stdout.startswith("NOT FOUND")
        r = _cli("--nat", f"{NA}:5353", "--at", "2026-11-27T08:30:10Z", "--proto", "udp", d)
        assert r.returncode == 3 and "NAT_CLASH" in r.stdout and "candidate 2" in r.stdout
        r = _cli("--nat", f"{NA}:28958", "--at", "2026-11-27T08:00:30", d)
        assert r.returncode == 2 and "no time zone" in r.stderr

    def test_bad_files(self, tmp_path: Path) -> None:
        """A missing file or a corrupt gzip is bad input naming the file."""
        r = _cli("--nat", f"{NA}:1", "--at", "2026-11-27T08:00:30Z", str(tmp_path / "nope"))
        assert r.returncode == 2 and "no such file" in r.stderr
        bad = tmp_path / "flows.json.2.gz"
        data = gzip.compress(b"".join(b'{"n":%d}\n' % random.getrandbits(64)
                                      for _ in range(20000)))
        bad.write_bytes(data[:len(data) // 2])  # cut short, as by a full disk
        r = _cli("--nat", f"{NA}:1", "--at", "2026-11-27T08:00:30Z", str(bad))
        assert r.returncode == 2 and "flows.json.2.gz" in r.stderr

    def test_usage_errors(self, tmp_path: Path) -> None:
        """Neither --nat/--at nor --queries, or both: exit 2 with a message."""
        f = tmp_path / "f"
        f.write_text("")
        r = _cli(str(f))
        assert r.returncode == 2 and "--queries" in r.stderr
        q = tmp_path / "q.csv"
        q.write_text("2026-11-27T08:00:30Z,198.51.100.1:1\n")
        r = _cli("--queries", str(q), "--nat", f"{NA}:1", str(f))
        assert r.returncode == 2 and "cannot be combined" in r.stderr

    def test_batch_text(self, outputs: dict[str, Path], tmp_path: Path) -> None:
        """--queries without --json: one answer block per query, in order."""
        q = tmp_path / "q.csv"
        q.write_text("# remote access log\n" + "\n".join(
            ",".join(r[:2]) for r in _batch_rows()[:2]) + "\n")
        r = _cli("--queries", str(q), "--window", "1m", str(outputs["file_sink"]))
        heads = [ln for ln in r.stdout.splitlines() if ln.startswith("line ")]
        assert [h.split(":")[0] for h in heads] == ["line 2", "line 3"]
        assert "FOUND" in heads[0] and r.returncode == 0
