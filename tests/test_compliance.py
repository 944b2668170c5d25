"""The ISC DNS compliance checks (DNS Flag Day, genreport -R) as dig runs them, against the
resolver forwarding to a real NSD. Each row: the dig flags of one check and what a correct
recursive server's answer shows. (The TSIG check, dnswkk, belongs with hardening.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from resolver.upstream.endpoints import parse_upstream

from .helpers.realservers import NSD, nsd_available
from .helpers.server import RunningServer

pytestmark = pytest.mark.skipif(
    not (shutil.which("dig") and nsd_available()),
    reason="needs dig and nsd (.ci/run installs them)",
)

ZONE = "isc.test"

# (check, dig arguments, expected status, texts that must appear, texts that must not)
CHECKS = [
    ("dns", "+noedns +noad +norec SOA", "NOERROR", ["IN\tSOA"], ["OPT PSEUDOSECTION"]),
    ("aa", "+noedns +noad +norec +aaflag SOA", "NOERROR", [], [" aa"]),
    ("ad", "+noedns +ad +norec SOA", "NOERROR", [], []),
    ("cd", "+noedns +noad +norec +cd SOA", "NOERROR", [" cd"], []),
    ("rd", "+noedns +noad +rec SOA", "NOERROR", ["rd ra"], []),
    ("zflag", "+noedns +noad +norec +zflag SOA", "NOERROR", [], ["MBZ"]),
    ("opcode", "+noedns +noad +norec +header-only +opcode=15", "NOTIMP", [], []),
    ("type666", "+noedns +noad +norec TYPE666", "NOERROR", [], []),
    ("tcp", "+noedns +noad +norec +tcp SOA", "NOERROR", ["IN\tSOA"], []),
    (
        "edns",
        "+edns=0 +nocookie +noad +norec SOA",
        "NOERROR",
        ["EDNS: version: 0", "udp: 1232"],
        [],
    ),
    (
        "edns1",
        "+edns=1 +noednsneg +nocookie +noad +norec SOA",
        "BADVERS",
        ["EDNS: version: 0"],
        ["IN\tSOA\t"],
    ),
    (
        "edns@512",
        "+edns=0 +nocookie +noad +norec +dnssec +ignore +bufsize=512 DNSKEY",
        "NOERROR",
        [],
        [],
    ),
    (
        "ednsopt",
        "+edns=0 +nocookie +noad +norec +ednsopt=100 SOA",
        "NOERROR",
        ["IN\tSOA"],
        ["OPT=100"],
    ),
    (
        "edns1opt",
        "+edns=1 +noednsneg +nocookie +noad +norec +ednsopt=100 SOA",
        "BADVERS",
        [],
        ["OPT=100"],
    ),
    ("do", "+edns=0 +nocookie +noad +norec +dnssec SOA", "NOERROR", ["flags: do"], []),
    ("edns1do", "+edns=1 +noednsneg +nocookie +noad +norec +dnssec SOA", "BADVERS", [], []),
    ("ednsflags", "+edns=0 +nocookie +noad +norec +ednsflags=0x0080 SOA", "NOERROR", [], ["MBZ"]),
    (
        "optlist",
        "+edns=0 +noad +norec +nsid +subnet=0.0.0.0/0 +expire +cookie=0102030405060708 SOA",
        "NOERROR",
        [],
        ["NSID:", "COOKIE:", "EXPIRE:", "CLIENT-SUBNET:"],
    ),
    ("ednsnsid", "+edns=0 +nocookie +noad +norec +nsid SOA", "NOERROR", [], ["NSID:"]),
    ("ednscookie", "+edns=0 +noad +norec +cookie=0102030405060708 SOA", "NOERROR", [], ["COOKIE:"]),
    ("ednsexpire", "+edns=0 +nocookie +noad +norec +expire SOA", "NOERROR", [], ["EXPIRE:"]),
    (
        "ednssubnet",
        "+edns=0 +nocookie +noad +norec +subnet=0.0.0.0/0 SOA",
        "NOERROR",
        [],
        ["CLIENT-SUBNET:"],
    ),
    ("edns1nsid", "+edns=1 +noednsneg +nocookie +noad +norec +nsid SOA", "BADVERS", [], []),
    (
        "ednstcp",
        "+edns=0 +nocookie +noad +norec +dnssec +bufsize=512 +tcp DNSKEY",
        "NOERROR",
        [],
        [],
    ),
    ("bind11", "+edns=0 +cookie=0102030405060708 +noad +norec +dnssec SOA", "NOERROR", [], []),
    ("dig11", "+edns=0 +cookie=0102030405060708 +ad +rec SOA", "NOERROR", [], []),
    ("A", "+noedns +noad +norec A", "NOERROR", ["192.0.2.80"], []),
    ("NS", "+noedns +noad +norec NS", "NOERROR", ["IN\tNS"], []),
    ("MX", "+noedns +noad +norec MX", "NOERROR", ["IN\tMX"], []),
    ("PTR", "+noedns +noad +norec PTR", "NOERROR", [], []),
    ("TXT", "+noedns +noad +norec TXT", "NOERROR", ["compliance"], []),
]


@pytest.fixture(scope="module")
def nsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NSD]:
    folder: Path = tmp_path_factory.mktemp("nsd")
    server = NSD(
        folder,
        ZONE,
        ["@ IN A 192.0.2.80", "@ IN MX 10 mail", "mail IN A 192.0.2.25", '@ IN TXT "compliance"'],
    )
    yield server
    server.stop()


@pytest.fixture
def forwarding(make_server: Callable[..., RunningServer], nsd: NSD) -> RunningServer:
    return make_server(upstreams=(parse_upstream(nsd.address),))


@pytest.mark.parametrize(
    ("check", "args", "status", "present", "absent"), CHECKS, ids=[c[0] for c in CHECKS]
)
def test_isc_compliance_check(
    forwarding: RunningServer,
    check: str,
    args: str,
    status: str,
    present: list[str],
    absent: list[str],
) -> None:
    command = [
        "dig",
        "@127.0.0.1",
        "-p",
        str(forwarding.port),
        "+time=3",
        "+tries=1",
        *args.split(),
    ]
    if "+header-only" not in args:
        command.insert(-1, ZONE)
    out = subprocess.run(command, capture_output=True, text=True, timeout=15).stdout
    assert f"status: {status}" in out, out
    for text in present:
        assert text in out, out
    for text in absent:
        assert text not in out, out
    size = re.search(r"MSG SIZE\s+rcvd: (\d+)", out)
    assert size is not None, out
    if ("bufsize=512" in args and "+tcp" not in args) or ("+noedns" in args and "+tcp" not in args):
        assert int(size.group(1)) <= 512
