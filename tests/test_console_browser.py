"""The console in a real browser (Debian's chromium, headless, driven by Playwright):
the real resolver with the shipped deepseek list, NSD as its upstream and a SQLite query
store; log in through the form, read the deepseek ban on the timeline, explain a name,
search the store after real DNS queries, watch the Live view, add a rule in the page and
see it blocked over DNS. Screenshots go to tests/artifacts/ (or $RESOLVER_ARTIFACTS)."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from resolver.config import Config, Listen
from resolver.observe.querylog import AuditConfig
from resolver.observe.storeconfig import StoreConfig
from resolver.upstream.endpoints import parse_upstream

from .helpers.browser import Watched, chromium, skip_reason
from .helpers.http import TOKEN
from .helpers.realservers import NSD, ROOT
from .helpers.server import Clock, RunningServer

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

LOOPBACK = Listen("127.0.0.1", 0)
#: The zone NSD serves: the names the tests forward.
ZONE = "corp.test"


#: A ban announced for a later date, watched (monitor phase) until then.
FUTURE_BAN = f"""\
list: future-ban
description: A ban announced for a later date
reference: "announced ban: https://example.org/announced-ban"
timezone: Europe/Brussels
active:
  monitor_from: 2025-01-01
  from: 2036-01-01
action: nxdomain
domains:
  - watched.{ZONE}
"""


class Console:
    """The resolver, NSD behind it, a chromium, and one logged-in page."""

    def __init__(self, folder: Path) -> None:
        lists = folder / "blocklists"
        lists.mkdir()
        shutil.copy(ROOT / "blocklists" / "deepseek.yaml", lists / "deepseek.yaml")
        (lists / "future.yaml").write_text(FUTURE_BAN)
        (folder / "nsd").mkdir()
        self.nsd = NSD(
            folder / "nsd",
            ZONE,
            [
                "www IN A 192.0.2.10",
                "mail IN A 192.0.2.11",
                "news IN A 192.0.2.12",
                "watched IN A 192.0.2.13",
            ],
        )
        config = Config(
            listen=(Listen("127.0.0.1", 0),),
            upstreams=(parse_upstream(self.nsd.address),),
            blocklists=lists,
            groups=(("office", ("127.0.0.0/8",)),),
            admin=LOOPBACK,
            admin_token=TOKEN,
            audit=AuditConfig(what="all"),
            store=StoreConfig(kind="sqlite", path=folder / "queries.sqlite3"),
            state_dir=folder / "state",  # the change log of rule edits
            upstream_timeout=0.5,
            upstream_deadline=2.0,
            drain_timeout=2.0,
        )
        self.running = RunningServer(config, Clock())
        self.base = f"http://127.0.0.1:{self.running.server.admin_port}"

    def api(self, path: str, body: Any = None) -> tuple[int, Any]:
        """The admin API with the bearer token, as curl would call it."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data)
        request.add_header("Authorization", f"Bearer {TOKEN}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def wait_rows(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, doc = self.api("/v1/queries?limit=1000")
            if status == 200 and len(doc["queries"]) >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} rows in the store after 10 s")

    def close(self) -> None:
        self.running.stop()
        self.nsd.stop()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    running = Console(tmp_path_factory.mktemp("console"))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(console: Console, browser: Any) -> Iterator[Watched]:
    """A fresh browser context, logged in through the form."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    watched = Watched(context.new_page())
    try:
        page = watched.page
        page.goto(console.base + "/console")
        page.fill('input[name="token"]', TOKEN)
        page.click('#login button[type="submit"]')
        page.wait_for_selector("body[data-ready='yes']", timeout=10_000)
        yield watched
        assert [
            e for e in watched.errors if "Content Security Policy" in e or "page error" in e
        ] == []
    finally:
        context.close()


def test_login_form_refuses_a_wrong_token_then_admits(console: Console, browser: Any) -> None:
    context = browser.new_context()
    try:
        watched = Watched(context.new_page())
        page = watched.page
        page.goto(console.base + "/console")
        page.fill('input[name="token"]', "wrong-token")
        page.click('#login button[type="submit"]')
        assert page.inner_text("#login-error") == "Wrong token."
        watched.shot("console-login-refused")
        page.fill('input[name="token"]', TOKEN)
        page.click('#login button[type="submit"]')
        page.wait_for_selector("body[data-ready='yes']", timeout=10_000)
        cookies = context.cookies()
        assert [c["name"] for c in cookies] == ["resolver_console"]
        assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
        # The page's script cannot read the session cookie.
        assert page.evaluate("document.cookie") == ""
        page.click("#logout button")
        page.wait_for_selector("#login")
        assert console.running.server.http_servers[0].sessions.ended >= 1
    finally:
        context.close()


def test_timeline_shows_the_deepseek_ban_enforced_since_2025_02_26(
    console: Console, page: Watched
) -> None:
    row = page.page.wait_for_selector('tr[data-list="deepseek"]', timeout=10_000)
    assert row is not None
    assert row.query_selector(".state").inner_text() == "enforced"
    window = row.query_selector(".window").inner_text()
    if console.api("/v1/timeline")[0] == 200:
        assert window == "enforced since 2025-02-26 00:00 Europe/Brussels"
    else:  # /v1/status only: the same instant, in UTC
        assert window == "enforced since 2025-02-25T23:00:00+00:00 (UTC)"
    link = row.query_selector("a")
    assert link.get_attribute("href").startswith("https://matz.belgium.be/")
    assert link.get_attribute("rel") == "noopener noreferrer"
    page.shot("console-timeline")


def test_timeline_counts_down_to_a_ban_in_monitor_and_shows_its_impact(
    console: Console, page: Watched
) -> None:
    # Answered (monitor: watched, not blocked), and counted for the client's group.
    assert console.running.query(f"watched.{ZONE}").rcode() == dns.rcode.NOERROR
    p = page.page
    p.reload()  # the timeline as of now
    row = p.wait_for_selector('tr[data-list="future-ban"]', timeout=10_000)
    assert row is not None
    assert row.query_selector(".state").inner_text() == "monitor"
    first = row.query_selector(".countdown").inner_text()
    assert re.fullmatch(r"\d+ d \d\d:\d\d:\d\d", first), first
    p.wait_for_function(
        f"() => document.querySelector('tr[data-list=\"future-ban\"] .countdown')"
        f".textContent !== {json.dumps(first)}",
        timeout=5_000,
    )  # it runs
    would = row.query_selector(".would").inner_text()
    if console.api("/v1/timeline")[0] == 200:
        assert would == "office: 1"
        assert row.query_selector(".window").inner_text() == (
            "monitor from 2025-01-01 00:00 Europe/Brussels, "
            "enforced from 2036-01-01 00:00 Europe/Brussels"
        )
    else:
        assert would == "1"
    page.shot("console-timeline-monitor")


def test_explain_in_the_page(page: Watched) -> None:
    p = page.page
    p.click('button[data-tab="explain"]')
    p.fill('#explain-form input[name="name"]', "chat.deepseek.com")
    p.fill('#explain-form input[name="client"]', "127.0.0.1")
    p.fill('#explain-form input[name="at"]', "2025-02-26T00:30 Europe/Brussels")
    p.click('#explain-form button[type="submit"]')
    decision = p.wait_for_selector("#explain-decision", timeout=10_000)
    assert decision.inner_text() == "blocked"
    out = p.inner_text("#explain-out")
    assert "deepseek" in out and "Europe/Brussels" in out and "deepseek.com" in out
    page.shot("console-explain")
    # Half an hour before the ban, the same name was forwarded.
    p.fill('#explain-form input[name="at"]', "2025-02-25T23:30 Europe/Brussels")
    p.click('#explain-form button[type="submit"]')
    p.wait_for_function(
        "() => document.getElementById('explain-decision').textContent === 'forwarded'",
        timeout=10_000,
    )


def test_search_the_query_store_after_real_queries(console: Console, page: Watched) -> None:
    running = console.running
    assert running.query("deepseek.com").rcode() == dns.rcode.NXDOMAIN
    assert running.query("chat.deepseek.com").rcode() == dns.rcode.NXDOMAIN
    assert running.query(f"www.{ZONE}").rcode() == dns.rcode.NOERROR
    console.wait_rows(3)
    p = page.page
    p.click('button[data-tab="investigations"]')
    form = "#search"
    p.fill(f'{form} input[name="name"]', "deepseek.com")
    p.select_option(f'{form} select[name="decision"]', "blocked")
    p.fill(f'{form} input[name="limit"]', "1")
    p.click(f'{form} button[type="submit"]')
    p.wait_for_selector("#search-rows tr", timeout=10_000)
    first = p.inner_text("#search-rows")
    assert "blocked" in first and "deepseek.com" in first
    # One row a page: the next page comes by the cursor.
    p.click("#next-page")
    p.wait_for_function(
        "() => document.querySelectorAll('#search-rows tr').length >= 2", timeout=10_000
    )
    rows = p.inner_text("#search-rows")
    assert "chat.deepseek.com" in rows and f"www.{ZONE}" not in rows
    csv_href = p.get_attribute("#csv", "href")
    assert "format=csv" in csv_href and "cursor" not in csv_href and "limit" not in csv_href
    if console.api("/v1/queries/clients")[0] == 200:
        # Which clients tried it, and were they refused: one client, two blocked.
        p.wait_for_selector("#client-rows tr", timeout=10_000)
        cells = [c.inner_text() for c in p.query_selector_all("#client-rows tr:first-child td")]
        assert cells[:4] == ["127.0.0.1", "2", "2", "0"], cells
        # The export, with the page's session cookie (as the link downloads it).
        exported = p.request.get(console.base + csv_href)
        assert exported.status == 200 and exported.headers["content-type"].startswith("text/csv")
        assert "chat.deepseek.com" in exported.text() and f"www.{ZONE}" not in exported.text()
    page.shot("console-investigations")
    # The client's own queries, forwarded ones included.
    p.click("#search-rows a.client")
    p.wait_for_function(
        f"() => document.getElementById('search-rows').textContent.includes('www.{ZONE}')",
        timeout=10_000,
    )
    assert p.input_value(f'{form} input[name="client"]') == "127.0.0.1"


def test_live_view(console: Console, page: Watched) -> None:
    p = page.page
    p.click('button[data-tab="live"]')
    p.wait_for_selector("#live-upstreams tr", timeout=10_000)
    for _ in range(20):
        console.running.query(f"mail.{ZONE}")
    # Two polls, 2 s apart, make a rate.
    p.wait_for_function(
        "() => !Number.isNaN(parseFloat(document.getElementById('live-qps').textContent))",
        timeout=10_000,
    )
    assert "healthy" in p.inner_text("#live-upstreams")
    assert "deepseek" in p.inner_text("#live-lists")
    assert "Z" in p.inner_text("#live-reload") or "+00:00" in p.inner_text("#live-reload")
    page.shot("console-live")


def test_add_a_rule_in_the_page_and_see_it_blocked(console: Console, page: Watched) -> None:
    name = f"news.{ZONE}"
    answer = console.running.query(name)  # answered by NSD, and now in the cache
    assert answer.rcode() == dns.rcode.NOERROR and answer.answer
    p = page.page
    p.click('button[data-tab="rules"]')
    p.fill('#rule-form input[name="name"]', name)
    p.fill('#rule-form input[name="reference"]', "https://example.org/circular-2026-14")
    p.fill('#rule-form input[name="operator"]', "console test")
    clicked = time.monotonic()
    p.click('#rule-form button[type="submit"]')
    # Blocked over DNS within 2 s of the click: the page's call, the file, the reload.
    while console.running.query(name).rcode() != dns.rcode.NXDOMAIN:
        assert time.monotonic() - clicked < 2.0, f"{name} not blocked over DNS within 2 s"
        time.sleep(0.05)
    p.wait_for_function(
        "() => document.getElementById('rules-note').textContent.startsWith('Added')",
        timeout=10_000,
    )
    p.wait_for_function(
        f"() => document.getElementById('rule-rows').textContent.includes('{name}')",
        timeout=10_000,
    )
    p.wait_for_function(
        f"() => document.getElementById('change-rows').textContent.includes('{name}')",
        timeout=10_000,
    )
    page.shot("console-rules")


#: Labels a DNS client may send (any octet is allowed in a label): markup, a quote, a
#: right-to-left override (U+202E, as its UTF-8 bytes), and a label of 63 octets.
HOSTILE_LABELS = (
    b"<img/src=x/onerror=window.__xss=1>",
    b"<script>window.__xss=2</script>",
    b"'\"><svg/onload=window.__xss=3>",
    "\u202egnp.exe".encode(),
    b"a" * 63,
)


def test_hostile_names_and_texts_are_shown_as_text_never_run(
    console: Console, page: Watched
) -> None:
    """XSS: query names from the store, a rule's reference and operator and the change
    log go into the page as text; no script runs, no dialog opens, and links are only
    http(s) (a javascript: or data: URL in a reference stays text)."""
    import dns.name

    p = page.page
    dialogs: list[str] = []
    p.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    zone = dns.name.from_text(ZONE)
    for label in HOSTILE_LABELS:
        name = dns.name.Name((label, *zone.labels))
        console.running.send(dns.message.make_query(name, "A"))
    hostile = "javascript:window.__xss=4 data:text/html,<script>window.__xss=5</script>"
    status, _ = console.api(
        "/v1/rules",
        {
            "name": f"xss.{ZONE}",
            "reference": f"{hostile} <img src=x onerror=window.__xss=6> https://example.org/ok",
            "operator": "<b onmouseover=window.__xss=7>mallory</b>",
        },
    )
    assert status == 201
    console.wait_rows(len(HOSTILE_LABELS))
    p.reload()
    p.wait_for_selector("body[data-ready='yes']", timeout=10_000)
    p.wait_for_selector(f'tr[data-rule="xss.{ZONE}"]', timeout=10_000)
    p.click('button[data-tab="investigations"]')
    p.fill('#search input[name="name"]', ZONE)
    p.click('#search button[type="submit"]')
    p.wait_for_function(
        "() => document.getElementById('search-rows').textContent.includes('__xss=1')",
        timeout=10_000,
    )
    shown = p.inner_text("#search-rows")
    # As the store writes them (dig's escapes): markup verbatim as text, the quote, a dot and
    # every non-ASCII octet escaped, so no right-to-left override reaches the page.
    assert f"<img/src=x/onerror=window\\.__xss=1>.{ZONE}." in shown  # a dot in a label: \.
    assert "<script>window\\.__xss=2</script>" in shown
    assert "\\226\\128\\174gnp\\.exe" in shown and "\u202e" not in shown
    assert "a" * 63 in shown
    p.click('button[data-tab="rules"]')
    p.wait_for_function(
        f"() => document.getElementById('change-rows').textContent.includes('xss.{ZONE}')",
        timeout=10_000,
    )
    assert "<b onmouseover=window.__xss=7>mallory</b>" in p.inner_text("#rule-rows")
    for tab in ("timeline", "rules", "investigations"):
        p.click(f'button[data-tab="{tab}"]')
        p.hover("body")
        hrefs = p.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
        bad = [h for h in hrefs if not h.startswith(("http://", "https://"))]
        assert bad == [], bad
        # Markup from the data made no element: the page's own only.
        assert (
            p.eval_on_selector_all("main img, main script, main svg, main b", "e => e.length") == 0
        )
    links = p.eval_on_selector_all(
        "#rule-rows a", "links => links.map(a => [a.href, a.rel, a.textContent])"
    )
    hostile_links = [link for link in links if "__xss" in link[2]]
    assert hostile_links and all(h == "https://example.org/ok" for h, _, _ in hostile_links), links
    assert all(rel == "noopener noreferrer" for _, rel, _ in links)
    assert p.evaluate("window.__xss") is None
    assert dialogs == []
    page.shot("console-hostile-names")


def test_removing_a_rule_in_the_page_records_its_own_basis(console: Console, page: Watched) -> None:
    """The change log says why each change was made: a removal is not logged with the
    reference the rule was added with."""
    name = f"lifted.{ZONE}"
    status, _ = console.api("/v1/rules", {"name": name, "reference": "Decree 7", "operator": "ana"})
    assert status == 201
    p = page.page
    p.click('button[data-tab="rules"]')
    row = f'#rule-rows tr:has(td:text-is("{name}"))'
    p.wait_for_selector(row, timeout=10_000)
    p.fill('#rule-form input[name="operator"]', "ben")
    p.click(f"{row} button")  # no basis given: refused in the page, nothing sent
    assert p.inner_text("#rules-note").startswith(f"To remove {name}, give")
    p.fill('#rule-form input[name="reference"]', "Decree 7")  # the adding basis again
    p.click(f"{row} button")
    assert p.inner_text("#rules-note").startswith(f"To remove {name}, give")
    p.fill('#rule-form input[name="reference"]', "lifted by Decree 8/2026")
    p.click(f"{row} button")
    p.wait_for_function(
        f"() => document.getElementById('rules-note').textContent === 'Removed {name}.'",
        timeout=10_000,
    )
    changes = console.api("/v1/changes")[1]["changes"]
    assert changes[0]["action"] == "remove" and changes[0]["name"] == name
    assert changes[0]["reference"] == "lifted by Decree 8/2026" and changes[0]["operator"] == "ben"
