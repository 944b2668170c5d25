"""The bulk path: validate a whole file of plain names with a few passes over its bytes.

A regular expression per line costs about a microsecond; a million-line file needs less.
So the whole text is checked at once with bytes.translate and bytes.find, which run in C:
any line that might not be a plain name (a comment, a wildcard, a bad label, an IP
address, a blank line) is marked a "suspect" and goes through the thorough per-line path,
which alone decides what it means. A false suspect only costs time, never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, count, repeat
from typing import Final

from .names import Entry, Problem, split_lines

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
class Bulk:
    """What the bulk path found: each line's candidate name, and the suspects by line index
    with the offset of one of their characters in the original text (-1 if the offsets of
    the rewritten text do not match the original's)."""

    names: list[str]
    suspects: dict[int, int]


def scan(
    text: str,
    prefixes: tuple[bytes, ...] = (),
    suffixes: tuple[bytes, ...] = (),
    starts: tuple[bytes, ...] = (),
) -> Bulk:
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
        return Bulk([""] * lines, dict.fromkeys(range(lines), -1))
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
    return Bulk(names, suspects)


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


def assemble(
    text: str,
    bulk: Bulk,
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
    bulk: Bulk,
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
                original = split_lines(text)
            line = original[index]
        yield slow(line, index + 1, problems)
        start = index + 1
    if start < len(names):
        yield zip(names[start:], repeat(flags), count(start + 1))


def _line_end(text: str, at: int) -> int:
    end = text.find("\n", at)
    return len(text) if end < 0 else end
