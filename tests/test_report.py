"""metrics/results.md from small hand-made metrics shaped like the stages' JSON (plot data: test_plots.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from slimcore_pipeline.config import Params, parse_params
from slimcore_pipeline.results_table import EXTRA_COLUMNS, SEED_COLUMNS, results_markdown

ROOT = Path(__file__).resolve().parents[1]

# The seed's pruning table (seed-results.md), column by column, and the name each has here:
# the seed's "model size/MB" columns hold parameter counts in millions (134.68 for VGG-16-BN).
SEED_HEADER = ["arch", "flops/G", "model size/MB", "slim", "predict pruning ratio", "true pruning ratio",
               "Flops after pruning", "Model size after pruning", "top1", "top5"]
OURS_FOR_SEED = {"arch": "arch", "flops/G": "FLOPs/G", "model size/MB": "params/M", "slim": "slim",
                 "predict pruning ratio": "requested", "true pruning ratio": "true ratio",
                 "Flops after pruning": "FLOPs after/G", "Model size after pruning": "params after/M",
                 "top1": "top1", "top5": "top5"}


def _params(**changes: Any) -> Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["archs"] = ["vgg16_bn", "resnet50"]
    raw["penalty"]["strength"] = {"vgg16_bn": 1e-4, "resnet50": 0.01}
    raw["prune"]["targets"] = [0.2, 0.5]
    raw.update(changes)
    return parse_params(raw)


def _ev(top1: float, top5: float = 1.0) -> dict[str, float]:
    return {"top1": top1, "top5": top5, "loss": 0.5}


def _prof(flops: float, params: int, size: int) -> dict[str, Any]:
    return {"flops": flops, "params": params, "bytes": size}


# Shaped like metrics/eval.json, metrics/profile.json and metrics/prune/ARCH-R.json: one sparse model per
# target (sparse-T, its penalty sized for T alone).
EVALS: dict[str, dict[str, dict[str, float]]] = {
    "vgg16_bn": {
        "baseline": _ev(0.8106, 0.9577), "sparse-0.2": _ev(0.8112, 0.9575), "sparse-0.5": _ev(0.8001, 0.9511),
        "pruned-0.2": _ev(0.5), "pruned-0.2-nofold": _ev(0.1234567), "finetuned-0.2": _ev(0.8067, 0.9516),
        "pruned-0.5": _ev(0.25), "pruned-0.5-nofold": _ev(0.125), "finetuned-0.5": _ev(0.7762, 0.9397),
    },
    "resnet50": {
        "baseline": _ev(0.9805), "sparse-0.2": _ev(0.95265, 0.99721), "sparse-0.5": _ev(0.97214, 0.99443),
        "pruned-0.2": _ev(0.94986), "finetuned-0.2": _ev(0.96657),  # no -nofold entry
        "pruned-0.5": _ev(float("nan")), "pruned-0.5-nofold": _ev(0.0), "finetuned-0.5": _ev(0.97493),
    },
}
PROFILE: dict[str, dict[str, Any]] = {
    "vgg16_bn": {
        "image_size": 224,
        "baseline": _prof(150.0e9, 134_678_692, 538_800_000),
        "sparse-0.2": _prof(150.0e9, 134_678_692, 538_800_000),
        "sparse-0.5": _prof(150.0e9, 134_678_692, 538_800_000),
        "finetuned-0.2": _prof(15.5e9, 130_310_000, 521_240_000),
        "finetuned-0.5": _prof(2.45e9, 120_730_000, 482_920_000),
    },
    "resnet50": {
        "image_size": 16,
        "baseline": _prof(5_551_000, 375_762, 1_520_000),
        "sparse-0.2": _prof(5_551_000, 375_762, 1_520_000),
        "sparse-0.5": _prof(5_551_000, 375_762, 1_520_000),
        "finetuned-0.2": _prof(2_801_234, 193_768, 886_000),
        "finetuned-0.5": _prof(833_000, 40_000, 263_000),
    },
}
PRUNES: dict[str, dict[str, dict[str, Any]]] = {  # arch -> target tag -> prune report
    "vgg16_bn": {"0.2": {"requested_ratio": 0.2, "true_ratio": 0.1875}, "0.5": {"requested_ratio": 0.5,
                                                                                 "true_ratio": 0.5}},
    "resnet50": {"0.2": {"requested_ratio": 0.2, "true_ratio": 0.2}, "0.5": {"requested_ratio": 0.5,
                                                                              "true_ratio": 0.49996}},
}


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Each ``## ARCH pruning`` table as rows of cells (header first, separator dropped)."""
    tables: dict[str, list[list[str]]] = {}
    current = None
    for line in markdown.splitlines():
        if line.startswith("## ") and line.endswith(" pruning"):
            current = line[3:-len(" pruning")]
            tables[current] = []
        elif current and line.startswith("|") and not line.startswith("|:"):
            tables[current].append([cell.strip() for cell in line.strip("|").split("|")])
        elif current and tables[current] and not line.strip():
            current = None
    return tables


@pytest.fixture(scope="module")
def markdown() -> str:
    return results_markdown(_params(), EVALS, PROFILE, PRUNES)


def test_header_keeps_the_seeds_columns_in_the_seeds_order(markdown: str) -> None:
    header = _tables(markdown)["vgg16_bn"][0]
    assert header[:len(SEED_HEADER)] == [OURS_FOR_SEED[c] for c in SEED_HEADER]
    assert header[len(SEED_HEADER):] == EXTRA_COLUMNS
    assert len(SEED_COLUMNS) == len(SEED_HEADER)
    # each row's own sparse model, right before that model pruned
    assert header.index("top1 sparse") + 1 == header.index("top1 pruned (no FT)")
    lines = markdown.splitlines()
    header_line = next(i for i, line in enumerate(lines) if line.startswith("| arch |"))
    assert lines[header_line + 1] == "|" + "|".join([":---:"] * len(header)) + "|"


def test_small_models_report_flops_in_megas(markdown: str) -> None:
    header = _tables(markdown)["resnet50"][0]
    assert header[1] == "FLOPs/M" and header[6] == "FLOPs after/M"


def test_one_row_per_arch_and_ratio_with_formatted_numbers(markdown: str) -> None:
    tables = _tables(markdown)
    assert list(tables) == ["vgg16_bn", "resnet50"]
    vgg, resnet = tables["vgg16_bn"][1:], tables["resnet50"][1:]
    # no test_images in these evals (an older eval.json): no interval and no noise mark
    assert vgg == [
        ["vgg16_bn", "150.00", "134.679", "1e-4", "20%", "18.75%", "15.500", "130.310", "80.670", "95.160",
         "n/a", "-0.39", "10.3%", "9.68x", "81.120", "50.000", "12.346", "521.240", "18.75%"],
        ["vgg16_bn", "150.00", "134.679", "1e-4", "50%", "50.00%", "2.450", "120.730", "77.620", "93.970",
         "n/a", "-3.44", "1.6%", "61.22x", "80.010", "25.000", "12.500", "482.920", "50.00%"],
    ]
    assert resnet == [
        ["resnet50", "5.551", "0.376", "1e-2", "20%", "20.00%", "2.801", "0.194", "96.657", "100.000",
         "n/a", "-1.39", "50.5%", "1.98x", "95.265", "94.986", "n/a", "0.886", "20.00%"],
        ["resnet50", "5.551", "0.376", "1e-2", "50%", "50.00%", "0.833", "0.040", "97.493", "100.000",
         "n/a", "-0.56", "15.0%", "6.66x", "97.214", "n/a", "0.000", "0.263", "50.00%"],
    ]
    assert "Test set: size not recorded in metrics/eval.json" in markdown


def test_training_summaries_follow_the_seeds_format(markdown: str) -> None:
    lines = markdown.splitlines()
    start = lines.index("## vgg16_bn")
    # the baseline, then one sparse model per target, each saying which target its penalty was sized for
    assert lines[start + 2:start + 10] == [
        "```",
        "# vgg16_bn default training",
        "total -  top1 acc: 81.060  top5 acc: 95.770",
        "# vgg16_bn slim 1e-4 pruning training, sized for 20%",
        "total -  top1 acc: 81.120  top5 acc: 95.750",
        "# vgg16_bn slim 1e-4 pruning training, sized for 50%",
        "total -  top1 acc: 80.010  top5 acc: 95.110",
        "```",
    ]
    assert "total -  top1 acc: 95.265  top5 acc: 99.721" in lines
    assert "total -  top1 acc: 97.214  top5 acc: 99.443" in lines


def test_preamble_describes_the_run(markdown: str) -> None:
    assert markdown.startswith("# Training Results\n")
    assert "do not edit" in markdown
    assert "Data: `digits` at 16px; models: stem `cifar`, width 0.125;" in markdown
    assert ("training 10 epochs (the baseline, and one sparse model per prune target, its penalty sized for that "
            "target alone), fine-tuning 3 epochs; seed 0.") in markdown
    assert "slimcore_pipeline/noise.py" in markdown and "slimcore/noise.py" not in markdown
    assert "(1 thread)" not in markdown and "timings/latency.md" in markdown  # wall-clock lives apart
    sections = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert sections == ["## vgg16_bn", "## vgg16_bn pruning", "## resnet50", "## resnet50 pruning"]


def test_only_the_configured_archs_and_ratios_are_reported() -> None:
    params = _params(archs=["resnet50"], prune={**_params().prune.model_dump(), "targets": [0.5]})
    tables = _tables(results_markdown(params, EVALS, PROFILE, PRUNES))
    assert list(tables) == ["resnet50"]
    assert [row[4] for row in tables["resnet50"][1:]] == ["50%"]


@pytest.mark.parametrize("value,text", [(1e-4, "1e-4"), (1e-5, "1e-5"), (1.5e-2, "1.5e-2"), (0.0, "0"), (2e-3, "2e-3")])
def test_sparsity_is_written_as_the_seed_wrote_it(value: float, text: str) -> None:
    from slimcore_pipeline.results_table import format_strength

    assert format_strength(value) == text


def test_summary_keys_ratios_by_position_with_percent_accuracy() -> None:
    """The declared metrics: names stable across ratio lists (r1, r2...) and across archs (the file
    names the arch), fine-tuned top-1 and MACs kept first; the details keep the rest."""
    from slimcore_pipeline.results_table import details, summary

    out = summary("vgg16_bn", _params(), EVALS["vgg16_bn"], PROFILE["vgg16_bn"], PRUNES["vgg16_bn"])
    assert out == {"r1": {"top1": 80.67, "macs_kept": 10.33},
                   "r2": {"top1": 77.62, "macs_kept": out["r2"]["macs_kept"]}, "baseline": {"top1": 81.06}}
    assert list(out["r1"]) == ["top1", "macs_kept"] and 0 < out["r2"]["macs_kept"] < 100
    got = details("vgg16_bn", _params(), EVALS["vgg16_bn"], PROFILE["vgg16_bn"], PRUNES["vgg16_bn"])
    assert list(got) == ["baseline", "r1", "r2"]  # no arch-level sparse model: each target has its own
    assert got["baseline"] == {"top1": 81.06, "top5": 95.77, "mflops": 150000.0, "params": 134_678_692}
    assert got["r1"] == {"target": "0.2", "ratio": 0.2, "removed_pct": 18.75, "removed_all_bn_pct": 18.75,
                         "top1_sparse": 81.12, "top1_pruned": 50.0, "top1": 80.67, "top5": 95.16, "macs_kept": 10.33,
                         "mflops": 15500.0, "params": 130_310_000}
    assert got["r2"]["ratio"] == 0.5 and got["r2"]["top1"] == 77.62 and got["r2"]["top1_sparse"] == 80.01
    flat = json.dumps([out, got])
    assert "latency" not in flat and "seconds" not in flat


def test_targets_beyond_the_ratio_show_what_was_requested() -> None:
    """The requested column names the target: FLOPs 50%, params 30%, safe (the ratio it resolved to)."""
    from slimcore_pipeline.results_table import details

    params = _params(archs=["resnet50"], prune={**_params().prune.model_dump(),
                                                "targets": [0.2, "flops0.5", "params0.3", "safe"]})
    evals = {"baseline": _ev(0.9)}
    profile = {"baseline": _prof(5_551_000, 375_762, 1_520_000)}
    prunes = {}
    for tag, ratio in (("0.2", 0.2), ("flops0.5", 0.31), ("params0.3", 0.52), ("safe", 0.45)):
        evals[f"sparse-{tag}"] = _ev(0.85 + ratio / 10)
        evals[f"pruned-{tag}"], evals[f"finetuned-{tag}"] = _ev(0.5), _ev(0.8)
        profile[f"finetuned-{tag}"] = _prof(2_000_000, 100_000, 400_000)
        prunes[tag] = {"target": tag, "requested_ratio": ratio, "true_ratio": ratio}
    rows = _tables(results_markdown(params, {"resnet50": evals}, {"resnet50": profile}, {"resnet50": prunes}))
    assert [row[4] for row in rows["resnet50"][1:]] == ["20%", "FLOPs 50%", "params 30%", "safe (45%)"]
    assert [row[5] for row in rows["resnet50"][1:]] == ["20.00%", "31.00%", "52.00%", "45.00%"]
    got = details("resnet50", params, evals, profile, prunes)
    assert [(got[f"r{i}"]["target"], got[f"r{i}"]["ratio"], got[f"r{i}"]["top1_sparse"]) for i in range(1, 5)] == [
        ("0.2", 0.2, 87.0), ("flops0.5", 0.31, 88.1), ("params0.3", 0.52, 90.2), ("safe", 0.45, 89.5)]
    markdown = results_markdown(params, {"resnet50": evals}, {"resnet50": profile}, {"resnet50": prunes})
    assert [line for line in markdown.splitlines() if "pruning training" in line] == [
        f"# resnet50 slim 1e-2 pruning training, sized for {label}"
        for label in ("20%", "FLOPs 50%", "params 30%", "safe (45%)")]
    header, *rows = _tables(markdown)["resnet50"]
    assert [row[header.index("top1 sparse")] for row in rows] == ["87.000", "88.100", "90.200", "89.500"]


def _sensitivity(arch: str, safe: float, reference: float = 97.2222) -> dict[str, Any]:
    """Shaped like metrics/sensitivity/ARCH-T.json (only what the report reads)."""
    return {"arch": arch, "max_drop": 2.0, "reference_top1": reference, "safe_ratio": safe,
            "points": [{"ratio": 0.4, "top1": 96.5}, {"ratio": 0.45, "top1": 95.5556}, {"ratio": 0.5, "top1": 90.0}]}


SENSITIVITY = {  # arch -> target tag -> the sensitivity of that target's own sparse model
    "vgg16_bn": {"0.2": _sensitivity("vgg16_bn", 0.45), "0.5": _sensitivity("vgg16_bn", 0.5, 98.0)},
    "resnet50": {"0.2": _sensitivity("resnet50", 0.0), "0.5": _sensitivity("resnet50", 0.4, 97.0)},
}


def test_each_target_shows_the_safe_ratio_of_its_own_sparse_model_beside_its_pruning_table() -> None:
    from slimcore_pipeline.results_table import details, summary

    markdown = results_markdown(_params(), EVALS, PROFILE, PRUNES, SENSITIVITY)
    lines = markdown.splitlines()
    budget = "(validation top-1 drop <= 2 pt before fine-tuning)"
    vgg = [f"Safe ratio of the sparse model for 20% {budget}: 45% (validation top-1 97.22 -> 95.56; "
           "[metrics/sensitivity/vgg16_bn-0.2.json](sensitivity/vgg16_bn-0.2.json))",
           f"Safe ratio of the sparse model for 50% {budget}: 50% (validation top-1 98.00 -> 90.00; "
           "[metrics/sensitivity/vgg16_bn-0.5.json](sensitivity/vgg16_bn-0.5.json))"]
    # a safe ratio of 0 says by how much the smallest ratio fails, not "97.22 -> 97.22"
    resnet = [f"Safe ratio of the sparse model for 20% {budget}: 0% (the smallest ratio tried, 40%, fails: "
              "validation top-1 97.22 -> 96.50; "
              "[metrics/sensitivity/resnet50-0.2.json](sensitivity/resnet50-0.2.json))",
              f"Safe ratio of the sparse model for 50% {budget}: 40% (validation top-1 97.00 -> 96.50; "
              "[metrics/sensitivity/resnet50-0.5.json](sensitivity/resnet50-0.5.json))"]
    # right after its own pruning table, one line per target in the targets' order, before the next arch's section
    at = lines.index("## vgg16_bn pruning")
    assert [lines.index(line) for line in vgg] == [at + 7, at + 9] and at + 9 < lines.index("## resnet50")
    at = lines.index("## resnet50 pruning")
    assert [lines.index(line) for line in resnet] == [at + 7, at + 9]
    assert _tables(markdown) == _tables(results_markdown(_params(), EVALS, PROFILE, PRUNES))  # tables unchanged
    assert "Safe ratio" not in results_markdown(_params(), EVALS, PROFILE, PRUNES)
    # the declared metrics stay narrow: the safe ratios are in the details, per target
    got = summary("vgg16_bn", _params(), EVALS["vgg16_bn"], PROFILE["vgg16_bn"], PRUNES["vgg16_bn"])
    assert list(got) == ["r1", "r2", "baseline"] and "safe_ratio" not in json.dumps(got)
    more = details("vgg16_bn", _params(), EVALS["vgg16_bn"], PROFILE["vgg16_bn"], PRUNES["vgg16_bn"],
                   SENSITIVITY["vgg16_bn"])
    assert list(more) == ["baseline", "r1", "r2"]
    assert (more["r1"]["safe_ratio"], more["r2"]["safe_ratio"]) == (0.45, 0.5)
    assert "safe_ratio" not in details("vgg16_bn", _params(), EVALS["vgg16_bn"], PROFILE["vgg16_bn"],
                                       PRUNES["vgg16_bn"])["r1"]


def test_a_target_without_a_sensitivity_report_has_no_safe_ratio_line() -> None:
    sens = {"vgg16_bn": {"0.5": SENSITIVITY["vgg16_bn"]["0.5"]}}
    lines = results_markdown(_params(), EVALS, PROFILE, PRUNES, sens).splitlines()
    assert [line for line in lines if "Safe ratio" in line] == [
        "Safe ratio of the sparse model for 50% (validation top-1 drop <= 2 pt before fine-tuning): 50% (validation "
        "top-1 98.00 -> 90.00; [metrics/sensitivity/vgg16_bn-0.5.json](sensitivity/vgg16_bn-0.5.json))"]


def _with_test_images(evals: dict[str, dict[str, dict[str, float]]], n: int) -> dict[str, Any]:
    return {arch: {label: {**ev, "test_images": n} for label, ev in models.items()} for arch, models in evals.items()}


def test_each_top1_has_its_95_interval_and_a_mark_when_within_noise_of_the_baseline() -> None:
    """359 test images (the digits default): one image is 0.28 pt; ~2 pt either way is noise."""
    evals = _with_test_images(EVALS, 359)
    markdown = results_markdown(_params(), evals, PROFILE, PRUNES)
    header, *rows = _tables(markdown)["resnet50"]
    col = {name: header.index(name) for name in ("top1", "top1 95% CI", "top1 vs baseline", "top1 sparse",
                                                  "top1 pruned (no FT)", "top1 pruned, no fold")}
    # baseline 98.05; fine-tuned 96.657 (347/359) lies inside the baseline's interval: within noise;
    # each row's "top1 sparse" is that target's own sparse model: 95.265 (beyond noise), 97.214 (within)
    assert [rows[0][col[c]] for c in col] == ["96.657", "94.2-98.1", "-1.39 ~", "95.265", "94.986", "n/a"]
    assert [rows[1][col[c]] for c in col] == ["97.493", "95.3-98.7", "-0.56 ~", "97.214 ~", "n/a", "0.000"]
    lines = markdown.splitlines()
    assert ("Test set: 359 images (one image = 0.28 pt). Top-1 with its 95% interval: baseline 98.05 "
            "(96.0-99.1); sparse for 20% 95.27 (92.5-97.0), beyond noise from the baseline; "
            "sparse for 50% 97.21 (94.9-98.5), within noise of the baseline.") in lines
    assert "Noise: each arch's test-set size is under its training summary" in markdown
    # vgg16_bn's pruned (no FT) at 50.0 is far outside; its fine-tuned 80.67 vs 81.06: within noise
    vgg_header, *vgg = _tables(markdown)["vgg16_bn"]
    assert vgg[0][vgg_header.index("top1 vs baseline")] == "-0.39 ~"
    assert vgg[0][vgg_header.index("top1 pruned (no FT)")] == "50.000"
    assert [row[vgg_header.index("top1 sparse")] for row in vgg] == ["81.120 ~", "80.010 ~"]


def test_noise_intervals_and_the_within_noise_rule() -> None:
    from slimcore_pipeline.noise import accuracy_interval, image_points, wilson_interval, within_noise

    lo, hi = wilson_interval(351, 359)  # 97.77% on the digits test set
    assert (round(100 * lo, 2), round(100 * hi, 2)) == (95.67, 98.87)
    assert wilson_interval(359, 359)[1] == 1.0 and wilson_interval(359, 359)[0] < 0.99  # never zero-width
    assert wilson_interval(0, 359)[0] == 0.0 and wilson_interval(5, 0) == (0.0, 1.0)
    assert accuracy_interval(351 / 359, 359) == (lo, hi)
    assert image_points(359) == pytest.approx(0.2786, abs=1e-4)
    # 7 images (1.95 pt) apart: within noise at 359 images; far beyond it at 10000 images
    assert within_noise(351 / 359, 344 / 359, 359) and within_noise(344 / 359, 351 / 359, 359)
    assert not within_noise(0.9777, 0.9582, 10_000)
    assert not within_noise(351 / 359, 269 / 359, 359)  # resnet50 without folding: 74.93 is a real loss
    # the difference of two proportions: 1.01 pt at 10000 images near 78% is not a result (its 95%
    # interval is +-1.15 pt), although each accuracy lies outside the other's own +-0.8 pt interval
    assert within_noise(0.7750, 0.7851, 10_000) and not within_noise(0.7750, 0.7900, 10_000)


def test_speedup_targets_and_macs_kept_on_every_row() -> None:
    """speedupS: requested 'speed-up 2x'; every row says the MACs kept and the MAC speed-up."""
    params = _params(archs=["resnet50"], prune={**_params().prune.model_dump(),
                                                "targets": [0.2, "speedup2", "flops0.5", "speedup1.5"]})
    base = 5_551_000
    evals = {"baseline": _ev(0.9)}
    profile = {"baseline": _prof(base, 375_762, 1_520_000)}
    prunes = {}
    for tag, ratio, flops in (("0.2", 0.2, 4_440_800), ("speedup2", 0.31, 2_734_000), ("flops0.5", 0.31, 2_734_000),
                              ("speedup1.5", 0.2, 3_700_667)):
        evals[f"sparse-{tag}"] = _ev(0.9)
        evals[f"pruned-{tag}"], evals[f"finetuned-{tag}"] = _ev(0.5), _ev(0.8)
        profile[f"finetuned-{tag}"] = _prof(flops, 100_000, 400_000)
        prunes[tag] = {"target": tag, "requested_ratio": ratio, "true_ratio": ratio}
    header, *rows = _tables(results_markdown(params, {"resnet50": evals}, {"resnet50": profile},
                                             {"resnet50": prunes}))["resnet50"]
    got = [(r[header.index("requested")], r[header.index("MACs kept")], r[header.index("speed-up")]) for r in rows]
    assert got == [("20%", "80.0%", "1.25x"), ("speed-up 2x", "49.3%", "2.03x"), ("FLOPs 50%", "49.3%", "2.03x"),
                   ("speed-up 1.5x", "66.7%", "1.50x")]
    from slimcore_pipeline.results_table import details, summary

    out = details("resnet50", params, evals, profile, prunes)
    assert out["r2"]["target"] == "speedup2" and out["r4"]["target"] == "speedup1.5"
    assert [summary("resnet50", params, evals, profile, prunes)[f"r{i}"]["macs_kept"] for i in range(1, 5)] == [
        80.0, 49.25, 49.25, 66.67]


def _sparsity_report(**extra: Any) -> dict[str, Any]:
    points = [{"ratio": r, "top1": 97.2222, "threshold": 0.3 + r} for r in (0.05, 0.1, 0.15)]
    return {"arch": "vgg16_bn", "max_drop": 2.0, "step": 0.05, "reference_top1": 97.2222, "safe_ratio": 0.0,
            "policy": {"warn_gamma": 0.01}, "points": points, **extra}


def test_a_sparse_model_with_no_sparsity_says_so_in_one_line_instead_of_a_safe_ratio() -> None:
    from slimcore_pipeline.results_table import no_sparsity, safe_ratio_line

    line = safe_ratio_line("vgg16_bn", 0.2, _sparsity_report(warn_gamma=0.01, gammas_below_warn=0.002))
    assert line == ("sparse-train reached no sparsity for 20%: 0.2% of BN gammas below 0.01; "
                    "raise penalty.strength.vgg16_bn or train.epochs "
                    "(safe ratio 0%; [metrics/sensitivity/vgg16_bn-0.2.json](sensitivity/vgg16_bn-0.2.json))")
    assert "\n" not in line and "Safe ratio" not in line
    # an older report without gammas_below_warn: the grid's thresholds (all above warn_gamma) decide
    assert safe_ratio_line("vgg16_bn", "flops0.5", _sparsity_report()).startswith(
        "sparse-train reached no sparsity for FLOPs 50%: fewer than 5% of BN channels scoring below 0.01; "
        "raise penalty.strength.vgg16_bn")
    # sparse enough: the safe ratio line as before; a safe target names the ratio it resolved to
    assert no_sparsity(_sparsity_report(gammas_below_warn=0.62))[0] is False
    assert safe_ratio_line("vgg16_bn", "safe", {**_sparsity_report(gammas_below_warn=0.62), "safe_ratio": 0.1},
                           {"requested_ratio": 0.1}).startswith(
        "Safe ratio of the sparse model for safe (10%) (validation top-1 drop <= 2 pt before fine-tuning): 10% "
        "(validation top-1 97.22 -> 97.22; [metrics/sensitivity/vgg16_bn-safe.json]")
    thresholds = _sparsity_report()
    thresholds["points"][1]["threshold"] = 0.0
    assert no_sparsity(thresholds) == (False, "at least 10% of BN channels scoring below 0.01")


def test_the_evaluate_stage_prints_each_targets_sparse_pruned_and_fine_tuned_top1_with_its_safe_ratio() -> None:
    from rich.console import Console

    from stages.evaluate import console_table

    sens = {"vgg16_bn": {"0.2": {"safe_ratio": 0.45}}}  # resnet50 and vgg16_bn's 0.5: no report
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(console_table(_params(), EVALS, sens))
    text = console.export_text()
    assert "0.2: sparse / pruned / FT" in text and "0.5: sparse / pruned / FT" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 2}
    assert "81.12 / 50.00 / 80.67" in rows["vgg16_bn"] and "80.01 / 25.00 / 77.62" in rows["vgg16_bn"]
    assert "95.27 / 94.99 / 96.66" in rows["resnet50"] and "97.21 / nan / 97.49" in rows["resnet50"]
    assert "safe 0.45" in text and text.count("safe 0.") == 1
    assert "drop <= 2 pt" in text
