#!/usr/bin/env python3
"""The console's page weight and its load time in a real browser.

Weight: the bytes of the page's HTML, JavaScript, CSS and icon as the server sends them,
plain and gzip-compressed (the server sends them plain; gzip shows what a proxy in front
would make of them).

Load time: the real resolver (in-process, shipped deepseek list, admin API with a token)
and Debian's chromium, headless, driven by Playwright; the page is loaded
``--loads`` times, each in a fresh browser context through the login form (cold: the
script not cached yet), then reloaded (warm: the assets cached, immutable).
Reported: the median of the Navigation Timing ``loadEventEnd`` and of the time until the
timeline is drawn (the page's ``timeline-drawn`` mark: its JSON fetched and rendered), in
milliseconds from the start of the navigation (for the first, the login form's post).

Usage::

    python3 bench/console.py                 # 20 loads of each kind
    python3 bench/console.py --loads 50 --json /tmp/console.json

Needs chromium (apt install chromium) and Playwright for Python (pip install playwright;
no ``playwright install``); exits 2 naming what is missing. Timings on a shared machine
vary: compare within one run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench-console-token"
CHROMIUM = os.environ.get("RESOLVER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: The timeline's first row drawn: the page is usable.
READY = "tr[data-list]"


def weight() -> dict[str, dict[str, int]]:
    """Bytes of each file the page loads, plain and gzip -9, and their totals."""
    from resolver.console import Console

    console = Console(TOKEN)
    files = {"console (HTML)": console._page.replace("{{csrf}}", "x" * 43).encode()}
    files |= {name: asset.body for name, asset in console.assets.items()}
    out = {
        name: {"bytes": len(body), "gzip": len(gzip.compress(body, 9))}
        for name, body in files.items()
    }
    out["total"] = {k: sum(v[k] for v in out.values()) for k in ("bytes", "gzip")}
    return out


def _timings(page: Any) -> tuple[float, float]:
    """loadEventEnd, and the page's own mark when it drew the timeline (app.js)."""
    page.wait_for_selector(READY, timeout=10_000)
    page.wait_for_function(
        "() => performance.getEntriesByType('navigation')[0].loadEventEnd > 0", timeout=10_000
    )
    nav = page.evaluate(
        "() => [performance.getEntriesByType('navigation')[0].loadEventEnd,"
        " performance.getEntriesByName('timeline-drawn')[0].startTime]"
    )
    return float(nav[0]), float(nav[1])


def load_times(loads: int) -> dict[str, dict[str, float]]:
    from playwright.sync_api import sync_playwright

    from resolver.config import Config, Listen
    from resolver.upstream.endpoints import parse_upstream
    from tests.helpers.server import Clock, RunningServer

    folder = Path(tempfile.mkdtemp(prefix="console-bench-"))
    lists = folder / "blocklists"
    lists.mkdir()
    shutil.copy(ROOT / "blocklists" / "deepseek.yaml", lists / "deepseek.yaml")
    config = Config(
        listen=(Listen("127.0.0.1", 0),),
        # Never asked: the page loads without a DNS query (the discard port will do).
        upstreams=(parse_upstream("127.0.0.1:9"),),
        blocklists=lists,
        admin=Listen("127.0.0.1", 0),
        admin_token=TOKEN,
    )
    running = RunningServer(config, Clock())
    url = f"http://127.0.0.1:{running.server.admin_port}/console"
    cold: list[tuple[float, float]] = []
    warm: list[tuple[float, float]] = []
    try:
        with sync_playwright() as driver:
            args = ["--no-sandbox"] if os.geteuid() == 0 else []
            browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
            for _ in range(loads):
                context = browser.new_context()
                page = context.new_page()
                page.goto(url)  # the login form (a fresh context: nothing cached)
                page.fill('input[name="token"]', TOKEN)
                page.click('#login button[type="submit"]')
                cold.append(_timings(page))
                page.reload()
                warm.append(_timings(page))
                context.close()
            browser.close()
    finally:
        running.stop()
        shutil.rmtree(folder, ignore_errors=True)

    def median(samples: list[tuple[float, float]], i: int) -> float:
        return round(statistics.median(s[i] for s in samples), 1)

    return {
        kind: {"load_event_ms": median(samples, 0), "timeline_drawn_ms": median(samples, 1)}
        for kind, samples in (("after login", cold), ("reload (assets cached)", warm))
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=20, help="page loads of each kind")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures: dict[str, Any] = {"weight": weight()}
    print("page weight (bytes as sent, and gzip -9):")
    for name, sizes in figures["weight"].items():
        print(f"  {name:16} {sizes['bytes']:7d} {sizes['gzip']:7d}")
    if not Path(CHROMIUM).is_file():
        print(f"no chromium at {CHROMIUM}: apt install chromium", file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("Playwright absent: pip install playwright", file=sys.stderr)
        return 2
    figures["load"] = load_times(max(1, args.loads))
    print(f"load time in headless chromium, median of {args.loads} loads (ms):")
    for kind, times in figures["load"].items():
        print(
            f"  {kind:24} loadEventEnd {times['load_event_ms']:7.1f}"
            f"   timeline drawn {times['timeline_drawn_ms']:7.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
