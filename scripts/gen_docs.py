"""Generate docs from the code (the single source of truth).

docs/CONFIG.md and docs/METRICS.md entirely; in docs/SCHEMA.md, the field table and
the examples between the ``<!-- BEGIN GENERATED ... -->`` / ``<!-- END GENERATED ... -->``
markers (from ``shipper/schema.py`` and records encoded from the captured kernel
messages in tests/data/); the rest of SCHEMA.md is hand-written prose.

    python3 scripts/gen_docs.py          rewrite the files
    python3 scripts/gen_docs.py --check  exit 1 if any is out of date (the tests run this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402

from shipper import ecs, schema  # noqa: E402
from shipper.config import Config  # noqa: E402
from shipper.ecs_json import JsonLineEncoder  # noqa: E402
from shipper.enrich.pods import pod_from_dict  # noqa: E402
from shipper.metrics import DEFS  # noqa: E402
from shipper.record import ip_to_str  # noqa: E402
from shipper.sources.decode import LayoutDecoder  # noqa: E402

CAPTURE = ROOT / "tests" / "data" / "ctnetlink_messages.json"
EXAMPLE_HOST = "node-a"
EXAMPLE_RECEIVED_NS = 1_795_766_503_887_525_603


def _default(field: Any, name: str) -> str:
    if name == "node_name":
        return "`$NODE_NAME`, else the hostname"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    return "`" + json.dumps(value, default=str) + "`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.append(f"| **`{key}`** | | {f.description or ''} |")
            out.extend(_rows(ann, key + "."))
            continue
        desc = (f.description or "").replace("|", "\\|")
        out.append(f"| `{key}` | {_default(f, name)} | {desc} |")
    return out


def config_md() -> str:
    """The configuration reference."""
    return "\n".join([
        "# Configuration reference",
        "",
        "Generated from `shipper/config.py` by `python3 scripts/gen_docs.py`; do not edit by",
        "hand. One YAML file (`--config`); every key is optional and has the default shown.",
        "Unknown keys are errors naming the key and the file; `flowlog-shipper check-config`",
        "validates a file and prints the effective configuration. CLI flags override the file",
        "(see `flowlog-shipper run --help`). An annotated example: `config/flowlog-shipper.yaml`.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
        *_rows(Config),
        "",
    ])


def metrics_md() -> str:
    """The metrics reference."""
    rows = []
    for d in DEFS.values():
        labels = ", ".join(f"`{x}`" for x in d.labels) or ""
        rows.append(f"| `{d.name}` | {d.kind} | {labels} | {d.help} |")
    return "\n".join([
        "# Metrics reference",
        "",
        "Generated from `shipper/metrics.py` by `python3 scripts/gen_docs.py`; do not edit by",
        "hand. Served in the Prometheus text format on `metrics.address` (default",
        "`0.0.0.0:9808`, path `/metrics`). Counters end in `_total`; every drop carries a",
        "`reason`; a retry is never counted as a drop. The same server answers `/healthz`",
        "and `/readyz` (see README, Health probes).",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


def _example_pod(family: int, ip: int) -> Any:
    return pod_from_dict({
        "metadata": {
            "namespace": "shop", "name": "checkout-7d9f8b6c5d-x2x7q",
            "uid": "5f0c2d1e-4b7a-4c1e-9a55-0c7b1d2e3f40",
            "labels": {"app": "checkout", "pod-template-hash": "7d9f8b6c5d"},
            "annotations": {"ovn.kubernetes.io/logical_switch": "ovn-default"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "checkout-7d9f8b6c5d",
                                 "controller": True, "apiVersion": "apps/v1", "uid": "r-1"}],
        },
        "spec": {"nodeName": EXAMPLE_HOST},
        "status": {"phase": "Running", "podIP": ip_to_str(family, ip)},
    })


def examples_md() -> str:
    """SCHEMA.md's examples, each action's first captured TCP/IPv4 message and a gap.

    A message with counters where the capture has one; encoded by the NDJSON
    encoder with an example pod.
    """
    dec = LayoutDecoder()
    events = []
    for m in json.loads(CAPTURE.read_text()):
        ev, _ = dec.decode(bytes.fromhex(m["hex"]), 0, EXAMPLE_RECEIVED_NS)
        if ev is not None:
            events.append(ev)
    enc = JsonLineEncoder(EXAMPLE_HOST)
    out = []
    for action in ("new", "destroy", "snapshot", "update"):
        tcp4 = [e for e in events if e.action == action and e.proto == 6 and e.family == 4]
        ev = next((e for e in tcp4 if e.orig_bytes is not None), tcp4[0])
        # Without the kernel's start time, the flow started at its `new` event (all
        # captured messages are decoded as read at one instant).
        start = None if ev.ts_start else EXAMPLE_RECEIVED_NS
        line = enc.encode(ev, _example_pod(ev.family, ev.orig_src), start)
        out += [f"### `{action}`", "", "```json", json.dumps(json.loads(line), indent=2),
                "```", ""]
    gap = ecs.gap_record(EXAMPLE_HOST, since_ns=EXAMPLE_RECEIVED_NS,
                         until_ns=EXAMPLE_RECEIVED_NS + 300_000_000, lost=2994, overruns=1,
                         resync=True)
    out += ["### `gap`", "", "```json", json.dumps(gap, indent=2), "```"]
    return "\n".join(out)


def _splice(text: str, name: str, body: str, path: Path) -> str:
    """Replace what lies between the BEGIN/END GENERATED markers called ``name``."""
    begin = f"<!-- BEGIN GENERATED {name} (scripts/gen_docs.py; do not edit by hand) -->"
    end = f"<!-- END GENERATED {name} -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise SystemExit(f"{path}: needs exactly one {begin!r} and one {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def schema_md(path: Path) -> str:
    """docs/SCHEMA.md with its generated parts replaced."""
    text = path.read_text()
    text = _splice(text, "fields", schema.field_table(), path)
    return _splice(text, "examples", examples_md(), path)


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    schema_path = ROOT / "docs" / "SCHEMA.md"
    for path, text in ((ROOT / "docs" / "CONFIG.md", config_md()),
                       (ROOT / "docs" / "METRICS.md", metrics_md()),
                       (schema_path, schema_md(schema_path))):
        current = path.read_text() if path.exists() else ""
        if current != text:
            if check:
                stale.append(str(path.relative_to(ROOT)))
            else:
                path.write_text(text)
    if stale:
        print("out of date (run python3 scripts/gen_docs.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
