"""What an operator's edit asks for, field by field: a rule to add (name, reference,
operator, kind, window in a time zone, mode) or a name to remove, each field bounded and
checked, an :class:`~.edits.EditError` naming the first field at fault."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..yamlload import SourceError
from .edits import (
    KINDS,
    MAX_INSTANT,
    MAX_OPERATOR,
    MAX_REFERENCE,
    MAX_TIMEZONE,
    MODES,
    EditError,
    Rule,
)
from .listfile import normalize_name
from .timewindow import TimeValueError, parse_instant, zone


def _text(body: Mapping[str, Any], key: str, limit: int, required: bool = False) -> str:
    """A bounded text field of an edit: printable, no longer than ``limit``."""
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise EditError(key, "required (give a non-empty value)")
        return ""
    if not isinstance(value, str):
        raise EditError(key, f"expected text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise EditError(key, "required (give a non-empty value)")
    if len(value) > limit:
        raise EditError(key, f"longer than {limit} characters ({len(value)})")
    if not value.isprintable():
        raise EditError(key, "holds a control or non-printable character")
    return value


def parse_rule(body: Mapping[str, Any], now: float) -> Rule:
    """The rule an add request asks for (name, reference, operator, kind, from, until,
    timezone, mode), validated field by field; EditError names the first field at fault."""
    known = {"name", "reference", "operator", "kind", "from", "until", "timezone", "mode"}
    known |= {"allow_tld"}
    for key in body:
        if key not in known:
            raise EditError(str(key)[:64], f"unknown field; expected {', '.join(sorted(known))}")
    name = check_name(body.get("name"))
    allow_tld = body.get("allow_tld", False)
    if not isinstance(allow_tld, bool):
        raise EditError("allow_tld", f"expected true or false, got {allow_tld!r}")
    reference = _text(body, "reference", MAX_REFERENCE, True)
    operator = check_operator(body)
    kind = _text(body, "kind", 16) or "domain"
    if kind not in KINDS:
        raise EditError(
            "kind", f"expected domain (the name and its subdomains) or exact, got {kind!r}"
        )
    mode = _text(body, "mode", 16)
    if mode and mode not in MODES:
        raise EditError("mode", f"expected enforce or monitor, got {mode!r}")
    tz_name = _text(body, "timezone", MAX_TIMEZONE)
    try:
        tz = zone(tz_name or "UTC")
    except TimeValueError as exc:
        raise EditError("timezone", str(exc)) from None
    bounds: dict[str, str] = {}
    instants: dict[str, float] = {}
    for key in ("from", "until"):
        text = _text(body, key, MAX_INSTANT)
        if text:
            try:
                instants[key] = parse_instant(text, tz)
            except TimeValueError as exc:
                raise EditError(key, str(exc)) from None
            bounds[key] = datetime.fromtimestamp(instants[key], tz).isoformat(timespec="seconds")
    if "from" in instants and "until" in instants and instants["from"] >= instants["until"]:
        raise EditError("until", "'until' is not after 'from'")
    if "." not in name and kind == "domain" and not allow_tld:
        raise EditError(
            "name",
            f"{name} is a top-level domain: a domain rule for it blocks every name under it; "
            "if that is meant, say so with allow_tld: true (resolver rules add --allow-tld)",
        )
    return Rule(
        name,
        kind,
        reference,
        operator,
        datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        bounds.get("from", ""),
        bounds.get("until", ""),
        tz_name if bounds else "",
        mode,
    )


def check_name(value: Any) -> str:
    """A rule's name in canonical form; EditError (field ``name``) when it is none."""
    if not isinstance(value, str) or not value.strip():
        raise EditError("name", "required: a domain name such as example.com")
    if len(value) > 300:
        raise EditError("name", f"longer than 253 characters ({len(value)})")
    if value.strip().startswith("*."):
        raise EditError(
            "name",
            f"give {value.strip()[2:]!r}, not a wildcard: a domain rule covers the name and "
            "every name under it (kind exact: the name only)",
        )
    try:
        name = normalize_name(value, None, "name")
    except SourceError as exc:
        raise EditError("name", exc.message) from None
    _same_name(value.strip().rstrip("."), name)
    return name


def _same_name(given: str, name: str) -> None:
    """Refuse an internationalised name that IDNA 2003 (the list loader's) reads as
    another name: 'ß' becomes 'ss' there (faß.de is blocked as fass.de, someone else's,
    while browsers and registries, on IDNA 2008, ask for xn--fa-hia.de), and an invisible
    character (a zero-width space) vanishes. The operator then gives the A-label meant."""
    if given.isascii():
        return
    wanted = unicodedata.normalize("NFC", given.lower())
    try:
        read = name.encode("ascii").decode("idna")
    except UnicodeError:
        read = ""
    if read == wanted:
        return
    shown = name if not read or read == name else f"{read} ({name})"
    raise EditError(
        "name",
        f"{given!r} would be blocked as {shown}, not as typed{_idna2008(given, name)}: give "
        "the name you mean in ASCII (an internationalised name in its xn-- form)",
    )


def _idna2008(given: str, name: str) -> str:
    """What IDNA 2008 (the optional ``idna`` package, not a dependency) makes of ``given``,
    as a note, when it differs from ``name``."""
    try:
        import idna

        other = idna.encode(given, uts46=True).decode("ascii")
    except Exception:  # absent, or not a name under IDNA 2008 either
        return ""
    return f"; browsers and registries (IDNA 2008) read it as {other}" if other != name else ""


def check_operator(body: Mapping[str, Any]) -> str:
    operator = _text(body, "operator", MAX_OPERATOR, True)
    if "#" in operator:
        raise EditError("operator", "may not hold '#'")
    return operator


def parse_removal(body: Mapping[str, Any]) -> tuple[str, str, str]:
    """(name, reference, operator) of a remove request."""
    for key in body:
        if key not in ("name", "reference", "operator"):
            raise EditError(str(key)[:64], "unknown field; expected name, reference, operator")
    name = check_name(body.get("name"))
    return name, _text(body, "reference", MAX_REFERENCE, True), check_operator(body)
