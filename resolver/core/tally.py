"""A count by key that costs the query path what a plain dict costs.

``collections.Counter`` defines ``__delitem__`` in Python, which makes CPython route
*every* item assignment of the type through a Python-level slot: ``counts[key] += 1`` on
a Counter costs about twice what it costs on a dict (some 1,100 instructions more per
increment in the compiled build, bench/instructions.py), and the pipeline increments two
of them for every blocked answer. A dict whose missing keys read as 0 keeps the one
Counter behaviour the readers rely on, without the slot.

(Not compiled: mypyc's native classes cannot subclass dict.)
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")


class Tally(dict[K, int]):
    """A dict of counts in which a missing key reads as 0 (and is not stored)."""

    __slots__ = ()

    def __missing__(self, key: K) -> int:
        return 0
