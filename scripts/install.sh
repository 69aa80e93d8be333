#!/usr/bin/env bash
# Install what flowlog-shipper needs on a Debian machine, as root, into ./.venv.
#   bash scripts/install.sh          runtime only
#   bash scripts/install.sh --test   plus the test, lint and type-check tools
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (it installs Debian packages and the demo/tests need CAP_NET_ADMIN)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# iptables/ip6tables (MASQUERADE in the lab), conntrack (the comparison in the benchmark and
# the tests), iproute2 (ip netns in the tests), ping, procps (sysctl), openssl
# (test certificates), kmod (modprobe).
retry() {  # a passing network hiccup should not fail a whole install
  local n
  for n in 1 2 3; do
    "$@" && return 0
    echo "install.sh: attempt $n of '$*' failed; retrying" >&2
    sleep $((n * 5))
  done
  "$@"
}
retry apt-get update -qq
retry apt-get install -y -qq --no-install-recommends \
  iptables conntrack iproute2 iputils-ping procps kmod openssl ca-certificates curl \
  python3 python3-venv python3-pip >/dev/null
for m in nf_conntrack nf_conntrack_netlink nf_nat iptable_nat ip6table_nat; do
  modprobe -q "$m" 2>/dev/null || true   # built in, or loaded on demand by iptables
done
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
retry .venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # A real syslog/RELP receiver for the syslog sink's tests (they start their own rsyslogd
  # on loopback with a private config; the system service is not used): imtcp, TLS through
  # the gtls and ossl drivers, imrelp.
  retry apt-get install -y -qq --no-install-recommends \
    rsyslog rsyslog-gnutls rsyslog-openssl rsyslog-relp >/dev/null
  # GNU time: peak RSS of the commands the benchmarks compare (bench/bench_dump.py).
  retry apt-get install -y -qq --no-install-recommends time >/dev/null
  # gcc: bench_events.py builds the LD_PRELOAD shim that gives conntrack -E's event socket
  # the asked buffer (its test too); bench_callgrind.py its client-request library.
  retry apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
  # ulogd2 with its JSON output plugin: the second peer of bench/bench_events.py, which
  # starts its own ulogd with a private config in the lab's namespace. The package's
  # system service (the NFLOG stack of /etc/ulogd.conf) is not needed: stop it where
  # systemd runs.
  retry apt-get install -y -qq --no-install-recommends ulogd2 ulogd2-json >/dev/null
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now ulogd2.service >/dev/null 2>&1 || true
  fi
  retry .venv/bin/python -m pip install -q -e ".[test]"
else
  retry .venv/bin/python -m pip install -q -e .
fi
