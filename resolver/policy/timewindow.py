"""Activation windows: when a list or a rule is in force, as instants on one time line.

Policy files speak local time ("from 2025-02-26 in Europe/Brussels"); everything after
loading speaks POSIX seconds, so that deciding is two float comparisons and a clock injected
by a test moves every window at once.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

NEVER = math.inf
ALWAYS = -math.inf


class TimeValueError(ValueError):
    """A date or datetime that cannot be placed on the time line."""


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` or a :class:`TimeValueError` saying it is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise TimeValueError(f"unknown IANA time zone {name!r}") from exc


def local_to_instant(naive: datetime, tz: ZoneInfo) -> float:
    """POSIX time of a local wall-clock time, refusing times that DST makes ambiguous.

    A local time skipped by a spring-forward gap, or repeated by a fall-back, has no single
    instant: guessing would move a ban by an hour, so it is an error.
    """
    first = naive.replace(tzinfo=tz, fold=0)
    second = naive.replace(tzinfo=tz, fold=1)
    if first.utcoffset() != second.utcoffset():
        back = first.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
        if back != naive:
            raise TimeValueError(
                f"{naive.isoformat()} does not exist in {tz.key} (skipped by a DST change); "
                "give an offset, e.g. +01:00"
            )
        raise TimeValueError(
            f"{naive.isoformat()} happens twice in {tz.key} (repeated by a DST change); "
            "give an offset, e.g. +01:00"
        )
    return first.timestamp()


def parse_instant(value: object, tz: ZoneInfo) -> float:
    """Read a policy time: a date (local midnight in ``tz``) or an ISO 8601 datetime.

    A datetime with an offset (or ``Z``) is absolute; without one it is read in ``tz``.
    """
    if isinstance(value, (datetime, date)):
        text = value.isoformat()
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise TimeValueError(f"expected a date (YYYY-MM-DD) or an ISO datetime, got {value!r}")
    if len(text) == 10:
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise TimeValueError(f"{text!r} is not a valid date (YYYY-MM-DD)") from None
        return local_to_instant(datetime(day.year, day.month, day.day), tz)
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise TimeValueError(
            f"{text!r} is not a valid date (YYYY-MM-DD) or ISO datetime "
            "(YYYY-MM-DDTHH:MM[:SS][+HH:MM])"
        ) from None
    if moment.tzinfo is None:
        return local_to_instant(moment, tz)
    return moment.timestamp()


def format_instant(instant: float, tz: ZoneInfo | None = None) -> str:
    """Human form of an instant, in ``tz`` when given, else UTC."""
    if instant == NEVER:
        return "never"
    if instant == ALWAYS:
        return "always"
    moment = datetime.fromtimestamp(instant, tz or UTC)
    return moment.isoformat(timespec="seconds")
