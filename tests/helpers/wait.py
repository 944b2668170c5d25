"""Polling until a condition holds, for the tests that watch something happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(check: Any, seconds: float = 5.0) -> float:
    """Poll ``check`` until true, failing the test after ``seconds``; the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - started


def wait_until(check: Callable[[], bool], seconds: float) -> bool:
    """Poll ``check`` for up to ``seconds``: whether it came true (the caller asserts)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
