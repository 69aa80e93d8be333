"""``flowlog-shipper demo`` end to end on the real kernel, as a user runs it.

Needs root, iptables/ip6tables and netfilter NAT (``-m kernel``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel]


def _netns_with_prefix(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in Path("/run/netns").iterdir()
                      if p.name.startswith(prefix + "-"))
    except FileNotFoundError:
        return []


class TestDemo:
    def test_demo_attributes_every_connection_and_leaves_nothing(self, tmp_path: Path) -> None:
        """`python -m shipper demo --pods 2` exits 0, all correct; no namespace is left."""
        records = tmp_path / "records.json"
        proc = subprocess.Popen([sys.executable, "-m", "shipper", "demo", "--pods", "2",
                                 "--keep-output", str(records)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        try:
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, f"{out}\n{err}"
        assert "10/10 connections attributed to the pod that made them (all correct)" in out
        assert records.stat().st_size > 0
        # The lab's default prefix is fl<pid>x<n>, the pid being the demo process's.
        assert _netns_with_prefix(f"fl{proc.pid}x0") == []
        assert not Path(f"/tmp/fl{proc.pid}x0-lab").exists()
