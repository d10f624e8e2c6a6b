"""`make compare` (slimcore_pipeline.compare) and `make dag` (slimcore_pipeline.dag), on DVC's JSON and dot output."""

from __future__ import annotations

from slimcore_pipeline.compare import render, rows
from slimcore_pipeline.dag import edges_of, mermaid


def _diff() -> dict:
    """Shaped like `dvc exp diff --json --all main targets-0.3-0.5` (values abridged)."""
    def m(old, new):
        if isinstance(old, list):  # DVC writes list params as text
            return {"old": str(old), "new": str(new)}
        return {"old": old, "new": new, "diff": None if old is None or new is None else new - old}

    metrics = {}
    for arch in ("vgg16_bn", "mobilenet_v2"):
        metrics[f"metrics/summary/{arch}.json"] = {
            "r1.top1": m(98.05, 97.77), "r1.macs_kept": m(80.9, 71.2), "r2.top1": m(98.05, 97.77),
            "r2.macs_kept": m(61.64, 53.9), "r3.top1": m(98.05, None), "r3.macs_kept": m(33.13, None),
            "baseline.top1": m(97.77, 97.77), "safe_ratio": m(0.6, 0.6)}
    return {"metrics": metrics, "params": {"params.yaml": {"prune.targets": m([0.2, 0.4, 0.6], [0.3, 0.5]),
                                                           "prune.round_to": m(1, 1),
                                                           "seed": m(0, 0)}}}


def test_one_row_per_arch_and_slot_with_each_runs_target() -> None:
    got = rows(_diff())
    assert [(r["arch"], r["slot"]) for r in got] == [("mobilenet_v2", "r1"), ("mobilenet_v2", "r2"),
                                                      ("mobilenet_v2", "r3"), ("vgg16_bn", "r1"), ("vgg16_bn", "r2"),
                                                      ("vgg16_bn", "r3")]
    assert got[3] == {"arch": "vgg16_bn", "slot": "r1", "old.target": "0.2", "new.target": "0.3", "old.top1": 98.05,
                      "new.top1": 97.77, "old.macs_kept": 80.9, "new.macs_kept": 71.2}
    assert got[5]["new.target"] is None and got[5]["new.top1"] is None


def test_the_table_fits_160_columns_and_marks_missing_slots() -> None:
    text = render(_diff(), "main", "targets-0.3-0.5")
    lines = text.splitlines()
    assert max(map(len, lines)) <= 160 and len(lines) == 7
    assert lines[0].split()[:4] == ["arch", "slot", "main", "target"]
    assert lines[4].split() == ["vgg16_bn", "r1", "0.2", "98.05", "80.90", "0.3", "97.77", "71.20", "-0.28", "-9.70"]
    assert lines[6].split() == ["vgg16_bn", "r3", "0.6", "98.05", "33.13", "-", "-", "-", "-", "-"]
    assert "no metrics/summary" in render({"metrics": {}, "params": {}}, "a", "b")


def test_dag_keeps_one_archs_stages_and_the_shared_ones() -> None:
    dot = "\n".join(['strict digraph {', '"baseline-train@vgg16_bn" -> "sparse-train@vgg16_bn-0.2";',
                     '"baseline-train@resnet50" -> "sparse-train@resnet50-0.2";',
                     '"sparse-train@vgg16_bn-0.2" -> "sensitivity@vgg16_bn-0.2";',
                     '"sensitivity@vgg16_bn-0.2" -> "prune@vgg16_bn-0.2";',
                     '"sparse-train@vgg16_bn-0.2" -> "prune@vgg16_bn-0.2";', '"prune@vgg16_bn-0.2" -> "evaluate";',
                     '"sparse-train@resnet50-0.2" -> "prune@resnet50-0.2";', '"prune@resnet50-0.2" -> "evaluate";',
                     '}'])
    chart = mermaid(edges_of(dot), "vgg16_bn")
    assert chart.splitlines()[0] == "flowchart LR" and "resnet50" not in chart
    assert chart.count("-->") == 5 and '["evaluate"]' in chart and '["sensitivity@vgg16_bn-0.2"]' in chart
    assert chart.index("baseline-train") < chart.index("sparse-train") < chart.index("prune@") < chart.index("evaluate")
