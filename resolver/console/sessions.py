"""Console sessions: a bounded table of random session ids with their CSRF tokens, and a
bound on wrong logins per client.

A session id is 32 random bytes, sent once in a cookie and kept here only as its SHA-256,
so a lookup's timing says nothing about the ids held and a dump of the table opens nothing.
The table holds at most ``max_sessions``: creating one more evicts the oldest (counted);
a session ends after ``idle`` seconds unused or ``lifetime`` seconds after login, whichever
comes first.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("resolver.console")

#: The session cookie's name.
COOKIE: Final = "resolver_console"
#: Sessions held at once; an operator's few browsers fit many times over.
MAX_SESSIONS: Final = 64
#: Seconds a session lives unused, and at most in all.
IDLE: Final = 30 * 60
LIFETIME: Final = 12 * 3600
#: A cookie value longer than this is no session id of ours (43 characters).
MAX_COOKIE_VALUE: Final = 64
#: Wrong logins a client may make within ``FAILURE_WINDOW`` seconds before it is locked out
#: for ``LOCKOUT`` seconds; clients remembered at once (the oldest forgotten first).
MAX_FAILURES: Final = 5
FAILURE_WINDOW: Final = 300.0
LOCKOUT: Final = 60.0
MAX_CLIENTS: Final = 1024
#: Wrong tokens from all clients together within ``FAILURE_WINDOW`` before every client
#: without a session is locked out for ``LOCKOUT`` (many addresses, one guesser).
MAX_FAILURES_ALL: Final = 100
#: IPv6 clients are counted per /64: one host holds a whole /64.
IPV6_PREFIX: Final = 64
#: The paths whose form posts carry their own credential (the token, or the CSRF field).
FORM_PATHS: Final = frozenset({"/console/login", "/console/logout"})


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(slots=True)
class Session:
    """One logged-in browser: its CSRF token and its times (monotonic seconds)."""

    key: str
    csrf: str
    created: float
    seen: float


class SessionTable:
    """The sessions of one admin listener."""

    form_paths: frozenset[str] = FORM_PATHS

    def __init__(
        self,
        max_sessions: int = MAX_SESSIONS,
        idle: float = IDLE,
        lifetime: float = LIFETIME,
        clock: Callable[[], float] = time.monotonic,
        guard: LoginGuard | None = None,
    ) -> None:
        self.max_sessions = max(1, max_sessions)
        self.idle = idle
        self.lifetime = lifetime
        self.clock = clock
        self._sessions: dict[str, Session] = {}  # by key, oldest created first
        #: Wrong logins per client (the login form's bound).
        self.guard = guard if guard is not None else LoginGuard(clock=clock)
        #: Sessions created, evicted to make room, expired, and ended by logout.
        self.created = 0
        self.evicted = 0
        self.expired = 0
        self.ended = 0
        self.revoked = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self) -> tuple[str, Session]:
        """A new session: the cookie value (given to the browser only) and the session."""
        now = self.clock()
        if len(self._sessions) >= self.max_sessions:
            for key in [k for k, s in self._sessions.items() if self._over(s, now)]:
                del self._sessions[key]
                self.expired += 1
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[next(iter(self._sessions))]
            self.evicted += 1
        value = secrets.token_urlsafe(32)
        session = Session(_digest(value), secrets.token_urlsafe(32), now, now)
        self._sessions[session.key] = session
        self.created += 1
        return value, session

    def find(self, cookie: str | None) -> Session | None:
        """The live session the ``Cookie`` header names, or None (and an expired one is
        dropped)."""
        value = cookie_value(cookie, COOKIE)
        if not value or len(value) > MAX_COOKIE_VALUE:
            return None
        session = self._sessions.get(_digest(value))
        if session is None:
            return None
        now = self.clock()
        if self._over(session, now):
            del self._sessions[session.key]
            self.expired += 1
            return None
        session.seen = now
        return session

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        """Whether ``given`` is the session's CSRF token, compared in constant time."""
        return bool(given) and hmac.compare_digest(str(given).encode(), session.csrf.encode())

    def end(self, session: Session) -> None:
        """Log out: the session is forgotten."""
        if self._sessions.pop(session.key, None) is not None:
            self.ended += 1

    def revoke_all(self) -> None:
        """End every session (the admin token changed)."""
        self.revoked += len(self._sessions)
        self._sessions.clear()

    def cookie(self, value: str, tls: bool) -> str:
        """The ``Set-Cookie`` value that gives the browser its session."""
        return _cookie(f"{COOKIE}={value}", int(self.lifetime), tls)

    def cleared_cookie(self, tls: bool) -> str:
        """The ``Set-Cookie`` value that makes the browser drop its session cookie."""
        return _cookie(f"{COOKIE}=", 0, tls)

    def _over(self, session: Session, now: float) -> bool:
        return now - session.seen > self.idle or now - session.created > self.lifetime


def _cookie(pair: str, max_age: int, tls: bool) -> str:
    secure = "; Secure" if tls else ""
    return f"{pair}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (the first one), or None."""
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip()
    return None


def client_key(address: str) -> str:
    """The key a client's wrong tokens are counted under: its IPv4 address, or its IPv6
    /64 (a host that holds a /64 could otherwise try 5 tokens from each of 2**64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class LoginGuard:
    """Wrong tokens (the login form, a bearer token) per client (an IPv4 address, an IPv6
    /64): after ``max_failures`` within ``window`` seconds the client is locked out for
    ``lockout`` seconds. At most ``max_clients`` are remembered (the oldest forgotten
    first, counted), so a flood of addresses costs a bounded table; and past
    ``max_failures_all`` wrong tokens from all clients within ``window``, every client is
    locked out for ``lockout`` (an attacker with many addresses gets that many guesses
    per window, not five per address; sessions already open keep working, and so do
    loopback clients, the host's own operators and CLI, locked out only one by one)."""

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window: float = FAILURE_WINDOW,
        lockout: float = LOCKOUT,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        max_failures_all: int = MAX_FAILURES_ALL,
    ) -> None:
        self.max_failures = max(1, max_failures)
        self.window = window
        self.lockout = lockout
        self.max_clients = max(1, max_clients)
        self.max_failures_all = max(1, max_failures_all)
        self.clock = clock
        #: client -> [failures, first failure, locked until]
        self._clients: dict[str, list[float]] = {}
        #: All clients together: [failures, first failure, locked until].
        self._all = [0.0, 0.0, 0.0]
        #: Times every client was locked out at once.
        self.global_lockouts = 0
        #: Right and wrong logins, logins refused while locked out, lockouts, clients
        #: forgotten.
        self.succeeded = 0
        self.failed = 0
        self.refused = 0
        self.lockouts = 0
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._clients)

    def locked(self, client: str) -> float:
        """Seconds ``client`` remains locked out (0: it may try); a try refused is counted."""
        entry = self._clients.get(client_key(client))
        now = self.clock()
        left = entry[2] - now if entry else 0.0
        if not _loopback(client):  # the host's own operators (the CLI) keep their way in
            left = max(left, self._all[2] - now)
        if left > 0:
            self.refused += 1
            return left
        return 0.0

    def failure(self, client: str) -> None:
        """A wrong token from ``client``."""
        self.failed += 1
        now = self.clock()
        self._count_all(now)
        client = client_key(client)
        entry = self._clients.get(client)
        if entry is None:
            if len(self._clients) >= self.max_clients:
                del self._clients[next(iter(self._clients))]
                self.forgotten += 1
            entry = self._clients[client] = [0.0, now, 0.0]
        if self._strike(entry, now, self.max_failures):
            self.lockouts += 1

    def success(self, client: str) -> None:
        """The right token: ``client``'s failures are forgotten."""
        self.succeeded += 1
        self._clients.pop(client_key(client), None)

    def _strike(self, entry: list[float], now: float, limit: int) -> bool:
        """One wrong token on ``entry`` ([failures, window start, locked until]), a
        client's or all clients'; True when it locks (``limit`` within the window)."""
        if now - entry[1] > self.window:
            entry[0], entry[1] = 0.0, now
        entry[0] += 1
        if entry[0] < limit:
            return False
        entry[0], entry[1], entry[2] = 0.0, now, now + self.lockout
        return True

    def _count_all(self, now: float) -> None:
        if self._strike(self._all, now, self.max_failures_all):
            self.global_lockouts += 1
            log.warning(
                "%d wrong admin tokens within %.0f s from many clients: every login and "
                "bearer token is refused for %.0f s (open console sessions keep working)",
                self.max_failures_all,
                self.window,
                self.lockout,
            )
