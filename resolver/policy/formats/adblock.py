"""The adblock format: the DNS subset of AdBlock/uBlock/AdGuard rules."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

from .bulk import assemble, scan
from .hosts import is_sinkhole
from .names import ALLOW, DOMAIN, SUBDOMAINS, Entry, Problem, check_name, column_of, quoted

# Element-hiding and scriptlet markers: ##, #@#, #?#, #$#, #%#, #@?#, #@$#, #$?# ...
_COSMETIC: Final = re.compile(r"#@?[$?%]{0,2}#")
# A line of '#' followed by nothing or by a space is a comment banner, not "##selector".
_HASH_COMMENT: Final = re.compile(r"#+(?:\s|$)")


_ADBLOCK_PREFIXES: Final = (b"||",)
_ADBLOCK_SUFFIXES: Final = (b"^", b"^$important")


def parse_adblock(text: str, problems: list[Problem]) -> Iterator[Entry]:
    bulk = scan(text, _ADBLOCK_PREFIXES, _ADBLOCK_SUFFIXES)
    return assemble(text, bulk, DOMAIN, adblock_line, problems)


def adblock_line(line: str, number: int, problems: list[Problem]) -> Iterator[Entry]:
    """The thorough path for one line of an adblock list."""
    rule = line.strip()
    if not rule or rule[0] == "!":
        return
    if rule[0] == "[" and rule[-1] == "]":
        return  # a "[Adblock Plus 2.0]" style header
    if rule[0] == "#" and (_HASH_COMMENT.match(rule) or not _COSMETIC.match(rule)):
        return
    result = _adblock_rule(rule)
    if isinstance(result, tuple):
        yield (*result, number)
    else:
        problems.append(Problem(number, column_of(line, rule), result))


def _adblock_rule(rule: str) -> tuple[str, int] | str:
    """``(name, flags)`` for a supported rule, else a sentence saying why it is not."""
    if _COSMETIC.search(rule):
        return (
            "cosmetic (element-hiding or scriptlet) rules act on web pages, not on DNS names; "
            "they are not supported."
        )
    allow = rule.startswith("@@")
    body = rule[2:] if allow else rule
    if len(body) > 1 and body[0] == "/" and ("/" in body[1:]):
        return "regular-expression rules are not supported; write ||name^ rules instead."
    pattern, dollar, modifiers = body.partition("$")
    if dollar:
        unsupported = [m for m in modifiers.split(",") if m.strip().lower() != "important"]
        if unsupported:
            shown = ", ".join("$" + m.strip() for m in unsupported)
            return (
                f"the modifier {shown} is not supported (only $important is); the rule would "
                "apply more widely without it, so it is not imported."
            )
    if pattern.startswith("||"):
        return _adblock_domain(pattern, allow)
    if pattern.startswith("|"):
        return (
            f"{quoted(pattern)} anchors a URL, which DNS filtering never sees; write ||name^ to "
            "match a domain and its subdomains."
        )
    fields = pattern.split()
    if len(fields) > 1 and is_sinkhole(fields[0]) is not None:
        return "the line is in hosts syntax; import hosts files with format hosts."
    if "/" in pattern or "^" in pattern or "*" in pattern or len(fields) != 1:
        return (
            f"{quoted(pattern)} is not a supported adblock rule; only ||name^, @@||name^ and the "
            "$important modifier are supported."
        )
    try:
        name = check_name(pattern)
    except ValueError:
        return (
            f"{quoted(pattern)} is not a supported adblock rule; only ||name^, @@||name^ and the "
            "$important modifier are supported."
        )
    # In adblock syntax a bare word is a substring pattern: 'ads.example' would also match
    # 'bads.example.org'. Importing it as a domain would change its meaning, so say so.
    return (
        f"a bare name ({name}) is a substring pattern in adblock syntax, not a domain rule; "
        f"write ||{name}^ to block it and its subdomains."
    )


def _adblock_domain(pattern: str, allow: bool) -> tuple[str, int] | str:
    """Interpret a ``||...`` pattern."""
    inner = pattern[2:]
    if not inner.endswith("^"):
        if "/" in inner:
            return f"{quoted(pattern)} has a URL path; DNS filtering sees only names, so remove it."
        if "^" in inner:
            return (
                f"{quoted(pattern)} has text after the closing '^', which is not supported; "
                "write ||name^ to match a domain and its subdomains."
            )
        return (
            f"{quoted(pattern)} has no closing '^', so it matches every name that merely starts "
            f"with it; write {pattern}^ to match the domain and its subdomains."
        )
    inner = inner[:-1]
    if "/" in inner or "^" in inner:
        return f"{quoted(pattern)} has a URL path; DNS filtering sees only names, so remove it."
    flags = DOMAIN
    if inner.startswith("*."):
        # ||*.example^ matches the names below example but not example itself.
        flags, inner = SUBDOMAINS, inner[2:]
    if "*" in inner:
        return (
            f"{quoted(pattern)} has a wildcard inside the name, which is not supported; only "
            "||name^ and ||*.name^ are."
        )
    try:
        name = check_name(inner)
    except ValueError as exc:
        return f"{exc}; fix or remove the rule."
    return (name, flags | ALLOW if allow else flags)
