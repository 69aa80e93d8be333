"""tests/conftest.py: in CI (CI=true) a skipped kernel test fails; elsewhere it is a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SAMPLE = '''
import pytest

@pytest.mark.kernel
def test_kernel_skips_itself():
    pytest.skip("no netfilter here")

@pytest.mark.kernel
@pytest.mark.skipif(True, reason="marked skip")
def test_kernel_skip_mark():
    pass

def test_plain_skip():
    pytest.skip("not a kernel test")

@pytest.mark.kernel
def test_kernel_runs():
    pass
'''


def run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """Run pytest on SAMPLE with this repository's tests/conftest.py as a plugin."""
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-rA", "-q", "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="counts assume the kernel test runs (root)")
class TestCiSkips:
    def test_in_ci_a_skipped_kernel_test_fails(self, tmp_path: Path) -> None:
        """CI=true: both ways of skipping a kernel test fail (a skip mark acts in set-up, so
        it shows as an error), with the reason; other skips stay skips."""
        res = run(tmp_path, "true")
        assert res.returncode == 1, res.stdout
        assert "1 failed, 1 passed, 1 skipped, 1 error" in res.stdout
        assert "FAILED test_sample.py::test_kernel_skips_itself" in res.stdout
        assert "ERROR test_sample.py::test_kernel_skip_mark" in res.stdout
        assert "a failure there: marked skip" in res.stdout
        assert "kernel test skipped in CI (CI=true), a failure there: no netfilter here" \
            in res.stdout

    @pytest.mark.parametrize("ci", [None, "false"])
    def test_outside_ci_a_skip_is_a_skip(self, tmp_path: Path, ci: str | None) -> None:
        """Without CI=true, skipped kernel tests are reported as skips."""
        res = run(tmp_path, ci)
        assert res.returncode == 0, res.stdout
        assert "1 passed, 3 skipped" in res.stdout
