# flowlog-shipper image. Build: docker build -t flowlog-shipper .
# Runs as root with CAP_NET_ADMIN (netlink subscription, SO_RCVBUFFORCE, sysctls) in the
# host network namespace of a gateway node; see manifests/daemonset.yaml.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shipper ./shipper
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
# conntrack (debugging: conntrack -L / -E next to the shipper), iproute2 (ip netns).
RUN apt-get update \
 && apt-get install -y --no-install-recommends conntrack iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /install /usr/local
ENV PYTHONUNBUFFERED=1
EXPOSE 9808
ENTRYPOINT ["flowlog-shipper"]
CMD ["run", "--config", "/etc/flowlog/flowlog-shipper.yaml"]
