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


class TestManifests:
    """The Kubernetes manifests parse and agree with each other and the config schema."""

    def test_configmap_config_is_valid(self, tmp_path: Path) -> None:
        """The ConfigMap's flowlog-shipper.yaml passes the shipper's own validation."""
        import yaml

        from shipper import config

        cm = yaml.safe_load((ROOT / "manifests" / "base" / "configmap.yaml").read_text())
        path = tmp_path / "c.yaml"
        path.write_text(cm["data"]["flowlog-shipper.yaml"])
        cfg = config.load(path)
        assert cfg.sink.type == "forward"

    def test_daemonset_uses_rbac_and_configmap(self) -> None:
        """The DaemonSet runs as the RBAC service account, mounts the ConfigMap, has NET_ADMIN."""
        import yaml

        ds = yaml.safe_load((ROOT / "manifests" / "base" / "daemonset.yaml").read_text())
        rbac = list(yaml.safe_load_all((ROOT / "manifests" / "base" / "rbac.yaml").read_text()))
        sa = next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"]["name"]
        spec = ds["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == sa
        assert spec["hostNetwork"] is True
        assert any(v.get("configMap", {}).get("name") == "flowlog-shipper"
                   for v in spec["volumes"])
        caps = spec["containers"][0]["securityContext"]["capabilities"]["add"]
        assert "NET_ADMIN" in caps
        role = next(d for d in rbac if d["kind"] == "ClusterRole")
        verbs = {v for r in role["rules"] for v in r["verbs"]}
        assert verbs == {"get", "list", "watch"}
