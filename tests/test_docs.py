"""The documentation cannot drift from the code.

- Every config key the code accepts (``resolver.config.TOP_KEYS`` and each section's
  ``*_KEYS``; the ``audit`` keys of ``resolver.querylog.CONFIG_KEYS``), written with its
  section (``cache.max_entries``, ``audit.sink``), has a ``### `key` `` heading in
  docs/configuration.md and a row in README.md's Configuration table; and every key
  documented in either place exists in the code.
- Every relative link in docs/*.md points to an existing file or directory.
- Every ``$ resolver ...`` command line shown in docs/*.md parses with the resolver's own
  argument parser (so flags and subcommands shown exist).
- Every YAML and JSON block in docs/*.md parses, and each YAML block that is a resolver
  config (only known top-level keys) loads with the resolver's config loader.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

import resolver.config as config_module
from resolver.cli.audit import _parser as audit_parser
from resolver.cli.main import _parser as cli_parser
from resolver.config import load_config
from resolver.observe import querylog

from .helpers.realservers import ROOT

DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))


def code_keys() -> set[str]:
    """Every key the config file accepts, sections written as ``section.key``."""
    keys: set[str] = set()
    for top in config_module.TOP_KEYS:
        if top == "audit":
            section: frozenset[str] | tuple[str, ...] | None = querylog.CONFIG_KEYS
        else:
            section = getattr(config_module, f"{top.upper()}_KEYS", None)
        if section is None:
            keys.add(top)
        else:
            keys.update(f"{top}.{key}" for key in section)
    return keys


def configuration_keys() -> set[str]:
    return set(re.findall(r"^### `([a-z0-9_.]+)`\s*$", CONFIGURATION.read_text(), re.MULTILINE))


def readme_table_keys() -> set[str]:
    """The backquoted keys in the first column of README.md's Configuration table."""
    text = README.read_text()
    match = re.search(r"^## Configuration\n(.*?)^## ", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Configuration' section"
    keys: set[str] = set()
    for line in match.group(1).splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        first = line.split("|")[1]
        keys.update(re.findall(r"`([a-z0-9_.]+)`", first))
    keys.discard("key")
    return keys


def test_the_code_has_the_sections_this_test_reads() -> None:
    keys = code_keys()
    assert {"listen", "cache.max_entries", "tcp.idle_timeout", "admin.token"} <= keys
    assert {"metrics.listen", "reload.debounce", "audit.sink", "audit.queue_size"} <= keys


def test_configuration_reference_documents_exactly_the_code_keys() -> None:
    code, documented = code_keys(), configuration_keys()
    missing = sorted(code - documented)
    unknown = sorted(documented - code)
    assert not missing, f"docs/configuration.md lacks a '### `key`' section for {missing}"
    assert not unknown, f"docs/configuration.md documents keys the code does not accept: {unknown}"


def test_readme_configuration_table_lists_exactly_the_code_keys() -> None:
    code, documented = code_keys(), readme_table_keys()
    missing = sorted(code - documented)
    unknown = sorted(documented - code)
    assert not missing, f"README.md's Configuration table lacks rows for {missing}"
    assert not unknown, f"README.md's Configuration table names keys the code lacks: {unknown}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_point_to_existing_files(page: Path) -> None:
    text = page.read_text()
    targets = LINK.findall(text)
    broken = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto:, in-page anchors
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block (also indented ones in lists)."""
    blocks = []
    pattern = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
    for match in pattern.finditer(text):
        indent = len(match.group(1))
        body = "\n".join(line[indent:] for line in match.group(3).splitlines())
        blocks.append((match.group(2), body))
    return blocks


def command_lines() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for _, body in fenced_blocks(page.read_text()):
            for line in body.splitlines():
                if line.startswith("$ resolver "):
                    out.append((page.name, line[2:]))
    return out


COMMANDS = command_lines()


def test_docs_show_resolver_commands() -> None:
    shown = {line.split()[1] for _, line in COMMANDS}
    assert {"check", "explain", "audit"} <= shown


@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{p}: {c}" for p, c in COMMANDS])
def test_command_lines_parse(page: str, line: str) -> None:
    argv = shlex.split(line, comments=True)[1:]
    parser = audit_parser() if argv[0] == "audit" else cli_parser()
    args = argv[1:] if argv[0] == "audit" else argv
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"{page}: `{line}` does not parse ({exc.code}): {errors.getvalue()}")


def data_blocks() -> list[tuple[str, int, str, str]]:
    out = []
    for page in PAGES:
        for index, (language, body) in enumerate(fenced_blocks(page.read_text())):
            if language in ("yaml", "json"):
                out.append((page.name, index, language, body))
    return out


DATA = data_blocks()


@pytest.mark.parametrize(
    ("page", "index", "language", "body"), DATA, ids=[f"{p}#{i}" for p, i, _, _ in DATA]
)
def test_yaml_and_json_blocks_parse(
    page: str, index: int, language: str, body: str, tmp_path: Path
) -> None:
    if language == "json":
        json.loads(body)
        return
    doc = yaml.safe_load(body)
    if isinstance(doc, dict) and set(doc) <= config_module.TOP_KEYS:
        path = tmp_path / "resolver.yaml"
        path.write_text(body)
        load_config(path)  # raises on any invalid key or value


def test_the_ban_walkthrough_shows_the_shipped_example_list() -> None:
    """docs/enacting-a-ban.md walks through blocklists/example-ai-services.yaml: the list it
    shows must be that file (replace the walk-through when the example changes)."""
    shown = [
        yaml.safe_load(body)
        for language, body in fenced_blocks((DOCS / "enacting-a-ban.md").read_text())
        if language == "yaml" and "list:" in body
    ]
    shipped = yaml.safe_load((ROOT / "blocklists" / "example-ai-services.yaml").read_text())
    assert shown == [shipped]
