"""Parsers for list formats that a YAML list can ``include:``: plain domains, hosts files,
AdBlock-style DNS rules and RPZ zone files.

Each parser turns one file's text into entries ``(name, flags, line)``. A line that cannot be
represented exactly (a redirection, a URL path, a cosmetic rule, an RPZ local-data record) is
reported as a :class:`Problem` and yields nothing: an import never silently drops a rule, and
never silently widens one into something that blocks more than its author meant.

Lists of a million lines are common. For domains, hosts and adblock files the whole text is
validated at once by a few C-speed passes over its bytes (the bulk path); only the lines that
it cannot vouch for go through the thorough per-line path, which alone decides what they mean
and explains what is wrong. RPZ files match their common record shape with one compiled
regular expression per line.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, count, repeat
from typing import Final

EXACT: Final = 1
"""The name itself."""
SUBDOMAINS: Final = 2
"""Every name below the name (not the name itself)."""
DOMAIN: Final = 3
"""``EXACT | SUBDOMAINS``."""
ALLOW: Final = 4
"""An exception (allow), not a block."""
NODATA: Final = 8
"""RPZ action override: answer NODATA."""
NXDOMAIN: Final = 16
"""RPZ action override: answer NXDOMAIN."""

FORMATS: Final = ("domains", "hosts", "adblock", "rpz")


@dataclass(frozen=True, slots=True)
class Problem:
    """A line of an imported file that was not turned into an entry, and why.

    ``line`` and ``column`` are 1-based; ``message`` is a sentence saying what is wrong or
    unsupported and what to do about it.
    """

    line: int
    column: int
    message: str


Entry = tuple[str, int, int]
"""``(normalised name, flags, line number)``."""

# One label: letters, digits, '_' and '-', 1-63 characters, no '-' at either end.
_LABEL: Final = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE: Final = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_LABEL_RE: Final = re.compile(_LABEL)
_NUMERIC_LAST: Final = re.compile(r"(?:^|\.)[0-9]+$")
# The longest name in presentation form (no trailing dot) whose wire form fits 255 octets.
_MAX_TEXT: Final = 253


#: How much of a line a message quotes: enough to find it, never a whole file's secret.
SHOWN: Final = 80


def _shown(text: str) -> str:
    """``text`` quoted for a message, cut to :data:`SHOWN` characters: an imported file can
    be anything (a mistaken include of a key file), and a message must not copy it out."""
    if len(text) > SHOWN:
        text = text[: SHOWN - 3] + "..."
    return repr(text)


def normalize(text: str) -> str:
    """Return ``text`` as a lower-case ASCII domain name without a trailing dot.

    Non-ASCII names are IDNA-encoded with the standard library's ``idna`` codec (IDNA 2003).
    Raise :class:`ValueError`, with a message saying what is wrong, for the root, an empty or
    over-long label, a character outside letters, digits, ``-`` and ``_``, a label that starts
    or ends with ``-``, or a name longer than 255 octets on the wire.
    """
    name = text.lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(
                f"{_shown(text)} is not a valid internationalised name ({exc})"
            ) from None
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("the root name cannot be listed: it would match every name")
    if len(name) > _MAX_TEXT:
        raise ValueError(
            f"{_shown(text)} is {len(name) + 2} octets long on the wire; the limit is 255"
        )
    if _NAME_RE.fullmatch(name) is None:
        raise ValueError(_name_error(text, name))
    return name


def _name_error(text: str, name: str) -> str:
    """Say which label of an invalid ``name`` is wrong; only called on the error path."""
    for label in name.split("."):
        if not label:
            return f"{_shown(text)} has an empty label (a leading dot or two dots in a row)"
        if len(label) > 63:
            return f"{_shown(text)} has a label longer than 63 characters"
        if _LABEL_RE.fullmatch(label) is None:
            bad = next((c for c in label if not (c.isalnum() or c in "-_")), None)
            if bad is not None:
                return (
                    f"{_shown(text)} contains {bad!r}; names hold only letters, digits, '-' and '_'"
                )
            return f"{_shown(text)} has a label {_shown(label)} that starts or ends with '-'"
    return f"{_shown(text)} is not a valid domain name"


def parse(text: str, fmt: str, problems: list[Problem]) -> Iterator[Entry]:
    """Yield the entries of one file's ``text`` in format ``fmt`` (one of :data:`FORMATS`).

    Every line that is not supported or not valid appends a :class:`Problem` to ``problems``
    as the iterator reaches it; the list is complete once the iterator is exhausted. Raise
    :class:`ValueError` at once for an unknown format.
    """
    parser = _PARSERS.get(fmt)
    if parser is None:
        raise ValueError(f"unknown list format {fmt!r}: use one of {', '.join(FORMATS)}")
    if text.startswith("\ufeff"):
        # A byte-order mark is an encoding artefact, not part of the first line.
        text = text[1:]
    return parser(text, problems)


def _lines(text: str) -> list[str]:
    """Split on LF only: ``splitlines`` would also split on form feeds and U+2028, and line
    numbers would then disagree with the user's editor. A CR before the LF is left for the
    line parsers, which all allow it."""
    return text.split("\n")


def _column(line: str, token: str) -> int:
    """The 1-based column of ``token`` in ``line`` (1 if it is not there)."""
    return line.find(token) + 1 or 1


def _check_name(token: str) -> str:
    """Normalise ``token`` as a name in a list, or raise :class:`ValueError`.

    An all-numeric last label is refused: no top-level domain is numeric, so such a name is an
    IP address (which a name-based filter cannot block), or a typo.
    """
    name = normalize(token)
    if _NUMERIC_LAST.search(name) is not None:
        raise ValueError(
            f"{_shown(token)} is an IP address (or ends in an all-numeric label), not a domain name"
        )
    return name


# ---------------------------------------------------------------------------------------------
# The bulk path: validate a whole file of plain names with a few passes over its bytes.
#
# A regular expression per line costs about a microsecond; a million-line file needs less.
# So the whole text is checked at once with bytes.translate and bytes.find, which run in C:
# any line that might not be a plain name (a comment, a wildcard, a bad label, an IP
# address, a blank line) is marked a "suspect" and goes through the thorough per-line path,
# which alone decides what it means. A false suspect only costs time, never changes a result.

_ASCII_LETTERS: Final = b"abcdefghijklmnopqrstuvwxyz"
# An accepted prefix ("0.0.0.0 ", "||") is overwritten with pads ending in _PREFIX, an accepted
# suffix ("^", "^$important") with _SUFFIX followed by pads: the same length, so that an offset
# in the rewritten text is the offset in the original, and a suspect line can be cut out of it.
_PREFIX: Final = b"\x01"
_SUFFIX: Final = b"\x02"
_PAD: Final = b"\x03"
_FILLERS: Final = _PREFIX + _SUFFIX + _PAD


def _table(default: bytes, classes: dict[bytes, bytes]) -> bytes:
    table = bytearray(default * 256)
    for chars, cls in classes.items():
        for char in chars:
            table[char] = cls[0]
    return bytes(table)


# Characters by class: letters (and the neutral pads and suffix) 'a', digits and '_' '0', the
# separators '.' '-', the line break and the prefix 's', anything else (space, '#', '*', CR,
# '?' for non-ASCII) '!'. Then "ss" finds empty labels, labels that start or end with '-',
# leading and trailing dots and blank lines (and, falsely, the '--' of "xn--"), and "!" every
# character that a name cannot hold.
_CLASS: Final = _table(
    b"!",
    {
        _ASCII_LETTERS + _PAD + _SUFFIX: b"a",
        b"0123456789_": b"0",
        b".-\n" + _PREFIX: b"s",
    },
)
# Letters and pads 'a', the ends of a name (line break, suffix) 'n', anything else '0': "0n"
# finds names whose last character is not a letter, which includes every name with an
# all-numeric last label (an IP address), and lines where nothing follows the prefix.
_LAST: Final = _table(b"0", {_ASCII_LETTERS + _PAD: b"a", b"\n" + _SUFFIX: b"n"})
# Anything but line breaks and fillers 'x': a run of 'x' longer than _SHORT is a long name.
_LENGTH: Final = _table(b"x", {b"\n" + _FILLERS: b"n"})
# Line breaks 'n', a prefix 'p', a suffix 'q', anything else 'x': "nx" finds lines without the
# prefix, "xn" lines without the suffix, "nn" blank lines.
_MARKS: Final = _table(b"x", {b"\n": b"n", _PREFIX + _PAD: b"p", _SUFFIX: b"q"})
# The longest name that needs no check of its label lengths (63) or total length (253).
_SHORT: Final = 63


@dataclass(slots=True)
class _Bulk:
    """What the bulk path found: each line's candidate name, and the suspects by line index
    with the offset of one of their characters in the original text (-1 if the offsets of
    the rewritten text do not match the original's)."""

    names: list[str]
    suspects: dict[int, int]


def _bulk(
    text: str,
    prefixes: tuple[bytes, ...] = (),
    suffixes: tuple[bytes, ...] = (),
    starts: tuple[bytes, ...] = (),
) -> _Bulk:
    """Find the lines of ``text`` that are one of ``prefixes`` (if any), a plain name and one
    of ``suffixes`` (if any), and whose name does not start with one of ``starts``.

    A plain name is lower-case ASCII letters, digits, '_', '.' and '-' in labels that neither
    start nor end with '-', at most 63 characters, ending in a letter: what the thorough path
    would accept unchanged. Every other line is a suspect. An empty last line (after the final
    line break) is no line.
    """
    low = text.lower()
    aligned = len(low) == len(text)  # lower-casing some non-ASCII letters changes lengths
    if "\r" in low:
        low = low.replace("\r\n", "\n")  # keeps the line count; a lone CR stays suspect
        aligned = False
    # One '?' per non-ASCII character; every line now sits between two line breaks.
    raw = b"".join((b"\n", low.encode("ascii", "replace"), b"" if low.endswith("\n") else b"\n"))
    if any(filler in raw for filler in _FILLERS):
        # The fillers would be ambiguous; no real list holds these control characters.
        lines = raw.count(b"\n") - 1
        return _Bulk([""] * lines, dict.fromkeys(range(lines), -1))
    for prefix in prefixes:
        # Look before rewriting: a scan for a long needle is quick, a rewrite copies the text.
        if (b"\t" in prefix and b"\t" not in raw) or b"\n" + prefix not in raw:
            continue
        raw = raw.replace(b"\n" + prefix, b"\n" + _PAD * (len(prefix) - 1) + _PREFIX)
    for suffix in suffixes:
        raw = raw.replace(suffix + b"\n", _SUFFIX + _PAD * (len(suffix) - 1) + b"\n")
    names = raw.translate(None, _FILLERS)[1:-1].decode("ascii").split("\n")
    lines = len(names)
    hits: list[int] = []
    if (prefixes and raw.count(_PREFIX) != lines) or (suffixes and raw.count(_SUFFIX) != lines):
        marks = raw.translate(_MARKS)
        if prefixes:
            _find(marks, (b"nx", b"nq", b"nn"), hits, raw)
        if suffixes:
            _find(marks, (b"xn", b"nn"), hits, raw)
    _find(raw.translate(_CLASS), (b"!", b"ss"), hits, raw)
    _find(raw.translate(_LAST), (b"0n",), hits, raw)
    _find(raw.translate(_LENGTH), (b"x" * (_SHORT + 1),), hits, raw)
    before = _PREFIX if prefixes else b"\n"
    _find(raw, tuple(before + start for start in starts), hits)
    hits.sort()
    suspects: dict[int, int] = {}
    index, counted = -1, 0
    for at in hits:
        index += raw.count(b"\n", counted, at)
        counted = at
        # raw has one line break more at the front than the text.
        suspects.setdefault(index, at - 1 if aligned else -1)
    return _Bulk(names, suspects)


def _find(
    data: bytes, patterns: tuple[bytes, ...], hits: list[int], breaks: bytes | None = None
) -> None:
    """Append to ``hits`` the offset of the last byte of each occurrence of ``patterns`` in
    ``data``, at most one per line (a line break belongs to the line it ends, so the last byte
    of a pattern always lies in the line at fault). ``breaks`` is the text with the line
    breaks if ``data`` has lost them."""
    lines = data if breaks is None else breaks
    for pattern in patterns:
        at = data.find(pattern)
        while at >= 0:
            last = at + len(pattern) - 1
            hits.append(last)
            end = lines.find(b"\n", last)  # one hit per line: go on from the line's end
            at = data.find(pattern, end) if end >= 0 else -1


def _assemble(
    text: str,
    bulk: _Bulk,
    flags: int,
    slow: Callable[[str, int, list[Problem]], Iterator[Entry]],
    problems: list[Problem],
) -> Iterator[Entry]:
    """Yield the plain names between the suspects as they are, and each suspect line as the
    thorough path ``slow`` reads it, in line order. The plain runs are chained in C: no
    Python code runs per plain line."""
    return chain.from_iterable(_segments(text, bulk, flags, slow, problems))


def _segments(
    text: str,
    bulk: _Bulk,
    flags: int,
    slow: Callable[[str, int, list[Problem]], Iterator[Entry]],
    problems: list[Problem],
) -> Iterator[Iterable[Entry]]:
    names = bulk.names
    original: list[str] = []
    start = 0
    for index in sorted(bulk.suspects):
        if index > start:
            yield zip(names[start:index], repeat(flags), count(start + 1))
        at = bulk.suspects[index]
        if at >= 0:
            # Cut the line out of the text around the offset: no split of the whole text.
            line = text[text.rfind("\n", 0, at) + 1 : _line_end(text, at)]
        else:
            if not original:
                original = _lines(text)
            line = original[index]
        yield slow(line, index + 1, problems)
        start = index + 1
    if start < len(names):
        yield zip(names[start:], repeat(flags), count(start + 1))


def _line_end(text: str, at: int) -> int:
    end = text.find("\n", at)
    return len(text) if end < 0 else end


# ---------------------------------------------------------------------------------------------
# domains: one name per line

_DOMAIN_COMMENT: Final = re.compile(r"\s#")


def _parse_domains(text: str, problems: list[Problem]) -> Iterator[Entry]:
    return _assemble(text, _bulk(text), DOMAIN, _domains_line, problems)


def _domains_line(line: str, number: int, problems: list[Problem]) -> Iterator[Entry]:
    """The thorough path for one line of a domains list."""
    body = line.strip()
    if not body or body[0] == "#":
        return
    comment = _DOMAIN_COMMENT.search(body)
    if comment is not None:
        body = body[: comment.start()].rstrip()
    fields = body.split()
    if len(fields) > 1:
        problems.append(
            Problem(
                number,
                _column(line, fields[1]),
                f"the line has more than one field ({_shown(body)}); a domains list holds one name "
                "per line (for a hosts file, import it with format hosts).",
            )
        )
        return
    token = fields[0]
    column = _column(line, token)
    message = _domains_token(token)
    if message is None:
        flags = DOMAIN
        if token.startswith("*."):
            flags, token = SUBDOMAINS, token[2:]
        try:
            yield (_check_name(token), flags, number)
            return
        except ValueError as exc:
            message = f"{exc}; fix or remove the line."
    problems.append(Problem(number, column, message))


def _domains_token(token: str) -> str | None:
    """Explain a token that is not a (possibly ``*.``-prefixed) name, or return ``None``."""
    if "://" in token:
        return f"{_shown(token)} is a URL; write only the host name (for example example.com)."
    if token.startswith(("||", "@@")) or token.endswith("^"):
        return f"{_shown(token)} is an adblock rule; import adblock lists with format adblock."
    if "*" in (token[2:] if token.startswith("*.") else token):
        return (
            f"{_shown(token)} has a wildcard that is not supported; only a leading '*.' "
            "(every name below) is, and a plain name already covers its subdomains."
        )
    if "/" in token:
        return f"{_shown(token)} is a path or an address range, not a domain name; remove the line."
    if ":" in token:
        return (
            f"{_shown(token)} is an IPv6 address or has a port, not a domain name; "
            "only names can be blocked."
        )
    return None


# ---------------------------------------------------------------------------------------------
# hosts: "address name [name ...]", blocking addresses only

# The entries every hosts file carries for the machine itself: not rules, skipped silently.
LOCAL_NAMES: Final = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "localhost4",
        "localhost4.localdomain4",
        "localhost6",
        "localhost6.localdomain6",
        "local",
        "broadcasthost",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
        "0.0.0.0",
    }
)


# The lines of a hosts file that the bulk path reads: the common blocking addresses, then one
# name (more names, comments, other addresses and the local names take the thorough path).
_HOSTS_PREFIXES: Final = (b"0.0.0.0 ", b"0.0.0.0\t", b"127.0.0.1 ", b"127.0.0.1\t")
_LOCAL_STARTS: Final = (b"local", b"broadcasthost", b"ip6-")


def _parse_hosts(text: str, problems: list[Problem]) -> Iterator[Entry]:
    bulk = _bulk(text, _HOSTS_PREFIXES, starts=_LOCAL_STARTS)
    return _assemble(text, bulk, EXACT, _hosts_line, problems)


_SINKHOLES: Final = frozenset({"0", "0.0.0.0", "127.0.0.1", "::", "::1"})


def _is_sinkhole(text: str) -> bool | None:
    """Whether a hosts address blocks (0.0.0.0/8, 127.0.0.0/8, ::, ::1); ``None`` if it is no
    address at all. ``0`` is accepted: some lists shorten 0.0.0.0 to it to save space."""
    if text in _SINKHOLES:
        return True  # the common cases, without the cost of parsing an address
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version == 4:
        return addr.packed[0] in (0, 127)
    return addr.packed in (bytes(16), bytes(15) + b"\x01")


def _hosts_line(line: str, number: int, problems: list[Problem]) -> Iterator[Entry]:
    """The thorough path for one line of a hosts file."""
    hash_at = line.find("#")
    body = line if hash_at < 0 else line[:hash_at]
    fields = body.split()
    if not fields:
        return
    if len(fields) == 1:
        problems.append(
            Problem(
                number,
                _column(line, fields[0]),
                f"the line has one field ({_shown(fields[0])}); a hosts line is an address "
                "followed by names, such as '0.0.0.0 ads.example' (for a plain list of names, "
                "import it with format domains).",
            )
        )
        return
    address, names = fields[0], fields[1:]
    rules = [name for name in names if name.lower().rstrip(".") not in LOCAL_NAMES]
    if not rules:
        return
    sinkhole = _is_sinkhole(address)
    if sinkhole is None:
        problems.append(
            Problem(
                number,
                _column(line, address),
                f"{_shown(address)} is not an IP address; a hosts line starts with the address "
                "0.0.0.0 (or 127.0.0.1, ::, ::1) followed by the names to block.",
            )
        )
        return
    if not sinkhole:
        problems.append(
            Problem(
                number,
                _column(line, address),
                f"the line sends {', '.join(rules)} to {address}, which is a redirection, not "
                "a block; only lines with 0.0.0.0, 127.0.0.1, :: or ::1 are supported, so "
                "remove the line or block the names in a list.",
            )
        )
        return
    start = len(line) - len(line.lstrip()) + len(address)
    for token in names:
        column = line.find(token, start) + 1
        start = column - 1 + len(token)
        if token.lower().rstrip(".") in LOCAL_NAMES:
            continue
        if "*" in token:
            problems.append(
                Problem(
                    number,
                    column,
                    f"{_shown(token)} has a wildcard, which hosts files do not support; "
                    "import wildcard lists with format domains.",
                )
            )
            continue
        try:
            yield (_check_name(token), EXACT, number)
        except ValueError as exc:
            problems.append(Problem(number, column, f"{exc}; fix or remove the name."))


# ---------------------------------------------------------------------------------------------
# adblock: the DNS subset of AdBlock/uBlock/AdGuard rules

# Element-hiding and scriptlet markers: ##, #@#, #?#, #$#, #%#, #@?#, #@$#, #$?# ...
_COSMETIC: Final = re.compile(r"#@?[$?%]{0,2}#")
# A line of '#' followed by nothing or by a space is a comment banner, not "##selector".
_HASH_COMMENT: Final = re.compile(r"#+(?:\s|$)")


_ADBLOCK_PREFIXES: Final = (b"||",)
_ADBLOCK_SUFFIXES: Final = (b"^", b"^$important")


def _parse_adblock(text: str, problems: list[Problem]) -> Iterator[Entry]:
    bulk = _bulk(text, _ADBLOCK_PREFIXES, _ADBLOCK_SUFFIXES)
    return _assemble(text, bulk, DOMAIN, _adblock_line, problems)


def _adblock_line(line: str, number: int, problems: list[Problem]) -> Iterator[Entry]:
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
        problems.append(Problem(number, _column(line, rule), result))


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
            f"{_shown(pattern)} anchors a URL, which DNS filtering never sees; write ||name^ to "
            "match a domain and its subdomains."
        )
    fields = pattern.split()
    if len(fields) > 1 and _is_sinkhole(fields[0]) is not None:
        return "the line is in hosts syntax; import hosts files with format hosts."
    if "/" in pattern or "^" in pattern or "*" in pattern or len(fields) != 1:
        return (
            f"{_shown(pattern)} is not a supported adblock rule; only ||name^, @@||name^ and the "
            "$important modifier are supported."
        )
    try:
        name = _check_name(pattern)
    except ValueError:
        return (
            f"{_shown(pattern)} is not a supported adblock rule; only ||name^, @@||name^ and the "
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
            return f"{_shown(pattern)} has a URL path; DNS filtering sees only names, so remove it."
        if "^" in inner:
            return (
                f"{_shown(pattern)} has text after the closing '^', which is not supported; "
                "write ||name^ to match a domain and its subdomains."
            )
        return (
            f"{_shown(pattern)} has no closing '^', so it matches every name that merely starts "
            f"with it; write {pattern}^ to match the domain and its subdomains."
        )
    inner = inner[:-1]
    if "/" in inner or "^" in inner:
        return f"{_shown(pattern)} has a URL path; DNS filtering sees only names, so remove it."
    flags = DOMAIN
    if inner.startswith("*."):
        # ||*.example^ matches the names below example but not example itself.
        flags, inner = SUBDOMAINS, inner[2:]
    if "*" in inner:
        return (
            f"{_shown(pattern)} has a wildcard inside the name, which is not supported; only "
            "||name^ and ||*.name^ are."
        )
    try:
        name = _check_name(inner)
    except ValueError as exc:
        return f"{exc}; fix or remove the rule."
    return (name, flags | ALLOW if allow else flags)


# ---------------------------------------------------------------------------------------------
# rpz: Response Policy Zone master files, QNAME triggers only

# "owner [ttl] [IN] CNAME target" with a relative owner, the one record shape of big feeds.
# The last label must start with a letter: that keeps IP-like names out of the fast path.
_TOP: Final = r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
_FAST_CORE: Final = rf"((?:{_LABEL}\.)*{_TOP})"
_FAST_RPZ: Final = re.compile(
    rf"(\*\.)?{_FAST_CORE}[ \t]+(?:[0-9]+[ \t]+)?(?:in[ \t]+)?cname[ \t]+"
    r"(\.|\*\.|rpz-passthru\.)[ \t]*(?:;.*)?\r?"
).fullmatch
_FAST_ACTION: Final = {".": NXDOMAIN, "*.": NODATA, "rpz-passthru.": ALLOW}
_TOKEN: Final = re.compile(r'"(?:[^"\\]|\\.)*"?|[()]|;.*|(?:[^\s"();\\]|\\.)+')
_TTL: Final = re.compile(r"[0-9]+|(?:[0-9]+[smhdw])+", re.IGNORECASE)
_CLASSES: Final = frozenset({"in", "ch", "chaos", "hs", "hesiod", "cs", "none", "any"})
_IP_TRIGGERS: Final = {
    "rpz-ip": "response IP address (rpz-ip)",
    "rpz-nsdname": "name server name (rpz-nsdname)",
    "rpz-nsip": "name server IP address (rpz-nsip)",
    "rpz-client-ip": "client IP address (rpz-client-ip)",
}

_Token = tuple[str, int]


@dataclass(slots=True)
class _Zone:
    """What an RPZ file has said so far: the origin for relative names and the apex."""

    origin: str | None = None  # absolute, with trailing dot
    apex: str | None = None  # absolute, with trailing dot; stripped from owners
    apex_from_soa: bool = False
    owner: str | None = None  # the previous record's owner, for blank-owner lines


def _parse_rpz(text: str, problems: list[Problem]) -> Iterator[Entry]:
    fast = _FAST_RPZ
    zone = _Zone()
    # The fast path reads a relative owner as the trigger itself, true while origin == apex.
    fast_ok = True
    fast_owner: str | None = None  # owner of the last fast-path record (relative)
    original = _lines(text)
    pending: list[_Token] = []  # tokens of a record still inside parentheses
    pending_line = 0
    pending_blank = False
    depth = 0
    for number, line in enumerate(text.lower().split("\n"), 1):
        if fast_ok and depth == 0:
            match = fast(line)
            if match is not None and "rpz-" not in match[2] and len(match[2]) <= _MAX_TEXT:
                wild = match[1] is not None
                fast_owner = "*." + match[2] if wild else match[2]
                scope = SUBDOMAINS if wild else EXACT
                yield (match[2], scope | _FAST_ACTION[match[3]], number)
                continue
        raw = original[number - 1]
        tokens = [(m[0], m.start() + 1) for m in _TOKEN.finditer(raw)]
        if depth == 0:
            pending_line, pending_blank = number, raw[:1] in (" ", "\t")
        for token in tokens:
            if token[0][0] == ";":
                break
            if token[0] == "(":
                depth += 1
            elif token[0] == ")":
                depth -= 1
            else:
                pending.append(token)
        if depth > 0:
            continue
        if depth < 0:
            problems.append(
                Problem(number, 1, "a ')' closes no '('; check the record's parentheses.")
            )
            depth = 0
            pending = []
            continue
        record, pending = pending, []
        if not record:
            continue
        if fast_owner is not None:
            zone.owner = _absolute(fast_owner, zone.origin)
            fast_owner = None
        entry = _rpz_record(record, pending_line, pending_blank, zone, problems)
        fast_ok = zone.origin == zone.apex
        if entry is not None:
            yield entry
    if depth > 0:
        problems.append(
            Problem(pending_line, 1, "a '(' is never closed; the record is not imported.")
        )


# The owner "@" in a file that never says its origin: the apex of a zone of unknown name.
_UNNAMED_APEX: Final = "@"


def _absolute(token: str, origin: str | None) -> str:
    """An owner or target in absolute form (trailing dot). With no origin known, a relative
    name is taken as absolute, and "@" stays :data:`_UNNAMED_APEX`."""
    name = token.lower()
    if name == "@":
        return _UNNAMED_APEX if origin is None else origin
    if name.endswith("."):
        return name
    if origin is None or origin == ".":
        return name + "."
    return name + "." + origin


def _rpz_record(
    record: list[_Token], number: int, blank: bool, zone: _Zone, problems: list[Problem]
) -> Entry | None:
    """Interpret one logical record (or directive) of an RPZ file."""
    first, column = record[0]
    if not blank and first.startswith("$"):
        _rpz_directive(record, number, zone, problems)
        return None
    if blank:
        if zone.owner is None:
            problems.append(
                Problem(number, 1, "the record has no owner name and none precedes it.")
            )
            return None
        owner, rest = zone.owner, record
    else:
        owner, rest = _absolute(first, zone.origin), record[1:]
        zone.owner = owner
    while rest and (_TTL.fullmatch(rest[0][0]) or rest[0][0].lower() in _CLASSES):
        if rest[0][0].lower() in _CLASSES and rest[0][0].lower() != "in":
            problems.append(
                Problem(
                    number,
                    rest[0][1],
                    f"the class {rest[0][0]} is not supported; RPZ records are class IN.",
                )
            )
            return None
        rest = rest[1:]
    if not rest:
        problems.append(Problem(number, column, "the record has no type; fix the line."))
        return None
    rtype, type_column = rest[0][0].upper(), rest[0][1]
    rdata = rest[1:]
    at_apex = owner == _UNNAMED_APEX or owner == zone.apex
    if rtype == "SOA":
        if owner != _UNNAMED_APEX and not zone.apex_from_soa:
            # The SOA names the zone: its owner is the suffix stripped from every trigger.
            zone.apex, zone.apex_from_soa = owner, True
            if zone.origin is None:
                zone.origin = owner
            return None
        if at_apex:
            return None
        problems.append(
            Problem(number, type_column, "a second SOA record is not supported; remove it.")
        )
        return None
    if at_apex:
        if rtype == "NS":
            return None
        problems.append(
            Problem(
                number,
                type_column,
                f"the {rtype} record at the zone apex is not a policy rule; remove it "
                "(only SOA and NS belong there).",
            )
        )
        return None
    trigger_or_problem = _trigger(owner, zone.apex)
    if isinstance(trigger_or_problem, str):
        problems.append(Problem(number, column, trigger_or_problem))
        return None
    name, scope = trigger_or_problem
    action = _rpz_action(rtype, rdata, name, scope, zone.origin)
    if isinstance(action, str):
        # A refused target is shown at the target; refused local data at its type.
        column = rdata[0][1] if rtype == "CNAME" and rdata else type_column
        problems.append(Problem(number, column, action))
        return None
    return (name, scope | action, number)


def _rpz_directive(record: list[_Token], number: int, zone: _Zone, problems: list[Problem]) -> None:
    directive, column = record[0][0].upper(), record[0][1]
    args = [token for token, _ in record[1:]]
    if directive == "$ORIGIN" and len(args) == 1:
        zone.origin = _absolute(args[0], zone.origin)
        if zone.apex is None:
            # Until an SOA says otherwise, the first origin is taken as the zone's name.
            zone.apex = zone.origin
        return
    if directive == "$TTL" and len(args) == 1 and _TTL.fullmatch(args[0]):
        return  # TTLs of policy records do not matter: the list's own ttl is used
    if directive in ("$ORIGIN", "$TTL"):
        message = f"{directive} takes one {'name' if directive == '$ORIGIN' else 'TTL'}."
    elif directive == "$INCLUDE":
        message = (
            "$INCLUDE is not supported; import the other file as a list of its own or copy "
            "its records into this one."
        )
    elif directive == "$GENERATE":
        message = "$GENERATE is not supported; write the generated records out."
    else:
        message = f"the directive {directive} is unknown; remove it."
    problems.append(Problem(number, column, message))


def _trigger(owner: str, apex: str | None) -> tuple[str, int] | str:
    """The trigger name and scope of an owner name, or why there is none."""
    if apex is None or apex == ".":
        relative = owner[:-1]
    elif owner.endswith("." + apex):
        relative = owner[: -len(apex) - 1]
    else:
        return f"the owner {owner} is outside the zone {apex}; remove the record."
    last = relative.rpartition(".")[2]
    if last in _IP_TRIGGERS:
        return (
            f"{_IP_TRIGGERS[last]} triggers are not supported, only QNAME triggers (names); "
            "remove the record."
        )
    scope = EXACT
    if relative.startswith("*."):
        scope, relative = SUBDOMAINS, relative[2:]
    elif relative == "*":
        return (
            "a wildcard at the zone apex would match every name; it is not supported, "
            "so the record is not imported."
        )
    if "*" in relative:
        return (
            f"the wildcard in {owner} is not supported; only a leading '*.' label is; "
            "remove the record."
        )
    try:
        return (_check_name(relative), scope)
    except ValueError as exc:
        return f"{exc}; fix or remove the record."


def _rpz_action(
    rtype: str, rdata: list[_Token], name: str, scope: int, origin: str | None
) -> int | str:
    """The flags for a policy record's action, or why it is not supported."""
    if rtype != "CNAME":
        return (
            f"{rtype} records are local data (they answer with records of their own), which is "
            "not supported; use CNAME . (NXDOMAIN), CNAME *. (NODATA) or CNAME rpz-passthru."
        )
    if len(rdata) != 1:
        return "a CNAME record takes exactly one target name; fix the line."
    target = _absolute(rdata[0][0], origin)
    if target == ".":
        return NXDOMAIN
    if target == "*.":
        return NODATA
    if target == "rpz-passthru.":
        return ALLOW
    if scope == EXACT and target == name + ".":
        return ALLOW  # the older, deprecated PASSTHRU form: a CNAME to the name itself
    if target in ("rpz-drop.", "rpz-tcp-only."):
        return (
            f"the {target[:-1]} action is not supported; use CNAME . (NXDOMAIN) or "
            "CNAME *. (NODATA)."
        )
    return (
        f"a CNAME to {target} is local data (it rewrites the answer), which is not supported; "
        "use CNAME . (NXDOMAIN), CNAME *. (NODATA) or CNAME rpz-passthru."
    )


# The thorough per-line paths, which alone decide what a suspect line means (tests compare
# the bulk path against them).
_LINE_PARSERS: Final[dict[str, Callable[[str, int, list[Problem]], Iterator[Entry]]]] = {
    "domains": _domains_line,
    "hosts": _hosts_line,
    "adblock": _adblock_line,
}

_PARSERS: Final[dict[str, Callable[[str, list[Problem]], Iterator[Entry]]]] = {
    "domains": _parse_domains,
    "hosts": _parse_hosts,
    "adblock": _parse_adblock,
    "rpz": _parse_rpz,
}
