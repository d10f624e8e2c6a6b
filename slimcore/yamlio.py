"""YAML reading that refuses what DVC refuses: a mapping key given twice.

PyYAML's ``safe_load`` silently keeps the last of two equal keys, while DVC refuses such a
params.yaml; the stages read it with :func:`safe_load_unique` so both agree, and the error
names the key (dotted, as params are named) and both lines.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice."""

    def __init__(self, key: str, first_line: int, line: int) -> None:
        super().__init__(f"{key}: given twice (lines {first_line} and {line}); DVC refuses such a file: keep one")
        self.key, self.first_line, self.line = key, first_line, line


def _check(node: yaml.Node, path: str) -> None:
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check(item, f"{path}[{i}]")
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
            _check(value_node, key)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate mapping keys (:class:`DuplicateKeyError`)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None:
        _check(node, "")
    return yaml.safe_load(text)


__all__ = ["DuplicateKeyError", "safe_load_unique"]
