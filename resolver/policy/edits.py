"""Rule edits made by operators: one local list file, written by the resolver, and a
change log of who changed what, when and why.

An edit (add or remove one name) takes a lock (``fcntl.flock`` on a hidden lock file
beside the list), reads the file, applies the change, renders the whole list again in one
deterministic form (a header comment, then one rule per line sorted by name, so that a Git
diff shows exactly the change), validates the result with the list loader that ``resolver
check`` uses, and writes it atomically (temporary file, fsync, rename). The caller then
loads the whole policy (the server's reload, or :func:`validate_policy` offline) and, when
that fails, puts the previous content back with :func:`restore`. Each edit that took
effect is appended to the change log (:mod:`.changelog`).

What the list format cannot carry (the operator, when the rule was added, the time zone
its window was given in) is kept on the rule's line as a comment, ``# edit: {json}``,
which the next edit reads back. A rule written by hand without it is kept, with those
fields empty.

Every field is bounded (:data:`MAX_REFERENCE`, :data:`MAX_OPERATOR`, ...), and so are the
list (:data:`MAX_RULES`) and its file (:data:`MAX_FILE_BYTES`): an edit beyond a bound is
refused with an :class:`EditError` naming the field.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from ..yamlload import SourceError, YMap, item_where, load_text
from .builder import Builder, LoadOptions
from .listfile import parse_list

log = logging.getLogger("resolver.edits")

#: Bounds of one edit's fields (characters), of the list and of its file.
MAX_REFERENCE: Final = 1000
MAX_OPERATOR: Final = 100
MAX_TIMEZONE: Final = 64
MAX_INSTANT: Final = 40
#: Each rule is a mapping of its own (its reference at least), which the list loader reads
#: at about 0.7 ms a rule: 10,000 rules reload in about 7 s. More names belong in a list
#: file of their own (a domains file included).
MAX_RULES: Final = 10_000
MAX_FILE_BYTES: Final = 64 * 1024 * 1024
KINDS: Final = ("domain", "exact")
MODES: Final = ("enforce", "monitor")
#: The list sections of each kind.
SECTIONS: Final = {"domain": "domains", "exact": "exact"}
#: Keys of the local list file kept as they are; any other key is refused (an edit
#: could not keep it on the one-rule-per-line form).
KEPT_KEYS: Final = ("description", "reference", "timezone", "mode", "action", "ttl", "clients")
_META: Final = " # edit: "

HEADER: Final = """\
# Rule edits made by operators (resolver rules add/remove, POST /v1/rules).
# Written by the resolver: one rule per line, sorted by name, so that a diff shows each
# change. You may edit it by hand; the next edit keeps every rule and the keys above
# `domains:`, but not comments of your own. Each rule's "# edit:" comment says who added
# it, when, and in which time zone its window was given. The change log says why.
"""


class EditError(ValueError):
    """An edit refused: ``field`` names the input at fault, ``status`` the HTTP status."""

    def __init__(self, field_name: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name
        self.status = status


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the edits go: the list file (inside ``blocklists``), its id, the change log,
    and how the policy is loaded (client groups...)."""

    file: Path
    list_id: str
    changelog: Path
    blocklists: Path
    options: LoadOptions = field(default_factory=LoadOptions)


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of the local list, as the API shows it."""

    name: str
    kind: str = "domain"
    reference: str = ""
    operator: str = ""
    added_at: str = ""
    start: str = ""  # "from" in the file and the API
    until: str = ""
    timezone: str = ""
    mode: str = ""

    def document(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "reference": self.reference,
            "operator": self.operator,
            "added_at": self.added_at,
            "from": self.start or None,
            "until": self.until or None,
            "timezone": self.timezone or None,
            "mode": self.mode or None,
        }


@dataclass(slots=True)
class LocalList:
    """The local list file's content: its kept keys, and its rules by name."""

    list_id: str
    keys: dict[str, Any]
    rules: dict[str, Rule]
    #: Read as the resolver wrote it (then only a new rule needs validating).
    fast: bool = False


@dataclass(frozen=True, slots=True)
class Applied:
    """An edit written: the file's content before (None: there was no file) and after,
    the change as the log records it, and the rule added or removed (for :func:`restore`
    when another edit came after it)."""

    before: bytes | None
    after: bytes
    change: dict[str, Any]
    rule: Rule | None = None


def resolve(
    blocklists: Path,
    state_dir: Path,
    file: Path | None,
    list_id: str,
    changelog: Path | None,
    options: LoadOptions | None = None,
) -> Settings:
    """The edit settings from the config's (``edits:``, ``blocklists``, ``state_dir``);
    EditError when the file would not be loaded as part of the policy."""
    if file is None:
        if not blocklists.is_dir():
            raise EditError(
                "edits.file",
                f"blocklists ({blocklists}) is not a directory: set edits.file to a file "
                "inside the lists' directory, or make blocklists a directory",
                409,
            )
        file = blocklists / "local-edits.yaml"
    top = Path(os.path.realpath(blocklists))
    where = Path(os.path.realpath(file.parent)) / file.name
    if blocklists.is_file() or (top != where.parent and top not in where.parents):
        raise EditError(
            "edits.file",
            f"{file} is not inside the blocklists directory ({blocklists}), so the policy "
            "would never load it",
            409,
        )
    if file.suffix not in (".yaml", ".yml") or file.name.startswith("."):
        raise EditError("edits.file", f"{file}: name it *.yaml, not hidden, so it is loaded", 409)
    if file.is_symlink():
        raise EditError(
            "edits.file",
            f"{file} is a symbolic link (to {os.readlink(file)}): an edit replaces the file, "
            "which would break the link; point edits.file at the file itself, inside the "
            "blocklists directory",
            409,
        )
    return Settings(
        file,
        list_id,
        changelog or state_dir / "changes.jsonl",
        blocklists,
        options or LoadOptions(),
    )


# --- reading and writing the file -------------------------------------------------------


def read_local(settings: Settings) -> tuple[bytes | None, LocalList]:
    """The file's bytes (None when it does not exist yet) and its content."""
    try:
        size = settings.file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise EditError(
                "", f"{settings.file} is over {MAX_FILE_BYTES} bytes: edits refuse to read it", 409
            )
        raw = settings.file.read_bytes()
    except FileNotFoundError:
        return None, LocalList(settings.list_id, {}, {})
    except OSError as exc:
        raise EditError("", f"cannot read {settings.file}: {exc}", 409) from None
    try:
        text = raw.decode("utf-8")
        fast = _fast_read(text, settings)
        if fast is not None:
            return raw, fast
        doc = load_text(text, str(settings.file))
    except (UnicodeDecodeError, SourceError) as exc:
        raise EditError("", f"{settings.file} cannot be read: {exc}", 409) from None
    return raw, _local_list(doc, text, settings)


def _fast_read(text: str, settings: Settings) -> LocalList | None:
    """The file as :func:`render` writes it, read line by line as JSON (about a hundred
    times faster than YAML); None when any line is not in that form (a file edited by
    hand), which is then read as YAML."""
    if not text.startswith(HEADER):
        return None
    local = LocalList(settings.list_id, {}, {}, fast=True)
    kind = ""
    for line in text[len(HEADER) :].splitlines():
        try:
            if line.startswith("  - {") and kind:
                cut = line.rfind(_META)
                item = json.loads(line[4:cut] if cut >= 0 else line[4:])
                meta = json.loads(line[cut + len(_META) :]) if cut >= 0 else {}
                if not isinstance(item, dict) or not isinstance(meta, dict):
                    return None
                rule = _rule_from(item, kind, meta)
                local.rules.setdefault(rule.name, rule)
                continue
            key, _, value = line.partition(":")
            value = value.strip()
            if key in SECTIONS.values() and value in ("", "[]"):
                kind = next(k for k, s in SECTIONS.items() if s == key)
            elif key == "list" and not kind:
                if value != settings.list_id:
                    return None  # the YAML path says what is wrong
            elif key in KEPT_KEYS and not kind:
                local.keys[key] = json.loads(value)
            else:
                return None
        except ValueError:
            return None
    return local


def _local_list(doc: Any, text: str, settings: Settings) -> LocalList:
    if doc is None:
        return LocalList(settings.list_id, {}, {})
    where = str(settings.file)
    if not isinstance(doc, YMap):
        raise EditError("", f"{where}: a list file must be a YAML mapping", 409)
    for key in doc:
        if key not in (*KEPT_KEYS, "list", "domains", "exact"):
            raise EditError(
                "",
                f"{where}: the key {key!r} cannot be kept by rule edits; move it to a list "
                "file of its own",
                409,
            )
    list_id = doc.get("list", settings.list_id)
    if list_id != settings.list_id:
        raise EditError(
            "",
            f"{where} holds list {list_id!r}, not {settings.list_id!r} (edits.list)",
            409,
        )
    lines = text.splitlines()
    rules: dict[str, Rule] = {}
    for kind, section in SECTIONS.items():
        items = doc.get(section) or []
        if not isinstance(items, list):
            raise EditError("", f"{where}: {section} is not a list", 409)
        for index, item in enumerate(items):
            rule = _read_rule(item, kind, lines, item_where(items, index))
            rules.setdefault(rule.name, rule)
    keys = {k: doc[k] for k in KEPT_KEYS if k in doc}
    return LocalList(settings.list_id, keys, rules)


def _read_rule(item: Any, kind: str, lines: list[str], where: Any) -> Rule:
    meta: dict[str, Any] = {}
    if where is not None and 0 < where.line <= len(lines):
        line = lines[where.line - 1]
        cut = line.rfind(_META)
        if cut >= 0:
            with contextlib.suppress(ValueError):
                found = json.loads(line[cut + len(_META) :])
                meta = found if isinstance(found, dict) else {}
    return _rule_from(item, kind, meta)


def _rule_from(item: Any, kind: str, meta: Mapping[str, Any]) -> Rule:
    """A rule from its list item (a name, or a mapping) and its ``# edit:`` metadata."""
    if isinstance(item, Mapping):
        name = str(item.get("name", ""))
        active = item.get("active")
        active = active if isinstance(active, Mapping) else {}
        return Rule(
            name.strip().rstrip(".").lower(),
            kind,
            str(item.get("reference", "")),
            str(meta.get("operator", "")),
            str(meta.get("added_at", "")),
            str(active.get("from", "")),
            str(active.get("until", "")),
            str(meta.get("timezone", "")),
            str(item.get("mode", "")),
        )
    return Rule(str(item).strip().rstrip(".").lower(), kind)


def _q(value: Any) -> str:
    """A YAML double-quoted scalar (a JSON string is one, for the printable text kept)."""
    return json.dumps(value, ensure_ascii=False)


def render_rule(rule: Rule) -> str:
    """One rule on one line, with its edit metadata as a trailing comment. The rule is a
    JSON object, which is also a YAML flow mapping: the loader reads it as YAML, and the
    next edit reads it back as JSON, much faster (see :func:`_fast_read`)."""
    doc: dict[str, Any] = {"name": rule.name}
    if rule.reference:
        doc["reference"] = rule.reference
    window = {k: v for k, v in (("from", rule.start), ("until", rule.until)) if v}
    if window:
        doc["active"] = window
    if rule.mode:
        doc["mode"] = rule.mode
    line = "  - " + _q(doc)
    meta = {k: v for k, v in (("operator", rule.operator), ("added_at", rule.added_at)) if v}
    if rule.timezone:
        meta["timezone"] = rule.timezone
    return line + (_META + json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else "")


def render(local: LocalList) -> bytes:
    """The whole file, deterministic: header, list keys, then each section sorted."""
    out = [HEADER.rstrip("\n"), f"list: {local.list_id}"]
    keys = {
        "description": "Rule edits made by operators (see the change log)",
        "timezone": "UTC",
        **local.keys,
    }
    for key in KEPT_KEYS:
        if key in keys:
            out.append(f"{key}: {json.dumps(keys[key], ensure_ascii=False)}")
    for kind, section in SECTIONS.items():
        rules = sorted((r for r in local.rules.values() if r.kind == kind), key=lambda r: r.name)
        if not rules:
            out.append(f"{section}: []")
            continue
        out.append(f"{section}:")
        out.extend(render_rule(rule) for rule in rules)
    return ("\n".join(out) + "\n").encode("utf-8")


def validate_file(data: bytes, settings: Settings) -> None:
    """The rendered file through the list loader (names, windows, time zones, modes):
    EditError naming the field, never a file in error."""
    try:
        doc = load_text(data.decode("utf-8"), str(settings.file))
        parse_list(doc, settings.file, Builder(settings.options))
    except SourceError as exc:
        raise EditError(exc.field or "", f"refused by the list loader: {exc}") from None


@contextlib.contextmanager
def locked(settings: Settings) -> Iterator[None]:
    """One edit at a time across processes (the server, ``resolver rules --offline``)."""
    lock_path = settings.file.parent / f".{settings.file.name}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        why = f"cannot create the lock file {lock_path}: {exc.strerror}"
        raise EditError("", why, 500) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    except OSError as exc:  # a full disk, a read-only folder: a sentence, not a traceback
        where = exc.filename or settings.file
        raise EditError("", f"cannot write {where}: {exc.strerror or exc}", 500) from None
    finally:
        os.close(fd)  # closing releases the lock


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: a reader (the watcher, a reload) sees
    the old file or the new one, never half of one."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crash; and never written through a link planted there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def restore(settings: Settings, applied: Applied) -> None:
    """Undo ``applied``: put back the file's previous content (or remove the file when
    there was none). When another edit (``resolver rules --offline``, the API) changed the
    file since, only this edit is undone (its rule taken out again, or put back), so that
    the other edit is not lost."""
    with locked(settings):
        try:
            now: bytes | None = settings.file.read_bytes()
        except FileNotFoundError:
            now = None
        if now == applied.after or applied.rule is None:
            if applied.before is None:
                with contextlib.suppress(FileNotFoundError):
                    settings.file.unlink()
            else:
                write_atomic(settings.file, applied.before)
            return
        _, local = read_local(settings)
        rule = applied.rule
        if applied.change["action"] == "add":
            if local.rules.get(rule.name) == rule:
                del local.rules[rule.name]
        else:
            local.rules.setdefault(rule.name, rule)
        write_atomic(settings.file, render(local))


# --- the edits --------------------------------------------------------------------------


def add(settings: Settings, rule: Rule, blocked_elsewhere: str = "") -> Applied:
    """Add ``rule`` to the local list; EditError when it is there already, or the list
    is full, or the result does not validate."""
    with locked(settings):
        before, local = read_local(settings)
        old = local.rules.get(rule.name)
        if old is not None:
            raise EditError(
                "name",
                f"{rule.name} is already in list {settings.list_id} (as a {old.kind} rule); "
                "remove it first to change it",
                409,
            )
        if len(local.rules) >= MAX_RULES:
            raise EditError(
                "name", f"list {settings.list_id} holds {MAX_RULES} rules, its bound", 409
            )
        local.rules[rule.name] = rule
        after = render(local)
        _fits(after)
        # A file the resolver wrote was valid: the new rule alone (with the list's keys)
        # needs the loader. A file edited by hand goes through it whole.
        alone = LocalList(local.list_id, local.keys, {rule.name: rule})
        validate_file(render(alone) if local.fast else after, settings)
        write_atomic(settings.file, after)
    change = _change("add", rule.name, rule.kind, rule.reference, rule.operator, settings)
    change["window"] = {
        "from": rule.start or None,
        "until": rule.until or None,
        "timezone": rule.timezone or None,
        "mode": rule.mode or None,
    }
    if blocked_elsewhere:
        change["note"] = blocked_elsewhere
    if "." not in rule.name and rule.kind == "domain":
        change["warning"] = f"every name under the top-level domain {rule.name} is blocked"
    return Applied(before, after, change, rule)


_NONE: Final = Rule("", kind="")


def remove(
    settings: Settings, name: str, reference: str, operator: str, elsewhere: str = ""
) -> Applied:
    """Remove ``name`` from the local list; EditError (404) when it is not there, saying
    which other list blocks it when ``elsewhere`` names one."""
    with locked(settings):
        before, local = read_local(settings)
        rule = local.rules.pop(name, None)
        if rule is None:
            labels = name.split(".")
            parents = (".".join(labels[i:]) for i in range(1, len(labels)))
            parent = next((p for p in parents if local.rules.get(p, _NONE).kind == "domain"), "")
            more = f"; the rule for {parent} in this list covers it" if parent else ""
            if elsewhere:
                more += f"; it is blocked by {elsewhere}, which rule edits cannot change"
            raise EditError("name", f"{name} is not in list {settings.list_id}{more}", 404)
        after = render(local)
        if not local.fast:  # a file the resolver wrote stays valid without a rule
            validate_file(after, settings)
        write_atomic(settings.file, after)
    change = _change("remove", name, rule.kind, reference, operator, settings)
    return Applied(before, after, change, rule)


def check_id(list_ids: list[tuple[str, str]], settings: Settings) -> None:
    """Refuse to edit when another file of the policy (``(id, file)`` of each list)
    already uses the local list's id: the reload after the edit would fail."""
    mine = os.path.realpath(settings.file)
    for list_id, file in list_ids:
        if list_id == settings.list_id and os.path.realpath(file) != mine:
            raise EditError(
                "edits.list",
                f"list id {list_id!r} is already used by {file}: set edits.list to another "
                "id in the config, or give that list another id",
                409,
            )


def _fits(data: bytes) -> None:
    if len(data) > MAX_FILE_BYTES:
        raise EditError("", f"the list file would be over {MAX_FILE_BYTES} bytes, its bound", 409)


def _change(
    action: str, name: str, kind: str, reference: str, operator: str, settings: Settings
) -> dict[str, Any]:
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "operator": operator,
        "action": action,
        "name": name,
        "kind": kind,
        "list": settings.list_id,
        "file": str(settings.file),
        "reference": reference,
    }


def rules(settings: Settings) -> list[Rule]:
    """The local list's rules, sorted by name."""
    return sorted(read_local(settings)[1].rules.values(), key=lambda r: r.name)
