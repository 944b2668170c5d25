"""The ``include:`` items of a list: a file inside the allowed roots or a remote URL (its
last fetched copy), imported in one of the list formats, with their unsupported lines kept
as warnings."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Final

from ..yamlload import SourceError, Where, YMap, check_keys, item_where, value_where
from . import formats, remote
from .builder import Builder, clip
from .model import ALLOW, DOMAIN, NODATA, NXDOMAIN, Action, BlockList, RemoteSpec, RuleSet

FILE_INCLUDE_KEYS: Final = frozenset({"file", "format"})
URL_INCLUDE_KEYS: Final = frozenset({"url", "format", "refresh", "timeout", "max_size"})

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_SIZE = re.compile(r"^(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?$", re.IGNORECASE)
MAX_WARNINGS_PER_FILE: Final = 20
_CHUNK: Final = 4096


def parse_duration(value: Any, where: Where | None, field_name: str) -> float:
    """``30s``, ``15m``, ``6h``, ``1d`` or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION.match(str(value).strip().lower())
    if not match or float(match.group(1)) <= 0:
        raise SourceError(where, field_name, f"{value!r} is not a duration (e.g. 30s, 15m, 6h, 1d)")
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def _parse_size(value: Any, where: Where | None, field_name: str) -> int:
    match = _SIZE.match(str(value).strip())
    if not match:
        raise SourceError(where, field_name, f"{value!r} is not a size (e.g. 64MiB)")
    unit = (match.group(2) or "b").lower()
    scale = {"b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30}
    return int(match.group(1)) * scale[unit]


def add_include(
    item: Any, index: int, doc: YMap, file: Path, blocklist: BlockList, builder: Builder
) -> int:
    items = doc["include"]
    where = item_where(items, index) or doc.where
    field_name = f"include[{index}]"
    if not isinstance(item, YMap) or ("file" in item) == ("url" in item):
        raise SourceError(
            where, field_name, "expected {file: PATH, format: F} or {url: URL, format: F}"
        )
    check_keys(item, FILE_INCLUDE_KEYS if "file" in item else URL_INCLUDE_KEYS, field_name)
    fmt = item.get("format")
    if not isinstance(fmt, str) or fmt not in formats.FORMATS:
        raise SourceError(
            value_where(item, "format") if "format" in item else where,
            f"{field_name}.format",
            f"unknown format {fmt!r}: use one of {', '.join(formats.FORMATS)}",
        )
    if "file" in item:
        target = _include_path(item, field_name, file, builder)
        source = str(target)
        try:
            raw = target.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(
                value_where(item, "file"), f"{field_name}.file", f"cannot read {target}: {exc}"
            ) from None
        # Hashed under the name the list gives it, which the list's own hash covers: the
        # digest must not change with where the folder of lists lies.
        builder.digest.update(str(item["file"]).encode() + b"\0" + raw)
        builder.files.append(source)
    else:
        url = str(item["url"])
        if not url.startswith(("http://", "https://")):
            raise SourceError(
                value_where(item, "url"), f"{field_name}.url", "expected an http(s) URL"
            )
        why = remote.refused_target(url, builder.options.allow_private)
        if why is not None:
            raise SourceError(value_where(item, "url"), f"{field_name}.url", why)
        refresh = parse_duration(
            item.get("refresh", "6h"), value_where(item, "refresh"), f"{field_name}.refresh"
        )
        timeout = parse_duration(
            item.get("timeout", "10s"), value_where(item, "timeout"), f"{field_name}.timeout"
        )
        max_size = _parse_size(
            item.get("max_size", "64MiB"), value_where(item, "max_size"), f"{field_name}.max_size"
        )
        builder.remotes.append(RemoteSpec(url, refresh, timeout, max_size, blocklist.id))
        source = url
        blocklist.includes.append(url)
        state_dir = builder.options.state_dir
        copy = remote.load_copy(url, state_dir) if state_dir else None
        if copy is None or copy.text is None:
            builder.warnings.append(
                f"{where}: warning: no copy of {url} yet; list {blocklist.id} goes without "
                "it until it is fetched"
            )
            return 0
        text = copy.text
        builder.digest.update(source.encode() + b"\0" + text.encode())
    return _add_imported(text, fmt, source, blocklist, builder)


def _include_path(item: YMap, field_name: str, file: Path, builder: Builder) -> Path:
    """The file an ``include: {file: ...}`` names, if it lies inside the allowed roots.

    An include reads whatever the process can read, and its unsupported lines are quoted in
    warnings: without this, a list could copy the admin token or /etc/shadow into ``check``
    output and the log. The real path (links resolved) must lie under the lists' folder, a
    folder linked into it, or one of ``include_roots``."""
    name = item["file"]
    where = value_where(item, "file")
    if not isinstance(name, str) or not name or "\0" in name:
        raise SourceError(where, f"{field_name}.file", "expected a file path (text, no NUL byte)")
    target = file.parent / name
    real = Path(os.path.realpath(target))
    if not any(real.is_relative_to(root) for root in builder.roots):
        allowed = ", ".join(str(root) for root in builder.roots)
        raise SourceError(
            where,
            f"{field_name}.file",
            f"{target} lies outside the folders lists may include from ({allowed}); move it "
            "under the lists' folder or add its folder to include_roots in the config",
        )
    return target


def _add_imported(text: str, fmt: str, source: str, blocklist: BlockList, builder: Builder) -> int:
    problems: list[formats.Problem] = []
    pending: dict[int, tuple[list[bytes], list[int]]] = {}
    rulesets: dict[int, RuleSet] = {}
    count = 0

    def flush(flags: int) -> None:
        names, lines = pending.pop(flags)
        rs = rulesets.get(flags)
        if rs is None:
            action = blocklist.action
            if flags & NODATA:
                action = Action("nodata")
            elif flags & NXDOMAIN:
                action = Action("nxdomain")
            rs = rulesets[flags] = builder.ruleset(
                blocklist,
                flags & (DOMAIN | ALLOW),
                blocklist.phases,
                blocklist.reference,
                action,
                f"include {source}",
                Where(source, lines[0], 1),
            )
        builder.add_many(names, rs, source, lines)

    # Names go into the table in chunks: a million names never sit in a list at once, so
    # the load's peak memory (which stays resident) is the table, not the parse.
    for name, flags, line in formats.parse(text, fmt, problems):
        names, lines = pending.setdefault(flags, ([], []))
        names.append(name.encode())
        lines.append(line)
        count += 1
        if len(names) >= _CHUNK:
            flush(flags)
    for flags in list(pending):
        flush(flags)
    for problem in problems[:MAX_WARNINGS_PER_FILE]:
        builder.warnings.append(
            f"{source}:{problem.line}:{problem.column}: warning: {clip(problem.message)}"
        )
    if len(problems) > MAX_WARNINGS_PER_FILE:
        builder.warnings.append(
            f"{source}: warning: {len(problems) - MAX_WARNINGS_PER_FILE} more unsupported lines"
        )
    return count
