"""Differential conformance test: this resolver and Unbound, side by side, forwarding to the
same NSD, must give the same answers, except where both behaviours are allowed.

NSD serves the zones of tests/helpers/richzones.py (CNAME chains, a cross-zone CNAME, a DNAME, a
wildcard, an empty non-terminal, a delegation with glue, NODATA, NXDOMAIN, large RRsets
and, when dnspython can sign, a signed zone). Unbound runs as a plain forwarder (iterator
only, no validation, cache on); this resolver runs as an operator starts it. A matrix of
queries (names x types x EDNS off / DO=0 / DO=1 x payload 512 / 1232 / 4096 x UDP / TCP),
asked twice (the first pass meets cold caches, the second warm ones), goes to both, and
rcode, flags, question, answer and authority RRsets, OPT presence, payload and DO, and TTL
bounds are compared.

What may differ is listed once, in ALLOWED, each with the RFC that allows it (and
docs/differences-from-unbound.md explains them to operators). Anything else fails with the
query, both answers and the dig commands that reproduce it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from .helpers.realservers import ResolverProcess, free_port
from .helpers.richzones import UnboundForwarder, ZoneServer, available, unbound_available

pytestmark = pytest.mark.skipif(
    not (available() and unbound_available()), reason="needs nsd and unbound"
)

NAMES = [
    "conf.test",  # the apex
    "www.conf.test",  # A, AAAA and TXT; NODATA for the other types
    "chain1.conf.test",  # CNAME -> CNAME -> CNAME -> www
    "xzone.conf.test",  # CNAME into another zone
    "dangling.conf.test",  # CNAME to a name that does not exist
    "dn.conf.test",  # the DNAME owner
    "x.dn.conf.test",  # below the DNAME: DNAME, synthesized CNAME, target
    "nx.dn.conf.test",  # below the DNAME, target missing
    "a.wild.conf.test",  # wildcard
    "b.ent.conf.test",  # empty non-terminal
    "mail.conf.test",  # MX with in-zone targets (additional records)
    "sub.conf.test",  # delegation point
    "a.sub.conf.test",  # below the delegation: referral with glue
    "nx.conf.test",  # NXDOMAIN
    "mid.conf.test",  # TXT over 512 octets, under 1232
    "big.conf.test",  # TXT over 1232 octets
    "many.conf.test",  # 40 A records (over 512 octets)
]
SIGNED_NAMES = [
    "signed.test",
    "www.signed.test",
    "alias.signed.test",
    "a.wild.signed.test",
    "nx.signed.test",
    "x.dn.signed.test",
    "mail.signed.test",
]
TYPES = ["A", "AAAA", "TXT", "MX", "CNAME", "NS", "SOA", "ANY"]
#: None: no EDNS; else (DO, payload).
EDNS = [None, (False, 512), (False, 1232), (False, 4096), (True, 512), (True, 1232), (True, 4096)]
PASSES = ("cold", "cached")
#: How much older a cached TTL may be than the authoritative one (the test's own length).
TTL_SLACK = 120


@dataclass(frozen=True)
class Case:
    name: str
    rtype: str
    edns: tuple[bool, int] | None
    tcp: bool
    phase: str

    @property
    def udp(self) -> bool:
        return not self.tcp

    def message(self) -> dns.message.Message:
        if self.edns is None:
            return dns.message.make_query(self.name, self.rtype, use_edns=False)
        do, payload = self.edns
        return dns.message.make_query(
            self.name, self.rtype, use_edns=0, payload=payload, want_dnssec=do
        )

    def dig(self, port: int) -> str:
        edns = (
            "+noedns"
            if self.edns is None
            else f"+edns=0 +bufsize={self.edns[1]}" + (" +dnssec" if self.edns[0] else "")
        )
        tcp = " +tcp" if self.tcp else " +ignore"
        return f"dig @127.0.0.1 -p {port} {self.name} {self.rtype} +noad +nocookie {edns}{tcp}"

    def __str__(self) -> str:
        edns = "no EDNS" if self.edns is None else f"DO={int(self.edns[0])} bufsize={self.edns[1]}"
        return f"{self.name} {self.rtype}, {edns}, {'TCP' if self.tcp else 'UDP'}, {self.phase}"


#: An RRset without its TTL: (owner, type, class, sorted RDATA texts).
RRKey = tuple[str, str, str, tuple[str, ...]]


@dataclass
class View:
    """What is compared of one answer."""

    rcode: str
    flags: frozenset[str]
    question: tuple[str, ...]
    answer: frozenset[RRKey]
    authority: frozenset[RRKey]
    opt: tuple[int, bool] | None  # (payload, DO)
    ttls: dict[RRKey, int] = field(compare=False)
    text: str = field(compare=False)
    size: int = field(compare=False, default=0)


def _rrsets(section: list[dns.rrset.RRset], ttls: dict[RRKey, int]) -> frozenset[RRKey]:
    out = set()
    for rrset in section:
        key = (
            rrset.name.to_text().lower(),
            dns.rdatatype.to_text(rrset.rdtype)
            + (
                "/" + dns.rdatatype.to_text(rrset.covers)
                if rrset.rdtype == dns.rdatatype.RRSIG
                else ""
            ),
            dns.rdataclass.to_text(rrset.rdclass),
            tuple(sorted(rd.to_text() for rd in rrset)),
        )
        out.add(key)
        ttls[key] = rrset.ttl
    return frozenset(out)


def view(message: dns.message.Message, size: int = 0) -> View:
    ttls: dict[RRKey, int] = {}
    flags = frozenset(dns.flags.to_text(message.flags).split())
    opt = (message.payload, bool(message.ednsflags & dns.flags.DO)) if message.edns >= 0 else None
    return View(
        dns.rcode.to_text(message.rcode()),
        flags,
        tuple(q.to_text().lower() for q in message.question),
        _rrsets(message.answer, ttls),
        _rrsets(message.authority, ttls),
        opt,
        ttls,
        message.to_text(),
        size,
    )


# ----------------------------------------------------------------- the allowed differences
# Each rule: (what may differ, the RFC that allows it, a function that, when the difference
# applies to this case, returns both views with that difference taken out). The function
# must not hide anything else: it removes only what its rule names.

Rule = Callable[[Case, View, View, View], tuple[View, View] | None]


def _without(v: View, **changes: object) -> View:
    out = View(v.rcode, v.flags, v.question, v.answer, v.authority, v.opt, v.ttls, v.text, v.size)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def _apex_ns(rrsets: frozenset[RRKey]) -> frozenset[RRKey]:
    return frozenset(r for r in rrsets if r[1] not in ("NS", "RRSIG/NS"))


def authority_ns(case: Case, ours: View, theirs: View, ref: View) -> tuple[View, View] | None:
    # Unbound answers minimally (minimal-responses: yes); this resolver forwards the NS RRset
    # that the authoritative server put beside a positive answer (and its RRSIG).
    if ours.rcode != "NOERROR" or not (ours.answer or theirs.answer):
        return None
    return _without(ours, authority=_apex_ns(ours.authority)), _without(
        theirs, authority=_apex_ns(theirs.authority)
    )


def any_subset(case: Case, ours: View, theirs: View, ref: View) -> tuple[View, View] | None:
    # RFC 8482 4.1: ANY may be answered with any non-empty subset of the name's RRsets.
    # NSD answers one RRset; Unbound adds what its cache holds for the name; this resolver
    # passes on the upstream's answer (over UDP: one RRset of it, with the aliases that
    # lead there). Both must hold only real RRsets of the name (``ref`` is the union of
    # NSD's answers for every type asked), keep the rcode, and agree on the aliases.
    if case.rtype != "ANY" or ours.rcode != theirs.rcode:
        return None
    if not (ours.answer <= ref.answer and theirs.answer <= ref.answer):
        return None
    aliases = ("CNAME", "DNAME")  # their RRSIGs: Unbound gives them to DO=0 too (above)
    if {r for r in ours.answer if r[1] in aliases} != {r for r in theirs.answer if r[1] in aliases}:
        return None
    if bool(ours.answer) != bool(theirs.answer):
        return None
    return _without(ours, answer=theirs.answer, authority=theirs.authority), theirs


def any_alias_target(case: Case, ours: View, theirs: View, ref: View) -> tuple[View, View] | None:
    # RFC 1034 4.3.2 step 3a: ANY matches a CNAME, so Unbound stops at the alias (NOERROR);
    # NSD, and this resolver after it, follow a DNAME's synthesized CNAME to the target and
    # give that name's rcode (NXDOMAIN and its zone's SOA when it is missing, RFC 6604 2).
    aliases = ("CNAME", "DNAME", "RRSIG/CNAME", "RRSIG/DNAME")
    if case.rtype != "ANY" or ours.rcode != ref.rcode or theirs.rcode != "NOERROR":
        return None
    mine = {r for r in ours.answer if r[1] in aliases}
    if not mine or mine != {r for r in theirs.answer if r[1] in aliases}:
        return None
    return _without(
        ours, rcode=theirs.rcode, answer=theirs.answer, authority=theirs.authority
    ), theirs


def udp_cap(case: Case, ours: View, theirs: View, ref: View) -> tuple[View, View] | None:
    # RFC 6891 6.2.5: a responder may use a smaller UDP payload than the client offers; this
    # resolver sends at most 1232 octets over UDP (DNS Flag Day 2020, RFC 9715 3.2) and
    # sets TC=1 beyond, where Unbound fills the client's 4096.
    if case.tcp or case.edns is None or case.edns[1] <= 1232:
        return None
    if "TC" not in ours.flags or "TC" in theirs.flags or theirs.size <= 1232:
        return None
    return _without(
        ours, flags=theirs.flags, answer=theirs.answer, authority=theirs.authority
    ), theirs


def truncated(case: Case, ours: View, theirs: View, ref: View) -> tuple[View, View] | None:
    # RFC 2181 9 and RFC 1035 4.2.1: a truncated UDP answer (TC=1) need carry nothing;
    # what little either side packs into it before the cut is not compared.
    if case.tcp or not ("TC" in ours.flags and "TC" in theirs.flags):
        return None
    return _without(ours, answer=frozenset(), authority=frozenset()), _without(
        theirs, answer=frozenset(), authority=frozenset()
    )


def _from_dname(key: RRKey, v: View) -> bool:
    """A CNAME whose owner is below a DNAME of the same answer (synthesized from it)."""
    owner = dns.name.from_text(key[0])
    return any(r[1] == "DNAME" and owner.is_subdomain(dns.name.from_text(r[0])) for r in v.answer)


def dname_ttl(case: Case, ours: View, theirs: View, ref: View) -> None:
    """Checked as bounds in differences(), not by taking anything out."""


def ttl_lowering(case: Case, ours: View, theirs: View, ref: View) -> None:
    """Checked as bounds in differences(), not by taking anything out."""


def referral_ttl(case: Case, ours: View, theirs: View, ref: View) -> None:
    """Checked as bounds in differences(), not by taking anything out."""


#: The one list of allowed differences: (what, the RFC, the rule).
ALLOWED: list[tuple[str, str, Rule]] = [
    (
        "NS RRset (and its RRSIG) in the authority section of a positive answer",
        "RFC 1034 4.3.2 (step 3a), RFC 2181 6.1: optional in a positive answer",
        authority_ns,
    ),
    (
        "ANY: which of the name's RRsets (one over UDP here, one from NSD, more from "
        "Unbound's cache), never invented ones, same rcode and aliases",
        "RFC 8482 4.1",
        any_subset,
    ),
    (
        "ANY at a name below a DNAME: the target's rcode (NSD's answer, passed on) or "
        "NOERROR at the synthesized CNAME (Unbound)",
        "RFC 1034 4.3.2 (ANY matches the CNAME), RFC 6604 2 (the rcode of the last name)",
        any_alias_target,
    ),
    (
        "TTL lowering within a message: every TTL of a cached answer capped at its lifetime "
        "(the lowest TTL, or the negative TTL), and at the policy's next change",
        "RFC 1035 3.2.1 and RFC 2181 5.2 (a cache may lower TTLs), RFC 2308 5",
        ttl_lowering,
    ),
    (
        "a referral (NOERROR, no answer, NS in authority, no SOA) passed on with TTL 0 "
        "where Unbound passes on the NS RRset's TTL",
        "RFC 2308 5 (no SOA: not cached), RFC 1035 3.2.1 (TTL 0: use once)",
        referral_ttl,
    ),
    (
        "a CNAME synthesized from a DNAME served from Unbound's cache with TTL 0, where "
        "this resolver (and NSD) give it the DNAME's TTL",
        "RFC 2672 4.1 (TTL 0, what Unbound does), RFC 6672 3.4 (the DNAME's TTL)",
        dname_ttl,
    ),
    (
        "UDP answers over 1232 octets: TC=1 here though the client offered more",
        "RFC 6891 6.2.5 (the responder's own limit), RFC 9715 3.2, DNS Flag Day 2020",
        udp_cap,
    ),
    (
        "truncated UDP answers (TC=1 on both): what precedes the cut",
        "RFC 2181 9, RFC 1035 4.2.1",
        truncated,
    ),
]


def differences(case: Case, ours: View, theirs: View, ref: View) -> list[str]:
    """What differs and no rule in ALLOWED allows, plus TTLs outside their bounds."""
    for _what, _rfc, rule in ALLOWED:
        if ours == theirs:
            break
        changed = rule(case, ours, theirs, ref)
        if changed is not None:
            ours, theirs = changed
    found = []
    for part in ("rcode", "flags", "question", "answer", "authority", "opt"):
        a, b = getattr(ours, part), getattr(theirs, part)
        if a != b:
            if isinstance(a, frozenset) and isinstance(b, frozenset):
                found.append(f"{part}: only ours {sorted(a - b)}, only Unbound's {sorted(b - a)}")
            else:
                found.append(f"{part}: ours {a}, Unbound's {b}")
    # TTL bounds: never above what the authoritative server says; never below the lowest
    # TTL of the authoritative message less the test's length (TTL_LOWERING in ALLOWED);
    # 0 for an answer passed on but not cached (REFERRAL_TTL in ALLOWED).
    floor = min(ref.ttls.values(), default=0) - TTL_SLACK
    for side, v in (("ours", ours), ("Unbound's", theirs)):
        for key, ttl in v.ttls.items():
            top = ref.ttls.get(key)
            if top is None:
                continue
            if ttl == 0 and side == "Unbound's" and key[1] == "CNAME" and _from_dname(key, v):
                continue  # DNAME_TTL in ALLOWED
            uncached = ttl == 0 and not ref.answer and "SOA" not in {r[1] for r in ref.authority}
            if ttl > top or (ttl < floor and not uncached):
                found.append(f"TTL of {key[0]} {key[1]}: {side} {ttl}, authoritative {top}")
    return found


# ------------------------------------------------------------------------------- the test


class Servers:
    def __init__(self, workdir: Path) -> None:
        self.nsd = ZoneServer(workdir / "nsd")
        self.unbound: UnboundForwarder | None = None
        self.ours: ResolverProcess | None = None
        try:
            self.unbound = UnboundForwarder(workdir / "unbound", self.nsd.address)
            lists = workdir / "lists"
            lists.mkdir()
            port = free_port()  # one port for UDP and TCP
            self.ours = ResolverProcess(
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                self.nsd.address,
                "--blocklists",
                str(lists),
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.ours is not None:
            self.ours.stop()
        if self.unbound is not None:
            self.unbound.stop()
        self.nsd.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("conformance"))
    yield running
    running.stop()


def ask(case: Case, port: int) -> View:
    """The answer to ``case`` from 127.0.0.1:``port``, as compared (retried on timeouts)."""
    query = case.message()
    for attempt in range(3):
        try:
            if case.tcp:
                reply = dns.query.tcp(query, "127.0.0.1", port=port, timeout=3)
            else:
                reply = dns.query.udp(
                    query, "127.0.0.1", port=port, timeout=2, ignore_trailing=True
                )
            return view(reply, len(reply.to_wire()))
        except (dns.exception.Timeout, OSError):
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


#: The EDNS variants asked, per pass and transport: the payload matters over UDP only, and
#: the second pass (warm caches) needs fewer.
VARIANTS: dict[tuple[str, bool], list[tuple[bool, int] | None]] = {
    ("cold", False): EDNS,
    ("cold", True): [None, (False, 1232), (True, 1232)],
    ("cached", False): [None, (False, 512), (True, 1232)],
    ("cached", True): [(True, 4096)],
}


def group(name: str, rtype: str) -> list[Case]:
    """The cases of one question, in the order asked (cold caches first)."""
    out = []
    for phase in PASSES:
        for tcp in (False, True):
            for edns in VARIANTS[phase, tcp]:
                out.append(Case(name, rtype, edns, tcp, phase))
    return out


def references(names: list[str], port: int) -> dict[tuple[str, str, bool], View]:
    """NSD's own answers over TCP, per name, type and DO; for ANY, the union of the answers
    for every other type (NSD answers ANY with one RRset, RFC 8482)."""

    def one(key: tuple[str, str, bool]) -> View:
        name, rtype, do = key
        return ask(Case(name, rtype, (do, 4096), True, "authoritative"), port)

    keys = [(n, t, do) for n in names for t in TYPES for do in (False, True)]
    with ThreadPoolExecutor(WORKERS) as pool:
        refs = dict(zip(keys, pool.map(one, keys), strict=True))
    for name in names:
        # Both DO kinds: RRSIGs are RRsets of the name too, which Unbound gives to ANY
        # whatever DO says (RFC 3225 3: "unless explicitly queried for").
        union: frozenset[RRKey] = frozenset()
        ttls: dict[RRKey, int] = {}
        for do in (False, True):
            for rtype in TYPES:
                if refs[name, rtype, do].rcode == refs[name, "ANY", do].rcode:
                    union |= refs[name, rtype, do].answer
                    ttls.update(refs[name, rtype, do].ttls)
        for do in (False, True):
            refs[name, "ANY", do] = _without(refs[name, "ANY", do], answer=union, ttls=ttls)
    return refs


#: Questions asked at once (each question's cases stay in order).
WORKERS = 6


def test_answers_agree_with_unbound(servers: Servers) -> None:
    ours_port = servers.ours.port if servers.ours is not None else 0
    unbound_port = servers.unbound.port if servers.unbound is not None else 0
    names = NAMES + (SIGNED_NAMES if servers.nsd.signed else [])
    started = time.monotonic()
    reference = references(names, servers.nsd.port)

    def run(question: tuple[str, str]) -> tuple[int, list[str]]:
        failures = []
        asked = 0
        for case in group(*question):
            ref = reference[case.name, case.rtype, bool(case.edns and case.edns[0])]
            ours = ask(case, ours_port)
            theirs = ask(case, unbound_port)
            asked += 1
            found = differences(case, ours, theirs, ref)
            if found:
                failures.append(
                    f"--- {case}\n  " + "\n  ".join(found) + "\n"
                    f"  ours:    {case.dig(ours_port)}\n"
                    f"  Unbound: {case.dig(unbound_port)}\n"
                    f"ours:\n{ours.text}\nUnbound's:\n{theirs.text}\n"
                )
        return asked, failures

    questions = [(name, rtype) for name in names for rtype in TYPES]
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(run, questions))
    asked = sum(r[0] for r in results)
    failures = [f for r in results for f in r[1]]
    elapsed = time.monotonic() - started
    kinds = Counter(
        f"{f.split(',')[1].strip()}: {f.split(chr(10))[1].split(':')[0].strip()}" for f in failures
    )
    assert not failures, (
        f"{len(failures)} of {asked} queries differ beyond ALLOWED ({elapsed:.0f} s; "
        f"by part: {dict(kinds)}); the first ones:\n" + "\n".join(failures[:6])
    )
    assert asked == len(questions) * sum(len(v) for v in VARIANTS.values())
