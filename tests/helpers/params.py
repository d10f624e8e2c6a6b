"""A tiny copy of the project's params.yaml for tests that run stages: one arch at 8 px, width 1/16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DELETE = object()  # as a value of ``changes``: remove that key


def tiny_params(arch: str, train: dict[str, Any], runtime: dict[str, Any],
                changes: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with ``archs: [arch]``, 8 px images, width 0.0625, ``train``/``runtime``
    updated, then each dotted key of ``changes`` set (or removed with :data:`DELETE`)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["archs"] = [arch]
    params["data"]["image_size"] = 8
    params["model"]["width"] = 0.0625
    params["train"].update(train)
    params["runtime"].update(runtime)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        if value is DELETE:
            node.pop(key)
        else:
            node[key] = value
    return params
