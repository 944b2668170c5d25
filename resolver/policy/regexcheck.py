"""Refuse regular expressions that can backtrack catastrophically, before they are used.

Python's ``re`` is a backtracking engine. A pattern such as ``(a+)+$`` takes time exponential
in the length of a name that almost matches, and ``\\w*\\w*\\w*x`` a high power of it: one
crafted 28-byte label froze all answering for 8.9 s. Patterns run on the event loop for
every name that reaches the policy, so such a pattern is refused when the list loads, with a
sentence saying what to rewrite.

The check reads the pattern's parse tree (the one ``re`` itself executes, after its own
optimisations) and is purely structural, so that ``check`` and a reload decide alike on every
machine. It refuses:

- a repeated group that holds another repeat, unless each round of the outer repeat must
  consume a character that none of the inner repeats can (``([a-z0-9-]+\\.)+`` is fine:
  every round ends at its dot; ``(a+)+`` and ``(\\.?[a-z]+)*`` are not);
- an alternation inside a repeat whose branches can start with the same character or match
  nothing (``(a|ab)*``, ``(a|a)*``, ``(x|x?)+``);
- a chain of :data:`MAX_CHAIN` or more long repeats in a row that can consume the same
  characters with nothing between them that one of them cannot (``.*a.*a.*x``,
  ``\\w*\\w*\\w*x``); an unanchored pattern counts the search's own scan as one;
- back-references (not a regular language), and patterns over :data:`MAX_LENGTH`.

A name is at most 253 characters, so what is left is bounded: the worst accepted shapes take
milliseconds on a crafted name, not seconds (tests/test_loading_faults.py).
"""

from __future__ import annotations

import re
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any, Final

MAX_LENGTH: Final = 512
"""The longest pattern accepted (characters between the slashes)."""
MAX_CHAIN: Final = 3
"""Long repeats in a row over overlapping characters (the search's scan included) from
which a pattern is refused: three make matching time cubic in the name's length."""
LONG: Final = 8
"""A repeat that can run more than this many times counts as long in a chain."""

_ALL: Final = frozenset(range(256))
_DIGITS: Final = frozenset(b"0123456789")
_WORD: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_") | frozenset(range(128, 256))
_SPACE: Final = frozenset(b" \t\n\r\f\v")
_CATEGORIES: Final = {
    sre.CATEGORY_DIGIT: _DIGITS,
    sre.CATEGORY_NOT_DIGIT: _ALL - _DIGITS,
    sre.CATEGORY_WORD: _WORD,
    sre.CATEGORY_NOT_WORD: _ALL - _WORD,
    sre.CATEGORY_SPACE: _SPACE,
    sre.CATEGORY_NOT_SPACE: _ALL - _SPACE,
}
_REPEATS: Final = (sre.MAX_REPEAT, sre.MIN_REPEAT)
_SINGLE: Final = (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)


class UnsafePattern(ValueError):
    """The pattern can take time exponential (or a high power) in a name's length."""


def _fold(chars: set[int] | frozenset[int]) -> frozenset[int]:
    # Patterns match case-insensitively against lower-case names: fold to lower case.
    return frozenset(c + 32 if 65 <= c <= 90 else c for c in chars)


def _single(op: Any, av: Any) -> frozenset[int]:
    """The characters one single-character item can consume."""
    if op is sre.LITERAL:
        return _fold({av})
    if op is sre.NOT_LITERAL:
        return _ALL - _fold({av})
    if op is sre.ANY:
        return _ALL - {10}
    chars: set[int] = set()
    negate = False
    for item_op, item_av in av:
        if item_op is sre.NEGATE:
            negate = True
        elif item_op is sre.LITERAL:
            chars.add(item_av)
        elif item_op is sre.RANGE:
            chars.update(range(item_av[0], item_av[1] + 1))
        elif item_op is sre.CATEGORY:
            chars |= _CATEGORIES.get(item_av, _ALL)
        else:
            chars |= _ALL  # anything unforeseen: assume the worst
    folded = _fold(chars)
    return _ALL - folded if negate else folded


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-sequences of one item."""
    if op in _REPEATS or op is sre.POSSESSIVE_REPEAT:
        return [av[2]]
    if op is sre.SUBPATTERN:
        return [av[3]]
    if op is sre.BRANCH:
        return list(av[1])
    if op in (sre.ASSERT, sre.ASSERT_NOT):
        return [av[1]]
    if op is sre.ATOMIC_GROUP:
        return [av]
    if op is sre.GROUPREF_EXISTS:
        return [seq for seq in av[1:] if seq is not None]
    return []


def _chars(seq: Any) -> frozenset[int]:
    """Every character a sequence can consume anywhere."""
    out: set[int] = set()
    for op, av in seq:
        if op in _SINGLE:
            out |= _single(op, av)
        else:
            for child in _children(op, av):
                out |= _chars(child)
    return frozenset(out)


def _nullable(seq: Any) -> bool:
    """Whether a sequence can match the empty string."""
    for op, av in seq:
        if op in _SINGLE:
            return False
        if op in _REPEATS or op is sre.POSSESSIVE_REPEAT:
            if av[0] > 0 and not _nullable(av[2]):
                return False
        elif op is sre.SUBPATTERN:
            if not _nullable(av[3]):
                return False
        elif op is sre.ATOMIC_GROUP:
            if not _nullable(av):
                return False
        elif op is sre.BRANCH and not any(_nullable(alt) for alt in av[1]):
            return False
    return True


def _first(seq: Any) -> frozenset[int]:
    """The characters a sequence can start with (over-approximated)."""
    out: set[int] = set()
    for op, av in seq:
        if op in _SINGLE:
            return frozenset(out | _single(op, av))
        for child in _children(op, av):
            out |= _first(child)
        if not _nullable([(op, av)]):
            break
    return frozenset(out)


def _is_repeat(op: Any, av: Any) -> bool:
    return op in _REPEATS and av[1] > 1


def _inner_repeats(seq: Any) -> list[Any]:
    """The repeat items (that can run more than once) anywhere inside a sequence."""
    found: list[Any] = []
    for op, av in seq:
        if _is_repeat(op, av):
            found.append((op, av))
        for child in _children(op, av):
            found.extend(_inner_repeats(child))
    return found


def _top(seq: Any) -> list[Any]:
    """A sequence with groups that stand alone unwrapped (``((a+)b)`` reads as ``a+ b``)."""
    out: list[Any] = []
    for op, av in seq:
        if op is sre.SUBPATTERN:
            out.extend(_top(av[3]))
        else:
            out.append((op, av))
    return out


def _check_repeat(body: Any, shown: str) -> None:
    inner = _inner_repeats(body)
    if inner:
        inner_chars: set[int] = set()
        for _, av in inner:
            inner_chars |= _chars(av[2])
        separated = any(
            op in _SINGLE and not _single(op, av) & inner_chars for op, av in _top(body)
        )
        if not separated:
            raise UnsafePattern(
                f"nested quantifiers ({shown}): a repeat inside a repeated group can take "
                "exponential time on a crafted name; rewrite it so that each round of the "
                "outer repeat ends in a character the inner one cannot match, e.g. "
                "([a-z0-9-]+\\.)+"
            )
    _check_branches(body, shown)


def _check_branches(seq: Any, shown: str) -> None:
    for op, av in seq:
        if op is sre.BRANCH:
            alts = list(av[1])
            if any(_nullable(alt) for alt in alts):
                raise UnsafePattern(
                    f"an alternation that can match nothing inside a repeat ({shown}) can "
                    "take exponential time on a crafted name; make every alternative "
                    "consume a character"
                )
            firsts = [_first(alt) for alt in alts]
            for i, one in enumerate(firsts):
                for other in firsts[i + 1 :]:
                    if one & other:
                        raise UnsafePattern(
                            f"alternatives that can start alike inside a repeat ({shown}) "
                            "can take exponential time on a crafted name; make them start "
                            "with different characters"
                        )
        for child in _children(op, av):
            _check_branches(child, shown)


def _walk(seq: Any, shown: str) -> None:
    """Apply the nested-repeat and alternation rules to every repeat in ``seq``."""
    for op, av in seq:
        if op is sre.GROUPREF or op is sre.GROUPREF_EXISTS:
            raise UnsafePattern("back-references are not supported; they can take exponential time")
        if _is_repeat(op, av):
            _check_repeat(av[2], shown)
        for child in _children(op, av):
            _walk(child, shown)


def _chain(seq: Any, anchored: bool) -> int:
    """The longest run of long repeats over overlapping characters in ``seq``."""
    best = 0
    run: list[frozenset[int]] = [_ALL] if not anchored else []
    best = len(run)
    for op, av in _top(seq):
        if op in _REPEATS and av[1] > LONG:
            chars = _chars(av[2])
            if run and any(chars & earlier for earlier in run):
                run.append(chars)
            else:
                run = [chars]
            best = max(best, len(run), _chain(av[2], True))
        elif op in _SINGLE:
            if run and not _single(op, av) & run[-1]:
                run = []  # the last repeat cannot run past this character
        elif op is sre.BRANCH:
            for alt in av[1]:
                best = max(best, _chain(alt, True))
            if run and not any(_nullable(alt) for alt in av[1]):
                chars = _chars([(op, av)])
                if not chars & run[-1]:
                    run = []
        elif op in (sre.ASSERT, sre.ASSERT_NOT, sre.ATOMIC_GROUP, sre.POSSESSIVE_REPEAT):
            for child in _children(op, av):
                best = max(best, _chain(child, True))
    return best


def check(pattern: str) -> None:
    """Raise :class:`UnsafePattern` (a :class:`ValueError`) if ``pattern`` can backtrack
    catastrophically, or :class:`re.error` if it is no regular expression."""
    if len(pattern) > MAX_LENGTH:
        raise UnsafePattern(f"the pattern is longer than {MAX_LENGTH} characters")
    parsed = sre_parse.parse(pattern.encode(), re.IGNORECASE)
    seq = list(parsed)
    _walk(seq, pattern if len(pattern) <= 60 else pattern[:57] + "...")
    anchored = bool(seq) and seq[0] == (sre.AT, sre.AT_BEGINNING)
    # A repeat at the very end that may match nothing never backtracks: whatever it takes,
    # the match is over (".*track.*" is one repeat and the scan, not three).
    tail = _top(seq)
    while tail and tail[-1][0] in _REPEATS and tail[-1][1][0] == 0:
        tail.pop()
    length = _chain(tail, anchored)
    if length >= MAX_CHAIN:
        raise UnsafePattern(
            f"{length} repeats in a row can match the same characters"
            + ("" if anchored else " (counting the search along the name)")
            + ": matching time grows as a high power of the name's length; anchor the "
            "pattern with ^, or separate the repeats by characters they cannot match "
            "(e.g. [^.]* instead of .*)"
        )
