"""The generated references stay true to the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class TestGeneratedDocs:
    """docs/CONFIG.md and docs/METRICS.md match what the code defines."""

    def test_config_and_metrics_docs_are_current(self) -> None:
        """scripts/gen_docs.py --check passes: every option and metric is documented."""
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stdout + res.stderr

    def test_readme_commands_exist(self) -> None:
        """The README's two commands point at scripts that exist."""
        readme = (ROOT / "README.md").read_text()
        assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
        assert (ROOT / "scripts" / "demo.sh").exists() and (ROOT / "scripts" / "test.sh").exists()
        assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
