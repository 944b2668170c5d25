"""A real browser for the console's tests: Debian's chromium, headless, driven by
Playwright for Python through ``executable_path`` (Playwright's own browser downloads do
not work on these machines, and are not needed: it speaks the DevTools protocol to any
recent chromium).

Screenshots go to ``$RESOLVER_ARTIFACTS`` (default tests/artifacts/, which git ignores).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .realservers import ROOT

#: The browser binary: Debian's ``chromium`` package.
CHROMIUM = os.environ.get("RESOLVER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def artifacts() -> Path:
    """Where screenshots go, made if needed."""
    folder = Path(os.environ.get("RESOLVER_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"no chromium at {CHROMIUM} (apt install chromium, or set RESOLVER_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python absent (pip install playwright; no 'playwright install')"
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium, closed after use (skips the test when there is none)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # As root, chromium runs only without its sandbox (containers, CI).
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


class Watched:
    """A page whose console messages and failed requests are kept: a CSP violation shows
    up as a console error."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def shot(self, name: str) -> Path:
        path = artifacts() / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path
