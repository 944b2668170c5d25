# syntax=docker/dockerfile:1
# The DNS filtering resolver as a container image.
#
#   docker build -t dns-filtering-resolver:0.1.0 .
#   docker run -d --name resolver -p 53:5353/udp -p 53:5353/tcp dns-filtering-resolver:0.1.0
#
# It runs as the numeric non-root user 10053 and listens on the unprivileged port 5353
# (UDP and TCP, every address): map port 53 of the host to it. To listen on 53 inside the
# container instead, allow unprivileged ports from 53 in the container's network namespace
# and say so in the config (see docs/deployment.md):
#   docker run --sysctl net.ipv4.ip_unprivileged_port_start=53 -p 53:53/udp -p 53:53/tcp \
#       -v "$PWD/config:/etc/resolver/config:ro" dns-filtering-resolver:0.1.0
#
# Layout:
#   /etc/resolver/config/resolver.yaml  the config (deploy/compose/config/resolver.yaml)
#   /etc/resolver/blocklists/           the lists (the shipped blocklists/)
#   /var/lib/resolver/                  state: copies of remote lists (RESOLVER_STATE_DIR)
# Mount directories there, not single files: the resolver watches them and reloads on change.

# ---------------------------------------------------------------------------------------
# Build: a virtual environment in /opt/resolver with the package, its fast extra (uvloop),
# its quic extra (aioquic, for DNS over QUIC; installed in the final stage) and
# its per-query modules compiled by mypyc (setup.py, RESOLVER_COMPILE=1: a forwarded miss
# then takes about a fifth less CPU), and with the C loop of the batched UDP listener
# (resolver/_fastudp.c: repeated questions answered without the interpreter; setup.py builds
# it wherever a compiler is, and the install below fails if the image would lack it). The
# full python image has the C compiler; mypy, the package's dependencies it type-checks
# against, and the compiler stay in this stage. Both stages name the same Debian release, so
# the compiled modules meet the glibc they were built for.
FROM python:3.11-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY resolver/ ./resolver/

RUN python -m venv .build \
    && .build/bin/pip install --no-cache-dir ".[fast,compile]" \
    && RESOLVER_COMPILE=1 .build/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps \
        --wheel-dir dist .

# The venv keeps its absolute path in the final stage (its scripts' #! lines name it).
# pip and setuptools are removed once the package is in: the image never installs anything.
# Dependencies only as wheels: none may be compiled here against libraries the slim image
# lacks.
RUN python -m venv /opt/resolver \
    && /opt/resolver/bin/pip install --no-cache-dir --only-binary=:all: "$(ls dist/*.whl)[fast,quic]" \
    && /opt/resolver/bin/pip uninstall --yes pip setuptools \
    && /opt/resolver/bin/python -I -c "import resolver._fastudp" \
    && /opt/resolver/bin/resolver --help > /dev/null

# ---------------------------------------------------------------------------------------
# Run: the venv, the shipped lists and the container config; nothing else.
FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0
ARG SOURCE_URL=""

LABEL org.opencontainers.image.title="dns-filtering-resolver" \
      org.opencontainers.image.description="A DNS filtering resolver with date-activated blocklists: sinkhole, forwarding, cache, audit log, Prometheus metrics" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

# A fixed numeric user and group (10053), with a passwd entry for tools that look it up.
RUN groupadd --system --gid 10053 resolver \
    && useradd --system --no-log-init --uid 10053 --gid 10053 \
        --home-dir /var/lib/resolver --no-create-home --shell /usr/sbin/nologin resolver \
    && install -d -o 10053 -g 10053 -m 0750 /var/lib/resolver

COPY --from=builder /opt/resolver /opt/resolver
# Config and lists belong to root and are only read by the resolver.
COPY blocklists/ /etc/resolver/blocklists/
COPY deploy/compose/config/resolver.yaml /etc/resolver/config/resolver.yaml

ENV PATH="/opt/resolver/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RESOLVER_STATE_DIR=/var/lib/resolver \
    RESOLVER_BLOCKLISTS=/etc/resolver/blocklists

USER 10053:10053
WORKDIR /var/lib/resolver

# 5353: DNS over UDP and TCP (map 53 to it); 9153: /metrics; 8053: the admin API, on the
# container's loopback in the default config (publish it only with admin.token set).
EXPOSE 5353/udp 5353/tcp 9153/tcp 8053/tcp

VOLUME ["/etc/resolver/config", "/etc/resolver/blocklists", "/var/lib/resolver"]

# A real DNS question that the resolver answers itself (ANY over UDP, RFC 8482): healthy
# while it answers, whatever its upstreams do (their health is the admin API's /readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/opt/resolver/bin/resolver", "healthcheck", "--server", "127.0.0.1:5353", "--timeout", "3"]

# SIGTERM stops taking queries, finishes those in progress (drain_timeout) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/resolver/bin/resolver"]
CMD ["serve", "--config", "/etc/resolver/config/resolver.yaml"]
