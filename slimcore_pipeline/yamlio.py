"""YAML reading that refuses what DVC refuses (a mapping key given twice) and what would hang.

PyYAML's ``safe_load`` silently keeps the last of two equal keys, while DVC refuses such a
params.yaml; the stages read it with :func:`safe_load_unique` so both agree, and the error
names the key (dotted, as params are named) and both lines.

It also bounds the work before anything is built: the file is composed once (libyaml's parser
when PyYAML has it), each node is visited once however many aliases (``*name``) reuse it, and a
document whose aliases would expand to more than :data:`MAX_EXPANDED_NODES` values (nested
anchors: nine lines that expand 9x each grow to hundreds of millions) or that refers to itself is
refused with :class:`AliasBombError`, naming the key, before it is constructed.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_EXPANDED_NODES = 100_000  # values (scalars, lists, mappings) once every alias is expanded

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice."""

    def __init__(self, key: str, first_line: int, line: int) -> None:
        super().__init__(f"{key}: given twice (lines {first_line} and {line}); DVC refuses such a file: keep one")
        self.key, self.first_line, self.line = key, first_line, line


class AliasBombError(yaml.YAMLError):
    """The document's aliases expand to too many values, or an alias refers to its own anchor."""


def _children(node: yaml.Node) -> list[tuple[str | None, yaml.Node]]:
    """(key or None, child) pairs of a collection node; keys and values of a mapping both count."""
    if isinstance(node, yaml.SequenceNode):
        return [(f"[{i}]", item) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out: list[tuple[str | None, yaml.Node]] = []
        for key_node, value_node in node.value:
            out.append((None, key_node))
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            out.append((name, value_node))
        return out
    return []


def _join(path: str, key: str) -> str:
    if key.startswith("["):
        return f"{path}{key}"
    return f"{path}.{key}" if path else key


def _check_expansion(root: yaml.Node, limit: int) -> None:
    """Refuse aliases that expand past ``limit`` values or form a cycle; each node is sized once."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise AliasBombError(f"{path or 'the top level'}: a YAML alias refers to a mapping or list that "
                                 f"contains it (line {node.start_mark.line + 1}): a cycle; write the values out")
        active.add(key)
        total = 1
        for name, child in _children(node):
            total += size(child, path if name is None else _join(path, name))
            if total > limit:  # no need to size the rest: it is refused already
                break
        active.discard(key)
        sizes[key] = total
        return total

    if size(root, "") <= limit:
        return
    # name the deepest key whose own value is over the limit: there the aliases multiply
    node, path = root, ""
    while True:
        bigger = [(name, child) for name, child in _children(node)
                  if name is not None and sizes.get(id(child), 0) > limit]
        if not bigger:
            break
        name, node = bigger[0]
        path = _join(path, name)
    raise AliasBombError(f"{path or 'the top level'} (line {node.start_mark.line + 1}): its YAML aliases "
                         f"(*name) expand to over {limit:,} values (anchors reused inside anchors multiply); "
                         "write the values out or reuse fewer nested aliases")


def _check(node: yaml.Node, path: str, done: set[int]) -> None:
    if id(node) in done:  # an aliased node: checked where it was first read
        return
    done.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check(item, f"{path}[{i}]", done)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(key, seen[key], line)
            seen[key] = line
            _check(value_node, key, done)


def safe_load_unique(text: str, max_nodes: int = MAX_EXPANDED_NODES) -> Any:
    """``yaml.safe_load`` that refuses duplicate mapping keys (:class:`DuplicateKeyError`) and
    aliases expanding to more than ``max_nodes`` values or into a cycle (:class:`AliasBombError`).

    The text is parsed once; every check runs on the composed nodes, before any object is built.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, max_nodes)
        _check(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


__all__ = ["MAX_EXPANDED_NODES", "AliasBombError", "DuplicateKeyError", "safe_load_unique"]
