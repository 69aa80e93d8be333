# flowlog-shipper image, deployed by manifests/ (kubectl apply -k manifests/).
#   docker build -t flowlog-shipper:0.1.0 .
# Tag it with project.version from pyproject.toml: manifests/base/kustomization.yaml pins
# that tag, and tests/unit/test_manifests.py checks the two agree. CI lints this file
# with hadolint (scripts/test.sh).
#
# Python dependencies come from requirements.lock: every package, direct and indirect,
# at an exact version with its hashes (pip --require-hashes), generated from
# pyproject.toml. After changing dependencies in pyproject.toml, regenerate it with
#   uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes -o requirements.lock
# (tests/unit/test_lockfile.py fails while pyproject.toml and the lock disagree).
#
# Privileges: the shipper runs as root (uid 0) with every capability dropped except
# CAP_NET_ADMIN (manifests/base/daemonset.yaml, container securityContext).
# - NET_ADMIN: the kernel refuses the ctnetlink event subscription and the table dump
#   without it (EPERM), and SO_RCVBUFFORCE (a receive buffer past net.core.rmem_max,
#   so bursts are not lost) needs it.
# - Root: Kubernetes has no ambient capabilities, so a non-root process loses the added
#   NET_ADMIN when it execs; uid 0 keeps it. Root here is not all-powerful: no other
#   capability (not even DAC_OVERRIDE; everything it reads or writes - config, mounted
#   secrets, the spool directory - is owned by root), no privilege escalation, a
#   read-only root filesystem and the runtime's default seccomp profile.
# - Not SYS_ADMIN: with hostNetwork the shipper reads conntrack in its own network
#   namespace and never calls setns(2). Only conntrack.netns / --netns (reading another
#   namespace, e.g. a gateway pod's) calls setns(CLONE_NEWNET), which needs
#   CAP_SYS_ADMIN: setns fails with EPERM under NET_ADMIN alone and works with
#   NET_ADMIN + SYS_ADMIN. Add SYS_ADMIN (and /run/netns mounted from the host) only
#   for that setup. tests/integration/test_privileges_kernel.py checks these points
#   on the real kernel (the CLI with its capabilities cut down by setpriv).
# - The conntrack sysctls (nf_conntrack_events/acct/timestamp) are set by the
#   DaemonSet's short privileged init container, because container runtimes mount
#   /proc/sys read-only; the shipper itself only reads and reports them.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (their own layer, rebuilt only when the lock changes), exactly as
# locked; then the project itself without resolving anything again.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes --prefix=/install -r requirements.lock
COPY pyproject.toml README.md ./
COPY shipper ./shipper
RUN pip install --no-cache-dir --no-deps --prefix=/install .

FROM python:3.11-slim-bookworm
# conntrack (conntrack -L / -S / -E next to the shipper when troubleshooting) and
# iproute2 (ip netns). Not pinned to exact Debian versions on purpose: the base image
# fixes the Debian release, within which versions change only for security and
# important fixes, and a pin would break the build when the archive replaces the
# pinned version.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends conntrack iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /install /usr/local
ENV PYTHONUNBUFFERED=1
EXPOSE 9808
ENTRYPOINT ["flowlog-shipper"]
CMD ["run", "--config", "/etc/flowlog/flowlog-shipper.yaml"]
