"""The record declared once (shipper/schema.py): both encoders and the docs follow from it."""

from __future__ import annotations

import dis
import importlib.util
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper import ecs, schema
from shipper.ecs_json import JsonLineEncoder
from tests.data import record_cases

ROOT = Path(__file__).resolve().parents[2]

GOLDEN: dict[str, str] = json.loads(record_cases.GOLDEN.read_text())
CASES = list(record_cases.cases())


class TestRecordBytes:
    """Records keep their exact bytes (keys, order, values) across changes of the code."""

    def test_golden_covers_the_cases(self) -> None:
        """The golden file has one line per case (so the byte tests cannot pass vacuously)."""
        assert len(CASES) > 500
        assert {c[0] for c in CASES} <= GOLDEN.keys()

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_ndjson_line_is_golden(self, case: tuple) -> None:
        """JsonLineEncoder.encode writes exactly the recorded bytes of each captured message."""
        name, ev, pod, start, attribution = case
        line = JsonLineEncoder(record_cases.HOST).encode(ev, pod, start, attribution)
        assert line.decode() == GOLDEN[name]

    @pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
    def test_dict_record_is_golden(self, case: tuple) -> None:
        """orjson.dumps(build_record(...)) is exactly the recorded line, newline aside."""
        name, ev, pod, start, attribution = case
        rec = ecs.build_record(ev, pod, record_cases.HOST, flow_start_ns=start,
                               attribution=attribution)
        assert orjson.dumps(rec).decode() + "\n" == GOLDEN[name]

    def test_gap_records_are_golden(self) -> None:
        """gap_record yields exactly the recorded bytes for every lost/resync combination."""
        names = [n for n in GOLDEN if n.startswith("gap/")]
        assert len(names) == 6
        for lost in (None, 0, 2994):
            for resync in (True, False):
                rec = ecs.gap_record(record_cases.HOST, since_ns=record_cases.START,
                                     until_ns=record_cases.START + 300_000_000 + 7,
                                     lost=lost, overruns=3, resync=resync)
                assert orjson.dumps(rec).decode() == GOLDEN[f"gap/{lost}/{resync}"]

    def test_unknown_attribution_is_rejected(self) -> None:
        """An attribution status outside record.ATTRIBUTIONS raises in both encoders."""
        ev = CASES[0][1]
        with pytest.raises(KeyError):
            JsonLineEncoder("n").encode(ev, None, None, "guess")
        with pytest.raises(KeyError):
            ecs.build_record(ev, None, "n", attribution="guess")


def _leaves(obj: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in obj.items():
        if isinstance(v, dict):
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def _gen_docs() -> Any:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class TestDocumentation:
    """docs/SCHEMA.md's table and examples come from the declaration and cannot drift."""

    def test_every_emitted_field_is_documented(self) -> None:
        """Each leaf of every golden record (labels/annotations as `.*`) is a table field."""
        documented = {path for path, _ in schema.documented_fields()}
        seen: set[str] = set()
        for line in GOLDEN.values():
            for leaf in _leaves(orjson.loads(line)):
                for wild in ("kubernetes.labels.", "kubernetes.annotations."):
                    if leaf.startswith(wild):
                        leaf = wild + "*"
                seen.add(leaf)
        assert seen - documented == set()
        # Declared fields no record of the capture has: only the kernel-optional ones.
        assert documented - seen <= {"conntrack.mark", "conntrack.zone",
                                     "kubernetes.annotations.*"} | {
            p for p in documented if p.startswith("destination.nat.")}

    def test_table_row_format(self) -> None:
        """Joined rows name each field and give per-field types only when they differ."""
        table = schema.field_table()
        assert ("| `destination.ip`, `destination.port` | ip, integer | always / with ports |"
                in table)
        assert "| `conntrack.icmp.type`, `.code`, `.id` | integer | ICMP/ICMPv6 |" in table
        assert "| `source.bytes`, `source.packets` | integer |" in table

    def test_drifted_schema_md_is_caught(self, tmp_path: Path) -> None:
        """A hand edit inside the generated table is undone by gen_docs (so --check fails)."""
        gen = _gen_docs()
        good = (ROOT / "docs" / "SCHEMA.md").read_text()
        bad = good.replace("| `conntrack.mark` | long |", "| `conntrack.mark` | integer |")
        assert bad != good
        path = tmp_path / "SCHEMA.md"
        path.write_text(bad)
        assert gen.schema_md(path) == good

    def test_prose_outside_markers_is_kept(self, tmp_path: Path) -> None:
        """Text outside the generated sections is left exactly as written."""
        gen = _gen_docs()
        text = (ROOT / "docs" / "SCHEMA.md").read_text().replace(
            "## The join key", "## The join key (edited)")
        path = tmp_path / "SCHEMA.md"
        path.write_text(text)
        assert gen.schema_md(path) == text

    def test_missing_markers_are_an_error(self, tmp_path: Path) -> None:
        """A SCHEMA.md without the markers is an error naming them, not a silent skip."""
        gen = _gen_docs()
        path = tmp_path / "SCHEMA.md"
        path.write_text("# no markers\n")
        with pytest.raises(SystemExit, match="BEGIN GENERATED fields"):
            gen.schema_md(path)


class TestCompiler:
    """The compiler turns a declaration into both encoders, and rejects what it cannot do."""

    DECL = (
        schema.Field("a", kind="int", value="x"),
        schema.Field("o", kind="object", when="y is not None", children=(
            schema.Field("s", value="y"),
            schema.Field("n", kind="intn", when="x > 1", value="None"),
        )),
        schema.Field("c", kind="const", const=["k", 1]),
    )

    def test_both_paths_agree_on_a_small_declaration(self) -> None:
        """Dict and line come out as the same bytes, with and without optional members."""
        ns: dict[str, Any] = {"_n": lambda v: "null" if v is None else str(v)}
        build = schema.compile_dict(self.DECL, "x, y", "", ns, "build", "doc")
        line = schema.compile_line(self.DECL, "x, y", "", ns, "line", "doc")
        for x, y in ((1, None), (1, "t"), (2, "t")):
            assert orjson.dumps(build(x, y)) + b"\n" == line(x, y)
        assert line(2, "t") == b'{"a":2,"o":{"s":"t","n":null},"c":["k",1]}\n'

    def test_a_record_of_many_pieces_is_joined_on_the_stack(self) -> None:
        """A line of more pieces than one f-string may join on the stack is split into
        f-strings of at most ``_MAX_PIECES`` each (CPython compiles a longer one as a
        list passed to ``str.join``), and still gives the same bytes as the dict path."""
        decl = tuple(schema.Field(f"f{i}", kind="int", value=f"x + {i}") for i in range(70))
        build = schema.compile_dict(decl, "x", "", {}, "build", "doc")
        line = schema.compile_line(decl, "x", "", {"__name__": "schema_test"}, "many", "doc")
        for x in (0, 7, -3):
            assert orjson.dumps(build(x)) + b"\n" == line(x)
        src = schema.source_of("schema_test.many")
        assert src.count("_l") >= 2  # split: 70 values and their keys are many pieces
        assert "join" not in line.__code__.co_names
        assert "LIST_APPEND" not in {i.opname for i in dis.get_instructions(line)}

    def test_the_flow_encoder_joins_on_the_stack(self) -> None:
        """The NDJSON encoder of the real record builds no list to join per record."""
        enc = JsonLineEncoder("node-1").encode
        assert "join" not in enc.__code__.co_names
        assert "LIST_APPEND" not in {i.opname for i in dis.get_instructions(enc)}

    def test_optional_first_member_is_rejected(self) -> None:
        """An object whose first member is optional cannot be compiled (comma rule)."""
        decl = (schema.Field("a", when="x", value="x"),)
        with pytest.raises(ValueError, match="first member"):
            schema.compile_line(decl, "x", "", {}, "f", "doc")

    def test_line_skip_member_is_written_by_the_one_before(self) -> None:
        """A ``line_skip`` member is not written by the line path itself: the member
        before it writes it (always present, or under a condition that holds whenever
        its own does), and both paths still give the same bytes."""
        decl = (
            schema.Field("a", kind="int", value="x", json='{x},"b":{x + 1}'),
            schema.Field("b", kind="int", value="x + 1", line_skip=True),
            schema.Field("c", kind="int", when="x > 1", value="x",
                         member="""f',"c":{x},"d":{x * 2}' if x > 2 else f',"c":{x}'"""),
            schema.Field("d", kind="int", when="x > 2", value="x * 2", line_skip=True),
        )
        build = schema.compile_dict(decl, "x", "", {}, "build", "doc")
        line = schema.compile_line(decl, "x", "", {}, "line", "doc")
        for x in (1, 2, 3):
            assert orjson.dumps(build(x)) + b"\n" == line(x)
        assert line(3) == b'{"a":3,"b":4,"c":3,"d":6}\n'

    def test_line_skip_after_an_optional_member_must_be_optional(self) -> None:
        """An always-present line_skip member after an optional one is rejected (it
        would be missing whenever the one before is)."""
        decl = (schema.Field("a", kind="int", value="x"),
                schema.Field("b", kind="int", when="x", value="x"),
                schema.Field("c", kind="int", value="x", line_skip=True))
        with pytest.raises(ValueError, match="line_skip"):
            schema.compile_line(decl, "x", "", {}, "f", "doc")
