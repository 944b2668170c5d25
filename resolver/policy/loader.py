"""Load list files (one YAML file per list) and what they include into a compiled
:class:`Policy`.

Everything is validated before anything is used: an unknown key, a bad date, a name that is
no domain, all stop the load with ``file:line:column: field: message``, so that a caller can
keep serving its last good policy. Imported files in other formats are third-party data: a
line they hold that is not supported is reported as a warning with its line (and never
silently widened into something broader), without failing the whole policy.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..yamlload import (
    SourceError,
    Where,
    YMap,
    check_keys,
    item_where,
    load_text,
    value_where,
)
from . import formats, regexcheck, remote
from .model import (
    ACTIONS,
    ALLOW,
    DOMAIN,
    EXACT,
    NODATA,
    NXDOMAIN,
    Action,
    BlockList,
    ClientGroups,
    Pattern,
    Phases,
    Policy,
    RemoteSpec,
    RuleSet,
)
from .table import NameTable
from .timewindow import ALWAYS, NEVER, TimeValueError, parse_instant, zone

LIST_KEYS: Final = frozenset(
    {
        "list",
        "description",
        "reference",
        "timezone",
        "active",
        "mode",
        "action",
        "ttl",
        "clients",
        "domains",
        "exact",
        "patterns",
        "allow",
        "include",
        "networks",
    }
)
RULE_KEYS: Final = frozenset({"name", "active", "reference", "mode"})
PATTERN_KEYS: Final = frozenset({"pattern", "active", "reference", "mode"})
WINDOW_KEYS: Final = frozenset({"monitor_from", "from", "until"})
SINKHOLE_KEYS: Final = frozenset({"a", "aaaa"})
FILE_INCLUDE_KEYS: Final = frozenset({"file", "format"})
URL_INCLUDE_KEYS: Final = frozenset({"url", "format", "refresh", "timeout", "max_size"})
MODES: Final = ("enforce", "monitor")

_LIST_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_WILDCARD_LABEL = re.compile(r"^[a-z0-9_*-]{1,63}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_SIZE = re.compile(r"^(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?$", re.IGNORECASE)
DEFAULT_TTL: Final = 60
MAX_TTL: Final = 86400
MAX_WARNINGS_PER_FILE: Final = 20
#: The longest warning or error reason taken from a file's content or an exception: an
#: imported file may be anything, and its bytes must not be copied out into logs.
MAX_MESSAGE: Final = 300
_CHUNK: Final = 4096


@dataclass
class LoadOptions:
    """What a load needs besides the files: the config's client groups, where remote
    copies live, whether to keep per-name sources (explain, check) and the instant used
    for warnings about windows already closed."""

    groups: ClientGroups = field(default_factory=ClientGroups)
    state_dir: Path | None = None
    keep_sources: bool = False
    now: float | None = None
    #: Folders besides the lists' own tree that ``include: {file: ...}`` may read from.
    include_roots: tuple[Path, ...] = ()
    #: Whether ``include: {url: ...}`` may name a loopback, link-local or unspecified
    #: address (remote.allow_private in the config).
    allow_private: bool = False


def list_files(path: Path) -> list[Path]:
    """The list files under ``path`` (a file or a directory, searched recursively), sorted.

    Hidden entries are skipped: a Kubernetes ConfigMap volume holds each file twice, once
    behind a ``..data`` symlink, and editors leave dot-files behind. Symbolic links to
    directories are followed (each real directory once, so a link loop ends); a link named
    like a list file whose target is gone is listed, so that loading it fails loudly.
    """
    return scan_lists(path)[0]


def scan_lists(path: Path) -> tuple[list[Path], list[Path]]:
    """The list files under ``path`` (see :func:`list_files`) and the real paths of the
    folders they were found in through links: together with the lists' own folder, the
    roots that included files must lie under."""
    if path.is_file():
        return [path], [Path(os.path.realpath(path.parent))]
    if not path.is_dir():
        if path.is_symlink():
            raise SourceError(
                Where(str(path), 1, 1),
                "blocklists",
                f"a symbolic link to {os.readlink(path)}, which does not exist",
            )
        raise SourceError(Where(str(path), 1, 1), "blocklists", "no such file or directory")
    top = os.path.realpath(path)
    roots = [Path(top)]
    visited = {top}
    found: list[Path] = []
    # os.walk, not Path.rglob: rglob follows no directory links before Python 3.13.
    for folder, dirs, files in os.walk(path, followlinks=True):
        keep = []
        for name in sorted(dirs):
            if name.startswith("."):
                continue
            real = os.path.realpath(os.path.join(folder, name))
            if real in visited:
                continue  # a link loop, or a folder linked twice: each is read once
            visited.add(real)
            keep.append(name)
            if os.path.islink(os.path.join(folder, name)):
                roots.append(Path(real))
        dirs[:] = keep
        for name in files:
            candidate = Path(folder) / name
            if name.startswith(".") or candidate.suffix not in (".yaml", ".yml"):
                continue
            # A dangling link is listed too: a list that vanished behind a link is a fault.
            if candidate.is_file() or candidate.is_symlink():
                found.append(candidate)
    return sorted(found), roots


def normalize_name(text: Any, where: Where | None, field_name: str) -> str:
    """A rule's domain in canonical form, or a :class:`SourceError` saying why not."""
    if not isinstance(text, str):
        raise SourceError(where, field_name, f"expected a domain name, got {text!r}")
    if text.strip().rstrip(".") == "":
        raise SourceError(where, field_name, "the root cannot be blocked")
    try:
        name: str = formats.normalize(text.strip())
        return name
    except ValueError as exc:
        raise SourceError(where, field_name, f"{text!r} is not a domain name: {exc}") from None


class _Builder:
    """Accumulates rule sets and names, merging names that several rule sets share."""

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self.rulesets: list[RuleSet] = []
        self._by_key: dict[tuple[Any, ...], RuleSet] = {}
        self.table = NameTable()
        self.multi: list[tuple[RuleSet, ...]] = []
        self._multi_index: dict[tuple[RuleSet, ...], int] = {}
        self.patterns: list[Pattern] = []
        self.warnings: list[str] = []
        self.digest = hashlib.sha256()
        self.remotes: list[RemoteSpec] = []
        self.files: list[str] = []
        #: Real paths that included files must lie under (the lists' tree, include_roots).
        self.roots: list[Path] = []
        self.networks: list[tuple[Any, RuleSet]] = []
        self.sources: dict[bytes, list[tuple[int, Where | None]]] | None = (
            {} if options.keep_sources else None
        )

    def ruleset(
        self,
        blocklist: BlockList,
        flags: int,
        phases: Phases,
        reference: str,
        action: Action,
        origin: str,
        where: Where | None,
    ) -> RuleSet:
        key = (id(blocklist), flags, phases, reference, action, origin)
        found = self._by_key.get(key)
        if found is None:
            found = RuleSet(
                len(self.rulesets), blocklist, flags, phases, reference, action, origin, where
            )
            self._by_key[key] = found
            self.rulesets.append(found)
        return found

    def _sets(self, value: int) -> tuple[RuleSet, ...]:
        if value & 0x80000000:
            return self.multi[value & 0x7FFFFFFF]
        return (self.rulesets[value],)

    def _merge(self, name: bytes, old: int, rs: RuleSet) -> bool:
        sets = self._sets(old)
        if rs in sets:
            return False
        # One tuple per combination, not per name: a million names in two lists would
        # otherwise hold a million tuples (memory, and a long free when the policy goes).
        merged = (*sets, rs)
        index = self._multi_index.get(merged)
        if index is None:
            index = self._multi_index[merged] = len(self.multi)
            self.multi.append(merged)
        self.table.replace(name, 0x80000000 | index)
        return True

    def add(self, name: str, rs: RuleSet, where: Where | None) -> None:
        key = name.encode()
        stored = self.table.insert(key, rs.index)
        if stored is not None and not self._merge(key, stored, rs):
            self.warnings.append(f"{where}: warning: {name} is listed twice in {rs.origin}")
        if self.sources is not None:
            self.sources.setdefault(key, []).append((rs.index, where))

    def add_many(self, names: list[bytes], rs: RuleSet, file: str, lines: list[int]) -> None:
        if self.sources is not None:
            for name, line in zip(names, lines, strict=True):
                self.add(name.decode(), rs, Where(file, line, 1))
            return
        for name, old in self.table.add_many(names, rs.index):
            self._merge(name, old, rs)


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters (a message that may quote a file's content)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fault(exc: BaseException) -> str:
    """A sentence for an unexpected exception while loading: what happened, never a
    traceback, and never more than :data:`MAX_MESSAGE` characters of its text."""
    if isinstance(exc, RecursionError):
        return "the file nests too deeply to be read (brackets or indentation)"
    if isinstance(exc, MemoryError):
        return "out of memory while reading the file"
    detail = str(exc)
    return clip(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)


def load_policy(path: Path, options: LoadOptions | None = None) -> Policy:
    """Read and compile every list under ``path``; raise :class:`SourceError` on the first
    error. Warnings (duplicates, unsupported import lines, closed windows) are kept in
    ``Policy.warnings``.

    Nothing else escapes: any other exception (a NUL byte in a path, YAML nested past the
    recursion limit, a file that vanishes mid-read) becomes a :class:`SourceError` naming
    the file being read, so that every caller can keep its last good policy."""
    try:
        return _load_policy(path, options or LoadOptions())
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(Where(str(path), 1, 1), "", f"cannot load: {fault(exc)}") from None


def _load_policy(path: Path, options: LoadOptions) -> Policy:
    builder = _Builder(options)
    lists: list[BlockList] = []
    seen: dict[str, Where] = {}
    builder.digest.update(repr(sorted(options.groups.bits)).encode())
    files, roots = scan_lists(path)
    builder.roots = [*roots, *(Path(os.path.realpath(r)) for r in options.include_roots)]
    for file in files:
        try:
            blocklist = _load_file(file, builder)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(Where(str(file), 1, 1), "", fault(exc)) from None
        if blocklist is None:
            continue
        if blocklist.id in seen:
            raise SourceError(
                blocklist.where,
                "list",
                f"list id {blocklist.id!r} is already used by {seen[blocklist.id]}",
            )
        seen[blocklist.id] = blocklist.where
        lists.append(blocklist)
    now = options.now if options.now is not None else time.time()
    for rs in builder.rulesets:
        if rs.phases.end <= now:
            place = rs.where or rs.blocklist.where
            builder.warnings.append(
                f"{place}: warning: window of {rs.origin} in list {rs.blocklist.id} "
                "has already closed; these rules never apply again"
            )
    policy = Policy(
        lists,
        builder.rulesets,
        builder.table,
        builder.multi,
        builder.patterns,
        options.groups,
        builder.digest.hexdigest()[:16],
        builder.warnings,
        builder.sources,
        builder.remotes,
        builder.files,
        builder.networks,
    )
    release_memory()
    return policy


def _load_file(file: Path, builder: _Builder) -> BlockList | None:
    """Read one list file into ``builder``; ``None`` for an empty file."""
    try:
        raw = file.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        if file.is_symlink():
            raise SourceError(
                Where(str(file), 1, 1),
                "",
                f"the file is a symbolic link to {os.readlink(file)}, which does not exist; "
                "restore the target, or delete the link to remove the list",
            ) from None
        raise SourceError(Where(str(file), 1, 1), "", "the file vanished while loading") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(Where(str(file), 1, 1), "", f"cannot read the file: {exc}") from None
    builder.digest.update(str(file).encode() + b"\0" + raw)
    builder.files.append(str(file))
    doc = load_text(text, str(file))
    if doc is None:
        return None  # an empty file is no list (an editor's new file, a commented-out list)
    return _parse_list(doc, file, builder)


def release_memory() -> None:
    """Give the memory a load freed back to the system (glibc keeps it otherwise).

    Parsing a million names allocates and frees far more than the table keeps; without
    this, resident memory stays at the load's peak (about 57 bytes per domain instead of
    33 for a million domains, measured by bench/policy_scale.py).
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _require_str(doc: YMap, key: str, default: str | None = None) -> str:
    value = doc.get(key, default)
    if value is None:
        raise SourceError(doc.where, key, "required key is missing")
    if not isinstance(value, str):
        raise SourceError(value_where(doc, key), key, f"expected text, got {value!r}")
    return value


def parse_phases(value: Any, where: Where | None, field_name: str, tz: Any) -> Phases:
    """Read an ``active:`` mapping (monitor_from, from, until) into :class:`Phases`."""
    if value is None:
        phases = Phases()
    else:
        if not isinstance(value, YMap):
            raise SourceError(
                where, field_name, "expected a mapping with from / until / monitor_from"
            )
        check_keys(value, WINDOW_KEYS, field_name)
        bounds: dict[str, float] = {}
        for key in ("monitor_from", "from", "until"):
            if key in value:
                try:
                    bounds[key] = parse_instant(value[key], tz)
                except TimeValueError as exc:
                    raise SourceError(
                        value_where(value, key), f"{field_name}.{key}", str(exc)
                    ) from None
        start = bounds.get("from", ALWAYS)
        end = bounds.get("until", NEVER)
        monitor = bounds.get("monitor_from", start)
        if start >= end:
            raise SourceError(
                value_where(value, "until"), f"{field_name}.until", "'until' is not after 'from'"
            )
        if monitor > start:
            raise SourceError(
                value_where(value, "monitor_from"),
                f"{field_name}.monitor_from",
                "'monitor_from' is after 'from': the monitor phase comes before enforcement",
            )
        phases = Phases(monitor, start, end)
    return phases


def parse_action(doc: YMap) -> Action:
    value = doc.get("action", "nxdomain")
    where = value_where(doc, "action")
    if value is None:
        value = "null"  # `action: null` reads as YAML's null: it means the null action
    if isinstance(value, str):
        if value not in ACTIONS or value == "sinkhole":
            raise SourceError(
                where,
                "action",
                f"unknown action {value!r}: use nxdomain, nodata, refused, null, "
                "or {sinkhole: {a: [...], aaaa: [...]}}",
            )
        return Action(value)
    if isinstance(value, YMap) and list(value) == ["sinkhole"]:
        spec = value["sinkhole"]
        if not isinstance(spec, YMap):
            raise SourceError(where, "action.sinkhole", "expected a mapping with a and/or aaaa")
        check_keys(spec, SINKHOLE_KEYS, "action.sinkhole")
        packed: dict[str, tuple[bytes, ...]] = {}
        for key, version in (("a", 4), ("aaaa", 6)):
            addrs = spec.get(key, [])
            if isinstance(addrs, str):
                addrs = [addrs]
            if not isinstance(addrs, list):
                where_addrs = value_where(spec, key)
                raise SourceError(where_addrs, f"action.sinkhole.{key}", "expected a list")
            out = []
            for index, text in enumerate(addrs):
                try:
                    addr = ipaddress.ip_address(str(text))
                except ValueError:
                    addr = None
                if addr is None or addr.version != version:
                    raise SourceError(
                        item_where(addrs, index) or value_where(spec, key),
                        f"action.sinkhole.{key}",
                        f"{text!r} is not an IPv{version} address",
                    )
                out.append(addr.packed)
            packed[key] = tuple(out)
        if not packed["a"] and not packed["aaaa"]:
            raise SourceError(where, "action.sinkhole", "give at least one address in a or aaaa")
        return Action("sinkhole", packed["a"], packed["aaaa"])
    raise SourceError(
        where, "action", "expected an action name or {sinkhole: {a: [...], aaaa: [...]}}"
    )


def _parse_clients(doc: YMap, groups: ClientGroups) -> tuple[tuple[str, ...], int]:
    value = doc.get("clients", ["all"])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SourceError(value_where(doc, "clients"), "clients", "expected a list of group names")
    mask = 0
    for index, name in enumerate(value):
        bit = groups.bits.get(name) if isinstance(name, str) else None
        if bit is None:
            known = ", ".join(sorted(groups.bits))
            raise SourceError(
                item_where(value, index) or value_where(doc, "clients"),
                f"clients[{index}]",
                f"unknown client group {name!r} (defined in the config: {known})",
            )
        mask |= bit
    return tuple(value), mask


def _items(doc: YMap, key: str) -> list[Any]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise SourceError(value_where(doc, key), key, f"expected a list under {key!r}")
    return value


def _parse_list(doc: Any, file: Path, builder: _Builder) -> BlockList:
    """Validate one list document and add its rules to ``builder``."""
    name = str(file)
    if not isinstance(doc, YMap):
        raise SourceError(Where(name, 1, 1), "", "a list file must be a YAML mapping")
    check_keys(doc, LIST_KEYS, "a list")
    list_id = _require_str(doc, "list")
    if not _LIST_ID.match(list_id):
        raise SourceError(
            value_where(doc, "list"),
            "list",
            f"{list_id!r}: a list id is 1-63 lower-case letters, digits, '-' or '_'",
        )
    tz_name = _require_str(doc, "timezone", "UTC")
    try:
        tz = zone(tz_name)
    except TimeValueError as exc:
        raise SourceError(value_where(doc, "timezone"), "timezone", str(exc)) from None
    mode = _parse_mode(doc, "mode", "enforce")
    ttl = doc.get("ttl", DEFAULT_TTL)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL:
        raise SourceError(value_where(doc, "ttl"), "ttl", f"expected seconds from 0 to {MAX_TTL}")
    clients, mask = _parse_clients(doc, builder.options.groups)
    blocklist = BlockList(
        id=list_id,
        description=_require_str(doc, "description", ""),
        reference=_require_str(doc, "reference", ""),
        timezone=tz,
        phases=Phases(),
        mode=mode,
        action=parse_action(doc),
        ttl=ttl,
        clients=clients,
        mask=mask,
        where=doc.where,
        window=parse_phases(doc.get("active"), value_where(doc, "active"), "active", tz),
    )
    blocklist.phases = blocklist.window.monitor_only() if mode == "monitor" else blocklist.window
    count = 0
    for key, flags in (("domains", DOMAIN), ("exact", EXACT), ("allow", DOMAIN | ALLOW)):
        count += _add_names(doc, key, flags, blocklist, builder, tz)
    count += _add_patterns(doc, blocklist, builder, tz)
    count += _add_networks(doc, blocklist, builder)
    for index, item in enumerate(_items(doc, "include")):
        count += _add_include(item, index, doc, file, blocklist, builder)
    blocklist.rule_count = count
    return blocklist


def _parse_mode(doc: YMap, field_name: str, default: str) -> str:
    mode = _require_str(doc, "mode", default)
    if mode not in MODES:
        raise SourceError(
            value_where(doc, "mode"), field_name, f"unknown mode {mode!r}: use enforce or monitor"
        )
    return mode


def _entry_settings(
    item: YMap, field_name: str, blocklist: BlockList, tz: Any
) -> tuple[Phases, str]:
    """A rule's own phases (its window within the list's, then its mode or the list's)
    and its reference."""
    phases = blocklist.window
    if "active" in item:
        own = parse_phases(item["active"], value_where(item, "active"), f"{field_name}.active", tz)
        phases = own.within(blocklist.window)
    if _parse_mode(item, f"{field_name}.mode", blocklist.mode) == "monitor":
        phases = phases.monitor_only()
    reference = _require_str(item, "reference") if "reference" in item else blocklist.reference
    return phases, reference


def _entry(
    items: list[Any],
    index: int,
    doc: YMap,
    section: str,
    main: str,
    keys: frozenset[str],
    blocklist: BlockList,
    tz: Any,
) -> tuple[Any, Where | None, Phases, str, bool]:
    """One item of a rule section: a plain value, or a mapping with its own window,
    reference and mode. Returns (value, where, phases, reference, has its own settings)."""
    item = items[index]
    where = item_where(items, index) or doc.where
    field_name = f"{section}[{index}]"
    if not isinstance(item, YMap):
        return item, where, blocklist.phases, blocklist.reference, False
    check_keys(item, keys, field_name)
    if main not in item:
        raise SourceError(where, f"{field_name}.{main}", "required key is missing")
    phases, reference = _entry_settings(item, field_name, blocklist, tz)
    return item[main], value_where(item, main) or where, phases, reference, True


def _add_names(
    doc: YMap, key: str, flags: int, blocklist: BlockList, builder: _Builder, tz: Any
) -> int:
    items = _items(doc, key)
    for index in range(len(items)):
        value, where, phases, reference, own = _entry(
            items, index, doc, key, "name", RULE_KEYS, blocklist, tz
        )
        name = normalize_name(value, where, f"{key}[{index}]")
        rs = builder.ruleset(
            blocklist,
            flags,
            phases,
            reference,
            blocklist.action,
            key,
            where if own else doc.where,
        )
        builder.add(name, rs, where)
    return len(items)


def pattern_regex(text: str) -> re.Pattern[bytes]:
    """Compile a pattern rule: ``/regex/`` as written, searched for in the lower-case name
    without its trailing dot (anchor it with ``^`` and ``$`` to match the whole name), or
    labels where ``*`` stands for any run of characters within one label (``deepseek.*``,
    ``*-ai.example``, ``api.*.deepseek.com``), which match the whole name."""
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        # Python's re backtracks: a pattern that can take exponential (or high polynomial)
        # time on a crafted name would freeze every answer. Such patterns are refused here,
        # by their structure, the same way whatever engine is installed (regexcheck.py).
        regexcheck.check(text[1:-1])
        return re.compile(text[1:-1].encode(), re.IGNORECASE)
    name = text.strip().rstrip(".").lower()
    labels = name.split(".")
    if "*" not in name or not all(_WILDCARD_LABEL.match(label) for label in labels):
        raise ValueError(
            "a pattern is /regex/ or a name whose labels may hold '*' (one label each), "
            "e.g. deepseek.* or api.*.example.com"
        )
    # A '*' stays within one label, which is at most 63 characters long.
    parts = [re.escape(label).replace(r"\*", "[^.]{0,63}") for label in labels]
    return re.compile(("^" + r"\.".join(parts) + "$").encode())


def _add_patterns(doc: YMap, blocklist: BlockList, builder: _Builder, tz: Any) -> int:
    items = _items(doc, "patterns")
    for index in range(len(items)):
        text, where, phases, reference, _ = _entry(
            items, index, doc, "patterns", "pattern", PATTERN_KEYS, blocklist, tz
        )
        field_name = f"patterns[{index}]"
        if not isinstance(text, str):
            raise SourceError(where, field_name, f"expected a pattern, got {text!r}")
        try:
            regex = pattern_regex(text)
        except (ValueError, re.error, regexcheck.UnsafePattern) as exc:
            raise SourceError(where, field_name, f"{clip(repr(text), 120)}: {exc}") from None
        rs = builder.ruleset(
            blocklist, EXACT, phases, reference, blocklist.action, "patterns", where
        )
        builder.patterns.append(Pattern(text, regex, rs))
    return len(items)


def _add_networks(doc: YMap, blocklist: BlockList, builder: _Builder) -> int:
    """``networks:``: upstream answers with an address inside one are blocked (rpz-ip)."""
    items = _items(doc, "networks")
    for index, item in enumerate(items):
        where = item_where(items, index) or doc.where
        try:
            net = ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise SourceError(
                where, f"networks[{index}]", f"{item!r} is not a network (e.g. 203.0.113.0/24)"
            ) from None
        rs = builder.ruleset(
            blocklist,
            EXACT,
            blocklist.phases,
            blocklist.reference,
            blocklist.action,
            "networks",
            where,
        )
        builder.networks.append((net, rs))
    return len(items)


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


def _add_include(
    item: Any, index: int, doc: YMap, file: Path, blocklist: BlockList, builder: _Builder
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
        builder.digest.update(source.encode() + b"\0" + raw)
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


def _include_path(item: YMap, field_name: str, file: Path, builder: _Builder) -> Path:
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


def _add_imported(text: str, fmt: str, source: str, blocklist: BlockList, builder: _Builder) -> int:
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
