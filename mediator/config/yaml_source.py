"""YAML loading that remembers where every value came from.

PyYAML's SafeLoader composes a node tree that carries start marks; we build the plain Python
value ourselves and record (line, column) for every key path, so that a pydantic error location
such as ("channels", 2, "methods", 0) maps back to `channels.yaml:14:7`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mediator.errors import ConfigError, ConfigProblem

KeyPath = tuple[str | int, ...]


@dataclass(slots=True)
class SourcedDocument:
    """A parsed YAML document and the position of each of its values."""

    file: str
    data: Any
    positions: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: Sequence[str | int]) -> tuple[int, int]:
        """Position of the deepest recorded prefix of `path` (pydantic adds non-key parts to locs)."""
        parts = tuple(path)
        while parts:
            if parts in self.positions:
                return self.positions[parts]
            parts = parts[:-1]
        return self.positions.get((), (1, 1))

    def problem(self, path: Sequence[str | int], message: str) -> ConfigProblem:
        line, column = self.position(path)
        dotted = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path).replace(".[", "[")
        text = f"{dotted}: {message}" if dotted else message
        return ConfigProblem(self.file, line, column, text)


def _build(node: yaml.Node, path: KeyPath, doc: SourcedDocument, constructor: yaml.SafeLoader) -> Any:
    # A mapping value is reported at its key (where a reader looks), so keep a position set there.
    doc.positions.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConfigError([ConfigProblem(doc.file, key_node.start_mark.line + 1,
                                                 key_node.start_mark.column + 1,
                                                 f"keys must be strings, got {key!r}")])
            if key in result:
                # PyYAML silently keeps the last duplicate; in a security policy that hides mistakes.
                raise ConfigError([ConfigProblem(doc.file, key_node.start_mark.line + 1,
                                                 key_node.start_mark.column + 1,
                                                 f"duplicate key {key!r}")])
            doc.positions[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = _build(value_node, (*path, key), doc, constructor)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(child, (*path, i), doc, constructor) for i, child in enumerate(node.value)]
    return constructor.construct_object(node, deep=True)


def load_yaml(path: Path, display_name: str | None = None) -> SourcedDocument:
    """Parse one YAML file; syntax errors become a ConfigError with file:line:col."""
    name = display_name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(name, 1, 1, f"cannot read file: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(name, 1, 1, "file is not valid UTF-8")]) from exc
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        doc = SourcedDocument(name, None)
        if root is not None:
            doc.data = _build(root, (), doc, loader)
        return doc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError([ConfigProblem(name, line, col, f"YAML syntax: {exc.problem}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(name, 1, 1, f"YAML: {exc}")]) from exc
    finally:
        loader.dispose()
