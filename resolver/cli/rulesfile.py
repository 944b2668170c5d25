"""``resolver rules --offline``: the edit made straight in the local list file, with the
code the API uses, then the whole policy loaded as ``resolver check`` loads it; when it
does not load, the file's previous content is put back."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..policy import changelog, editinput, edits, load_policy
from ..policy.loader import fault
from ..yamlload import SourceError


def offline(args: argparse.Namespace) -> dict[str, Any]:
    """The API's answer to the same request, computed here."""
    try:
        config = load_config(args.config) if args.config else Config()
    except (SourceError, ValueError) as exc:
        raise edits.EditError("", str(exc), 0) from None
    from ..service.rules_api import settings_of

    settings = settings_of(config)
    if args.action == "list":
        found = edits.rules(settings)
        return {
            "list": settings.list_id,
            "file": str(settings.file),
            "count": len(found),
            "rules": [rule.document() for rule in found],
        }
    now = time.time()
    if args.action == "add":
        body = {
            "name": args.name,
            "reference": args.reference,
            "operator": args.operator,
            "kind": args.kind,
            "from": args.start,
            "until": args.until,
            "timezone": args.timezone,
            "mode": args.mode,
            "allow_tld": args.allow_tld,
        }
        applied = edits.add(settings, editinput.parse_rule(body, now))
    else:
        name, reference, operator = editinput.parse_removal(
            {"name": args.name, "reference": args.reference, "operator": args.operator}
        )
        try:
            applied = edits.remove(settings, name, reference, operator)
        except edits.EditError as exc:
            raise edits.EditError("", f"{exc}{_elsewhere(settings, name, now)}", 1) from None
    try:
        policy = load_policy(config.blocklists, settings.options)
    except Exception as exc:
        edits.restore(settings, applied)
        why = str(exc) if isinstance(exc, SourceError) else fault(exc)
        undone = f"the edit was undone: the policy did not load: {why}"
        raise edits.EditError("", undone, 1) from None
    change = changelog.with_digests(applied.change, None, policy.digest)
    change["offline"] = True
    changelog.record(settings, change)
    return {"change": change, "policy": policy.digest}


def _elsewhere(settings: edits.Settings, name: str, now: float) -> str:
    """Which other lists block ``name`` (read from the whole policy, on this error only)."""
    from ..service.rules_api import other_lists

    try:
        policy = load_policy(settings.blocklists, settings.options)
    except Exception:
        return ""
    found = other_lists(policy, name, settings.list_id, now)
    return f"; it is blocked by {found}, which rule edits cannot change" if found else ""


def edit_problems(config: Config, lists: list[tuple[str, str]]) -> list[str]:
    """What would make rule edits fail with ``config`` (``resolver check``): edits
    settings that cannot work, a lists folder or change-log folder that cannot be written,
    a list id that another list file (``lists``: (id, file) of each) already uses, a local
    list file that edits cannot read."""
    from ..service.rules_api import settings_of

    try:
        settings = settings_of(config)
        edits.check_id(lists, settings)
        edits.read_local(settings)
    except edits.EditError as exc:
        return [f"rule edits: {exc}"]
    out = []
    folder = settings.file.parent
    if not folder.is_dir():
        out.append(f"rule edits: edits.file: the folder {folder} does not exist")
    elif not os.access(folder, os.W_OK | os.X_OK):  # EROFS too, for root
        out.append(
            f"rule edits: edits.file: the folder {folder} is not writable by this user, so "
            "every edit would be refused; see docs/console.md (a ConfigMap is read-only)"
        )
    log_folder = _existing(settings.changelog.parent)
    if not os.access(log_folder, os.W_OK | os.X_OK):
        out.append(
            f"rule edits: edits.changelog: {settings.changelog} cannot be written ({log_folder} "
            "is not writable by this user)"
        )
    return out


def _existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists (where it would be created)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
