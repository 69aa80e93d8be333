"""A throwaway Kube-OVN-gateway-like lab in network namespaces, and the demo built on it.

Not part of the shipper's record path: the ``demo`` subcommand, the integration
tests and the benchmark use it. Modules:

* :mod:`shipper.lab.topology` - :class:`Lab` (namespaces, links and NAT rules; traffic
  agents), :class:`Server`, :class:`Flood`;
* :mod:`shipper.lab.agents` - the traffic agents, run as ``python -m shipper.lab.agents``;
* :mod:`shipper.lab.host` - the host commands the lab needs and a check for them;
* :mod:`shipper.lab.demo` - ``flowlog-shipper demo``;
* :mod:`shipper.lab.errors` - :class:`LabError`, the lab's own exception.

``from shipper.lab import Lab`` works as before. The names are loaded on first use
(PEP 562): every agent process imports this package first, and must not pay for
pyroute2 (which the topology module imports) on each start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shipper.lab.errors import LabError

if TYPE_CHECKING:
    from shipper.lab.topology import (
        AGENT_MAX_SECONDS,
        Flood,
        FloodResult,
        Lab,
        PodIdentity,
        Server,
    )

__all__ = ["AGENT_MAX_SECONDS", "Flood", "FloodResult", "Lab", "LabError", "PodIdentity",
           "Server"]

_TOPOLOGY_NAMES = frozenset(__all__) - {"LabError"}


def __getattr__(name: str) -> Any:
    """Load the topology module's public names on first access."""
    if name in _TOPOLOGY_NAMES:
        from shipper.lab import topology

        return getattr(topology, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
