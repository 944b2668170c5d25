"""YAML loading that remembers where every key and item stood, for errors that name a line.

PyYAML forgets positions once it builds Python objects and silently keeps the last of two
equal keys. Here mappings become :class:`YMap` and sequences :class:`YList`, both carrying
the line and column of each key or item, and a repeated key is an error. Timestamps are left
as strings so that dates are parsed in one place, with the list's time zone.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode


@dataclass(frozen=True, slots=True)
class Where:
    """A place in a file: 1-based line and column."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class SourceError(Exception):
    """A user error in a file: ``file:line:column: field: message``."""

    def __init__(self, where: Where | None, field: str, message: str) -> None:
        self.where = where
        self.field = field
        self.message = message
        prefix = f"{where}: " if where else ""
        label = f"{field}: " if field else ""
        super().__init__(f"{prefix}{label}{message}")


class SourceErrors(SourceError):
    """Several user errors found in one run (a config's sections, a folder's files), in
    the order found: reported all at once, one a line, rather than one per attempt. Its
    ``where``, ``field`` and ``message`` are the first error's."""

    errors: list[SourceError]

    def __init__(self, errors: Iterable[SourceError]) -> None:
        flat: list[SourceError] = []
        for error in errors:
            flat.extend(error.errors if isinstance(error, SourceErrors) else [error])
        first = flat[0]
        super().__init__(first.where, first.field, first.message)
        self.errors = flat
        self.args = ("\n".join(str(error) for error in flat),)


def raise_all(errors: list[SourceError]) -> None:
    """Raise the errors found, if any: one as itself, several as :class:`SourceErrors`."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise SourceErrors(errors)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """``"did you mean X? "`` for the known key closest to a misspelt ``key``, else ``""``."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean {close[0]}? " if close else ""


class YMap(dict[str, Any]):
    """A mapping that knows where it and each of its keys stood."""

    where: Where
    key_where: dict[str, Where]
    value_where: dict[str, Where]


class YList(list[Any]):
    """A sequence that knows where it and each of its items stood."""

    where: Where
    item_where: list[Where]


def empty_map(where: Where) -> YMap:
    """An empty :class:`YMap` standing at ``where`` (for a section left out)."""
    out = YMap()
    out.where = where
    out.key_where = {}
    out.value_where = {}
    return out


def _where(node: Node, file: str) -> Where:
    return Where(file, node.start_mark.line + 1, node.start_mark.column + 1)


#: Brackets deeper than this are refused as soon as they are read: PyYAML's scanner takes
#: about 10 s over 20,000 '[' before its composer would run out of stack.
MAX_NESTING = 100


class _Loader(yaml.SafeLoader):
    file = "<string>"

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_NESTING:
            raise yaml.scanner.ScannerError(
                None,
                None,
                f"the YAML nests too deeply (more than {MAX_NESTING} levels of brackets)",
                self.get_mark(),
            )
        super().fetch_flow_collection_start(TokenClass)


# Dates stay strings: they are read later, in the time zone of the list they belong to.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_map(loader: _Loader, node: Node) -> YMap:
    assert isinstance(node, MappingNode)
    loader.flatten_mapping(node)
    out = empty_map(_where(node, loader.file))
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        where = _where(key_node, loader.file)
        if not isinstance(key, str):
            raise SourceError(where, str(key), "keys must be strings")
        if key in out:
            raise SourceError(where, key, f"key repeated (first at line {out.key_where[key].line})")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_where[key] = where
        out.value_where[key] = _where(value_node, loader.file)
    return out


def _construct_seq(loader: _Loader, node: Node) -> YList:
    assert isinstance(node, SequenceNode)
    out = YList()
    out.where = _where(node, loader.file)
    out.item_where = []
    for child in node.value:
        out.append(loader.construct_object(child, deep=True))
        out.item_where.append(_where(child, loader.file))
    return out


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def load_text(text: str, file: str) -> Any:
    """Parse one YAML document; syntax errors become :class:`SourceError` with a place."""
    loader = _Loader(text)
    loader.file = file
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if isinstance(node, ScalarNode) and node.value == "":
            return None
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Where(file, mark.line + 1, mark.column + 1) if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise SourceError(where, "", f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise SourceError(Where(file, 1, 1), "", f"YAML error: {exc}") from None
    except RecursionError:
        # PyYAML composes nested collections recursively: 20,000 '[' exhaust the stack.
        raise SourceError(
            Where(file, 1, 1), "", "the YAML nests too deeply (brackets or indentation)"
        ) from None
    finally:
        loader.dispose()


def load_file(path: Path) -> Any:
    """Read and parse a YAML file; an unreadable file is a :class:`SourceError` too."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(Where(str(path), 1, 1), "", f"cannot read the file: {exc}") from None
    return load_text(text, str(path))


def value_where(mapping: Any, key: str) -> Where | None:
    """Where the value of ``key`` stood in ``mapping`` (or the mapping itself), when known."""
    if isinstance(mapping, YMap):
        return mapping.value_where.get(key, mapping.where)
    return None


def item_where(seq: Any, index: int) -> Where | None:
    """Where item ``index`` stood in ``seq``, when known."""
    if isinstance(seq, YList) and index < len(seq.item_where):
        return seq.item_where[index]
    return None


def check_keys(
    mapping: YMap,
    allowed: set[str] | frozenset[str],
    context: str,
    errors: list[SourceError] | None = None,
) -> None:
    """Reject keys outside ``allowed``: an unknown key is a typo until proven otherwise, so
    the message names the known key closest to it. Every unknown key is reported: into
    ``errors`` when given, else raised (all of them at once)."""
    found: list[SourceError] = []
    for key in mapping:
        if key not in allowed:
            hint = ", ".join(sorted(allowed))
            found.append(
                SourceError(
                    mapping.key_where.get(key),
                    key,
                    f"unknown key in {context}; {did_you_mean(key, allowed)}(known: {hint})",
                )
            )
    if errors is None:
        raise_all(found)
    else:
        errors.extend(found)
