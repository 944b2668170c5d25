"""The import formats: domains, hosts, adblock and RPZ files into entries and problems.

Each table row is one file (often one line) with the exact entries it must give and the
problems it must report, as (line, column, words the message must hold).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.policy import formats
from resolver.policy.formats import (
    ALLOW,
    DOMAIN,
    EXACT,
    FORMATS,
    NODATA,
    NXDOMAIN,
    SUBDOMAINS,
    Entry,
    Problem,
    normalize,
    parse,
)

Expected = list[tuple[int, int, str]]


def run(fmt: str, text: str) -> tuple[list[Entry], list[Problem]]:
    problems: list[Problem] = []
    entries = list(parse(text, fmt, problems))
    return entries, problems


def check(fmt: str, text: str, entries: list[Entry], problems: Expected) -> None:
    got, found = run(fmt, text)
    assert got == entries
    assert [(p.line, p.column) for p in found] == [(line, col) for line, col, _ in problems]
    for problem, (_, _, words) in zip(found, problems, strict=True):
        assert words.lower() in problem.message.lower(), problem.message
        # A message is a sentence: it ends with a full stop.
        assert problem.message.endswith("."), problem.message


# --- normalize --------------------------------------------------------------------------------

LONGEST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters: 255 on the wire


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de.", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("a-b.c_d.e", "a-b.c_d.e"),
        ("localhost", "localhost"),
        ("1.2.3.4", "1.2.3.4"),  # a valid name; the list parsers refuse it as an address
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (LONGEST, LONGEST),
        (LONGEST + ".", LONGEST),
    ],
)
def test_normalize_accepts(text: str, name: str) -> None:
    assert normalize(text) == name


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "root"),
        (".", "root"),
        ("a..b", "empty label"),
        (".a.com", "empty label"),
        ("a.com..", "empty label"),
        ("-a.com", "starts or ends with '-'"),
        ("a-.com", "starts or ends with '-'"),
        ("a" * 64 + ".com", "longer than 63"),
        (LONGEST + "e", "the limit is 255"),
        (LONGEST + ".e", "the limit is 255"),
        ("a b.com", "contains ' '"),
        ("a*.com", "contains '*'"),
        ("exa!mple.com", "contains '!'"),
        ("ü..de", "internationalised"),
    ],
)
def test_normalize_refuses(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        normalize(text)
    assert words in str(info.value)


def test_unknown_format_is_refused_at_call() -> None:
    with pytest.raises(ValueError, match="unknown list format 'csv'"):
        parse("example.com\n", "csv", [])
    assert FORMATS == ("domains", "hosts", "adblock", "rpz")


# --- domains ----------------------------------------------------------------------------------

DOMAINS: list[tuple[str, list[Entry], Expected]] = [
    ("example.com\n", [("example.com", DOMAIN, 1)], []),
    ("example.com", [("example.com", DOMAIN, 1)], []),
    ("Example.COM.\n", [("example.com", DOMAIN, 1)], []),
    ("*.example.com\n", [("example.com", SUBDOMAINS, 1)], []),
    ("*.Example.com.\n", [("example.com", SUBDOMAINS, 1)], []),
    ("bücher.de\n", [("xn--bcher-kva.de", DOMAIN, 1)], []),
    ("xn--bcher-kva.de\n", [("xn--bcher-kva.de", DOMAIN, 1)], []),
    ("_dmarc.example.com\n", [("_dmarc.example.com", DOMAIN, 1)], []),
    ("cdn1.example.co2\n", [("cdn1.example.co2", DOMAIN, 1)], []),
    ("localhost\n", [("localhost", DOMAIN, 1)], []),
    ("  padded.example  \n", [("padded.example", DOMAIN, 1)], []),
    ("\ufeffbom.example\n", [("bom.example", DOMAIN, 1)], []),
    ("a.example\r\nb.example\r\n", [("a.example", DOMAIN, 1), ("b.example", DOMAIN, 2)], []),
    (
        "# a comment\n\n   \n\t\nexample.com # trailing\nexample.org\t# after a tab\n#example.net\n",
        [("example.com", DOMAIN, 5), ("example.org", DOMAIN, 6)],
        [],
    ),
    (
        "ok.example\nbad..example\nok2.example\n",
        [("ok.example", DOMAIN, 1), ("ok2.example", DOMAIN, 3)],
        [(2, 1, "empty label")],
    ),
    ("http://example.com/\n", [], [(1, 1, "is a URL")]),
    ("https://example.com\n", [], [(1, 1, "is a URL")]),
    ("1.2.3.4\n", [], [(1, 1, "IP address")]),
    ("::1\n", [], [(1, 1, "IPv6 address")]),
    ("example.com:443\n", [], [(1, 1, "has a port")]),
    ("10.0.0.0/8\n", [], [(1, 1, "address range")]),
    ("example.com/path\n", [], [(1, 1, "path")]),
    ("example.com extra\n", [], [(1, 13, "more than one field")]),
    ("0.0.0.0 example.com\n", [], [(1, 9, "format hosts")]),
    ("*.*.example.com\n", [], [(1, 1, "wildcard")]),
    ("ads*.example.com\n", [], [(1, 1, "wildcard")]),
    ("*example.com\n", [], [(1, 1, "wildcard")]),
    ("||example.com^\n", [], [(1, 1, "format adblock")]),
    ("example.com#comment\n", [], [(1, 1, "contains '#'")]),
    ("-a.example\n", [], [(1, 1, "starts or ends with '-'")]),
    ("a-.example\n", [], [(1, 1, "starts or ends with '-'")]),
    (".example.com\n", [], [(1, 1, "empty label")]),
    ("example.com..\n", [], [(1, 1, "empty label")]),
    ("a" * 64 + ".example\n", [], [(1, 1, "longer than 63")]),
    (LONGEST + "x\n", [], [(1, 1, "the limit is 255")]),
    (".\n", [], [(1, 1, "root")]),
    ("*.\n", [], [(1, 1, "root")]),
    ("  bad_ name\n", [], [(1, 8, "more than one field")]),
    ("\x01weird.example\nok.example\n", [("ok.example", DOMAIN, 2)], [(1, 1, "contains")]),
]


@pytest.mark.parametrize(("text", "entries", "problems"), DOMAINS)
def test_domains(text: str, entries: list[Entry], problems: Expected) -> None:
    check("domains", text, entries, problems)


# --- hosts ------------------------------------------------------------------------------------

STEVENBLACK_HEADER = """\
# Title: a hosts file
#
127.0.0.1 localhost
127.0.0.1 localhost.localdomain
127.0.0.1 local
255.255.255.255 broadcasthost
::1 localhost
::1 ip6-localhost
::1 ip6-loopback
fe80::1%lo0 localhost
ff00::0 ip6-localnet
ff00::0 ip6-mcastprefix
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
ff02::3 ip6-allhosts
0.0.0.0 0.0.0.0
"""

HOSTS: list[tuple[str, list[Entry], Expected]] = [
    ("0.0.0.0 ads.example.com\n", [("ads.example.com", EXACT, 1)], []),
    ("127.0.0.1 ads.example\n", [("ads.example", EXACT, 1)], []),
    ("0.0.0.0\tads.example\n", [("ads.example", EXACT, 1)], []),
    ("127.0.0.1\tads.example\n", [("ads.example", EXACT, 1)], []),
    ("0 ads.example\n", [("ads.example", EXACT, 1)], []),
    (":: ads.example\n", [("ads.example", EXACT, 1)], []),
    ("::1 ads.example\n", [("ads.example", EXACT, 1)], []),
    ("127.1.2.3 ads.example\n", [("ads.example", EXACT, 1)], []),
    ("0.1.2.3 ads.example\n", [("ads.example", EXACT, 1)], []),
    ("0.0.0.0 ADS.Example.\n", [("ads.example", EXACT, 1)], []),
    ("0.0.0.0 bücher.de\n", [("xn--bcher-kva.de", EXACT, 1)], []),
    ("  0.0.0.0   ads.example  \n", [("ads.example", EXACT, 1)], []),
    ("0.0.0.0 ads.example\r\n", [("ads.example", EXACT, 1)], []),
    ("0.0.0.0 ads.example # a comment\n", [("ads.example", EXACT, 1)], []),
    ("0.0.0.0 ads.example#a comment\n", [("ads.example", EXACT, 1)], []),
    (
        "0.0.0.0 a.example b.example\tc.example\n",
        [("a.example", EXACT, 1), ("b.example", EXACT, 1), ("c.example", EXACT, 1)],
        [],
    ),
    ("127.0.0.1 localhost ads.example\n", [("ads.example", EXACT, 1)], []),
    ("0.0.0.0 localhost\n", [], []),
    (STEVENBLACK_HEADER, [], []),
    (
        STEVENBLACK_HEADER + "\n# blocked\n0.0.0.0 ads.example\n",
        [("ads.example", EXACT, 19)],
        [],
    ),
    ("# only a comment\n\n   \n", [], []),
    ("93.184.216.34 example.com\n", [], [(1, 1, "redirection")]),
    ("192.168.1.1 router.lan other.lan\n", [], [(1, 1, "redirection")]),
    ("2001:db8::1 example.com\n", [], [(1, 1, "redirection")]),
    ("example.com\n", [], [(1, 1, "one field")]),
    ("0.0.0.0\n", [], [(1, 1, "one field")]),
    ("notanip example.com\n", [], [(1, 1, "not an IP address")]),
    ("0.0.0.0 *.example.com\n", [], [(1, 9, "wildcard")]),
    ("0.0.0.0 1.2.3.4\n", [], [(1, 9, "IP address")]),
    ("0.0.0.0 ok.example bad..example\n", [("ok.example", EXACT, 1)], [(1, 20, "empty label")]),
    ("0.0.0.0 a.example a.example.\n", [("a.example", EXACT, 1), ("a.example", EXACT, 1)], []),
    ("0.0.0.0 -bad.example\n", [], [(1, 9, "starts or ends with '-'")]),
]


@pytest.mark.parametrize(("text", "entries", "problems"), HOSTS)
def test_hosts(text: str, entries: list[Entry], problems: Expected) -> None:
    check("hosts", text, entries, problems)


# --- adblock ----------------------------------------------------------------------------------

ADBLOCK: list[tuple[str, list[Entry], Expected]] = [
    ("||ads.example.com^\n", [("ads.example.com", DOMAIN, 1)], []),
    ("||ADS.Example^\n", [("ads.example", DOMAIN, 1)], []),
    ("||ads.example.^\n", [("ads.example", DOMAIN, 1)], []),
    ("@@||good.example^\n", [("good.example", DOMAIN | ALLOW, 1)], []),
    ("||ads.example^$important\n", [("ads.example", DOMAIN, 1)], []),
    ("@@||good.example^$important\n", [("good.example", DOMAIN | ALLOW, 1)], []),
    ("||*.ads.example^\n", [("ads.example", SUBDOMAINS, 1)], []),
    ("@@||*.good.example^\n", [("good.example", SUBDOMAINS | ALLOW, 1)], []),
    ("||bücher.de^\n", [("xn--bcher-kva.de", DOMAIN, 1)], []),
    ("  ||ads.example^  \n", [("ads.example", DOMAIN, 1)], []),
    (
        "||ads.example^\r\n||b.example^\r\n",
        [("ads.example", DOMAIN, 1), ("b.example", DOMAIN, 2)],
        [],
    ),
    (
        "[Adblock Plus 2.0]\n! Title: a list\n# a comment\n\n##### a banner #####\n"
        "||ads.example^\n",
        [("ads.example", DOMAIN, 6)],
        [],
    ),
    ("||a.example/ads^\n", [], [(1, 1, "URL path")]),
    ("||a.example/ads\n", [], [(1, 1, "URL path")]),
    ("||a.example^$third-party\n", [], [(1, 1, "$third-party")]),
    ("||a.example^$client=192.168.1.1\n", [], [(1, 1, "$client=192.168.1.1")]),
    ("||a.example^$dnstype=AAAA\n", [], [(1, 1, "$dnstype=AAAA")]),
    ("||a.example^$important,dnstype=A\n", [], [(1, 1, "$dnstype=A")]),
    ("##.banner\n", [], [(1, 1, "cosmetic")]),
    ("###banner-id\n", [], [(1, 1, "cosmetic")]),
    ("example.com##.ad\n", [], [(1, 1, "cosmetic")]),
    ("example.com#@#.ad\n", [], [(1, 1, "cosmetic")]),
    ("example.com#?#div:has(.ad)\n", [], [(1, 1, "cosmetic")]),
    ("example.com#$#body { x: y }\n", [], [(1, 1, "cosmetic")]),
    ("/ads[0-9]+\\.example/\n", [], [(1, 1, "regular-expression")]),
    ("|http://ads.example/\n", [], [(1, 1, "anchors a URL")]),
    ("bare.example\n", [], [(1, 1, "||bare.example^")]),
    ("@@bare.example\n", [], [(1, 1, "bare name")]),
    ("||noend.example\n", [], [(1, 1, "no closing '^'")]),
    ("||x.example^|\n", [], [(1, 1, "after the closing '^'")]),
    ("||a*b.example^\n", [], [(1, 1, "wildcard")]),
    ("0.0.0.0 ads.example\n", [], [(1, 1, "format hosts")]),
    ("||1.2.3.4^\n", [], [(1, 1, "IP address")]),
    ("||a..b^\n", [], [(1, 1, "empty label")]),
    ("||^\n", [], [(1, 1, "root")]),
    ("  ||a.example/x^\n", [], [(1, 3, "URL path")]),
    ("*ads*\n", [], [(1, 1, "not a supported adblock rule")]),
    (
        "||a.example^\n||b.example/x^\n@@||c.example^\n",
        [("a.example", DOMAIN, 1), ("c.example", DOMAIN | ALLOW, 3)],
        [(2, 1, "URL path")],
    ),
]


@pytest.mark.parametrize(("text", "entries", "problems"), ADBLOCK)
def test_adblock(text: str, entries: list[Entry], problems: Expected) -> None:
    check("adblock", text, entries, problems)


# --- rpz --------------------------------------------------------------------------------------

HEADER = """\
$TTL 300
$ORIGIN rpz.example.
@ IN SOA localhost. root.localhost. ( 2024010101 ; serial
        3600 600 86400 300 )  ; refresh retry expire minimum
  IN NS localhost.
"""
AFTER = HEADER.count("\n")  # records below start on line AFTER + 1

RPZ_RECORDS: list[tuple[str, list[Entry], list[tuple[int, str]]]] = [
    ("bad.example CNAME .", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("*.bad.example CNAME .", [("bad.example", SUBDOMAINS | NXDOMAIN, 1)], []),
    ("bad.example CNAME *.", [("bad.example", EXACT | NODATA, 1)], []),
    ("*.bad.example CNAME *.", [("bad.example", SUBDOMAINS | NODATA, 1)], []),
    ("ok.example CNAME rpz-passthru.", [("ok.example", EXACT | ALLOW, 1)], []),
    ("*.ok.example CNAME rpz-passthru.", [("ok.example", SUBDOMAINS | ALLOW, 1)], []),
    ("ok.example CNAME ok.example.", [("ok.example", EXACT | ALLOW, 1)], []),
    ("bad.example 300 IN CNAME .", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("bad.example IN 300 CNAME .", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("bad.example IN CNAME .", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("bad.example 1h30m CNAME .", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("bad.example\t300\tIN\tCNAME\t.", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("BAD.Example cname .", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("bad.example CNAME . ; a comment", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("bad.example.rpz.example. CNAME .", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("bücher.de CNAME .", [("xn--bcher-kva.de", EXACT | NXDOMAIN, 1)], []),
    ("bad.example CNAME .\r", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    ("drop.example CNAME rpz-drop.", [], [(1, "rpz-drop")]),
    ("tcp.example CNAME rpz-tcp-only.", [], [(1, "rpz-tcp-only")]),
    ("local.example A 192.0.2.1", [], [(1, "A records are local data")]),
    ("local.example AAAA 2001:db8::1", [], [(1, "AAAA records are local data")]),
    ('local.example TXT "a; b"', [], [(1, "TXT records are local data")]),
    ("local.example MX 10 mail.example.", [], [(1, "MX records")]),
    ("redirect.example CNAME walled.garden.example.", [], [(1, "CNAME to walled.garden")]),
    ("relative.example CNAME target", [], [(1, "CNAME to target.rpz.example.")]),
    ("*.redirect.example CNAME *.garden.example.", [], [(1, "local data")]),
    ("32.1.2.0.192.rpz-ip CNAME .", [], [(1, "rpz-ip")]),
    ("ns.evil.example.rpz-nsdname CNAME .", [], [(1, "rpz-nsdname")]),
    ("32.1.2.0.192.rpz-nsip CNAME .", [], [(1, "rpz-nsip")]),
    ("24.0.0.0.10.rpz-client-ip CNAME .", [], [(1, "rpz-client-ip")]),
    ("other.zone. CNAME .", [], [(1, "outside the zone")]),
    ("* CNAME .", [], [(1, "every name")]),
    ("a.*.example CNAME .", [], [(1, "wildcard")]),
    ('@ TXT "v1"', [], [(1, "zone apex")]),
    ("@ NS other.ns.", [], []),
    ("sub.example NS ns.sub.example.", [], [(1, "NS records")]),
    ("@ SOA a. b. 1 2 3 4 5", [], []),
    ("$INCLUDE other.rpz", [], [(1, "$INCLUDE")]),
    ("$GENERATE 1-10 host$ CNAME .", [], [(1, "$GENERATE")]),
    ("$FOO bar", [], [(1, "unknown")]),
    ("$ORIGIN", [], [(1, "takes one name")]),
    ("$TTL soon", [], [(1, "takes one TTL")]),
    ("bad.example CH CNAME .", [], [(1, "class CH")]),
    ("bad.example", [], [(1, "no type")]),
    ("bad.example 300", [], [(1, "no type")]),
    ("bad.example CNAME", [], [(1, "exactly one target")]),
    ("bad.example CNAME . extra.", [], [(1, "exactly one target")]),
    ("1.2.3.4 CNAME .", [], [(1, "IP address")]),
    ("bad..example CNAME .", [], [(1, "empty label")]),
    ("bad.example CNAME ( . )", [("bad.example", EXACT | NXDOMAIN, 1)], []),
    (")", [], [(1, "closes no '('")]),
    ("bad.example CNAME (", [], [(1, "never closed")]),
    (
        'sub.bad.example TXT "x"\n  CNAME .\n\t300 CNAME *.',
        [("sub.bad.example", EXACT | NXDOMAIN, 2), ("sub.bad.example", EXACT | NODATA, 3)],
        [(1, "TXT records")],
    ),
    (
        "bad.example CNAME .\n  A 192.0.2.1",
        [("bad.example", EXACT | NXDOMAIN, 1)],
        [(2, "A records")],
    ),
]


@pytest.mark.parametrize(("records", "entries", "problems"), RPZ_RECORDS)
def test_rpz_records(records: str, entries: list[Entry], problems: list[tuple[int, str]]) -> None:
    """Records below a standard header (whose SOA and NS give nothing); line numbers in the
    table count from the first record."""
    got, found = run("rpz", HEADER + records + "\n")
    assert [(name, flags, line - AFTER) for name, flags, line in got] == entries
    assert [p.line - AFTER for p in found] == [line for line, _ in problems]
    for problem, (_, words) in zip(found, problems, strict=True):
        assert words.lower() in problem.message.lower(), problem.message
        assert problem.message.endswith("."), problem.message
        assert problem.column >= 1


def test_rpz_line_numbers_and_columns() -> None:
    text = (
        HEADER
        + "bad.example CNAME .\n\nlocal.example 300 IN A 192.0.2.1\ndrop.example CNAME rpz-drop.\n"
    )
    check(
        "rpz",
        text,
        [("bad.example", EXACT | NXDOMAIN, AFTER + 1)],
        [(AFTER + 3, 22, "A records"), (AFTER + 4, 20, "rpz-drop")],
    )


RPZ_ZONES: list[tuple[str, list[Entry], Expected]] = [
    # No $ORIGIN and an SOA at "@": the zone's name is not in the file; names are absolute.
    (
        "$TTL 300\n@ SOA ns. admin. 1 2 3 4 5\n NS ns.\nbad.example CNAME .\n",
        [("bad.example", EXACT | NXDOMAIN, 4)],
        [],
    ),
    (
        "$TTL 300\n@ SOA ns. admin. 1 2 3 4 5\n@ CNAME .\n",
        [],
        [(3, 3, "zone apex")],
    ),
    # No directives at all: every owner is a trigger.
    (
        "bad.example CNAME .\n*.bad.example CNAME *.\n",
        [("bad.example", EXACT | NXDOMAIN, 1), ("bad.example", SUBDOMAINS | NODATA, 2)],
        [],
    ),
    # The SOA owner names the zone.
    (
        "rpz.example. 300 IN SOA ns. admin. 1 2 3 4 5\n"
        "bad.example CNAME .\nbad2.example.rpz.example. CNAME .\n",
        [("bad.example", EXACT | NXDOMAIN, 2), ("bad2.example", EXACT | NXDOMAIN, 3)],
        [],
    ),
    # named-compilezone's style: $ORIGIN . then a relative SOA owner, then $ORIGINs below.
    (
        "$ORIGIN .\n$TTL 300\nrpz.example IN SOA ns.rpz.example. admin.rpz.example. (\n"
        "  1 3600 600 86400 300\n)\n    NS ns.rpz.example.\n$ORIGIN rpz.example.\n"
        "bad CNAME .\n$ORIGIN bad.rpz.example.\n* CNAME *.\n",
        [("bad", EXACT | NXDOMAIN, 8), ("bad", SUBDOMAINS | NODATA, 10)],
        [],
    ),
    # An $ORIGIN below the apex: owners are relative to it, the apex is still stripped.
    (
        HEADER
        + "$ORIGIN bad.example.rpz.example.\n@ CNAME .\n* CNAME *.\nwww CNAME rpz-passthru.\n",
        [
            ("bad.example", EXACT | NXDOMAIN, AFTER + 2),
            ("bad.example", SUBDOMAINS | NODATA, AFTER + 3),
            ("www.bad.example", EXACT | ALLOW, AFTER + 4),
        ],
        [],
    ),
    # A relative $ORIGIN is relative to the current one.
    (
        HEADER + "$ORIGIN sub\nx CNAME .\n",
        [("x.sub", EXACT | NXDOMAIN, AFTER + 2)],
        [],
    ),
    # A second SOA elsewhere is refused; the first one named the zone.
    (
        HEADER + "other.example SOA a. b. 1 2 3 4 5\n",
        [],
        [(AFTER + 1, 15, "second SOA")],
    ),
    # A blank owner with nothing before it.
    ("  CNAME .\n", [], [(1, 1, "no owner")]),
    # The fast path and the thorough path agree on a blank-owner line after a plain record.
    (
        HEADER + "bad.example CNAME .\n  CNAME *.\n",
        [("bad.example", EXACT | NXDOMAIN, AFTER + 1), ("bad.example", EXACT | NODATA, AFTER + 2)],
        [],
    ),
]


@pytest.mark.parametrize(("text", "entries", "problems"), RPZ_ZONES)
def test_rpz_zones(text: str, entries: list[Entry], problems: Expected) -> None:
    check("rpz", text, entries, problems)


# --- the bulk path agrees with the thorough path -----------------------------------------------

FRAGMENTS = [
    "a",
    "b1",
    "ex",
    "com",
    "xn--p1ai",
    "_x",
    "9",
    ".",
    "..",
    "-",
    "--",
    "*",
    "*.",
    "#",
    " ",
    "\t",
    "\r",
    "ü",
    "İ",
    "Ex",
    "0.0.0.0 ",
    "127.0.0.1 ",
    "0.0.0.0\t",
    "::1 ",
    "1.2.3.4",
    "||",
    "^",
    "^$important",
    "$third-party",
    "@@",
    "!",
    "/",
    ":",
    "localhost",
    "local",
    "ip6-",
    "broadcasthost",
    "a" * 40,
    "b" * 30,
    "\x01",
]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["domains", "hosts", "adblock"]),
    st.lists(st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join), max_size=8),
    st.booleans(),
)
def test_bulk_path_matches_line_path(fmt: str, lines: list[str], final_break: bool) -> None:
    """Whatever the bulk path vouches for, the per-line path reads the same way."""
    text = "\n".join(lines) + ("\n" if final_break and lines else "")
    got, found = run(fmt, text)
    expected: list[Entry] = []
    problems: list[Problem] = []
    line_parser = formats._LINE_PARSERS[fmt]
    for number, line in enumerate(text.split("\n"), 1):
        expected.extend(line_parser(line, number, problems))
    assert got == expected
    assert found == problems


# --- large files ------------------------------------------------------------------------------


def test_a_million_lines(tmp_path: Path) -> None:
    """A million-line domains file and hosts file, with a few odd lines among them.

    The timing is printed (run with -s), not asserted: machines differ.
    """
    count = 1_000_000
    names = [f"host{i}.example{i % 97}.com" for i in range(count)]
    names[10] = "# a comment"
    names[500_000] = "bad..example"
    names[count - 1] = "*.last.example"
    domains = tmp_path / "domains.txt"
    domains.write_text("\n".join(names) + "\n")
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("".join(f"0.0.0.0 {name}\n" for name in names))
    for fmt, path in (("domains", domains), ("hosts", hosts)):
        text = path.read_text()
        problems: list[Problem] = []
        start = time.perf_counter()
        entries = list(parse(text, fmt, problems))
        elapsed = time.perf_counter() - start
        print(f"{fmt}: {count} lines in {elapsed:.3f} s")
        assert len(entries) == count - 3 + (fmt == "domains")
        assert entries[0] == ("host0.example0.com", DOMAIN if fmt == "domains" else EXACT, 1)
        assert entries[-1][2] == count - (fmt == "hosts")
        assert [p.line for p in problems] == (
            [500_001] if fmt == "domains" else [11, 500_001, count]
        )


OWNER_PARTS = ["bad", "Ex", "com", "1", "2x", "_srv", "xn--p1ai", "-", "*", "rpz-ip", "a" * 60]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["", "$ORIGIN rpz.example.\n", HEADER, "$ORIGIN .\n"]),
    st.lists(st.sampled_from(OWNER_PARTS), min_size=1, max_size=5).map(".".join),
    st.sampled_from(["", " 300", " IN", " 300 IN", " in 60"]),
    st.sampled_from([".", "*.", "rpz-passthru.", "rpz-drop.", "walled.example.", "rel"]),
    st.sampled_from(["", " ; note", "\r"]),
)
def test_rpz_fast_path_matches_thorough_path(
    header: str, owner: str, middle: str, target: str, tail: str
) -> None:
    """A target in parentheses means the same but is read by the thorough path."""
    plain = f"{header}{owner}{middle} CNAME {target}{tail}\n"
    wrapped = f"{header}{owner}{middle} CNAME ( {target} ){tail}\n"
    got, found = run("rpz", plain)
    expected, problems = run("rpz", wrapped)
    assert got == expected
    assert [(p.line, p.message) for p in found] == [(p.line, p.message) for p in problems]
