"""Load list files (one YAML file per list) and what they include into a compiled
:class:`Policy`.

Everything is validated before anything is used: an unknown key, a bad date, a name that is
no domain, all stop the load with ``file:line:column: field: message``, so that a caller can
keep serving its last good policy. Imported files in other formats are third-party data: a
line they hold that is not supported is reported as a warning with its line (and never
silently widened into something broader), without failing the whole policy.

This module finds and reads the files and assembles the :class:`Policy`;
:mod:`.listfile` validates one list document, :mod:`.includes` its ``include:`` items, and
:mod:`.builder` holds what the load accumulates.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from pathlib import Path

from ..yamlload import SourceError, Where, load_text, raise_all
from .builder import Builder, LoadOptions, clip
from .listfile import parse_list
from .model import BlockList, Policy


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
    error (with ``options.all_errors``, :class:`SourceErrors` naming the error of each
    file in error). Warnings (duplicates, unsupported import lines, closed windows) are kept in
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
    builder = Builder(options)
    lists: list[BlockList] = []
    seen: dict[str, Where] = {}
    builder.digest.update(repr(sorted(options.groups.bits)).encode())
    files, roots = scan_lists(path)
    builder.roots = [*roots, *(Path(os.path.realpath(r)) for r in options.include_roots)]
    errors: list[SourceError] = []
    for file in files:
        try:
            blocklist = _load_file(file, builder, _digest_name(file, path))
            if blocklist is not None and blocklist.id in seen:
                raise SourceError(
                    blocklist.where,
                    "list",
                    f"list id {blocklist.id!r} is already used by {seen[blocklist.id]}",
                )
        except Exception as exc:
            error = exc if isinstance(exc, SourceError) else None
            errors.append(error or SourceError(Where(str(file), 1, 1), "", fault(exc)))
            if not options.all_errors:
                break
            continue
        if blocklist is None:
            continue
        seen[blocklist.id] = blocklist.where
        lists.append(blocklist)
    raise_all(errors)
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


def _digest_name(file: Path, top: Path) -> str:
    """The name the digest gives ``file``: its path under the folder loaded (its own name
    when a single file is loaded), so that the digest depends on the lists' content and
    layout, never on how the folder was spelt (absolute, relative or through a link)."""
    return file.name if file == top else os.path.relpath(file, top)


def _load_file(file: Path, builder: Builder, name: str) -> BlockList | None:
    """Read one list file into ``builder``, hashing it under ``name``; ``None`` for an
    empty file."""
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
    builder.digest.update(name.encode() + b"\0" + raw)
    builder.files.append(str(file))
    doc = load_text(text, str(file))
    if doc is None:
        return None  # an empty file is no list (an editor's new file, a commented-out list)
    return parse_list(doc, file, builder)


def release_memory() -> None:
    """Give the memory a load freed back to the system (glibc keeps it otherwise).

    Parsing a million names allocates and frees far more than the table keeps; without
    this, resident memory stays at the load's peak (about 57 bytes per domain instead of
    33 for a million domains, measured by bench/policy_scale.py).
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
