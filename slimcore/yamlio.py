"""YAML reading that refuses what DVC refuses: a mapping key given twice.

PyYAML's ``safe_load`` silently keeps the last of two equal keys, while DVC refuses such a
params.yaml; the stages read it with :func:`safe_load_unique` so both agree, and the error
names the key and both lines.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping holds the same key twice."""


class UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` on a repeated mapping key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # reported by the base class
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(
                        None, None,
                        f"key {key!r} appears twice (lines {seen[key]} and {line}); DVC refuses such a file: "
                        "keep one", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate mapping keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=UniqueKeySafeLoader)  # noqa: S506 (a SafeLoader subclass)


__all__ = ["DuplicateKeyError", "UniqueKeySafeLoader", "safe_load_unique"]
