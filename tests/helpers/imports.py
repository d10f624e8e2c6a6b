"""What an import statement names, for the tests that walk the source's imports."""

from __future__ import annotations

import ast


def imported_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` statement reads, relative imports resolved
    against ``package`` (the package of the file the statement is in)."""
    if not node.level:
        return node.module or ""
    anchor = package.split(".")
    anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
    return ".".join([*anchor, node.module] if node.module else anchor)
