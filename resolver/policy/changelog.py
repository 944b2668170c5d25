"""The change log of rule edits: one JSON line per edit that took effect (who, when,
what, why, the policy digests before and after), rotated past
:data:`CHANGELOG_MAX_BYTES` with one old file (``.1``) kept and read too."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Final

from .edits import EditError, Settings, locked

log = logging.getLogger("resolver.edits")

#: The change log is rotated past this size (one old file, ``.1``, is kept).
CHANGELOG_MAX_BYTES: Final = 8 * 1024 * 1024
#: Entries :func:`changes` returns at most.
MAX_CHANGES: Final = 1000
#: Change log rotations since the process started (one log line each).
rotations = 0


def record(settings: Settings, change: dict[str, Any]) -> None:
    """Append one change to the log, rotating it past :data:`CHANGELOG_MAX_BYTES`."""
    global rotations
    path = settings.changelog
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EditError("", f"cannot create {path.parent}: {exc.strerror}", 500) from None
    line = (json.dumps(change, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    with locked(settings):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size + len(line) > CHANGELOG_MAX_BYTES:
                os.replace(path, path.with_name(path.name + ".1"))
                rotations += 1
                log.info("change log %s rotated (kept as %s.1)", path, path.name)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def changes(settings: Settings, limit: int = 100) -> list[dict[str, Any]]:
    """The last ``limit`` changes, newest first (the rotated file too when needed)."""
    limit = max(1, min(limit, MAX_CHANGES))
    out: list[dict[str, Any]] = []
    path = settings.changelog
    for source in (path, path.with_name(path.name + ".1")):
        try:
            lines = source.read_bytes().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            continue
        for raw in reversed(lines):
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if isinstance(entry, dict):
                    out.append(entry)
            if len(out) >= limit:
                return out
    return out


def with_digests(change: dict[str, Any], before: str | None, after: str | None) -> dict[str, Any]:
    """The change with the policy digests before and after it."""
    return {**change, "policy_before": before, "policy_after": after}
