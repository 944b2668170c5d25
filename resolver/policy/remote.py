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
import json
import os
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
            raise urllib.error.HTTPError(
                req.full_url, code, f"redirect to a non-HTTP URL {newurl}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    # A fresh default context per fetch: it reads SSL_CERT_FILE / SSL_CERT_DIR as they are
    # now, and verifies certificates and host names.
    context = ssl.create_default_context()
    return urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _RedirectHandler()
    )


def fetch(
    url: str, cache_dir: Path, timeout: float = 10.0, max_bytes: int = 64 * 1024 * 1024
) -> FetchResult:
    """Fetch ``url`` and, if it changed, replace its copy in ``cache_dir``.

    Send the copy's ETag and Last-Modified as a conditional GET. Return ``"updated"`` with the
    new text, ``"not-modified"`` with the copy's, or ``"failed"`` with the copy's text (if any)
    and a sentence saying why: an HTTP error status, no connection, more than ``timeout``
    seconds without progress or in total (the total can overrun by up to one ``timeout`` while
    a read waits), a body over ``max_bytes``, or text that is not UTF-8. A failed fetch never
    touches the copy. Raise :class:`ValueError` at once for a URL that is not http(s).
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
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if isinstance(meta.get("etag"), str):
        headers["If-None-Match"] = meta["etag"]
    if isinstance(meta.get("last_modified"), str):
        headers["If-Modified-Since"] = meta["last_modified"]
    request = urllib.request.Request(url, headers=headers)

    def failed(why: str) -> FetchResult:
        return FetchResult("failed", old.text, f"fetching {url} failed: {why}", old.fetched_at)

    deadline = time.monotonic() + timeout
    answered = False  # whether the status line and headers came: which timeout it was
    try:
        with _opener().open(request, timeout=timeout) as response:
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
            return failed(f"the server answered HTTP {exc.code} {exc.reason}")
    except urllib.error.URLError as exc:
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
        why = str(exc) or type(exc).__name__
        if not answered:
            return failed(f"the connection broke off before an answer: {why}")
        return failed(f"the transfer broke off: {why}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return failed(f"the list is not valid UTF-8 ({exc})")
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
