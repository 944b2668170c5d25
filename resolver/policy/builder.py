"""What one policy load accumulates: the options it runs with, the rule sets and the name
table it compiles, the warnings it collects, and the digest of everything it read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..yamlload import Where
from .model import Action, BlockList, ClientGroups, Pattern, Phases, RemoteSpec, RuleSet
from .table import NameTable

#: The longest warning or error reason taken from a file's content or an exception: an
#: imported file may be anything, and its bytes must not be copied out into logs.
MAX_MESSAGE: Final = 300


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
    #: Whether a load reads every file and reports all the errors found (``resolver
    #: check``) rather than stopping at the first (serving keeps its last good policy).
    all_errors: bool = False


class Builder:
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
