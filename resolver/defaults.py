"""The default value of every setting that both the config and a component need.

Plain constants and no imports from the package, so that the config (which documents and
validates the settings) and the components (which take them as plain values) both depend on
this module instead of on each other. A setting that only the config knows keeps its
default in its dataclass (resolver/config/model.py).
"""

from __future__ import annotations

from typing import Final

# The answer cache (resolver/core/cache.py) and the answer memo (resolver/core/pipeline.py).
DEFAULT_CACHE_MAX_ENTRIES: Final = 100_000
DEFAULT_CACHE_MAX_BYTES: Final = 256 * 1024 * 1024
DEFAULT_CACHE_MAX_TTL: Final = 86_400
DEFAULT_CACHE_MAX_NEGATIVE_TTL: Final = 3_600
#: Seconds to wait for upstreams before serving a stale answer.
DEFAULT_STALE_TIMER: Final = 1.8
DEFAULT_MEMO_MAX_BYTES: Final = 16 * 1024 * 1024
#: Bytes of queries the kernel may hold for each UDP listening socket (udp.receive_buffer):
#: about 5,000 queries that arrive while the loop is busy (a reload, a pause of the
#: process), where Linux's usual default holds about 270 and drops the rest unseen.
DEFAULT_UDP_RECEIVE_BUFFER: Final = 4 * 1024 * 1024
#: The most udp.receive_buffer may ask for.
MAX_UDP_RECEIVE_BUFFER: Final = 1 << 30
#: The answer memo's entries per transport.
DEFAULT_MEMO_MAX_ENTRIES: Final = 50_000
#: Queries waiting for upstreams at once; beyond, SERVFAIL.
DEFAULT_INFLIGHT_MAX: Final = 4096

# The access list and rate limit (resolver/core/guard.py).
#: Loopback, RFC 1918, RFC 4193 (unique local), link-local, IPv4-mapped loopback.
DEFAULT_ALLOW: Final = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    "169.254.0.0/16",
    "fe80::/10",
)
DEFAULT_RATELIMIT_IPV6_PREFIX: Final = 56
DEFAULT_RATELIMIT_MAX_CLIENTS: Final = 100_000

# TCP listeners (resolver/service/listeners.py).
DEFAULT_TCP_IDLE: Final = 10.0
DEFAULT_TCP_MAX_CONNECTIONS: Final = 1000
DEFAULT_TCP_MAX_PIPELINE: Final = 100
#: Bytes of answers a client has not read yet before its connection stops reading.
DEFAULT_TCP_MAX_OUTPUT: Final = 64 * 1024
DEFAULT_TCP_MAX_PER_CLIENT: Final = 100

# The admin API and /metrics (resolver/service/http.py).
#: HTTP connections open at once on each listener.
DEFAULT_HTTP_MAX_CONNECTIONS: Final = 64

# Forwarding (resolver/upstream/).
DEFAULT_UPSTREAM_TIMEOUT: Final = 1.0
DEFAULT_UPSTREAM_DEADLINE: Final = 2.5
#: Transport failures in a row (timeouts, refused connections, TLS or HTTP failures) that
#: mark an upstream down (``upstream_health.max_fails``).
DEFAULT_DOWN_AFTER: Final = 3
#: While an upstream is down, it is probed after this many seconds, the wait doubling after
#: each failed probe up to DEFAULT_MAX_BACKOFF (``upstream_health.probe_interval``,
#: ``probe_max_interval``).
DEFAULT_PROBE_INTERVAL: Final = 0.5
DEFAULT_MAX_BACKOFF: Final = 30.0
#: What a probe asks (``upstream_health.probe_name``): the root's NS records, which every
#: recursive resolver answers from its priming data.
DEFAULT_PROBE_NAME: Final = "."
#: The upstream strategies (``upstream_strategy``), the default first.
STRATEGIES: Final = ("failover", "random", "fastest", "parallel")

# The audit log (resolver/observe/querylog.py).
#: Rotate the file when it would exceed this many bytes.
#: Where DNS over HTTPS answers (RFC 8484's example path, which clients assume).
DEFAULT_DOH_PATH: Final = "/dns-query"
DEFAULT_AUDIT_MAX_BYTES: Final = 64 * 2**20
#: Rotated files kept: path.1 ... path.<keep>.
DEFAULT_AUDIT_KEEP: Final = 7
DEFAULT_AUDIT_QUEUE_SIZE: Final = 10_000
