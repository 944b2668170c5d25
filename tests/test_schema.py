"""The shipped JSON Schema and the loader accept and reject the same list documents."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from resolver.policy import load_policy
from resolver.yamlload import SourceError

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "resolver" / "schema" / "blocklist.schema.json").read_text())

# (case, YAML document, accepted?)
DOCUMENTS = [
    ("minimal", "list: a\n", True),
    (
        "full",
        """\
list: deepseek
description: d
reference: r
timezone: Europe/Brussels
active: {monitor_from: 2025-02-12, from: 2025-02-26, until: 2027-02-26}
mode: enforce
action: nxdomain
ttl: 60
clients: [all]
domains: [deepseek.com, {name: deepseek.example, active: {from: 2025-03-01}, reference: x}]
exact: [only.example]
patterns: ["deepseek.*", "/^ai[0-9]+\\\\.example$/"]
allow: [ok.deepseek.com]
include: [{file: x.hosts, format: hosts}, {url: "https://lists.example/x.txt", format: adblock, refresh: 6h}]
""",
        True,
    ),
    ("sinkhole", "list: a\naction: {sinkhole: {a: [10.0.0.1], aaaa: ['::1']}}\n", True),
    ("networks", "list: a\nnetworks: [203.0.113.0/24, '2001:db8::/32']\n", True),
    ("bad network", "list: a\nnetworks: [not-a-net]\n", False),
    ("sinkhole single address", "list: a\naction: {sinkhole: {a: 10.0.0.1}}\n", True),
    ("datetime with offset", "list: a\nactive: {from: '2025-02-26T08:00:00+01:00'}\n", True),
    ("monitor mode", "list: a\nmode: monitor\n", True),
    ("rule-level mode", "list: a\ndomains: [{name: x.com, mode: monitor}]\n", True),
    ("empty sections", "list: a\ndomains:\nexact:\n", True),
    ("missing list", "domains: [x.com]\n", False),
    ("bad list id", "list: Bad Id\n", False),
    ("unknown key", "list: a\ndomain: [x.com]\n", False),
    ("unknown window key", "list: a\nactive: {form: 2025-01-01}\n", False),
    ("not a date", "list: a\nactive: {from: tomorrow}\n", False),
    ("unknown action", "list: a\naction: block\n", False),
    ("empty sinkhole", "list: a\naction: {sinkhole: {}}\n", False),
    ("sinkhole wrong family", "list: a\naction: {sinkhole: {a: ['::1']}}\n", False),
    ("ttl negative", "list: a\nttl: -1\n", False),
    ("ttl too big", "list: a\nttl: 100000\n", False),
    ("ttl text", "list: a\nttl: sixty\n", False),
    ("bad mode", "list: a\nmode: dry-run\n", False),
    ("domains not a list", "list: a\ndomains: x.com\n", False),
    ("rule unknown key", "list: a\ndomains: [{name: x.com, form: 1}]\n", False),
    ("rule without name", "list: a\ndomains: [{reference: x}]\n", False),
    ("domain with a space", "list: a\ndomains: ['bad name.com']\n", False),
    ("domain with a slash", "list: a\ndomains: [x.com/path]\n", False),
    ("include without format", "list: a\ninclude: [{file: x.txt}]\n", False),
    ("include unknown format", "list: a\ninclude: [{file: x.txt, format: csv}]\n", False),
    ("include both", "list: a\ninclude: [{file: x.txt, url: 'http://x', format: hosts}]\n", False),
    ("include bad url", "list: a\ninclude: [{url: 'ftp://x/y', format: hosts}]\n", False),
    (
        "include bad refresh",
        "list: a\ninclude: [{url: 'http://x/y', format: hosts, refresh: soon}]\n",
        False,
    ),
    ("clients empty", "list: a\nclients: []\n", False),
    ("a sequence", "- list: a\n", False),
]


@pytest.mark.parametrize(("case", "text", "accepted"), DOCUMENTS, ids=[d[0] for d in DOCUMENTS])
def test_schema_and_loader_agree(tmp_path: Path, case: str, text: str, accepted: bool) -> None:
    (tmp_path / "x.hosts").write_text("0.0.0.0 a.example\n")
    (tmp_path / "list.yaml").write_text(text)
    # The schema sees YAML as an editor does: dates as strings.
    document = yaml.load(text, Loader=yaml.BaseLoader) if text else None
    document = json.loads(json.dumps(document))
    document = _typed(document)
    validator = jsonschema.Draft202012Validator(
        SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    schema_ok = validator.is_valid(document)
    try:
        load_policy(tmp_path)
        loader_ok = True
    except SourceError:
        loader_ok = False
    assert (schema_ok, loader_ok) == (accepted, accepted)


def _typed(value: object) -> object:
    """BaseLoader keeps every scalar a string; give integers back their type as an editor
    with YAML 1.2 core schema would (the only non-string scalars lists use)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if value == "":
        return None
    return value


def test_shipped_lists_validate_against_the_schema() -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    files = sorted((ROOT / "blocklists").rglob("*.yaml"))
    assert files
    for file in files:
        document = _typed(yaml.load(file.read_text(), Loader=yaml.BaseLoader))
        errors = [e.message for e in validator.iter_errors(document)]
        assert not errors, f"{file}: {errors}"
        assert file.read_text().startswith("# yaml-language-server: $schema=")
