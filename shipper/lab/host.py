"""The host commands the lab runs, and a check that they are installed.

Namespaces, links, addresses and routes are made through netlink (pyroute2), sysctls
are written to ``/proc/sys`` from inside the namespace, and processes are forked
from a thread inside the namespace, so the only commands the lab needs from the
host are the ones that write the NAT rules. The container image does
not ship them (it runs the shipper, not the lab).
"""

from __future__ import annotations

import shutil

#: Command -> the Debian/Ubuntu package that provides it.
REQUIRED_TOOLS: dict[str, str] = {"iptables": "iptables", "ip6tables": "iptables"}


def missing_tools(ipv6: bool = True, path: str | None = None) -> list[str]:
    """Return the lab's host commands not found on ``path`` (default ``$PATH``), in order."""
    tools = [t for t in REQUIRED_TOOLS if ipv6 or t != "ip6tables"]
    return [t for t in tools if shutil.which(t, path=path) is None]


def missing_tools_message(missing: list[str]) -> str:
    """A one-paragraph explanation naming ``missing`` and how to install them."""
    packages = sorted({REQUIRED_TOOLS[t] for t in missing})
    return (f"missing host commands: {', '.join(missing)} (not found on PATH). The lab "
            f"writes its MASQUERADE rules with them. Install them on the host "
            f"(Debian/Ubuntu: apt-get install {' '.join(packages)}; or run "
            f"'bash scripts/install.sh' in a checkout) and run the demo there, as root; "
            f"the container image does not include them.")
