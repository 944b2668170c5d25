"""Remote lists: fetch a list over HTTP(S) and keep an on-disk copy of it.

The copy is what a load reads, so that a start or a reload needs no network and a list
server that is down, slow or broken leaves the last good copy in force. Each fetch is a
conditional GET (ETag / Last-Modified from the copy's metadata), capped in size and time.

:func:`fetch` blocks; the server calls it in a worker thread. Two fetches of the same URL
must not run at once (the copy and its metadata are replaced one after the other).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import json
import os
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Any, Final

from .. import __version__

USER_AGENT: Final = f"dns-filtering-resolver/{__version__} (list fetch)"
_SCHEMES: Final = ("http", "https")
_CHUNK: Final = 64 * 1024

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def forbidden(addr: Address) -> str | None:
    """Why a list must not be fetched from ``addr`` unless the operator allows private
    targets, or ``None``: the resolver's own host (loopback: its admin API, a sidecar),
    link-local (cloud metadata services at 169.254.169.254), unspecified, multicast."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for kind, test in (
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),
        ("unspecified", addr.is_unspecified),
        ("multicast", addr.is_multicast),
    ):
        if test:
            return kind
    return None


_ADVICE: Final = "set remote.allow_private: true in the config if this is intended"


def refused_target(url: str, allow_private: bool) -> str | None:
    """Why ``url`` is refused by its text alone (a loopback or link-local IP address, or
    ``localhost``), or ``None``. Names are checked again, resolved, when fetched."""
    if allow_private:
        return None
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError as exc:
        return f"{url!r} is not a valid URL: {exc}"
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is this machine (loopback); {_ADVICE}"
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    kind = forbidden(addr)
    return f"{host} is a {kind} address; {_ADVICE}" if kind else None


class RefusedTarget(OSError):
    """A fetch would connect to an address the policy on targets refuses."""


def _guarded(allow_private: bool, own: tuple[tuple[str, int], ...]) -> Any:
    """A ``socket.create_connection`` that resolves the host itself and connects only to
    addresses allowed: checked after resolution (a public name may resolve to 127.0.0.1)
    and pinned (the address checked is the address connected to)."""

    def create_connection(
        address: tuple[str, int], timeout: Any = None, source_address: Any = None, **_: Any
    ) -> socket.socket:
        host, port = address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        refused = ""
        last: OSError | None = None
        for family, kind, proto, _name, sockaddr in infos:
            addr = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            why = forbidden(addr) if not allow_private else None
            if why is None and _is_own(addr, port, own):
                why = "this resolver's own admin or metrics endpoint"
            if why is not None:
                refused = refused or f"{host} resolves to {addr}, {why}"
                continue
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not None:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        if last is not None:
            raise last
        advice = "" if "own" in refused else f"; {_ADVICE}"
        raise RefusedTarget(f"refused: {refused}{advice}")

    return create_connection


def _is_own(addr: Address, port: int, own: tuple[tuple[str, int], ...]) -> bool:
    """Whether ``addr``:``port`` reaches one of ``own`` (the admin API, /metrics): the
    same address, or any address of this machine when ``own`` listens on all of them."""
    for host, own_port in own:
        if port != own_port:
            continue
        mine = ipaddress.ip_address(host)
        if addr == mine:
            return True
        if mine.is_unspecified:
            if addr.is_loopback:
                return True
            family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
            # Binding succeeds only to an address this machine holds.
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((str(addr), 0))
                    return True
                except OSError:
                    pass
    return False


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The outcome of a fetch or of reading the copy.

    ``status`` is ``"updated"``, ``"not-modified"``, ``"failed"`` or ``"offline-copy"``.
    ``text`` is the new text, or the on-disk copy's (``None`` if there is none). ``error`` says
    why a fetch failed, naming the URL; on ``"updated"`` it can also carry a warning that the
    new text could not be saved. ``fetched_at`` is the POSIX time of the copy's last successful
    fetch (a 304 counts), or ``None`` if unknown.
    """

    status: str
    text: str | None
    error: str | None
    fetched_at: float | None


def copy_path(url: str, cache_dir: Path) -> Path:
    """Where the copy of ``url`` lives: a name derived from the URL alone, so that the same
    URL always finds its copy and no URL text reaches the file system. Its metadata is the
    same path with the suffix ``.json``."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return cache_dir / f"{digest}.txt"


def _meta_path(url: str, cache_dir: Path) -> Path:
    return copy_path(url, cache_dir).with_suffix(".json")


def _read_meta(url: str, cache_dir: Path) -> dict[str, Any]:
    """The copy's metadata, or ``{}`` if it is missing, unreadable or for another URL."""
    try:
        meta = json.loads(_meta_path(url, cache_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(meta, dict) or meta.get("url") != url:
        return {}
    return meta


def _fetched_at(meta: dict[str, Any]) -> float | None:
    value = meta.get("fetched_at")
    return float(value) if isinstance(value, int | float) else None


def load_copy(url: str, cache_dir: Path) -> FetchResult:
    """Read the on-disk copy of ``url`` without touching the network.

    Return status ``"offline-copy"`` with its text, or ``"failed"`` if there is no readable
    copy (error ``"no copy of <url> yet"`` when there is none at all).
    """
    path = copy_path(url, cache_dir)
    meta = _read_meta(url, cache_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return FetchResult("failed", None, f"no copy of {url} yet", None)
    except OSError as exc:
        return FetchResult("failed", None, f"cannot read the copy of {url}: {exc}", None)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return FetchResult(
            "failed", None, f"the copy of {url} in {path} is not valid UTF-8: {exc}", None
        )
    return FetchResult("offline-copy", text, None, _fetched_at(meta))


class _BadRedirect(urllib.error.HTTPError):
    """A redirect refused here (its reason is our sentence, not the server's text)."""


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: urllib would also follow one to ftp://."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in _SCHEMES:
            raise _BadRedirect(
                req.full_url, code, f"redirect to a non-HTTP URL {newurl}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _GuardedHTTP(urllib.request.HTTPHandler):
    def __init__(self, connect: Any) -> None:
        super().__init__()
        self._connect = connect

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)

    def _connection(self, host: str, **kwargs: Any) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(host, **kwargs)
        conn._create_connection = self._connect  # type: ignore[attr-defined]
        return conn


class _GuardedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext, connect: Any) -> None:
        super().__init__(context=context)
        self._connect = connect
        self._context = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req, context=self._context)

    def _connection(self, host: str, **kwargs: Any) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(host, **kwargs)
        conn._create_connection = self._connect  # type: ignore[attr-defined]
        return conn


def _opener(
    allow_private: bool = False, own: tuple[tuple[str, int], ...] = ()
) -> urllib.request.OpenerDirector:
    # A fresh default context per fetch: it reads SSL_CERT_FILE / SSL_CERT_DIR as they are
    # now, and verifies certificates and host names.
    context = ssl.create_default_context()
    connect = _guarded(allow_private, own)
    return urllib.request.build_opener(
        _GuardedHTTP(connect), _GuardedHTTPS(context, connect), _RedirectHandler()
    )


def fetch(
    url: str,
    cache_dir: Path,
    timeout: float = 10.0,
    max_bytes: int = 64 * 1024 * 1024,
    allow_private: bool = False,
    own: tuple[tuple[str, int], ...] = (),
) -> FetchResult:
    """Fetch ``url`` and, if it changed, replace its copy in ``cache_dir``.

    Send the copy's ETag and Last-Modified as a conditional GET. Return ``"updated"`` with the
    new text, ``"not-modified"`` with the copy's, or ``"failed"`` with the copy's text (if any)
    and a sentence saying why: an HTTP error status, no connection, more than ``timeout``
    seconds without progress or in total (the total can overrun by up to one ``timeout`` while
    a read waits), a body over ``max_bytes``, or text that is not UTF-8. A failed fetch never
    touches the copy. Raise :class:`ValueError` at once for a URL that is not http(s).

    Unless ``allow_private``, no connection is made to a loopback, link-local, unspecified
    or multicast address, whatever the name resolves to (redirects included); never to
    ``own`` (host, port) pairs, the resolver's admin API and /metrics. Errors say the status
    and size of what came back, never its content.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in _SCHEMES or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    # A folder that cannot be made is reported when the copy cannot be saved; the fetch
    # itself can still succeed and serve this run.
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
    old = load_copy(url, cache_dir)
    meta = _read_meta(url, cache_dir) if old.text is not None else {}
    request = _conditional_get(url, meta)

    def failed(why: str) -> FetchResult:
        return FetchResult("failed", old.text, f"fetching {url} failed: {why}", old.fetched_at)

    deadline = time.monotonic() + timeout
    answered = False  # whether the status line and headers came: which timeout it was
    try:
        with _opener(allow_private, own).open(request, timeout=timeout) as response:
            answered = True
            if response.status != 200:
                return failed(f"the server answered HTTP {response.status}, expected 200")
            body = _read_capped(response, max_bytes, deadline)
            etag = response.headers.get("ETag")
            last_modified = response.headers.get("Last-Modified")
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            if exc.code == 304:
                return _not_modified(url, cache_dir, old, meta, exc.headers, failed)
            if isinstance(exc, _BadRedirect):
                return failed(f"the server answered HTTP {exc.code} {exc.reason}")
            # The status code only: the reason phrase and the body are the server's text.
            return failed(f"the server answered HTTP {exc.code}{_size(exc.headers)}")
    except RefusedTarget as exc:
        return failed(str(exc))
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, RefusedTarget):
            return failed(str(exc.reason))
        if isinstance(exc.reason, TimeoutError):
            return failed(f"no answer within {timeout:g} s")
        return failed(f"cannot connect: {exc.reason}")
    except _TooBig:
        return failed(f"the list is larger than the limit of {max_bytes} bytes")
    except TimeoutError:
        if not answered:
            return failed(f"no answer within {timeout:g} s")
        return failed(f"the transfer took longer than {timeout:g} s")
    except (OSError, http.client.HTTPException) as exc:
        return failed(_broke_off(exc, answered))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return failed(f"the list is not valid UTF-8 ({exc})")
    return _save(url, cache_dir, body, text, etag, last_modified)


def _broke_off(exc: OSError | http.client.HTTPException, answered: bool) -> str:
    """Why a fetch failed on a connection or protocol error, before or after the answer."""
    # An HTTPException's text can be the server's own bytes (BadStatusLine quotes the
    # line it got): name the exception only.
    why = type(exc).__name__ if isinstance(exc, http.client.HTTPException) else str(exc)
    why = why or type(exc).__name__
    if not answered:
        return f"the connection broke off before an answer: {why}"
    return f"the transfer broke off: {why}"


def _conditional_get(url: str, meta: dict[str, Any]) -> urllib.request.Request:
    """The request for ``url``, conditional on the copy's validators in ``meta``."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if isinstance(meta.get("etag"), str):
        headers["If-None-Match"] = meta["etag"]
    if isinstance(meta.get("last_modified"), str):
        headers["If-Modified-Since"] = meta["last_modified"]
    return urllib.request.Request(url, headers=headers)


def _save(
    url: str,
    cache_dir: Path,
    body: bytes,
    text: str,
    etag: str | None,
    last_modified: str | None,
) -> FetchResult:
    """Replace the copy of ``url`` with a new ``body`` (``text`` decoded) and its metadata."""
    now = time.time()
    new_meta = {
        "url": url,
        "etag": etag,
        "last_modified": last_modified,
        "fetched_at": now,
        "size": len(body),
    }
    try:
        _write_atomic(copy_path(url, cache_dir), body)
        _write_atomic(_meta_path(url, cache_dir), json.dumps(new_meta, indent=1).encode())
    except OSError as exc:
        # The new text is good and is returned; only the next start will miss it.
        return FetchResult(
            "updated", text, f"fetched {url} but could not save the copy: {exc}", now
        )
    return FetchResult("updated", text, None, now)


def _size(headers: Message | None) -> str:
    length = headers.get("Content-Length") if headers is not None else None
    return f" ({length} bytes)" if length is not None and length.isdigit() else ""


class _TooBig(Exception):
    """The body passed the size cap."""


def _read_capped(response: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    """Read the body, at most ``max_bytes`` of it, before ``deadline`` (monotonic time)."""
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _TooBig  # no need to download what will be refused
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError
        # read1 returns what one receive gives: a server that trickles bytes cannot hold a
        # read (and the deadline check) for longer than the socket timeout.
        chunk = response.read1(min(_CHUNK, max_bytes + 1 - size))
        if not chunk:
            if response.length:
                # read1 does not check a Content-Length the server failed to deliver.
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise _TooBig


def _not_modified(
    url: str,
    cache_dir: Path,
    old: FetchResult,
    meta: dict[str, Any],
    headers: Message,
    failed: Callable[[str], FetchResult],
) -> FetchResult:
    """The server confirmed the copy: note when, and any validators the 304 refreshed."""
    if old.text is None:
        return failed("the server answered 304 Not Modified but there is no copy")
    now = time.time()
    new_meta = dict(meta, url=url, fetched_at=now)
    for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        if headers.get(header):
            new_meta[key] = headers[header]
    # Losing this update only leaves an older fetched_at; the copy itself is unchanged.
    with contextlib.suppress(OSError):
        _write_atomic(_meta_path(url, cache_dir), json.dumps(new_meta, indent=1).encode())
    return FetchResult("not-modified", old.text, None, now)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new, whole."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())  # the data must be on disk before the name points at it
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
