"""The hosts format: "address name [name ...]", blocking addresses only."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Final

from .bulk import assemble, scan
from .names import EXACT, Entry, Problem, check_name, column_of, quoted

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


def parse_hosts(text: str, problems: list[Problem]) -> Iterator[Entry]:
    bulk = scan(text, _HOSTS_PREFIXES, starts=_LOCAL_STARTS)
    return assemble(text, bulk, EXACT, hosts_line, problems)


_SINKHOLES: Final = frozenset({"0", "0.0.0.0", "127.0.0.1", "::", "::1"})


def is_sinkhole(text: str) -> bool | None:
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


def hosts_line(line: str, number: int, problems: list[Problem]) -> Iterator[Entry]:
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
                column_of(line, fields[0]),
                f"the line has one field ({quoted(fields[0])}); a hosts line is an address "
                "followed by names, such as '0.0.0.0 ads.example' (for a plain list of names, "
                "import it with format domains).",
            )
        )
        return
    address, names = fields[0], fields[1:]
    rules = [name for name in names if name.lower().rstrip(".") not in LOCAL_NAMES]
    if not rules:
        return
    sinkhole = is_sinkhole(address)
    if sinkhole is None:
        problems.append(
            Problem(
                number,
                column_of(line, address),
                f"{quoted(address)} is not an IP address; a hosts line starts with the address "
                "0.0.0.0 (or 127.0.0.1, ::, ::1) followed by the names to block.",
            )
        )
        return
    if not sinkhole:
        problems.append(
            Problem(
                number,
                column_of(line, address),
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
                    f"{quoted(token)} has a wildcard, which hosts files do not support; "
                    "import wildcard lists with format domains.",
                )
            )
            continue
        try:
            yield (check_name(token), EXACT, number)
        except ValueError as exc:
            problems.append(Problem(number, column, f"{exc}; fix or remove the name."))
