"""The log-store recipes in config/ agree with docs/SCHEMA.md and with each other."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
ES = CONFIG / "elasticsearch"


def schema_fields() -> dict[str, str]:
    """Every field of the table in docs/SCHEMA.md's "Fields" section, with its type text.

    Rows may name several fields (`a`, `b` or `x.icmp.type`, `.code`) and give one
    type for all or one per field ("ip, integer").
    """
    text = (ROOT / "docs" / "SCHEMA.md").read_text()
    section = text.split("\n## Fields\n", 1)[1].split("\n## ", 1)[0]
    fields: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        types = [t.strip() for t in cells[1].split(",")]
        full: list[str] = []
        for n in names:
            if n.startswith(".") and full:
                n = full[-1].rsplit(".", 1)[0] + n
            full.append(n)
        for i, n in enumerate(full):
            fields[n] = types[i] if len(types) == len(full) else cells[1]
    return fields


def es_types(schema_type: str) -> set[str]:
    """The Elasticsearch types that fit a SCHEMA.md type."""
    t = schema_type.lower()
    if "rfc 3339" in t:
        return {"date", "date_nanos"}
    if t.startswith("ip"):
        return {"ip"}
    if t.startswith("integer"):
        return {"integer", "long"}
    if t.startswith("long"):
        return {"long"}
    if t.startswith("boolean"):
        return {"boolean"}
    if t.startswith(("keyword", "array")):
        return {"keyword"}
    raise AssertionError(f"SCHEMA.md type {schema_type!r} has no Elasticsearch type rule")


def template() -> dict[str, Any]:
    """config/elasticsearch/index-template.json."""
    return json.loads((ES / "index-template.json").read_text())


def mapping_of(path: str) -> dict[str, Any] | None:
    """The mapping of a dotted field in the template, or None."""
    node: dict[str, Any] = template()["template"]["mappings"]
    for part in path.split("."):
        props = node.get("properties")
        if props is None or part not in props:
            return None
        node = props[part]
    return node


def mapped_leaves() -> set[str]:
    """Every dotted field the template maps (objects excluded)."""
    out: set[str] = set()

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.get("properties", {}).items():
            if "properties" in v:
                walk(v, prefix + k + ".")
            else:
                out.add(prefix + k)

    walk(template()["template"]["mappings"], "")
    return out


class TestSchemaParser:
    """The SCHEMA.md parser finds the fields (so the mapping test cannot pass vacuously)."""

    def test_parses_every_row_form(self) -> None:
        """Single, paired, relative (.code) and wildcard names all come out."""
        f = schema_fields()
        assert f["@timestamp"].startswith("RFC 3339")
        assert f["destination.ip"] == "ip" and f["destination.port"] == "integer"
        assert "conntrack.icmp.code" in f and "kubernetes.labels.*" in f
        assert f["source.nat.port"] == "integer" and len(f) >= 45


class TestElasticsearchTemplate:
    """The composable template maps every record field with the right type."""

    def test_every_schema_field_is_mapped(self) -> None:
        """A SCHEMA.md field without a mapping (or with a wrong type) fails here."""
        problems = []
        for name, typ in schema_fields().items():
            if name.endswith(".*"):
                m = mapping_of(name[:-2])
                if not m or m.get("type") != "flattened":
                    problems.append(f"{name}: needs a flattened mapping of {name[:-2]}")
                continue
            m = mapping_of(name)
            if m is None:
                problems.append(f"{name}: no mapping")
            elif m.get("type") not in es_types(typ):
                problems.append(f"{name}: {m.get('type')} is not one of {es_types(typ)}")
        assert not problems, problems

    def test_no_mapping_outside_the_schema(self) -> None:
        """Every mapped field is a SCHEMA.md field (no stale or misspelt mapping)."""
        fields = schema_fields()
        known = set(fields) | {f[:-2] for f in fields if f.endswith(".*")}
        assert mapped_leaves() - known == set()

    def test_join_key_types(self) -> None:
        """The join fields: ip addresses, integer ports, long counters, date times."""
        assert mapping_of("source.nat.ip") == {"type": "ip"}
        assert mapping_of("source.nat.port") == {"type": "integer"}
        assert mapping_of("source.bytes") == {"type": "long"}
        assert mapping_of("conntrack.id") == {"type": "long"}  # u32: too big for integer
        assert mapping_of("@timestamp") == {"type": "date"}

    def test_data_stream_wiring(self) -> None:
        """Data stream template matching the writer's index, with ILM and the dedup pipeline."""
        t = template()
        assert t["data_stream"] == {} and t["priority"] > 100
        fb = yaml.safe_load((CONFIG / "fluent-bit.yaml").read_text())
        es_out = next(o for o in fb["pipeline"]["outputs"] if o["name"] == "es")
        assert any(fnmatch.fnmatch(es_out["index"], p) for p in t["index_patterns"])
        settings = t["template"]["settings"]
        install = (ES / "install.sh").read_text()
        assert f"/_ilm/policy/{settings['index.lifecycle.name']} " in install
        assert f"/_ingest/pipeline/{settings['index.default_pipeline']} " in install
        assert t["template"]["mappings"]["dynamic"] is False


class TestIlmAndPipeline:
    """Retention and duplicate handling."""

    def test_ilm_hot_then_delete(self) -> None:
        """Hot with rollover, then delete after a number of days."""
        phases = json.loads((ES / "ilm-policy.json").read_text())["policy"]["phases"]
        assert list(phases) == ["hot", "delete"]
        assert "rollover" in phases["hot"]["actions"]
        assert re.fullmatch(r"\d+d", phases["delete"]["min_age"])
        assert phases["delete"]["actions"] == {"delete": {}}

    def test_pipeline_sets_id_from_event_id(self) -> None:
        """The document _id is event.id (a schema field present in every record)."""
        procs = json.loads((ES / "ingest-pipeline.json").read_text())["processors"]
        sets = [p["set"] for p in procs if "set" in p and p["set"]["field"] == "_id"]
        assert sets and sets[0]["value"] == "{{{event.id}}}"
        assert "always" in _present("event.id")


def _present(field: str) -> str:
    text = (ROOT / "docs" / "SCHEMA.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith(f"| `{field}`"))
    return row.split("|")[3]


class _FakeEs(BaseHTTPRequestHandler):
    """Answers index-management PUTs as Elasticsearch does: 200 {"acknowledged":true}."""

    seen: list[tuple[str, str, bytes]]

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append((self.path, self.headers.get("Content-Type", ""), body))
        data = b'{"acknowledged":true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_es() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A capturing Elasticsearch index-management endpoint on a free loopback port."""
    seen: list[tuple[str, str, bytes]] = []
    handler = type("H", (_FakeEs,), {"seen": seen})
    srv = HTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


class TestInstallScript:
    """config/elasticsearch/install.sh sends the three recipes, retention substituted."""

    def test_puts_policy_pipeline_template(self, fake_es: tuple[str, list[Any]]) -> None:
        """Three PUTs in dependency order; ILM delete age from RETENTION_DAYS."""
        url, seen = fake_es
        r = subprocess.run(["bash", str(ES / "install.sh")], capture_output=True, text=True,
                           timeout=60, check=False,
                           env={**os.environ, "ES_URL": url, "RETENTION_DAYS": "365"})
        assert r.returncode == 0, r.stderr
        assert [s[0] for s in seen] == ["/_ilm/policy/flowlog",
                                        "/_ingest/pipeline/flowlog-dedup",
                                        "/_index_template/flowlog"]
        assert all(s[1] == "application/json" for s in seen)
        ilm = json.loads(seen[0][2])
        assert ilm["policy"]["phases"]["delete"]["min_age"] == "365d"
        assert json.loads(seen[1][2]) == json.loads((ES / "ingest-pipeline.json").read_text())
        assert json.loads(seen[2][2]) == template()

    def test_bad_retention_refused(self, fake_es: tuple[str, list[Any]]) -> None:
        """A non-numeric RETENTION_DAYS is refused before anything is sent."""
        url, seen = fake_es
        r = subprocess.run(["bash", str(ES / "install.sh")], capture_output=True, text=True,
                           timeout=60, check=False,
                           env={**os.environ, "ES_URL": url, "RETENTION_DAYS": "90 days"})
        assert r.returncode == 2 and "RETENTION_DAYS" in r.stderr and seen == []


def _strip_strings(q: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', q)


class TestQueries:
    """ES|QL, KQL and LogQL queries name only fields that exist."""

    def test_esql_fields_are_mapped(self) -> None:
        """Every dotted field in join.esql is mapped; the source is the data stream."""
        q = (CONFIG / "queries" / "join.esql").read_text()
        assert q.startswith("FROM flowlog\n")
        fields = set(re.findall(r"@timestamp|\b[a-z_]+(?:\.[a-z_]+)+\b", _strip_strings(q)))
        assert {"source.nat.ip", "source.nat.port", "event.action"} <= fields
        assert [f for f in fields if f != "@timestamp" and mapping_of(f) is None] == []

    @pytest.mark.parametrize("name", ["join.kql", "gaps.kql"])
    def test_kql_fields_are_mapped(self, name: str) -> None:
        """Every `field :` / `field <=` in the KQL is mapped."""
        q = (CONFIG / "queries" / name).read_text()
        fields = re.findall(r"([@\w.]+)\s*(?::|<=|>=)", _strip_strings(q))
        assert fields and all(f == "@timestamp" or mapping_of(f) for f in fields), fields

    def test_logql_filters_on_structured_metadata(self) -> None:
        """The selector uses labels the Loki output sets; filters use its structured metadata."""
        out = _loki_output()
        labels = _kv(out["labels"])
        meta = _kv(out["structured_metadata"])
        q = (CONFIG / "queries" / "join.logql").read_text().strip()
        selector = re.match(r"\{([^}]*)\}", q)
        assert selector
        sel_labels = re.findall(r"(\w+)\s*=~?", selector.group(1))
        assert set(sel_labels) <= set(labels)
        filters = re.findall(r"\|\s*(\w+)\s*=~?", q)
        assert {"nat_ip", "nat_port"} <= set(filters) <= set(meta)


def _loki_output() -> dict[str, Any]:
    fb = yaml.safe_load((CONFIG / "loki" / "fluent-bit-loki.yaml").read_text())
    (out,) = [o for o in fb["pipeline"]["outputs"] if o["name"] == "loki"]
    return out


def _kv(text: str) -> dict[str, str]:
    return dict(p.strip().split("=", 1) for p in text.split(","))


def _accessor_field(acc: str) -> str | None:
    if not acc.startswith("$"):
        return None
    root, _, rest = acc[1:].partition("[")
    return ".".join([root, *re.findall(r"'([^']+)'\]", rest)])


class TestLoki:
    """The Loki recipe: bounded labels, join fields as structured metadata, retention."""

    def test_labels_are_low_cardinality(self) -> None:
        """Labels: job, namespace and host only; never an address, port, pod or id."""
        labels = _kv(_loki_output()["labels"])
        assert set(labels) == {"job", "namespace", "host"}
        assert _accessor_field(labels["namespace"]) == "kubernetes.namespace"
        assert _accessor_field(labels["host"]) == "host.name"

    @pytest.mark.parametrize("path", ["loki/fluent-bit-loki.yaml", "fluent-bit.yaml"])
    def test_record_accessors_name_schema_fields(self, path: str) -> None:
        """Every $record['accessor'] in a loki output is a SCHEMA.md field."""
        fb = yaml.safe_load((CONFIG / path).read_text())
        fields = schema_fields()
        for out in (o for o in fb["pipeline"]["outputs"] if o["name"] == "loki"):
            for key in ("labels", "structured_metadata"):
                for k, acc in _kv(out[key]).items():
                    f = _accessor_field(acc)
                    assert f is None or f in fields, (path, k, acc)

    def test_join_fields_are_structured_metadata(self) -> None:
        """NAT address and port, destination and action are structured metadata."""
        meta = {k: _accessor_field(v) for k, v in _kv(_loki_output()["structured_metadata"])
                .items()}
        assert {"source.nat.ip", "source.nat.port", "destination.ip", "destination.port",
                "event.action", "event.id"} <= set(meta.values())

    def test_retention(self) -> None:
        """Compactor retention on, a whole number of days, structured metadata allowed."""
        cfg = yaml.safe_load((CONFIG / "loki" / "loki-retention.yaml").read_text())
        assert cfg["compactor"]["retention_enabled"] is True
        period = cfg["limits_config"]["retention_period"]
        assert re.fullmatch(r"\d+h", period) and int(period[:-1]) % 24 == 0
        assert cfg["limits_config"]["allow_structured_metadata"] is True
        assert cfg["schema_config"]["configs"][-1]["schema"] == "v13"


class TestKibana:
    """The saved-search export is a valid Kibana ndjson export over mapped fields."""

    def _objects(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        lines = (CONFIG / "kibana" / "flowlog-saved-search.ndjson").read_text().splitlines()
        objs = [json.loads(ln) for ln in lines]
        return objs[:-1], objs[-1]

    def test_export_shape_and_references(self) -> None:
        """The summary counts the objects; every reference resolves inside the file."""
        objs, summary = self._objects()
        assert summary["exportedCount"] == len(objs) and summary["missingRefCount"] == 0
        ids = {(o["type"], o["id"]) for o in objs}
        for o in objs:
            for ref in o["references"]:
                assert (ref["type"], ref["id"]) in ids

    def test_search_columns_and_query(self) -> None:
        """Columns are mapped fields; the search source points at the data view."""
        objs, _ = self._objects()
        (search,) = [o for o in objs if o["type"] == "search"]
        (view,) = [o for o in objs if o["type"] == "index-pattern"]
        cols = search["attributes"]["columns"]
        assert {"kubernetes.pod.name", "source.nat.ip", "source.nat.port"} <= set(cols)
        assert [c for c in cols if mapping_of(c) is None] == []
        src = json.loads(search["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
        assert src["query"]["language"] == "kuery"
        assert src["indexRefName"] in {r["name"] for r in search["references"]}
        assert fnmatch.fnmatch("flowlog", view["attributes"]["title"])
        assert view["attributes"]["timeFieldName"] == "@timestamp"


# Property names Fluent Bit accepts on an output, read from its source at commit
# d55459d492c5 (v5.1 line): the generic ones (src/flb_output.c prop_key_check, plus
# "name") and each plugin's config map (plugins/out_es/es.c, plugins/out_loki/loki.c).
_FB_OUTPUT_GENERIC = {
    "name", "alias", "host", "port", "log_level", "log_suppress_interval", "match",
    "match_regex", "retry_limit", "storage.total_limit_size", "workers", "tls", "tls.ca_file",
    "tls.ca_path", "tls.ciphers", "tls.crt_file", "tls.debug", "tls.key_file",
    "tls.key_passwd", "tls.max_version", "tls.min_version", "tls.verify",
    "tls.verify_hostname", "tls.vhost",
}
_FB_OUTPUT_KEYS = {
    "es": {"aws_auth", "aws_external_id", "aws_profile", "aws_region", "aws_role_arn",
           "aws_service_name", "aws_sts_endpoint", "buffer_size", "cloud_auth", "cloud_id",
           "compress", "current_time_index", "generate_id", "http_api_key", "http_passwd",
           "http_user", "id_key", "include_tag_key", "index", "logstash_dateformat",
           "logstash_format", "logstash_prefix", "logstash_prefix_key",
           "logstash_prefix_separator", "path", "pipeline", "replace_dots",
           "suppress_type_name", "tag_key", "time_key", "time_key_format", "time_key_nanos",
           "trace_error", "trace_output", "type", "upstream", "write_operation"},
    "loki": {"uri", "tenant_id", "tenant_id_key", "tenant_id_key_error_handling",
             "partial_success", "labels", "structured_metadata",
             "structured_metadata_map_keys", "auto_kubernetes_labels", "drop_single_key",
             "label_keys", "remove_keys", "line_format", "label_map_path", "http_user",
             "http_passwd", "buffer_size", "bearer_token", "header", "compress"},
}


@pytest.mark.parametrize("path", ["fluent-bit.yaml", "loki/fluent-bit-loki.yaml"])
def test_fluent_bit_output_keys_exist(path: str) -> None:
    """Every property of an es/loki output is one Fluent Bit knows (no typo'd key)."""
    fb = yaml.safe_load((CONFIG / path).read_text())
    for out in fb["pipeline"]["outputs"]:
        unknown = set(out) - _FB_OUTPUT_GENERIC - _FB_OUTPUT_KEYS[out["name"]]
        assert not unknown, (path, out["name"], unknown)


class TestFluentBitConfig:
    """config/fluent-bit.yaml keeps its validated syntax and says it was validated."""

    def test_header_and_syntax(self) -> None:
        """YAML parses with its sections; the header no longer claims it was never validated."""
        text = (CONFIG / "fluent-bit.yaml").read_text()
        assert "Not validated" not in text and "--dry-run" in text
        fb = yaml.safe_load(text)
        assert {"env", "service", "pipeline"} <= set(fb)
