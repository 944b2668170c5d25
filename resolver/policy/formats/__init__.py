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

The package: :mod:`.names` (flags, problems, name checks), :mod:`.bulk` (the bulk path), one
module per format, and here the dispatch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

from .adblock import adblock_line, parse_adblock
from .domains import domains_line, parse_domains
from .hosts import hosts_line, parse_hosts
from .names import (
    ALLOW,
    DOMAIN,
    EXACT,
    NODATA,
    NXDOMAIN,
    SHOWN,
    SUBDOMAINS,
    Entry,
    Problem,
    normalize,
)
from .rpz import parse_rpz

__all__ = [
    "ALLOW",
    "DOMAIN",
    "EXACT",
    "FORMATS",
    "NODATA",
    "NXDOMAIN",
    "SHOWN",
    "SUBDOMAINS",
    "Entry",
    "Problem",
    "normalize",
    "parse",
]

FORMATS: Final = ("domains", "hosts", "adblock", "rpz")


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


# The thorough per-line paths, which alone decide what a suspect line means (tests compare
# the bulk path against them).
_LINE_PARSERS: Final[dict[str, Callable[[str, int, list[Problem]], Iterator[Entry]]]] = {
    "domains": domains_line,
    "hosts": hosts_line,
    "adblock": adblock_line,
}

_PARSERS: Final[dict[str, Callable[[str, list[Problem]], Iterator[Entry]]]] = {
    "domains": parse_domains,
    "hosts": parse_hosts,
    "adblock": parse_adblock,
    "rpz": parse_rpz,
}
