"""Shared test policy and fixtures.

- ``@pytest.mark.kernel`` tests need root (network namespaces, netfilter): they are
  skipped elsewhere, except in CI (``CI=true``), where a skipped kernel test is a
  failure, so a CI machine that cannot run them cannot pass by skipping them.
- ``lab``: a fresh network-namespace lab (``shipper.lab.Lab``, unique names) for one
  test, removed afterwards also when the test fails. Its arguments come from the
  closest ``@pytest.mark.lab(...)`` (default ``Lab(pods=3)``). A module that needs more
  set-up overrides ``lab`` with a fixture of the same name that takes this one.
- ``no_ambient_kube``: no Kubernetes or proxy settings inherited from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from shipper.lab import Lab

NEEDS_ROOT = "needs root for network namespaces"


def in_ci() -> bool:
    """True when running in CI (the ``CI`` environment variable is ``true``)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip kernel tests when not root (a failure in CI, see the report hook)."""
    if os.geteuid() == 0:
        return
    for item in items:
        if item.get_closest_marker("kernel") is not None:
            item.add_marker(pytest.mark.skip(reason=NEEDS_ROOT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None],
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI, turn a skipped kernel test (in any phase, for any reason) into a failure."""
    report = yield
    if (report.skipped and not hasattr(report, "wasxfail") and in_ci()
            and item.get_closest_marker("kernel") is not None):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"kernel test skipped in CI (CI=true), a failure there: {reason}"
    return report


@pytest.fixture
def no_ambient_kube(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Kubernetes config from the environment (a shipper child inherits it: no real
    cluster, no in-cluster detection) and no proxy for loopback API servers. Use with
    ``pytest.mark.usefixtures("no_ambient_kube")``."""
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh lab; ``@pytest.mark.lab(pods=1, ipv6=False)`` and the like set its arguments."""
    marker = request.node.get_closest_marker("lab")
    kwargs: dict[str, Any] = {"pods": 3, **(marker.kwargs if marker is not None else {})}
    with Lab(**kwargs) as built:
        yield built
