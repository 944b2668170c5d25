"""The domains format: one name per line, ``*.name`` for the names below it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

from .bulk import assemble, scan
from .names import DOMAIN, SUBDOMAINS, Entry, Problem, check_name, column_of, quoted

_DOMAIN_COMMENT: Final = re.compile(r"\s#")


def parse_domains(text: str, problems: list[Problem]) -> Iterator[Entry]:
    return assemble(text, scan(text), DOMAIN, domains_line, problems)


def domains_line(line: str, number: int, problems: list[Problem]) -> Iterator[Entry]:
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
                column_of(line, fields[1]),
                f"the line has more than one field ({quoted(body)}); a domains list holds one name "
                "per line (for a hosts file, import it with format hosts).",
            )
        )
        return
    token = fields[0]
    column = column_of(line, token)
    message = _domains_token(token)
    if message is None:
        flags = DOMAIN
        if token.startswith("*."):
            flags, token = SUBDOMAINS, token[2:]
        try:
            yield (check_name(token), flags, number)
            return
        except ValueError as exc:
            message = f"{exc}; fix or remove the line."
    problems.append(Problem(number, column, message))


def _domains_token(token: str) -> str | None:
    """Explain a token that is not a (possibly ``*.``-prefixed) name, or return ``None``."""
    if "://" in token:
        return f"{quoted(token)} is a URL; write only the host name (for example example.com)."
    if token.startswith(("||", "@@")) or token.endswith("^"):
        return f"{quoted(token)} is an adblock rule; import adblock lists with format adblock."
    if "*" in (token[2:] if token.startswith("*.") else token):
        return (
            f"{quoted(token)} has a wildcard that is not supported; only a leading '*.' "
            "(every name below) is, and a plain name already covers its subdomains."
        )
    if "/" in token:
        return f"{quoted(token)} is a path or an address range, not a domain name; remove the line."
    if ":" in token:
        return (
            f"{quoted(token)} is an IPv6 address or has a port, not a domain name; "
            "only names can be blocked."
        )
    return None
