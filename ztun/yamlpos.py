"""YAML loading that remembers where every value came from.

PyYAML's ``safe_load`` returns plain Python values and forgets the source positions, so a
validation error can only say *what* is wrong. This module composes the YAML node graph
itself, builds the same plain values (dicts, lists, str, int, float, bool, None) and keeps
a side table ``path -> line/column`` for every mapping key and value. Validators
(ztun.policy by hand, the daemon config with pydantic) then report ``file:line: field:``.

It also rejects what ``safe_load`` silently accepts: duplicate mapping keys (the last
one would win) and alias bombs (exponential expansion).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import yaml

from ztun.errors import ConfigError

if TYPE_CHECKING:
    import pydantic

__all__ = [
    "Mark",
    "Path",
    "YamlDocument",
    "format_path",
    "load_documents",
    "load_file",
]

Path = tuple[str | int, ...]

# Expanding aliases can grow a few lines of YAML into billions of values ("billion
# laughs"). No ztun file legitimately has more values than this, nor re-uses anchored
# values this often (a value reached again through an alias counts each time).
MAX_NODES = 1_000_000
MAX_ALIAS_EXPANSIONS = 10_000
# Deeper nesting than this is certainly not a ztun file and would only exhaust the stack.
MAX_DEPTH = 64


@dataclasses.dataclass(frozen=True)
class Mark:
    """A position in a source file; ``line`` and ``column`` count from 1."""

    line: int
    column: int


def format_path(path: Sequence[str | int]) -> str:
    """``("spec", "rules", 0, "from")`` -> ``"spec.rules[0].from"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


@dataclasses.dataclass
class YamlDocument:
    """One document of a YAML stream: its plain ``data`` and where each part came from."""

    data: Any
    file: str
    index: int
    start: Mark
    values: dict[Path, Mark] = dataclasses.field(default_factory=dict, repr=False)
    keys: dict[Path, Mark] = dataclasses.field(default_factory=dict, repr=False)

    def mark(self, path: Sequence[str | int]) -> Mark:
        """Position of the value at ``path``, or of its nearest ancestor that exists."""
        p = tuple(path)
        while p:
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.values.get((), self.start)

    def key_mark(self, path: Sequence[str | int]) -> Mark:
        """Position of the mapping key at ``path`` (falls back to :meth:`mark`)."""
        return self.keys.get(tuple(path)) or self.mark(path)

    def line(self, path: Sequence[str | int]) -> int:
        return self.mark(path).line

    def error(
        self,
        path: Sequence[str | int],
        message: str,
        *,
        cls: type[ConfigError] = ConfigError,
        at_key: bool = False,
    ) -> ConfigError:
        """An error of class ``cls`` that names this file, the line of ``path`` and the field."""
        mark = self.key_mark(path) if at_key else self.mark(path)
        return cls(message, file=self.file, line=mark.line, field=format_path(path) or None)

    def pydantic_error(
        self,
        exc: pydantic.ValidationError,
        *,
        prefix: Sequence[str | int] = (),
        cls: type[ConfigError] = ConfigError,
    ) -> ConfigError:
        """Turn pydantic's first error into one located error (``prefix`` = where the model sat)."""
        first = exc.errors()[0]
        loc = tuple(prefix) + tuple(first["loc"])
        at_key = first["type"] == "extra_forbidden"
        return self.error(loc, first["msg"], cls=cls, at_key=at_key)


class _Builder:
    """Turns a composed node graph into plain values, recording positions by path."""

    def __init__(self, doc: YamlDocument, loader: yaml.SafeLoader, error_cls: type[ConfigError]):
        self.doc = doc
        self.loader = loader
        self.error_cls = error_cls
        self.count = 0
        self.seen: set[int] = set()
        self.expansions = 0

    def fail(self, node: yaml.Node, path: Path, message: str) -> ConfigError:
        return self.error_cls(
            message, file=self.doc.file, line=_mark(node).line, field=format_path(path) or None
        )

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.fail(node, path, f"document too large (more than {MAX_NODES} values)")
        if id(node) in self.seen:
            self.expansions += 1
            if self.expansions > MAX_ALIAS_EXPANSIONS:
                raise self.fail(node, path, "document too large (too many alias expansions)")
        else:
            self.seen.add(id(node))
        if len(path) > MAX_DEPTH:
            raise self.fail(node, path, f"nested deeper than {MAX_DEPTH} levels")
        self.doc.values.setdefault(path, _mark(node))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(child, (*path, i)) for i, child in enumerate(node.value)]
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as e:
            raise self.fail(node, path, f"invalid value: {e.problem or e.context}") from None
        except yaml.YAMLError as e:
            raise self.fail(node, path, f"invalid value: {e}") from None

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        try:
            self.loader.flatten_mapping(node)  # resolves "<<" merge keys
        except yaml.YAMLError as e:
            raise self.fail(node, path, f"invalid merge: {e}") from None
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(key_node, path, "mapping keys must be plain scalars")
            key = self.loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise self.fail(key_node, path, "mapping keys must be plain scalars")
            child = (*path, key if isinstance(key, str | int) else str(key))
            if key in out:
                raise self.fail(key_node, child, "duplicate key")
            self.doc.keys[child] = _mark(key_node)
            out[key] = self.build(value_node, child)
        return out


def _documents(text: str, file: str, error_cls: type[ConfigError]) -> Iterator[YamlDocument]:
    loader = yaml.SafeLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node said there is one
                break
            doc = YamlDocument(data=None, file=file, index=index, start=_mark(node))
            doc.data = _Builder(doc, loader, error_cls).build(node, ())
            yield doc
            index += 1
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = e.problem or e.context or "malformed YAML"
        raise error_cls(f"malformed YAML: {problem}", file=file, line=line) from None
    except yaml.YAMLError as e:
        raise error_cls(f"malformed YAML: {e}", file=file) from None
    finally:
        loader.dispose()


def load_documents(
    text: str | bytes, *, file: str = "<string>", error_cls: type[ConfigError] = ConfigError
) -> list[YamlDocument]:
    """Every document of a YAML stream, empty documents included (their ``data`` is None)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error_cls(f"not UTF-8 text: {e.reason} at byte {e.start}", file=file) from None
    return list(_documents(text, file, error_cls))


def load_file(
    path: str | os.PathLike[str], *, error_cls: type[ConfigError] = ConfigError
) -> list[YamlDocument]:
    """Read and parse one YAML file (see :func:`load_documents`)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error_cls(f"cannot read: {e.strerror}", file=name) from None
    return load_documents(raw, file=name, error_cls=error_cls)
