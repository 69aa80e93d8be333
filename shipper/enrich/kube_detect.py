"""Whether the Kubernetes API source is configured, decided with the standard library only.

Kept apart from :mod:`shipper.enrich.kube` so the decision can be made even
when the Kubernetes client library cannot be imported: a configured source
whose client cannot load is then a start-up error naming the missing package,
never a silent no-op.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shipper.config import Config

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster_available(service_account: Path | None = None) -> bool:
    """True when this process runs in a pod with a service-account token."""
    sa = service_account if service_account is not None else SERVICE_ACCOUNT_DIR
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (sa / "token").is_file()


def kubeconfig_path(cfg: Config) -> Path | None:
    """``kubernetes.kubeconfig``, else the first file of ``$KUBECONFIG``, else None."""
    if cfg.kubernetes.kubeconfig is not None:
        return cfg.kubernetes.kubeconfig
    env = os.environ.get("KUBECONFIG", "").strip()
    if env:
        # Like kubectl, KUBECONFIG may list several files; the first one is used.
        return Path(env.split(os.pathsep)[0])
    return None


def kube_enabled(cfg: Config) -> bool:
    """True when the API source should run: a kubeconfig is given, or in-cluster credentials exist.

    Order: ``kubernetes.kubeconfig``, then ``$KUBECONFIG``, then (with
    ``in_cluster: auto``) the pod's service account.
    """
    if kubeconfig_path(cfg) is not None:
        return True
    return cfg.kubernetes.in_cluster == "auto" and in_cluster_available()
