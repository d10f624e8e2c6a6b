"""The charts: plot data (slimcore_pipeline.plotdata), the DVC templates, offline rendering and the offline page."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import vl_convert
import yaml

from slimcore_pipeline import plotdata, render_plots, vega_vendor
from slimcore_pipeline.plotdata import (
    BASELINE,
    CURVE_FIELDS,
    CURVE_METRICS,
    FINETUNED,
    GAMMA_FIELDS,
    PRUNED,
    SPARSE,
    TRADEOFF_FIELDS,
    TRADEOFF_SERIES,
    log_bin_edges,
    write_plot_data,
)

ROOT = Path(__file__).resolve().parents[1]
ARCHS, TARGETS = ["vgg16_bn", "resnet50"], [0.2, 0.5]
TRAIN_EPOCHS, FT_EPOCHS = 4, 2


def _ev(top1: float, top5: float = 1.0) -> dict[str, float]:
    return {"top1": top1, "top5": top5, "loss": 0.5, "test_images": 359}


def _history(epochs: int, top1: float, lr: float) -> list[dict[str, float]]:
    return [{"epoch": e, "lr": lr / e, "train_loss": 2.0 / e, "train_top1": top1,
             "val_top1": top1 - 0.01 * (epochs - e), "val_top5": 1.0,
             "test_top1": float("nan"), "test_top5": float("nan"), "gamma_mean": 0.5, "gamma_small": 0.1,
             "seconds": 1.0} for e in range(1, epochs + 1)]


def _inputs() -> dict[str, Any]:
    """write_plot_data's keyword arguments, shaped like what the evaluate stage gathers: one sparse
    model per target (``sparse-T``, run ``sparse-train-T``), each with its own sensitivity curve."""
    evals, profile, prunes, histories, gammas = {}, {}, {}, {}, {}
    gen = torch.Generator().manual_seed(0)
    for i, arch in enumerate(ARCHS):
        evals[arch] = {"baseline": _ev(0.90 + i / 100, 0.99), "sparse-0.2": _ev(0.88), "sparse-0.5": _ev(0.86, 0.97),
                       "pruned-0.2": _ev(0.85), "pruned-0.2-nofold": _ev(0.5), "finetuned-0.2": _ev(0.8912, 0.987),
                       "pruned-0.5": _ev(float("nan")), "pruned-0.5-nofold": _ev(0.1), "finetuned-0.5": _ev(0.87)}
        flops = {"baseline": 100e6, "sparse-0.2": 100e6, "sparse-0.5": 100e6, "pruned-0.2": 64e6,
                 "pruned-0.2-nofold": 64e6, "finetuned-0.2": 64e6, "pruned-0.5": 25e6, "pruned-0.5-nofold": 25e6,
                 "finetuned-0.5": 25e6}
        profile[arch] = {"image_size": 16, **{k: {"flops": f, "params": int(f / 100), "bytes": int(f / 25)}
                                              for k, f in flops.items()}}
        prunes[arch] = {"0.2": {"requested_ratio": 0.2, "true_ratio": 0.2015, "threshold": 3.2e-5},
                        "0.5": {"requested_ratio": 0.5, "true_ratio": 0.5, "threshold": 0.0123}}
        histories[arch] = {"finetune-0.5": _history(FT_EPOCHS, 0.87, 0.01),  # any order in, fixed order out
                           "sparse-train-0.5": _history(TRAIN_EPOCHS, 0.86, 0.1),
                           "sparse-train-0.2": _history(TRAIN_EPOCHS, 0.88, 0.1),
                           "baseline-train": _history(TRAIN_EPOCHS, 0.9, 0.1),
                           "finetune-0.2": _history(FT_EPOCHS, 0.89, 0.01)}
        sparse_02 = torch.cat([10 ** (torch.rand(300, generator=gen) * 3 - 6), torch.rand(200, generator=gen) + 0.05,
                               torch.zeros(3)])
        sparse_05 = torch.cat([10 ** (torch.rand(400, generator=gen) * 2 - 6), torch.rand(100, generator=gen) + 0.05,
                               torch.zeros(20)])
        gammas[arch] = {"baseline": torch.rand(500, generator=gen) * 0.9 + 0.1, "sparse-0.2": sparse_02,
                        "sparse-0.5": sparse_05}
    return {"archs": ARCHS, "targets": TARGETS, "evals": evals, "profile": profile, "prunes": prunes,
            "histories": histories, "gammas": gammas,
            "sensitivity": {arch: {"0.2": _sensitivity(i), "0.5": _sensitivity(i, 1)} for i, arch in enumerate(ARCHS)}}


def _sensitivity(i: int, j: int = 0) -> dict[str, Any]:
    """Shaped like metrics/sensitivity/ARCH-T.json: a non-monotone curve, one ratio that cannot be slimmed
    (``j`` 0: the 20% target's sparse model; 1: the 50% one's, sparser: it keeps more at every ratio)."""
    curve = {0.25: 97.5, 0.5: 95.0 - i + j, 0.75: None if j == 0 else 95.5 - i}
    # vgg16_bn: safe at 50% (20%'s model), 75% (50%'s); resnet50: at 25%, 50%
    points = [{"ratio": r, "true_ratio": None if t is None else r - 0.01, "ratio_all_bn": None if t is None else r / 2,
               "exact": False, "bound_by": [], "threshold": 0.01, "top1": t, "top5": None if t is None else 99.0,
               "drop": None if t is None else round(98.0 - t, 4), "mflops": None if t is None else 100 * (1 - r),
               "params": None if t is None else int(1000 * (1 - r)), "error": "no" if t is None else None,
               "within_budget": t is not None and 98.0 - t <= 3.0} for r, t in curve.items()]
    safe = 0.0
    for point in points:
        if not point["within_budget"]:
            break
        safe = point["ratio"]
    return {"arch": ARCHS[i], "max_drop": 3.0, "step": 0.25, "reference_top1": 98.0, "reference_top5": 99.5,
            "reference_mflops": 100.0, "reference_params": 1000, "val_images": 144, "image_size": 16,
            "policy": {}, "safe_ratio": safe, "points": points}


def _rows(content: bytes) -> list[dict[str, str]]:
    """CSV rows as DVC reads them: every value a string."""
    return list(csv.DictReader(io.StringIO(content.decode())))


@pytest.fixture(scope="module")
def tables() -> dict[str, list[dict[str, str]]]:
    return {name: _rows(content) for name, content in plotdata.plot_tables(**_inputs()).items()}


# --------------------------------------------------------------------------------------------
# plot data
# --------------------------------------------------------------------------------------------


def test_tradeoff_has_the_baseline_reference_both_curves_and_ratio_labels(tables: dict) -> None:
    rows = [r for r in tables["tradeoff.csv"] if r["arch"] == "resnet50"]
    assert list(rows[0]) == list(TRADEOFF_FIELDS)
    assert [r["series"] for r in rows] == [BASELINE, SPARSE, PRUNED, FINETUNED, SPARSE, PRUNED, FINETUNED]
    baseline = rows[0]
    assert (baseline["top1"], baseline["top5"], baseline["mflops"], baseline["label"]) == ("91", "99", "100", "")
    # one sparse model per target, at the dense FLOPs, labelled with the target it was trained for
    sparse = [r for r in rows if r["series"] == SPARSE]
    assert [(r["label"], r["top1"], r["top5"], r["mflops"]) for r in sparse] == [("20%", "88", "100", "100"),
                                                                                ("50%", "86", "97", "100")]
    assert [r["true_ratio"] for r in sparse] == ["", ""]  # not pruned
    assert [(r["point_label"], r["label_row"]) for r in sparse] == [("20%", ""), ("50%", "")]  # 2 points apart
    pruned = [r for r in rows if r["series"] == PRUNED]
    tuned = [r for r in rows if r["series"] == FINETUNED]
    assert [r["label"] for r in pruned] == [r["label"] for r in tuned] == ["20%", "50%"]
    assert [r["ratio"] for r in tuned] == ["20", "50"] and [r["true_ratio"] for r in tuned] == ["20.15", "50"]
    assert [r["mflops"] for r in pruned] == [r["mflops"] for r in tuned] == ["64", "25"]
    assert [r["top1"] for r in tuned] == ["89.12", "87"]  # percent, as in results.md
    assert tuned[0]["top5"] == "98.7"
    assert [r["top1"] for r in pruned] == ["85", ""]  # NaN accuracy: an empty cell, not a point at 0
    assert set(TRADEOFF_SERIES) == {r["series"] for r in tables["tradeoff.csv"]}


def test_curves_draw_fine_tuning_after_training_in_percent(tables: dict) -> None:
    rows = [r for r in tables["curves.csv"] if r["arch"] == "vgg16_bn"]
    assert list(rows[0]) == list(CURVE_FIELDS)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    # the baseline, then per target its own sparse training and its fine-tuning
    assert runs == ["baseline-train", "sparse-train-0.2", "finetune-0.2", "sparse-train-0.5", "finetune-0.5"]
    first = {run: rows[[r["run"] for r in rows].index(run)] for run in runs}
    assert [int(first[run]["order"]) for run in runs] == [0, 1, 2, 3, 4]
    # a target's sparse training and fine-tuning are one line of work (one colour in the chart)
    assert [first[run]["target"] for run in runs] == [BASELINE, "20%", "20%", "50%", "50%"]
    assert {r["metric"] for r in rows} == set(CURVE_METRICS)

    def epochs(run: str) -> list[int]:
        return [int(r["epoch"]) for r in rows if r["run"] == run and r["metric"] == "lr"]

    assert epochs("baseline-train") == epochs("sparse-train-0.2") == epochs("sparse-train-0.5") == \
        list(range(1, TRAIN_EPOCHS + 1))
    for run in ("finetune-0.2", "finetune-0.5"):
        assert epochs(run) == list(range(TRAIN_EPOCHS + 1, TRAIN_EPOCHS + FT_EPOCHS + 1))
        assert [int(r["run_epoch"]) for r in rows if r["run"] == run and r["metric"] == "lr"] == [1, 2]
    value = {(r["run"], r["run_epoch"], r["metric"]): float(r["value"]) for r in rows}
    assert value[("sparse-train-0.2", "4", "val_top1")] == pytest.approx(88.0)  # percent
    assert value[("sparse-train-0.5", "4", "val_top1")] == pytest.approx(86.0)
    assert value[("sparse-train-0.2", "2", "train_loss")] == pytest.approx(1.0)
    assert value[("finetune-0.2", "2", "lr")] == pytest.approx(0.005)  # the learning rate as is


def test_each_fine_tuning_continues_after_its_own_sparse_training() -> None:
    """finetune-T starts from T's own pruned sparse model: its epochs follow sparse-train-T's last,
    whatever the other sparse trainings (or the baseline) ran."""
    histories = {"finetune-0.5": _history(2, 0.9, 0.1), "sparse-train-0.5": _history(6, 0.9, 0.1),
                 "finetune-0.2": _history(2, 0.9, 0.1), "sparse-train-0.2": _history(3, 0.9, 0.1),
                 "baseline-train": _history(5, 0.9, 0.1)}
    rows = plotdata.curve_rows("a", histories, labels={"0.5": "FLOPs 50%"})

    def epochs(run: str) -> list[int]:
        return [r["epoch"] for r in rows if r["run"] == run and r["metric"] == "lr"]

    assert epochs("finetune-0.2") == [4, 5] and epochs("finetune-0.5") == [7, 8]
    assert epochs("sparse-train-0.2") == [1, 2, 3] and epochs("sparse-train-0.5") == list(range(1, 7))
    assert {r["run"]: r["target"] for r in rows} == {"baseline-train": BASELINE, "sparse-train-0.2": "20%",
                                                     "finetune-0.2": "20%", "sparse-train-0.5": "FLOPs 50%",
                                                     "finetune-0.5": "FLOPs 50%"}
    assert plotdata.run_target("sparse-train-flops0.5") == ("sparse-train", plotdata.parse_target("flops0.5"))
    assert plotdata.run_target("finetune-safe")[0] == "finetune"
    assert plotdata.run_target("baseline-train") is None and plotdata.run_target("sparse-train-nope") is None


def test_curves_without_sparse_training_start_fine_tuning_after_the_baseline() -> None:
    rows = plotdata.curve_rows("a", {"baseline-train": _history(3, 0.9, 0.1), "finetune-0.2": _history(1, 0.9, 0.1)})
    assert [r["epoch"] for r in rows if r["run"] == "finetune-0.2"] == [4, 4, 4]


def test_gamma_histogram_uses_shared_log_bins_and_marks_every_threshold(tables: dict) -> None:
    rows = [r for r in tables["gamma_hist.csv"] if r["arch"] == "vgg16_bn"]
    assert list(rows[0]) == list(GAMMA_FIELDS)
    models = list(dict.fromkeys(r["model"] for r in rows if r["kind"] == "bin"))
    assert models == ["baseline", "sparse-0.2", "sparse-0.5"]  # one histogram per sparse model
    bins = {m: [r for r in rows if r["kind"] == "bin" and r["model"] == m] for m in models}
    zeros = {m: bins[m].pop(0) for m in bins}  # the exact zeros' own bar comes first
    assert {z["label"] for z in zeros.values()} == {plotdata.ZERO_BIN} and zeros["sparse-0.2"]["gamma"] == "0"
    assert float(zeros["sparse-0.2"]["pct"]) == pytest.approx(100 * 3 / 503, abs=1e-3)
    assert float(zeros["sparse-0.5"]["pct"]) == pytest.approx(100 * 20 / 520, abs=1e-3)
    assert zeros["baseline"]["pct"] == "0"
    zero_hi, first_lo = float(zeros["sparse-0.2"]["bin_hi"]), float(bins["sparse-0.2"][0]["bin_lo"])
    assert zero_hi * 10 ** (2 / plotdata.BINS_PER_DECADE) <= first_lo * 1.0001  # a gap of 2+ bins
    assert np.floor(np.log10(float(zeros["sparse-0.2"]["bin_lo"]))) == np.floor(np.log10(zero_hi))  # in a decade
    edges = {m: [(r["bin_lo"], r["bin_hi"]) for r in rs] for m, rs in bins.items()}
    assert edges["baseline"] == edges["sparse-0.2"] == edges["sparse-0.5"]  # shared by every model of the arch
    lo = np.array([float(r["bin_lo"]) for r in bins["sparse-0.2"]])
    hi = np.array([float(r["bin_hi"]) for r in bins["sparse-0.2"]])
    step = 10 ** (1 / plotdata.BINS_PER_DECADE)
    assert np.allclose(hi / lo, step, rtol=1e-5)  # log-spaced
    gammas = torch.cat(list(_inputs()["gammas"]["vgg16_bn"].values())).double()
    smallest, largest = float(gammas[gammas > 0].min()), float(gammas.max())
    assert lo[0] <= smallest < lo[0] * step * 1.0001 and hi[-1] / step / 1.0001 < largest <= hi[-1]  # tight
    centre = np.array([float(r["gamma"]) for r in bins["sparse-0.2"]])
    assert np.allclose(centre, np.sqrt(lo * hi), rtol=1e-5)
    for model, n_small, total in (("baseline", 0, 500), ("sparse-0.2", 300, 503), ("sparse-0.5", 400, 520)):
        pct = np.array([float(r["pct"]) for r in bins[model]])
        assert pct.sum() + float(zeros[model]["pct"]) == pytest.approx(100.0, abs=1e-3)
        assert pct[hi <= 1e-3 * 1.0001].sum() == pytest.approx(100 * n_small / total, abs=1e-3)
    # each target's threshold is drawn on the histogram of the sparse model it pruned
    thresholds = [(r["label"], float(r["gamma"]), r["model"], r["label_row"]) for r in rows if r["kind"] == "threshold"]
    assert thresholds == [("20%", 3.2e-5, "sparse-0.2", "0"), ("50%", 0.0123, "sparse-0.5", "0")]


@pytest.mark.parametrize("values,first,last", [
    ([np.array([0.1, 1.0])], 0.1, 1.0),                    # exact edges stay edges
    ([np.array([0.0, 0.0])], 0.1, 1.0),                    # all zero: one decade below 1
    ([np.array([])], 0.1, 1.0),
    ([np.array([1.0])], 1.0, 10 ** 0.2),                   # one value: one bin
    ([np.array([1e-30, 2.0])], 10 ** (0.4 - plotdata.MAX_DECADES), 10 ** 0.4),  # at most MAX_DECADES decades
])
def test_log_bin_edges(values: list[np.ndarray], first: float, last: float) -> None:
    edges = log_bin_edges(values)
    assert edges[0] == pytest.approx(first) and edges[-1] == pytest.approx(last)
    assert np.diff(np.log10(edges)) == pytest.approx(np.full(len(edges) - 1, 1 / plotdata.BINS_PER_DECADE))


def test_write_plot_data_is_deterministic_and_atomic(tmp_path: Path) -> None:
    write_plot_data(tmp_path / "a", **_inputs())
    inputs = _inputs()
    inputs["gammas"] = {a: {m: g.numpy() for m, g in v.items()} for a, v in inputs["gammas"].items()}  # any array
    write_plot_data(tmp_path / "b", **inputs)
    write_plot_data(tmp_path / "b", **inputs)  # replaces
    names = ["curves.csv", "gamma_hist.csv", "sensitivity.csv", "tradeoff.csv"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == names  # no temporary files left
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    shuffled = _inputs()  # dicts in another order: the same bytes (rows follow archs and targets, not dict order)
    shuffled["histories"] = {a: dict(reversed(list(h.items()))) for a, h in shuffled["histories"].items()}
    shuffled["gammas"] = {a: dict(reversed(list(g.items()))) for a, g in shuffled["gammas"].items()}
    shuffled["sensitivity"] = {a: dict(reversed(list(r.items()))) for a, r in shuffled["sensitivity"].items()}
    write_plot_data(tmp_path / "c", **shuffled)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name


def test_csv_cells() -> None:
    values = (3, 0.1 + 0.2, 1e-7, float("nan"), float("inf"), None, "a,b", 100 * 0.2, np.float64(0.5))
    assert [plotdata.format_value(v) for v in values] == ["3", "0.3", "1e-07", "", "", "", "a,b", "20", "0.5"]
    assert plotdata.render_csv(["a", "b"], [{"a": "x,y"}]) == b'a,b\n"x,y",\n'
    with pytest.raises(ValueError, match="outside the header"):
        plotdata.render_csv(["a"], [{"b": 1}])
    assert plotdata.percent_label(0.25) == "25%" and plotdata.percent_label(0.125) == "12.5%"


# --------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------


def _plot_defs() -> dict[str, dict[str, Any]]:
    return {name: spec for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
            for name, spec in entry.items()}


def _template(name: str) -> dict[str, Any]:
    return json.loads((ROOT / ".dvc" / "plots" / f"{name}.json").read_text())


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_templates_are_valid_dvc_templates_reading_only_written_fields(tables: dict) -> None:
    defs = _plot_defs()
    assert len(defs) == 5
    for spec in defs.values():
        template = _template(spec["template"])
        assert template["data"]["values"] == "<DVC_METRIC_DATA>"
        assert "vega-lite" in template["$schema"]
        ((file, y),) = spec["y"].items()
        header = set(tables[Path(file).name][0])
        assert {spec["x"], y} <= header
        anchors = {"<DVC_METRIC_X>": spec["x"], "<DVC_METRIC_Y>": y}
        fields = {anchors.get(n["field"], n["field"]) for n in _walk(template) if isinstance(n.get("field"), str)}
        fields |= {n["filter"]["field"] for n in _walk(template) if isinstance(n.get("filter"), dict)}
        calculated = {n["as"] for n in _walk(template) if "calculate" in n}
        assert fields - {"rev", "pruned_at", "rule_label"} - calculated <= header, file
        assert "rev" in fields  # `dvc plots diff` keeps revisions apart
        # DVC passes CSV cells as strings: every number the template reads is parsed (an empty cell: no mark)
        parsed = set(template["data"]["format"]["parse"])
        numeric = {anchors.get(n["field"], n["field"]) for n in _walk(template)
                   if isinstance(n.get("field"), str) and n.get("type") == "quantitative"}
        assert numeric - {"pruned_at"} - calculated <= parsed <= header, file


def test_templates_filter_on_the_values_the_data_has(tables: dict) -> None:
    filters = {t: [n["filter"] for n in _walk(_template(t)) if isinstance(n.get("filter"), dict)]
               for t in ("slimcore_tradeoff", "slimcore_curves", "slimcore_gamma")}
    series = {v for f in filters["slimcore_tradeoff"] for v in ([f["equal"]] if "equal" in f else f["oneOf"])}
    assert series == set(TRADEOFF_SERIES)
    domain = [n["scale"]["domain"] for n in _walk(_template("slimcore_tradeoff")) if "domain" in (n.get("scale") or {})]
    assert domain and all(d == list(TRADEOFF_SERIES) for d in domain)
    assert [f["equal"] for f in filters["slimcore_curves"]] == list(CURVE_METRICS)
    assert {f["equal"] for f in filters["slimcore_gamma"] if f["field"] == "kind"} == \
        {r["kind"] for r in tables["gamma_hist.csv"]}


# --------------------------------------------------------------------------------------------
# rendering, as `dvc plots show` fills the templates
# --------------------------------------------------------------------------------------------


def _filled_spec(name: str, revs: tuple[str, ...]) -> dict[str, Any]:
    """The spec DVC builds for plot ``name`` of dvc.yaml from the synthetic data, for ``revs``."""
    from dvc.render.converter.vega import VegaConverter
    from dvc_render.vega import VegaRenderer

    spec = _plot_defs()[name]
    ((file, _),) = spec["y"].items()
    content = plotdata.plot_tables(**_inputs())[Path(file).name]
    datapoints: list[dict[str, Any]] = []
    for rev in revs:
        points, props = VegaConverter(name, {file: _rows(content)}, dict(spec)).flat_datapoints(rev)
        datapoints += points
    props.update(template_dir=str(ROOT / ".dvc" / "plots"), revs_with_datapoints=list(revs))
    return VegaRenderer(datapoints, name, **props).get_filled_template()


@pytest.fixture(scope="module")
def tradeoff_spec() -> dict[str, Any]:
    return _filled_spec("top-1 vs FLOPs", ("workspace",))


def test_a_filled_spec_renders_to_svg_and_png_offline(tradeoff_spec: dict[str, Any]) -> None:
    svg = render_plots.render(tradeoff_spec, "svg").decode()
    assert svg.startswith("<svg")
    for text in ("dense baseline", "pruned + fine-tuned", "pruned, before fine-tune", "20%", "50%",
                 "test top-1 (%)", "MFLOPs per image", "resnet50", "vgg16_bn"):
        assert text in svg, text
    png = render_plots.render(tradeoff_spec, "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from PIL import Image, ImageChops

    raw = vl_convert.vegalite_to_png(tradeoff_spec, vl_version=render_plots.VEGA_LITE_VERSION,
                                     scale=render_plots.PNG_SCALE)
    with Image.open(io.BytesIO(png)) as small, Image.open(io.BytesIO(raw)) as big:
        assert small.size == big.size and ImageChops.difference(small, big).getbbox() is None  # lossless
    assert len(png) < len(raw)
    assert render_plots.render(tradeoff_spec, "svg").decode() == svg  # deterministic
    with pytest.raises(ValueError, match="unknown image format"):
        render_plots.render(tradeoff_spec, "gif")


@pytest.mark.parametrize("name,texts", [
    ("training curves", ("train loss", "validation top-1 (%)", "learning rate (log)", "dense baseline", "20%", "50%",
                         "pruned", "target")),
    ("BN gamma histogram", ("prune 20%", "prune 50%", "BN channels (%)", "sparse-0.2", "sparse-0.5", "baseline")),
    ("top-1 vs FLOPs", ("sparse-trained", "20%", "50%")),
])
def test_every_chart_renders_and_tells_revisions_apart(name: str, texts: tuple[str, ...]) -> None:
    svg = render_plots.render(_filled_spec(name, ("HEAD", "workspace")), "svg").decode()
    for text in (*texts, "revision", "HEAD", "workspace"):
        assert text in svg, text


def test_vega_lite_specs_from_dvc_json(tradeoff_spec: dict[str, Any], tmp_path: Path) -> None:
    out = {"data": {"top-1 vs FLOPs": [{"type": "vega", "revisions": ["workspace"], "content": tradeoff_spec}],
                    "a.png": [{"type": "image", "revisions": ["workspace"], "url": "x.png"}]}}
    specs = render_plots.vega_lite_specs(out)
    assert list(specs) == ["top-1 vs FLOPs"]
    written = render_plots.render_all(specs, tmp_path, ["svg"])
    assert written == [tmp_path / "top-1-vs-flops.svg"] and written[0].read_text().startswith("<svg")
    with pytest.raises(render_plots.PlotsError, match="no data"):
        render_plots.vega_lite_specs({})
    errors = {"errors": [{"name": "broken", "rev": "HEAD", "msg": "boom"}]}
    assert render_plots.plot_errors(errors) == ["broken @ HEAD: boom"]
    with pytest.raises(render_plots.PlotsError, match=r"no data(.|\n)*  broken @ HEAD: boom"):
        render_plots.vega_lite_specs(errors)
    assert list(render_plots.vega_lite_specs({**out, **errors})) == ["top-1 vs FLOPs"]  # drawn without HEAD
    assert render_plots.slug("BN |gamma| histogram") == "bn-gamma-histogram"


# --------------------------------------------------------------------------------------------
# the offline page of `dvc plots show`
# --------------------------------------------------------------------------------------------

VENDOR = ROOT / vega_vendor.VENDOR_DIR


def test_dvc_config_uses_the_offline_page() -> None:
    from configobj import ConfigObj

    config = ConfigObj(str(ROOT / ".dvc" / "config"))
    template = ROOT / ".dvc" / config["plots"]["html_template"]  # relative to .dvc/, as DVC reads it
    assert template.resolve() == (VENDOR / vega_vendor.PAGE).resolve()


def test_the_page_inlines_the_recorded_bundles_and_loads_nothing() -> None:
    page = (VENDOR / vega_vendor.PAGE).read_text()
    versions = json.loads((VENDOR / vega_vendor.VERSIONS).read_text())
    scripts = vega_vendor.inlined_scripts(page)
    assert list(scripts) == [f"{v['package']}@{v['version']}/{v['file']}" for v in versions]
    for v, code in zip(versions, scripts.values()):
        assert hashlib.sha256(code.encode()).hexdigest() == v["sha256"]
        assert (VENDOR / f"LICENSE-{v['package']}.txt").read_text().startswith("Copyright")
    assert (VENDOR / vega_vendor.THIRD_PARTY).stat().st_size > 10_000
    vega_lite = next(v for v in versions if v["package"] == "vega-lite")
    assert vega_lite["version"].startswith(render_plots.VEGA_LITE_VERSION + ".")  # browser = make plots
    assert "{plot_divs}" in page and "{scripts}" not in page
    assert not re.search(r"<script[^>]*\ssrc=", page, re.I)  # nothing loaded from anywhere
    assert page == vega_vendor.build_page({b: scripts[f"{b.spec}/{b.file}"] for b in vega_vendor.BUNDLES})


def test_dvc_renders_the_page_without_cdn_tags(tmp_path: Path) -> None:
    from dvc_render import render_html
    from dvc_render.vega import VegaRenderer

    renderer = VegaRenderer([{"x": 1, "y": 2}], "p", template="linear")
    out = render_html([renderer], tmp_path / "index.html", html_template=str(VENDOR / vega_vendor.PAGE))
    html = Path(out).read_text()
    assert "cdn.jsdelivr" not in html and not re.search(r"<script[^>]*\ssrc=", html, re.I)
    assert html.count("<script data-bundle=") == 3 and "vegaEmbed(" in html.rsplit("<body>", 1)[1]


@pytest.mark.parametrize("bad", ["</script>", "{plot_divs}", "<!-- x"])
def test_a_bundle_that_cannot_be_inlined_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot inline"):
        vega_vendor.build_page({vega_vendor.BUNDLES[0]: f"var a = '{bad}';"})



def test_targets_beyond_the_ratio_are_labelled_and_ordered() -> None:
    """FLOPs/params/safe targets: the label names the target, ``ratio`` is the ratio it resolved to,
    and their fine-tuning curves follow the ratios' in the legend."""
    inputs = _inputs()
    targets = [0.2, "flops0.5", "safe"]
    for i, arch in enumerate(ARCHS):
        for tag, ratio, threshold in (("flops0.5", 0.31, 0.002), ("safe", 0.45, 0.02)):
            for label in (f"sparse-{tag}", f"pruned-{tag}", f"finetuned-{tag}"):
                inputs["evals"][arch][label] = _ev(0.8)
                inputs["profile"][arch][label] = {"flops": 100e6 if label.startswith("sparse") else 50e6,
                                                  "params": 1, "bytes": 1}
            inputs["prunes"][arch][tag] = {"requested_ratio": ratio, "true_ratio": ratio, "threshold": threshold}
            inputs["gammas"][arch][f"sparse-{tag}"] = inputs["gammas"][arch]["sparse-0.2"]
            inputs["sensitivity"][arch][tag] = _sensitivity(i)
        inputs["histories"][arch] = {"finetune-safe": _history(FT_EPOCHS, 0.8, 0.01),
                                     "sparse-train-safe": _history(TRAIN_EPOCHS, 0.8, 0.1),
                                     "finetune-flops0.5": _history(FT_EPOCHS, 0.8, 0.01),
                                     "finetune-0.2": _history(FT_EPOCHS, 0.8, 0.01),
                                     "sparse-train-flops0.5": _history(TRAIN_EPOCHS, 0.8, 0.1),
                                     "sparse-train-0.2": _history(TRAIN_EPOCHS, 0.88, 0.1)}
    tables = {name: _rows(content) for name, content in plotdata.plot_tables(**{**inputs, "targets": targets}).items()}
    tuned = [r for r in tables["tradeoff.csv"] if r["arch"] == "vgg16_bn" and r["series"] == plotdata.FINETUNED]
    assert [(r["label"], r["ratio"]) for r in tuned] == [("20%", "20"), ("FLOPs 50%", "31"), ("safe (45%)", "45")]
    sparse = [r for r in tables["tradeoff.csv"] if r["arch"] == "vgg16_bn" and r["series"] == plotdata.SPARSE]
    assert [r["label"] for r in sparse] == ["20%", "FLOPs 50%", "safe (45%)"]
    # at the same top-1 (80%), two sparse models share one label beside their points
    assert [r["point_label"] for r in sparse] == ["20%", "FLOPs 50%, safe (45%)", "FLOPs 50%, safe (45%)"]
    curves = [r for r in tables["curves.csv"] if r["arch"] == "vgg16_bn"]
    assert list(dict.fromkeys((r["run"], r["target"]) for r in curves)) == [
        ("sparse-train-0.2", "20%"), ("finetune-0.2", "20%"), ("sparse-train-flops0.5", "FLOPs 50%"),
        ("finetune-flops0.5", "FLOPs 50%"), ("sparse-train-safe", "safe (45%)"), ("finetune-safe", "safe (45%)")]
    marks = [(r["label"], r["gamma"], r["model"]) for r in tables["gamma_hist.csv"]
             if r["arch"] == "vgg16_bn" and r["kind"] == "threshold"]
    assert marks == [("20%", "3.2e-05", "sparse-0.2"), ("FLOPs 50%", "0.002", "sparse-flops0.5"),
                     ("safe (45%)", "0.02", "sparse-safe")]
    sens = [r for r in tables["sensitivity.csv"] if r["arch"] == "vgg16_bn"]
    assert list(dict.fromkeys(r["target"] for r in sens)) == ["20%", "FLOPs 50%", "safe (45%)"]


# --------------------------------------------------------------------------------------------
# sensitivity
# --------------------------------------------------------------------------------------------


def test_sensitivity_rows_start_unpruned_and_keep_every_grid_ratio(tables: dict) -> None:
    everything = tables["sensitivity.csv"]
    assert list(everything[0]) == list(plotdata.SENSITIVITY_FIELDS)
    # one curve per (arch, target): the sparse model trained for that target, in the order of the targets
    assert list(dict.fromkeys((r["arch"], r["target"]) for r in everything)) == [
        ("vgg16_bn", "20%"), ("vgg16_bn", "50%"), ("resnet50", "20%"), ("resnet50", "50%")]
    rows = [r for r in everything if r["arch"] == "vgg16_bn" and r["target"] == "20%"]
    assert [r["label"] for r in rows] == ["unpruned", "25%", "50%", "75%"]
    assert [r["ratio"] for r in rows] == ["0", "25", "50", "75"]  # percent
    assert [r["top1"] for r in rows] == ["98", "97.5", "95", ""]  # the ratio that cannot be slimmed: no mark
    assert [r["mflops"] for r in rows] == ["100", "75", "50", ""]
    assert [r["within_budget"] for r in rows] == ["1", "1", "1", "0"]
    assert {r["safe_ratio"] for r in rows} == {"50"} and {r["budget_top1"] for r in rows} == {"95"}
    assert {r["legend"] for r in rows} == {"20% (safe 50%)"}
    sparser = [r for r in everything if r["arch"] == "vgg16_bn" and r["target"] == "50%"]
    assert [r["top1"] for r in sparser] == ["98", "97.5", "96", "95.5"]  # measured on the 50% target's own model
    assert {r["safe_ratio"] for r in sparser} == {"75"} and {r["legend"] for r in sparser} == {"50% (safe 75%)"}
    other = [r for r in everything if r["arch"] == "resnet50" and r["target"] == "20%"]
    assert {r["safe_ratio"] for r in other} == {"25"} and other[2]["within_budget"] == "0"
    without = plotdata.plot_tables(**{**_inputs(), "sensitivity": None})
    assert "sensitivity.csv" not in without  # older callers: the three files as before
    partial = _inputs()
    del partial["sensitivity"]["resnet50"]["0.2"]  # a target without a report: no curve, the others drawn
    rows = _rows(plotdata.plot_tables(**partial)["sensitivity.csv"])
    assert {(r["arch"], r["target"]) for r in rows} == {("vgg16_bn", "20%"), ("vgg16_bn", "50%"), ("resnet50", "50%")}


@pytest.mark.parametrize("name,texts", [
    ("sensitivity by ratio", ("requested share of prunable BN channels removed (%)", "20% (safe 50%)",
                              "50% (safe 75%)", "20% (safe 25%)", "50% (safe 50%)")),
    ("sensitivity by FLOPs", ("MFLOPs per image", "20% (safe 50%)", "validation top-1 (%)")),
])
def test_the_sensitivity_charts_render_one_line_per_target_in_each_arch_and_mark_the_safe_ratio(
        name: str, texts: tuple[str, ...]) -> None:
    svg = render_plots.render(_filled_spec(name, ("HEAD", "workspace")), "svg").decode()
    for text in (*texts, "vgg16_bn", "resnet50", "revision", "HEAD", "workspace"):
        assert text in svg, text


# --------------------------------------------------------------------------------------------
# every chart shows its data: Vega's layout, checked (render_plots.chart_problems)
# --------------------------------------------------------------------------------------------


def _pruned_only_zeros(inputs: dict[str, Any]) -> dict[str, Any]:
    """What the proximal penalties give: many exact zeros, and thresholds of 0 (only zeros removed)."""
    for arch in ARCHS:
        for tag in ("0.2", "0.5"):
            sparse = inputs["gammas"][arch][f"sparse-{tag}"]
            inputs["gammas"][arch][f"sparse-{tag}"] = torch.cat([torch.zeros(400), sparse[300:]])
            inputs["prunes"][arch][tag]["threshold"] = 0.0
    return inputs


@pytest.mark.parametrize("case", ["synthetic", "zero thresholds", "close ratios"])
@pytest.mark.parametrize("revs", [("workspace",), ("HEAD", "workspace")])
def test_every_chart_shows_data_in_every_panel_and_no_label_overlaps(case: str, revs: tuple[str, ...]) -> None:
    inputs = _inputs()
    if case == "zero thresholds":
        inputs = _pruned_only_zeros(inputs)
    if case == "close ratios":  # nearly the same FLOPs at both ratios: their labels would collide on one row
        for arch in ARCHS:  # and both sparse models at nearly the same top-1: so would their labels
            for label in ("pruned-0.5", "pruned-0.5-nofold", "finetuned-0.5"):
                inputs["profile"][arch][label]["flops"] = 63.5e6
            inputs["evals"][arch]["sparse-0.5"]["top1"] = 0.8805
    specs = render_plots.fill_specs(plotdata.plot_tables(**inputs), revs, ROOT / "dvc.yaml", ROOT / ".dvc" / "plots")
    assert len(specs) == 5
    for name, spec in specs.items():
        assert render_plots.chart_problems(spec, name) == [], name


def test_the_check_finds_an_empty_panel_an_unplaceable_mark_and_overlapping_labels() -> None:
    def spec(values: list[dict[str, Any]], layer: list[dict[str, Any]]) -> dict[str, Any]:
        return {"data": {"values": values}, "facet": {"column": {"field": "p", "type": "nominal"}},
                "spec": {"width": 200, "height": 100, "layer": layer}, "resolve": {"scale": {"x": "independent"}}}

    log_bars = {"mark": "bar", "encoding": {"x": {"field": "x", "type": "quantitative", "scale": {"type": "log"}},
                                            "y": {"field": "y", "type": "quantitative"}}}
    zero_on_log = spec([{"p": "a", "x": 0, "y": 1}, {"p": "a", "x": 1, "y": 2}], [log_bars])
    problems = render_plots.chart_problems(zero_on_log, "gamma")
    assert any("cannot be placed" in p for p in problems) and any("no visible data mark" in p for p in problems)
    empty = spec([{"p": "a", "x": 1, "y": 0}, {"p": "b", "x": 2, "y": 3}], [{**log_bars, "mark": "bar"}])
    assert render_plots.chart_problems(empty, "c") == ["c panel 1: no visible data mark"]
    text = {"mark": {"type": "text"}, "encoding": {"x": {"field": "x", "type": "quantitative"},
                                                  "y": {"field": "y", "type": "quantitative"},
                                                  "text": {"field": "t", "type": "nominal"}}}
    points = {"mark": "point", "encoding": {"x": {"field": "x", "type": "quantitative"},
                                           "y": {"field": "y", "type": "quantitative"}}}
    curves = render_plots.fill_specs(plotdata.plot_tables(**_inputs()), ("workspace",), ROOT / "dvc.yaml",
                                     ROOT / ".dvc" / "plots")["training curves"]
    curves["data"]["values"] = [r for r in curves["data"]["values"] if r["metric"] != "val_top1"]
    assert "training curves: no data has metric = 'val_top1': what it selects is not drawn" in \
        render_plots.chart_problems(curves, "training curves")
    crowded = spec([{"p": "a", "x": 1, "y": 1, "t": "40%"}, {"p": "a", "x": 1.02, "y": 1, "t": "20%"}], [points, text])
    assert render_plots.chart_problems(crowded, "t") == ["t panel 1: labels '40%' and '20%' overlap"]


def test_accuracies_carry_their_95_percent_interval_from_the_set_size(tables: dict) -> None:
    from slimcore_pipeline.noise import accuracy_interval

    tuned = next(r for r in tables["tradeoff.csv"] if r["series"] == FINETUNED and r["arch"] == "vgg16_bn")
    lo, hi = accuracy_interval(0.8912, 359)
    assert tuned["images"] == "359"
    assert float(tuned["top1_lo"]) == pytest.approx(100 * lo, abs=1e-3)
    assert float(tuned["top1_hi"]) == pytest.approx(100 * hi, abs=1e-3)
    val = next(r for r in tables["curves.csv"] if r["metric"] == "val_top1")
    lo, hi = accuracy_interval(float(val["value"]) / 100, 144)  # the sensitivity report's val_images
    assert (float(val["lo"]), float(val["hi"])) == pytest.approx((100 * lo, 100 * hi), abs=1e-3)
    sens = next(r for r in tables["sensitivity.csv"] if r["label"] == "unpruned")
    assert sens["images"] == "144" and float(sens["top1_lo"]) < 98 < float(sens["top1_hi"])
    assert sens["legend"] == "20% (safe 50%)" and sens["target"] == "20%"
    assert plotdata.interval_pct(None, 10) == (None, None) and plotdata.interval_pct(90.0, None) == (None, None)


def test_label_rows_never_put_two_overlapping_labels_in_one_row() -> None:
    assert plotdata.label_rows([10, 100, 200], [20, 20, 20]) == [0, 0, 0]
    assert plotdata.label_rows([100, 105, 110, 300], [28, 28, 28, 28]) == [0, 1, 2, 0]
    assert plotdata.label_rows([50, 50], [12, 12], gap=0) == [0, 1]  # equal thresholds stack


def test_the_committed_charts_show_their_data() -> None:
    """metrics/plots as committed, drawn by the templates of this checkout (after `dvc repro`)."""
    tables = {p.name: p.read_bytes() for p in (ROOT / "metrics" / "plots").glob("*.csv")}
    fields = {"tradeoff.csv": TRADEOFF_FIELDS, "curves.csv": CURVE_FIELDS, "gamma_hist.csv": GAMMA_FIELDS,
              "sensitivity.csv": plotdata.SENSITIVITY_FIELDS}
    stale = [name for name, want in fields.items()
             if name not in tables or tables[name].split(b"\n", 1)[0].decode() != ",".join(want)]
    if stale:
        pytest.skip(f"metrics/plots/{', '.join(stale)} predate slimcore_pipeline/plotdata.py's columns: `dvc repro` "
                    "rewrites them")
    specs = render_plots.fill_specs(tables, ("workspace",), ROOT / "dvc.yaml", ROOT / ".dvc" / "plots")
    for name, spec in specs.items():
        assert render_plots.chart_problems(spec, name) == [], name


# --------------------------------------------------------------------------------------------
# the sentences of docs/plots.md (render_plots.describe)
# --------------------------------------------------------------------------------------------


def test_the_doc_blocks_name_each_targets_own_sparse_model(tmp_path: Path) -> None:
    """describe() reads metrics/eval.json, metrics/prune/ARCH-T.json and metrics/sensitivity/ARCH-T.json."""
    inputs = _inputs()
    (tmp_path / "prune").mkdir()
    (tmp_path / "sensitivity").mkdir()
    (tmp_path / "eval.json").write_text(json.dumps({"vgg16_bn": inputs["evals"]["vgg16_bn"]}))
    for tag, report in inputs["prunes"]["vgg16_bn"].items():
        (tmp_path / "prune" / f"vgg16_bn-{tag}.json").write_text(json.dumps({**report, "target": tag}))
        (tmp_path / "sensitivity" / f"vgg16_bn-{tag}.json").write_text(
            json.dumps(inputs["sensitivity"]["vgg16_bn"][tag]))
    blocks = render_plots.describe(tmp_path)
    assert blocks["tradeoff"] == (
        "- **vgg16_bn** (359 test images, one image = 0.28 pt): dense baseline 90.00%; "
        "20%: its sparse model 88.00%, 85.00% pruned, 89.12% after fine-tuning (within noise of the baseline); "
        "50%: its sparse model 86.00%, n/a pruned, 87.00% after fine-tuning (within noise of the baseline).")
    assert blocks["gamma"] == ("- **vgg16_bn**: thresholds (each on its target's own sparse model) "
                               "20%: 3.2e-05; 50%: 0.0123.")
    assert blocks["sensitivity"] == (
        "- **vgg16_bn**: 20%'s sparse model: unpruned validation top-1 98.00%, safe ratio 50% (drop <= 3 pt); "
        "50%'s sparse model: unpruned validation top-1 98.00%, safe ratio 75% (drop <= 3 pt); "
        "144 validation images, one image = 0.69 pt.")
    page = "a\n<!-- generated: tradeoff -->\nold\n<!-- /generated -->\n"
    assert render_plots.fill_doc(page, {"tradeoff": "new"}) == page.replace("old", "new")
