"""The ``audit:`` section of the config file, validated into an :class:`AuditConfig`.

Every error is ``audit.<key>: <what is wrong and what to write instead>``; an unknown key
names the one probably meant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..yamlload import did_you_mean
from .querylog import (
    DEFAULT_KEEP,
    DEFAULT_MAX_BYTES,
    DEFAULT_QUEUE_SIZE,
    SINKS,
    WHATS,
    AuditConfig,
)

CONFIG_KEYS: Final = ("sink", "path", "log", "max_size", "keep", "pseudonymize_key", "queue_size")
# Names people are likely to try, from the AuditConfig fields and other loggers' settings.
_ALIASES: Final = {
    "what": "log",
    "max_bytes": "max_size",
    "size": "max_size",
    "rotate": "keep",
    "file": "path",
    "key": "pseudonymize_key",
    "pseudonymise_key": "pseudonymize_key",
}
# Decimal and binary units; bare "K"/"M"/"G" are refused because they are ambiguous.
_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
# A shorter key makes pseudonyms open to guessing the key from one known address.
MIN_KEY_LENGTH: Final = 16
MAX_QUEUE_SIZE: Final = 10_000_000
MAX_KEEP: Final = 1000


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as ``"64MiB"``, ``"100MB"``, ``"512 KiB"``.

    Raises ValueError with a message meant to follow ``audit.max_size: ``.
    """
    if isinstance(value, bool):  # YAML yes/no: an int subclass, never a size
        raise ValueError(f"expected a size such as 64MiB or 100MB, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        number, unit = match.groups()
        factor = _UNITS.get(unit.lower())
        if factor is None:
            raise ValueError(
                f"unknown unit {unit!r} in {value!r}; write B, KB, MB, GB (powers of 1000) "
                "or KiB, MiB, GiB (powers of 1024), e.g. 64MiB"
            )
        size = int(float(number) * factor)
    else:
        raise ValueError(f"expected a size such as 64MiB or 100MB, got {value!r}")
    if size <= 0:
        raise ValueError(f"must be more than 0 bytes, got {value!r}; e.g. 64MiB")
    return size


def _int(key: str, value: object, low: int, high: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"audit.{key}: expected a whole number, got {value!r}; e.g. {example}")
    if not low <= value <= high:
        raise ValueError(
            f"audit.{key}: must be between {low} and {high}, got {value}; e.g. {example}"
        )
    return value


def parse_config(doc: Mapping[str, Any]) -> AuditConfig:
    """Validate the ``audit:`` section of the config file into an :class:`AuditConfig`.

    Raises ``ValueError("audit.<key>: <what is wrong and what to write instead>")``. A
    relative ``path`` is kept relative: the caller resolves it against the config file.
    """
    if not isinstance(doc, Mapping):
        raise ValueError(f"audit: expected a mapping of settings, got {doc!r}")
    _check_keys(doc)
    sink = _sink(doc)
    path = _path(doc, sink)

    what = doc.get("log", "blocked")
    if what not in WHATS:
        raise ValueError(
            f"audit.log: expected all (every query) or blocked (blocked and monitored "
            f"queries), got {what!r}"
        )

    max_bytes = DEFAULT_MAX_BYTES
    if "max_size" in doc:
        try:
            max_bytes = parse_size(doc["max_size"])
        except ValueError as exc:
            raise ValueError(f"audit.max_size: {exc}") from None

    keep = DEFAULT_KEEP
    if "keep" in doc:
        keep = _int("keep", doc["keep"], 0, MAX_KEEP, "keep: 7")

    secret = _secret(doc)
    queue_size = DEFAULT_QUEUE_SIZE
    if "queue_size" in doc:
        queue_size = _int("queue_size", doc["queue_size"], 1, MAX_QUEUE_SIZE, "queue_size: 10000")

    return AuditConfig(
        sink=sink,
        path=path,
        what=what,
        max_bytes=max_bytes,
        keep=keep,
        pseudonymize_key=secret,
        queue_size=queue_size,
    )


def _check_keys(doc: Mapping[str, Any]) -> None:
    """Refuse an unknown key, naming the one probably meant."""
    for key in doc:
        if key not in CONFIG_KEYS:
            alias = _ALIASES.get(str(key))
            hint = f"did you mean {alias}? " if alias else did_you_mean(str(key), CONFIG_KEYS)
            raise ValueError(
                f"audit.{key}: unknown key; {hint}expected one of {', '.join(CONFIG_KEYS)}"
            )


def _sink(doc: Mapping[str, Any]) -> str:
    sink = doc.get("sink")
    if sink is False:
        # PyYAML reads a bare ``off`` as the boolean false (YAML 1.1).
        sink = "off"
    if sink is None:
        if "path" in doc:
            # A path alone would otherwise leave logging silently off.
            raise ValueError(
                "audit.sink: missing; write sink: file to log to the path, or sink: off"
            )
        sink = "off"
    if sink not in SINKS:
        raise ValueError(f"audit.sink: expected off, stdout or file, got {sink!r}")
    return str(sink)


def _path(doc: Mapping[str, Any], sink: str) -> Path | None:
    raw_path = doc.get("path")
    if raw_path is not None:
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise ValueError(
                f"audit.path: expected a file name such as /var/log/resolver/audit.jsonl, "
                f"got {raw_path!r}"
            )
        return Path(raw_path)
    if sink == "file":
        raise ValueError(
            "audit.path: required with sink: file; e.g. path: /var/log/resolver/audit.jsonl"
        )
    return None


def _secret(doc: Mapping[str, Any]) -> str | None:
    secret = doc.get("pseudonymize_key")
    if secret is not None:
        if not isinstance(secret, str):
            raise ValueError(
                f"audit.pseudonymize_key: expected a string, got {type(secret).__name__}; "
                'quote it, e.g. pseudonymize_key: "<output of openssl rand -hex 16>"'
            )
        if len(secret) < MIN_KEY_LENGTH:
            raise ValueError(
                f"audit.pseudonymize_key: too short ({len(secret)} characters); use at least "
                f"{MIN_KEY_LENGTH} random characters, e.g. the output of openssl rand -hex 16"
            )
    return secret
