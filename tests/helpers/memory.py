"""Resident memory of a process, read from /proc (Linux), for the tests that bound growth."""

from __future__ import annotations

import gc
from pathlib import Path

MiB = 1024 * 1024


def rss(pid: int | None = None, *, collect: bool = False) -> int:
    """The resident memory in bytes of process ``pid`` (this process by default), after a
    full garbage collection of this process when ``collect``."""
    if collect:
        gc.collect()
    status = Path(f"/proc/{'self' if pid is None else pid}/status")
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in {status}")
