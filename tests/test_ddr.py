"""Discovery of Designated Resolvers (RFC 9462, RFC 9461): ``_dns.resolver.arpa`` SVCB
answers name the encrypted listeners of the config, asked of the real server over UDP and
TCP, read by dig and by dnspython; ``resolver.arpa`` is never forwarded."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rdtypes.svcbbase
import pytest

from resolver.config import Config, DDRConfig, DoHConfig, DoQConfig, DoTConfig, TLSConfig
from resolver.config import parse_listen as listen
from resolver.service.assembly import make_designation, reconfigure

from .helpers.fakeupstream import FakeUpstream
from .helpers.realservers import free_port
from .helpers.server import RunningServer
from .helpers.tls import make_certificate


def certificate(folder: Path, san: str) -> tuple[Path, Path]:
    """A self-signed certificate with this subjectAltName (openssl syntax)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-days", "2", "-subj", "/CN=resolver", "-addext", f"subjectAltName={san}"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def ports() -> tuple[int, int, int]:
    return free_port(), free_port(), free_port()


@pytest.fixture
def encrypted(tmp_path: Path, ports: tuple[int, int, int]) -> dict[str, object]:
    """Config overrides: DoT, DoH and DoQ on loopback, a certificate for dns.example.test."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_certificate(cert, key, "dns.example.test")
    dot, doh, doq = ports
    return {
        "tls": TLSConfig(cert=cert, key=key),
        "dot": DoTConfig(listen=(listen(f"127.0.0.1:{dot}"),)),
        "doh": DoHConfig(listen=(listen(f"127.0.0.1:{doh}"),), path="/q"),
        "doq": DoQConfig(listen=(listen(f"127.0.0.1:{doq}"),)),
    }


def svcb(server: RunningServer, tcp: bool = False) -> dns.message.Message:
    return server.query("_dns.resolver.arpa", "SVCB", tcp=tcp)


def params(rdata: dns.rdata.Rdata) -> dict[str, str]:
    """The SvcParams of an SVCB rdata, as presentation text by key."""
    out = {}
    for key, value in rdata.params.items():
        out[dns.rdtypes.svcbbase.ParamKey.to_text(key).lower()] = value.to_text().strip('"')
    return out


def test_dnspython_reads_one_record_per_listener_kind(
    make_server: Callable[..., RunningServer],
    encrypted: dict[str, object],
    ports: tuple[int, int, int],
) -> None:
    server = make_server(**encrypted)
    for tcp in (False, True):
        reply = svcb(server, tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.flags & dns.flags.AA
        (rrset,) = reply.answer
        assert rrset.rdtype == dns.rdatatype.SVCB and rrset.ttl == 300
        records = sorted(rrset, key=lambda r: r.priority)
        assert [r.priority for r in records] == [1, 2, 3]
        assert {str(r.target) for r in records} == {"dns.example.test."}
        dot, doh, doq = (params(r) for r in records)
        assert dot == {"alpn": "dot", "port": str(ports[0]), "ipv4hint": "127.0.0.1"}
        assert doh == {
            "alpn": "h2,http/1.1",
            "port": str(ports[1]),
            "ipv4hint": "127.0.0.1",
            "dohpath": "/q{?dns}",
        }
        assert doq == {"alpn": "doq", "port": str(ports[2]), "ipv4hint": "127.0.0.1"}
        # the keys in their order on the wire (RFC 9460 2.2): alpn, port, ipv4hint, dohpath
        assert list(records[1].params) == [1, 3, 4, 7]


def test_dig_prints_the_svcparams(
    make_server: Callable[..., RunningServer],
    encrypted: dict[str, object],
    ports: tuple[int, int, int],
) -> None:
    server = make_server(**encrypted)
    out = subprocess.run(
        [
            *("dig", f"@{server.host}", "-p", str(server.port), "+norec", "+time=3", "+tries=1"),
            *("_dns.resolver.arpa", "SVCB"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert "status: NOERROR" in out
    assert f'1 dns.example.test. alpn="dot" port={ports[0]} ipv4hint=127.0.0.1' in out
    assert (
        f'2 dns.example.test. alpn="h2,http/1.1" port={ports[1]} ipv4hint=127.0.0.1 '
        'key7="/q{?dns}"'
        in out
        or f'2 dns.example.test. alpn="h2,http/1.1" port={ports[1]} ipv4hint=127.0.0.1 '
        'dohpath="/q{?dns}"'
        in out
    )
    assert f'3 dns.example.test. alpn="doq" port={ports[2]} ipv4hint=127.0.0.1' in out


def test_hints_leave_out_wildcards_and_keep_both_families(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path, "DNS:*.dns.example.test,DNS:dns.example.test,IP:10.0.0.1")
    config = Config(
        tls=TLSConfig(cert=cert, key=key),
        dot=DoTConfig(
            listen=(listen("0.0.0.0:853"), listen("10.0.0.1:853"), listen("[fd00::53]:853"))
        ),
    )
    ddr = make_designation(config)
    assert ddr.target == "dns.example.test"  # the first name that is not a wildcard
    (endpoint,) = ddr.endpoints
    assert endpoint.hints == ("10.0.0.1", "fd00::53")
    assert (endpoint.alpn, endpoint.port) == (("dot",), 853)


def test_each_port_of_a_kind_gets_its_record(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path, "DNS:dns.example.test")
    config = Config(
        tls=TLSConfig(cert=cert, key=key),
        doh=DoHConfig(listen=(listen("10.0.0.1:443"), listen("10.0.0.1:8443"))),
    )
    assert [e.port for e in make_designation(config).endpoints] == [443, 8443]
    # A proxy in front of plain DoH serves another port: nothing to designate.
    plain = replace(config, doh=replace(config.doh, plain=True))
    assert make_designation(plain).endpoints == ()


def nodata(reply: dns.message.Message, name: str = "_dns.resolver.arpa.") -> None:
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer
    (soa,) = reply.authority
    assert soa.rdtype == dns.rdatatype.SOA and str(soa.name).lower() == "resolver.arpa."
    assert str(reply.question[0].name).lower() == name.lower()


def test_without_encrypted_listeners_nothing_is_designated_nor_forwarded(
    make_server: Callable[..., RunningServer], upstream: FakeUpstream
) -> None:
    server = make_server()
    nodata(svcb(server))
    nodata(server.query("resolver.arpa", "SOA"), "resolver.arpa.")
    nodata(server.query("X.Resolver.ARPA", "A"), "X.Resolver.ARPA.")
    assert upstream.count("_dns.resolver.arpa", "SVCB") == 0
    assert upstream.count("resolver.arpa", "SOA") == 0
    assert upstream.count("x.resolver.arpa", "A") == 0
    # A name that only ends with the same letters is not under resolver.arpa.
    server.query("xresolver.arpa", "A")
    assert upstream.count("xresolver.arpa", "A") == 1


def test_other_types_and_names_get_nodata(
    make_server: Callable[..., RunningServer], encrypted: dict[str, object]
) -> None:
    server = make_server(**encrypted)
    nodata(server.query("_dns.resolver.arpa", "A"))
    nodata(server.query("_dns.resolver.arpa", "HTTPS"))
    nodata(server.query("other.resolver.arpa", "SVCB"), "other.resolver.arpa.")
    # EDNS and DO are echoed.
    reply = server.query("_dns.resolver.arpa", "SVCB", use_edns=0, want_dnssec=True)
    assert reply.edns == 0 and reply.ednsflags & dns.flags.DO and len(reply.answer) == 1


def test_off_or_without_a_certificate_name_nothing_is_designated(
    make_server: Callable[..., RunningServer],
    encrypted: dict[str, object],
    tmp_path: Path,
) -> None:
    nodata(svcb(make_server(**encrypted, ddr=DDRConfig(enabled=False))))
    folder = tmp_path / "ip-only"
    folder.mkdir()
    cert, key = certificate(folder, "IP:127.0.0.1")
    config = Config(tls=TLSConfig(cert=cert, key=key), dot=encrypted["dot"])  # type: ignore[arg-type]
    # RFC 9462 4: the TargetName of a resolver.arpa record may not be ".".
    assert make_designation(config).endpoints == ()


def test_a_reload_rebuilds_the_answer_and_forgets_the_memoised_one(
    make_server: Callable[..., RunningServer], encrypted: dict[str, object]
) -> None:
    server = make_server(**encrypted)
    assert len(svcb(server).answer) == 1
    assert len(svcb(server).answer) == 1  # (from the memo)
    old = server.server.config
    new = replace(old, ddr=DDRConfig(enabled=False))
    server.loop.call_soon_threadsafe(reconfigure, server.resolver, old, new)
    server.call(_settle())
    nodata(svcb(server))


async def _settle() -> None:
    """One turn of the server's loop (after a call_soon_threadsafe)."""


def test_the_answer_is_counted_as_local(
    make_server: Callable[..., RunningServer], encrypted: dict[str, object]
) -> None:
    server = make_server(**encrypted)
    svcb(server)
    svcb(server, tcp=True)
    answers = server.resolver.stats.answers
    assert answers[("udp", "SVCB", "NOERROR", "local")] == 1
    assert answers[("tcp", "SVCB", "NOERROR", "local")] == 1


def test_a_list_may_still_block_resolver_arpa(
    make_server: Callable[..., RunningServer],
    encrypted: dict[str, object],
    lists_dir: Path,
) -> None:
    (lists_dir / "no-ddr.yaml").write_text(
        "list: no-ddr\nreference: test\naction: nxdomain\ndomains:\n  - resolver.arpa\n"
    )
    server = make_server(**encrypted)
    assert svcb(server).rcode() == dns.rcode.NXDOMAIN
