"""``resolver rules add|remove|list``: rule edits in the local list, through the running
server's admin API (so that the reload and the change log happen in one place), or with
``--offline`` straight into the file with the same code (a running server's file watcher
then reloads). Errors are one line; exit 0 on success, 1 when the edit is refused, 2 for
bad arguments or a server that cannot be reached."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..policy import edits

#: Where ``resolver serve`` puts the admin API in the example config (deploy/resolver.yaml).
DEFAULT_ADMIN = "http://127.0.0.1:8053"


def add_parser(sub: Any) -> None:
    """The ``rules`` command and its subcommands."""
    rules = sub.add_parser("rules", help="add, remove or list rules in the local list")
    actions = rules.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="block a name (and its subdomains, by default)")
    remove = actions.add_parser("remove", help="remove a name from the local list")
    show = actions.add_parser("list", help="the local list's rules")
    for parser in (add, remove):
        parser.add_argument("name", help="the domain name")
        parser.add_argument("--reference", required=True, help="the legal or policy basis (why)")
        parser.add_argument("--operator", required=True, help="your name (who)")
    add.add_argument("--from", dest="start", metavar="DATE", help="enforced from (date or ISO)")
    add.add_argument("--until", metavar="DATE", help="enforced until (exclusive)")
    add.add_argument("--timezone", metavar="TZ", help="the zone of --from/--until (default UTC)")
    add.add_argument("--mode", choices=edits.MODES, help="enforce (default) or monitor")
    add.add_argument("--kind", choices=edits.KINDS, default="domain", help="domain or exact")
    add.add_argument(
        "--allow-tld", action="store_true", help="allow a top-level domain (blocks all under it)"
    )
    show.add_argument("--json", action="store_true", help="print the rules as JSON")
    for parser in (add, remove, show):
        parser.add_argument(
            "--admin", metavar="URL", help=f"the admin API (default {DEFAULT_ADMIN})"
        )
        parser.add_argument("--token", help="the admin token (default $RESOLVER_ADMIN_TOKEN)")
        parser.add_argument("--config", type=Path, help="YAML config file (with --offline)")
        parser.add_argument(
            "--offline", action="store_true", help="edit the file directly, not via the server"
        )


def main(args: argparse.Namespace) -> int:
    """Run ``resolver rules ...``; the exit code."""
    try:
        if args.offline:
            from .rulesfile import offline

            document = offline(args)
        else:
            document = _online(args)
    except edits.EditError as exc:
        print(f"resolver rules: {exc}", file=sys.stderr)
        return 2 if exc.status == 0 else 1
    except _Unreachable as exc:
        print(f"resolver rules: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --offline: a file that cannot be read or written
        print(f"resolver rules: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    _print(args, document)
    return 0


class _Unreachable(Exception):
    """The admin API did not answer."""


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": args.name,
        "reference": args.reference,
        "operator": args.operator,
    }
    if args.action == "add":
        body["kind"] = args.kind
        if args.allow_tld:
            body["allow_tld"] = True
        for key, value in (
            ("from", args.start),
            ("until", args.until),
            ("timezone", args.timezone),
            ("mode", args.mode),
        ):
            if value:
                body[key] = value
    return body


def _online(args: argparse.Namespace) -> dict[str, Any]:
    base = (args.admin or DEFAULT_ADMIN).rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    token = args.token or os.environ.get("RESOLVER_ADMIN_TOKEN")
    if args.action == "list":
        return _call("GET", f"{base}/v1/rules", token, None)
    path = "/v1/rules" if args.action == "add" else "/v1/rules/remove"
    return _call("POST", base + path, token, _body(args))


def _call(method: str, url: str, token: str | None, body: Any) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, method=method, data=data)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            document: dict[str, Any] = json.loads(response.read())
            return document
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        if exc.code == 401:
            message = f"{message} (give --token or set RESOLVER_ADMIN_TOKEN)"
        raise edits.EditError("", f"{url}: {exc.code}: {message}") from None
    except (OSError, ValueError) as exc:
        raise _Unreachable(
            f"cannot reach the admin API at {url}: {getattr(exc, 'reason', exc)} "
            "(give --admin URL, or --offline --config FILE to edit the file directly)"
        ) from None


def _print(args: argparse.Namespace, document: dict[str, Any]) -> None:
    if args.action != "list":
        change = document.get("change", {})
        if change.get("warning"):
            print(f"resolver rules: warning: {change['warning']}", file=sys.stderr)
        print(
            f"{change.get('action', args.action)} {change.get('name', args.name)} "
            f"in list {change.get('list', '?')} by {change.get('operator', '?')}"
            + (f": policy {document['policy']}" if document.get("policy") else "")
        )
        return
    if args.json:
        print(json.dumps(document, indent=2))
        return
    print(f"list {document.get('list')} ({document.get('file')}): {document.get('count')} rules")
    for rule in document.get("rules", []):
        window = " ".join(
            f"{key} {rule[key]}" for key in ("from", "until", "timezone", "mode") if rule.get(key)
        )
        print(
            f"{rule['name']}\t{rule['kind']}\t{rule.get('operator') or '-'}\t"
            f"{rule.get('added_at') or '-'}\t{window or '-'}\t{rule.get('reference') or '-'}"
        )
