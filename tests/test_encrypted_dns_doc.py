"""docs/encrypted-dns.md: its Apple profile is a valid plist with a DNS Settings payload,
and the edit it gives for the bypass list is the one tests/test_bypass.py makes."""

from __future__ import annotations

import plistlib
import re

from .helpers.realservers import ROOT

PAGE = ROOT / "docs" / "encrypted-dns.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", PAGE.read_text(), re.MULTILINE | re.DOTALL)


def test_the_apple_profile_is_a_plist_with_a_dns_settings_payload() -> None:
    (xml,) = blocks("xml")
    profile = plistlib.loads(xml.encode())
    assert profile["PayloadType"] == "Configuration"
    (payload,) = profile["PayloadContent"]
    assert payload["PayloadType"] == "com.apple.dnsSettings.managed"
    settings = payload["DNSSettings"]
    assert settings["DNSProtocol"] == "HTTPS"
    assert settings["ServerURL"].startswith("https://") and settings["ServerURL"].endswith(
        "/dns-query"
    )
    uuids = [profile["PayloadUUID"], payload["PayloadUUID"]]
    assert len(set(uuids)) == 2 and all(re.fullmatch(r"[0-9A-F-]{36}", u) for u in uuids)


def test_the_documented_bypass_edit_is_the_shipped_mode_line() -> None:
    (line,) = re.findall(r"^\s*`(mode: monitor[^`]*)`\s*$", PAGE.read_text(), re.MULTILINE)
    shipped = (ROOT / "blocklists" / "bypass.yaml").read_text().splitlines()
    assert shipped.count(line) == 1
