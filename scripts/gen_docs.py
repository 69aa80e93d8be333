"""Generate docs/CONFIG.md and docs/METRICS.md from the code (the single source of truth).

    python3 scripts/gen_docs.py          rewrite both files
    python3 scripts/gen_docs.py --check  exit 1 if either is out of date (the tests run this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402

from shipper.config import Config  # noqa: E402
from shipper.metrics import DEFS  # noqa: E402


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


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for path, text in ((ROOT / "docs" / "CONFIG.md", config_md()),
                       (ROOT / "docs" / "METRICS.md", metrics_md())):
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
