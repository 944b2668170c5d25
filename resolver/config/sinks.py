"""The config sections of the query records' sinks (``audit``, ``store``), each validated
by its own module's parser, with relative paths taken from the config file's folder."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from ..observe.auditconfig import parse_config as parse_audit
from ..observe.querylog import AuditConfig
from ..observe.storeconfig import StoreConfig, parse_store
from ..yamlload import SourceError, YMap, value_where
from .fields import read_section
from .model import EDITS_KEYS, EditsConfig

#: A section's settings type.
_C = TypeVar("_C")


def _parsed(doc: YMap, section: str, parse: Callable[[Any], _C]) -> _C:
    """A section validated by its own parser, whose ``section.key: message`` errors become
    errors at the key's line."""
    section_doc = doc.get(section) or {}
    if not isinstance(section_doc, dict):
        raise SourceError(value_where(doc, section), section, "expected a mapping")
    try:
        return parse(section_doc)
    except ValueError as exc:
        field_name, _, message = str(exc).partition(": ")
        key = field_name.split(".", 1)[-1]
        where = section_doc.key_where.get(key) if isinstance(section_doc, YMap) else None
        raise SourceError(where or value_where(doc, section), field_name, message) from None


def audit_section(doc: YMap, path: Path) -> AuditConfig:
    audit = _parsed(doc, "audit", parse_audit)
    if audit.path is not None and not audit.path.is_absolute():
        audit = replace(audit, path=path.parent / audit.path)
    return audit


def store_section(doc: YMap, path: Path) -> StoreConfig:
    store = _parsed(doc, "store", parse_store)
    if store.path is not None and not store.path.is_absolute():
        store = replace(store, path=path.parent / store.path)
    return store


#: A list id: what the list loader accepts (policy/listfile.py).
_LIST_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def edits_section(doc: YMap, path: Path) -> EditsConfig:
    """``edits:``: the local list file of rule edits, its list id and the change log;
    relative paths are taken from the config file's folder."""
    section = read_section(doc, "edits", EDITS_KEYS)
    out: dict[str, Any] = {}
    for key in ("file", "changelog"):
        value = section.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise SourceError(value_where(section, key), f"edits.{key}", "expected a path")
        out[key] = path.parent / value
    list_id = section.get("list", "local")
    if not isinstance(list_id, str) or not _LIST_ID.match(list_id):
        raise SourceError(
            value_where(section, "list"),
            "edits.list",
            f"{list_id!r}: a list id is 1-63 lower-case letters, digits, '-' or '_'",
        )
    return EditsConfig(list=list_id, **out)
