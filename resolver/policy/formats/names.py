"""What every list format shares: the entry flags, :class:`Problem`, and the checks that turn a
token into a normalised domain name (with the sentence that says what is wrong with it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
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
LABEL: Final = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE: Final = re.compile(rf"(?:{LABEL}\.)*{LABEL}")
_LABEL_RE: Final = re.compile(LABEL)
_NUMERIC_LAST: Final = re.compile(r"(?:^|\.)[0-9]+$")
# The longest name in presentation form (no trailing dot) whose wire form fits 255 octets.
MAX_TEXT: Final = 253


#: How much of a line a message quotes: enough to find it, never a whole file's secret.
SHOWN: Final = 80


def quoted(text: str) -> str:
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
                f"{quoted(text)} is not a valid internationalised name ({exc})"
            ) from None
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("the root name cannot be listed: it would match every name")
    if len(name) > MAX_TEXT:
        raise ValueError(
            f"{quoted(text)} is {len(name) + 2} octets long on the wire; the limit is 255"
        )
    if _NAME_RE.fullmatch(name) is None:
        raise ValueError(_name_error(text, name))
    return name


def _name_error(text: str, name: str) -> str:
    """Say which label of an invalid ``name`` is wrong; only called on the error path."""
    for label in name.split("."):
        if not label:
            return f"{quoted(text)} has an empty label (a leading dot or two dots in a row)"
        if len(label) > 63:
            return f"{quoted(text)} has a label longer than 63 characters"
        if _LABEL_RE.fullmatch(label) is None:
            bad = next((c for c in label if not (c.isalnum() or c in "-_")), None)
            if bad is not None:
                return (
                    f"{quoted(text)} contains {bad!r}; names hold only letters, digits, '-' and '_'"
                )
            return f"{quoted(text)} has a label {quoted(label)} that starts or ends with '-'"
    return f"{quoted(text)} is not a valid domain name"


def split_lines(text: str) -> list[str]:
    """Split on LF only: ``splitlines`` would also split on form feeds and U+2028, and line
    numbers would then disagree with the user's editor. A CR before the LF is left for the
    line parsers, which all allow it."""
    return text.split("\n")


def column_of(line: str, token: str) -> int:
    """The 1-based column of ``token`` in ``line`` (1 if it is not there)."""
    return line.find(token) + 1 or 1


def check_name(token: str) -> str:
    """Normalise ``token`` as a name in a list, or raise :class:`ValueError`.

    An all-numeric last label is refused: no top-level domain is numeric, so such a name is an
    IP address (which a name-based filter cannot block), or a typo.
    """
    name = normalize(token)
    if _NUMERIC_LAST.search(name) is not None:
        raise ValueError(
            f"{quoted(token)} is an IP address (or ends in an all-numeric label), not a domain name"
        )
    return name
