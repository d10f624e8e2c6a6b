"""bench/peers.py's table: the rows of one call, and runs of other speed-ups left out, not a crash."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _peers() -> Any:
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _score(top1: float) -> dict[str, float]:
    return {"top1": top1, "low": top1 - 0.8, "high": top1 + 0.8, "n": 10000}


def _cell(before: float, after: float) -> dict[str, Any]:
    return {"macs_kept": 0.5, "before": _score(before), "after": _score(after)}


def test_table_marks_the_best_skips_runs_of_other_speedups_and_gives_each_cell_its_sparse_model() -> None:
    peers = _peers()
    results = {"vgg16_bn": {"baseline": _score(77.78), "methods": {
        "slimcore": {"sparse": _score(78.0), "cells": {"2": {**_cell(80.26, 81.27), "sparse": _score(80.23)},
                                                       "4": {**_cell(77.10, 79.02), "sparse": _score(78.0)}}},
        "slimcore:penalty.ramp_epochs=2": {"sparse": _score(53.18), "cells": {"4": _cell(53.11, 51.48)}},
        "tp-bnscale": {"sparse": _score(82.03), "cells": {"2": _cell(18.04, 79.50), "4": _cell(10.0, 77.01)}},
    }}}
    lines = peers.table(results, [2.0, 4.0]).splitlines()
    two = [line for line in lines if "| 2x |" in line]
    assert [line.split("|")[3].strip() for line in two] == ["slimcore", "tp-bnscale"]  # the 4x-only run: not at 2x
    assert "| 80.23 [79.4, 81.0] |" in two[0] and "**81.27 [80.5, 82.1]**" in two[0]  # its own sparse model
    assert two[0].endswith("| +1.77 |")  # beyond noise: 95% interval of the difference ~ +-1.17
    four = [line for line in lines if "| 4x |" in line]
    assert len(four) == 3 and "| 78.00 [77.2, 78.8] |" in four[0] and four[1].endswith("| -25.53 |")
