"""The shipped ``bypass`` list switched to enforce, as docs/encrypted-dns.md tells an agency
to do ("Closing the bypass"): canaries get NXDOMAIN, public DoH/DoT resolver names are
blocked, the agency's own resolver name is not, and a client that uses this resolver over
an encrypted transport keeps working."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from resolver.config import DoQConfig, TLSConfig, parse_listen

from .helpers.realservers import ROOT
from .helpers.server import RunningServer
from .helpers.tls import make_certificate

SHIPPED = ROOT / "blocklists" / "bypass.yaml"
#: The one edit the document gives: the list's mode line.
MONITOR = "mode: monitor               # for the DoH resolvers below; the canaries override it"
AGENCY = "resolver.agency.example"


def enforced(folder: Path) -> Path:
    text = SHIPPED.read_text()
    assert text.count(MONITOR) == 1, "docs/encrypted-dns.md quotes this line: keep them in step"
    (folder / "bypass.yaml").write_text(text.replace(MONITOR, "mode: enforce"))
    return folder


@pytest.fixture
def lists_dir(tmp_path: Path) -> Path:
    """Only the bypass list, as the agency enforces it."""
    folder = tmp_path / "blocklists"
    folder.mkdir()
    return enforced(folder)


PUBLIC = ["dns.google", "mozilla.cloudflare-dns.com", "dns.quad9.net", "dns.nextdns.io"]
CANARIES = ["use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com"]


@pytest.fixture
def records(upstream: object) -> None:
    upstream.records.update(  # type: ignore[attr-defined]
        {(name, "A"): ["192.0.2.80"] for name in [*PUBLIC, *CANARIES, AGENCY]}
    )


@pytest.mark.usefixtures("records")
def test_enforced_bypass_list_blocks_public_resolvers_not_the_agency_one(
    server: RunningServer,
) -> None:
    for name in CANARIES:
        assert server.query(name).rcode() == dns.rcode.NXDOMAIN, name
    for name in PUBLIC:
        reply = server.query(name)
        assert reply.rcode() == dns.rcode.NXDOMAIN, name
        assert not reply.answer
    agency = server.query(AGENCY)
    assert agency.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in agency.answer[0]] == ["192.0.2.80"]


@pytest.mark.usefixtures("records")
def test_as_shipped_public_resolvers_are_only_watched(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(SHIPPED, shipped / "bypass.yaml")
    server = make_server(blocklists=shipped)
    assert server.query("use-application-dns.net").rcode() == dns.rcode.NXDOMAIN
    assert server.query("dns.google").rcode() == dns.rcode.NOERROR  # monitor: answered


def test_the_documented_edit_passes_resolver_check(lists_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "resolver", "check", str(lists_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"bypass \(\d+ rules, enforced\)", result.stdout), result.stdout


@pytest.mark.usefixtures("records")
def test_a_client_configured_with_this_resolver_keeps_working_over_doq(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    if importlib.util.find_spec("aioquic") is None:
        pytest.skip("DoQ needs aioquic, the optional 'quic' extra")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_certificate(cert, key, AGENCY)
    server = make_server(
        tls=TLSConfig(cert=cert, key=key),
        doq=DoQConfig((parse_listen("127.0.0.1:0"),)),
    )
    port = next(b.port for b in server.server.bound if b.proto == "doq")

    def ask(name: str) -> dns.message.Message:
        query = dns.message.make_query(name, "A")
        return dns.query.quic(
            query, "127.0.0.1", port=port, timeout=5, verify=str(cert), server_hostname=AGENCY
        )

    assert ask(AGENCY).rcode() == dns.rcode.NOERROR
    assert ask("example.test").rcode() == dns.rcode.NOERROR
    assert ask("dns.google").rcode() == dns.rcode.NXDOMAIN
