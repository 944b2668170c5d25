"""Remote lists: fetching over HTTP(S) into an on-disk copy, against a scripted local server.

The server is a real ``http.server.ThreadingHTTPServer`` on 127.0.0.1, port 0. Each path
answers as its :class:`Route` says; every request's headers are recorded so that tests can
check what the client sent.
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from resolver.policy.remote import FetchResult, copy_path, load_copy
from resolver.policy.remote import fetch as guarded_fetch

# The list servers here listen on loopback, which a fetch refuses unless allowed
# (remote.allow_private); tests/test_loading_faults.py tests the refusal itself.
fetch = functools.partial(guarded_fetch, allow_private=True)

ETAG = '"v1"'
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"
TIMEOUT = 0.5


@dataclass
class Route:
    """How the server answers one path."""

    status: int = 200
    body: bytes = b""
    etag: str | None = None
    last_modified: str | None = None
    delay: float = 0.0  # before the status line
    trickle: float = 0.0  # between body bytes, sent one at a time
    content_length: bool = True
    location: str | None = None
    honour_conditional: bool = True
    hang_up: bool = False  # close the connection without a word
    claimed_length: int | None = None  # a Content-Length other than the body's


@dataclass
class ListServer:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    base: str = ""

    def url(self, path: str) -> str:
        return self.base + path

    def headers(self, index: int = -1) -> dict[str, str]:
        """The headers of a recorded request (the last by default), names lower-cased."""
        return self.requests[index][1]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet

    def do_GET(self) -> None:
        script = self.server.script
        headers = {key.lower(): value for key, value in self.headers.items()}
        script.requests.append((self.path, headers))
        route = script.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        if route.delay and script.stop.wait(route.delay):
            return  # the test is over
        if route.hang_up:
            self.close_connection = True
            return
        if route.honour_conditional and self._not_modified(route, headers):
            self.send_response(304)
            if route.etag:
                self.send_header("ETag", route.etag)
            self.end_headers()
            return
        self.send_response(route.status)
        if route.etag:
            self.send_header("ETag", route.etag)
        if route.last_modified:
            self.send_header("Last-Modified", route.last_modified)
        if route.location:
            self.send_header("Location", route.location)
        if route.content_length:
            length = len(route.body) if route.claimed_length is None else route.claimed_length
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if not route.trickle:
            self.wfile.write(route.body)
            return
        for byte in route.body:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            if script.stop.wait(route.trickle):
                return

    @staticmethod
    def _not_modified(route: Route, headers: dict[str, str]) -> bool:
        if route.etag and "if-none-match" in headers:
            return headers["if-none-match"] == route.etag
        return bool(route.last_modified and headers.get("if-modified-since") == route.last_modified)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    script: ListServer


def _serve(context: ssl.SSLContext | None = None) -> Iterator[ListServer]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    scheme = "https" if context else "http"
    script = ListServer(base=f"{scheme}://127.0.0.1:{httpd.server_address[1]}")
    httpd.script = script
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield script
    finally:
        script.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server() -> Iterator[ListServer]:
    yield from _serve()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours proxy variables; tests talk to 127.0.0.1 directly."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def _files(cache: Path) -> set[str]:
    return {path.name for path in cache.iterdir()}


def _meta(url: str, cache: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(copy_path(url, cache).with_suffix(".json").read_text())
    return data


def _first(server: ListServer, cache: Path, path: str = "/list.txt", **route: object) -> str:
    """Serve ``path`` and fetch it once, successfully; return its URL."""
    server.routes[path] = Route(body=b"ads.example\n", **route)  # type: ignore[arg-type]
    url = server.url(path)
    result = fetch(url, cache, timeout=TIMEOUT)
    assert result.status == "updated", result.error
    return url


# --- copy_path and load_copy ------------------------------------------------------------------


def test_copy_path_is_deterministic_per_url(tmp_path: Path) -> None:
    a = copy_path("https://lists.example/a.txt", tmp_path)
    assert a == copy_path("https://lists.example/a.txt", tmp_path)
    assert a != copy_path("https://lists.example/b.txt", tmp_path)
    assert a.parent == tmp_path
    assert a.suffix == ".txt"
    assert len(a.stem) == 16
    int(a.stem, 16)  # hex


def test_load_copy_without_a_copy(tmp_path: Path) -> None:
    url = "https://lists.example/a.txt"
    assert load_copy(url, tmp_path) == FetchResult("failed", None, f"no copy of {url} yet", None)
    assert load_copy(url, tmp_path / "missing") == FetchResult(
        "failed", None, f"no copy of {url} yet", None
    )


def test_load_copy_reads_the_copy(server: ListServer, tmp_path: Path) -> None:
    before = time.time()
    url = _first(server, tmp_path, etag=ETAG)
    result = load_copy(url, tmp_path)
    assert result.status == "offline-copy"
    assert result.text == "ads.example\n"
    assert result.error is None
    assert result.fetched_at is not None and before <= result.fetched_at <= time.time()
    assert len(server.requests) == 1  # no network


def test_load_copy_without_metadata(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path)
    copy_path(url, tmp_path).with_suffix(".json").unlink()
    assert load_copy(url, tmp_path) == FetchResult("offline-copy", "ads.example\n", None, None)


def test_load_copy_of_bad_utf8(tmp_path: Path) -> None:
    url = "https://lists.example/a.txt"
    copy_path(url, tmp_path).write_bytes(b"\xff\xfe")
    result = load_copy(url, tmp_path)
    assert result.status == "failed" and result.text is None
    assert result.error is not None and "UTF-8" in result.error and url in result.error


# --- fetch: success and conditional requests ---------------------------------------------------


def test_first_fetch_saves_copy_and_metadata(server: ListServer, tmp_path: Path) -> None:
    cache = tmp_path / "state" / "lists"  # created on demand
    server.routes["/list.txt"] = Route(
        body="ads.example\nbücher.example\n".encode(), etag=ETAG, last_modified=LAST_MODIFIED
    )
    url = server.url("/list.txt")
    before = time.time()
    result = fetch(url, cache, timeout=TIMEOUT)
    assert result.status == "updated"
    assert result.text == "ads.example\nbücher.example\n"
    assert result.error is None
    assert result.fetched_at is not None and before <= result.fetched_at <= time.time()
    path = copy_path(url, cache)
    assert path.read_text(encoding="utf-8") == result.text
    assert _meta(url, cache) == {
        "url": url,
        "etag": ETAG,
        "last_modified": LAST_MODIFIED,
        "fetched_at": result.fetched_at,
        "size": len("ads.example\nbücher.example\n".encode()),
    }
    assert _files(cache) == {path.name, path.with_suffix(".json").name}  # no temp files left
    first = server.headers()
    assert "if-none-match" not in first and "if-modified-since" not in first
    assert first["accept-encoding"] == "identity"
    assert first["user-agent"].startswith("dns-filtering-resolver/")


def test_second_fetch_is_conditional_and_not_modified(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path, etag=ETAG, last_modified=LAST_MODIFIED)
    first_at = _meta(url, tmp_path)["fetched_at"]
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    assert server.headers()["if-none-match"] == ETAG
    assert server.headers()["if-modified-since"] == LAST_MODIFIED
    assert result.status == "not-modified"
    assert result.text == "ads.example\n"
    assert result.error is None
    # A confirmed copy counts as fetched now.
    assert isinstance(first_at, float) and result.fetched_at is not None
    assert result.fetched_at >= first_at
    assert _meta(url, tmp_path)["fetched_at"] == result.fetched_at
    assert _meta(url, tmp_path)["etag"] == ETAG


def test_last_modified_alone_is_sent_back(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path, last_modified=LAST_MODIFIED)
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    assert "if-none-match" not in server.headers()
    assert server.headers()["if-modified-since"] == LAST_MODIFIED
    assert result.status == "not-modified"
    assert result.text == "ads.example\n"


def test_no_validators_means_a_full_fetch(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path)
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    assert "if-none-match" not in server.headers()
    assert "if-modified-since" not in server.headers()
    assert result.status == "updated"


def test_a_changed_list_replaces_the_copy(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path, etag=ETAG)
    server.routes["/list.txt"] = Route(body=b"new.example\n", etag='"v2"')
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    assert server.headers()["if-none-match"] == ETAG
    assert result.status == "updated"
    assert result.text == "new.example\n"
    assert copy_path(url, tmp_path).read_text() == "new.example\n"
    assert _meta(url, tmp_path)["etag"] == '"v2"'
    assert _meta(url, tmp_path)["last_modified"] is None


def test_metadata_without_copy_sends_no_validators(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path, etag=ETAG)
    copy_path(url, tmp_path).unlink()
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    assert "if-none-match" not in server.headers()
    assert result.status == "updated" and result.text == "ads.example\n"


def test_not_modified_without_a_copy_fails(server: ListServer, tmp_path: Path) -> None:
    server.routes["/list.txt"] = Route(status=304, honour_conditional=False, content_length=False)
    url = server.url("/list.txt")
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    assert result.status == "failed" and result.text is None
    assert result.error is not None and url in result.error and "304" in result.error


def test_a_copy_that_cannot_be_saved_is_still_returned(server: ListServer, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    server.routes["/list.txt"] = Route(body=b"ads.example\n")
    url = server.url("/list.txt")
    result = fetch(url, blocker / "cache", timeout=TIMEOUT)
    assert result.status == "updated" and result.text == "ads.example\n"
    assert result.error is not None and "could not save the copy" in result.error
    assert url in result.error


def test_exactly_the_size_limit_is_accepted(server: ListServer, tmp_path: Path) -> None:
    server.routes["/list.txt"] = Route(body=b"a" * 1000)
    result = fetch(server.url("/list.txt"), tmp_path, timeout=TIMEOUT, max_bytes=1000)
    assert result.status == "updated" and result.text == "a" * 1000


def test_redirects_are_followed(server: ListServer, tmp_path: Path) -> None:
    server.routes["/old.txt"] = Route(status=302, location="/list.txt")
    server.routes["/list.txt"] = Route(body=b"ads.example\n")
    result = fetch(server.url("/old.txt"), tmp_path, timeout=TIMEOUT)
    assert result.status == "updated" and result.text == "ads.example\n"
    assert [path for path, _ in server.requests] == ["/old.txt", "/list.txt"]


# --- fetch: failures keep the copy ------------------------------------------------------------


def _assert_failed(result: FetchResult, url: str, words: str, text: str | None) -> None:
    assert result.status == "failed"
    assert result.text == text
    assert result.error is not None
    assert url in result.error, result.error
    assert words in result.error, result.error


@pytest.mark.parametrize("status", [404, 500, 503])
def test_http_error_keeps_the_copy(server: ListServer, tmp_path: Path, status: int) -> None:
    url = _first(server, tmp_path, etag=ETAG)
    fetched_at = _meta(url, tmp_path)["fetched_at"]
    server.routes["/list.txt"] = Route(status=status, body=b"oops")
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    _assert_failed(result, url, f"HTTP {status}", "ads.example\n")
    assert result.fetched_at == fetched_at
    assert copy_path(url, tmp_path).read_text() == "ads.example\n"
    assert _meta(url, tmp_path)["fetched_at"] == fetched_at


def test_http_error_without_a_copy(server: ListServer, tmp_path: Path) -> None:
    server.routes["/list.txt"] = Route(status=500)
    url = server.url("/list.txt")
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    _assert_failed(result, url, "HTTP 500", None)
    assert result.fetched_at is None
    assert not copy_path(url, tmp_path).exists()


def test_slow_server_times_out(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path)
    server.routes["/list.txt"] = Route(body=b"late.example\n", delay=5.0)
    start = time.monotonic()
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    assert time.monotonic() - start < 2.0
    _assert_failed(result, url, "no answer within 0.5 s", "ads.example\n")
    assert copy_path(url, tmp_path).read_text() == "ads.example\n"


def test_trickling_body_hits_the_deadline(server: ListServer, tmp_path: Path) -> None:
    """Each byte comes within the socket timeout, but the whole transfer takes too long."""
    url = _first(server, tmp_path)
    server.routes["/list.txt"] = Route(body=b"x" * 100, trickle=0.1)
    start = time.monotonic()
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    assert time.monotonic() - start < 2.0
    _assert_failed(result, url, "longer than 0.5 s", "ads.example\n")


@pytest.mark.parametrize("content_length", [True, False])
def test_oversized_body_is_refused(
    server: ListServer, tmp_path: Path, content_length: bool
) -> None:
    url = _first(server, tmp_path)
    server.routes["/list.txt"] = Route(body=b"a" * 5000, content_length=content_length)
    result = fetch(url, tmp_path, timeout=TIMEOUT, max_bytes=1000)
    _assert_failed(result, url, "limit of 1000 bytes", "ads.example\n")
    assert copy_path(url, tmp_path).read_text() == "ads.example\n"


def test_server_down(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/list.txt"  # nothing listens there now
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    _assert_failed(result, url, "cannot connect", None)


def test_server_down_keeps_the_copy(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path)
    copy = copy_path(url, tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = f"http://127.0.0.1:{port}/list.txt"
    shutil.copy(copy, copy_path(down, tmp_path))
    result = fetch(down, tmp_path, timeout=TIMEOUT)
    _assert_failed(result, down, "cannot connect", "ads.example\n")


def test_hang_up_keeps_the_copy(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path)
    server.routes["/list.txt"] = Route(hang_up=True)
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    _assert_failed(result, url, "broke off before an answer", "ads.example\n")


def test_truncated_body_is_refused(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path)
    server.routes["/list.txt"] = Route(body=b"cut.example\n", claimed_length=1000)
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    _assert_failed(result, url, "the transfer broke off", "ads.example\n")
    assert copy_path(url, tmp_path).read_text() == "ads.example\n"


def test_bad_utf8_is_refused(server: ListServer, tmp_path: Path) -> None:
    url = _first(server, tmp_path)
    server.routes["/list.txt"] = Route(body=b"ads.example\n\xff\xfe\n")
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    _assert_failed(result, url, "not valid UTF-8", "ads.example\n")
    assert copy_path(url, tmp_path).read_text() == "ads.example\n"


def test_redirect_to_another_scheme_is_refused(server: ListServer, tmp_path: Path) -> None:
    server.routes["/list.txt"] = Route(status=302, location="ftp://127.0.0.1/list.txt")
    url = server.url("/list.txt")
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    _assert_failed(result, url, "non-HTTP", None)


@pytest.mark.parametrize(
    "url",
    ["ftp://lists.example/a.txt", "file:///etc/hosts", "lists.example/a.txt", "http:///a.txt"],
)
def test_other_schemes_are_refused_at_call(tmp_path: Path, url: str) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="not an http"):
        fetch(url, cache)
    assert not cache.exists()


# --- https ------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ListServer, Path]]:
    """An HTTPS server with a self-signed certificate for 127.0.0.1 (needs the openssl tool)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    for script in _serve(context):
        yield script, cert


def test_https_verifies_the_certificate(
    tls_server: tuple[ListServer, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, cert = tls_server
    server.routes["/list.txt"] = Route(body=b"ads.example\n")
    url = server.url("/list.txt")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-certs"))
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    _assert_failed(result, url, "CERTIFICATE_VERIFY_FAILED", None)
    # Trusting the certificate through SSL_CERT_FILE makes the same fetch work.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    result = fetch(url, tmp_path, timeout=TIMEOUT)
    assert result.status == "updated", result.error
    assert result.text == "ads.example\n"
