"""The data behind ``dvc plots``: four tidy CSV files under ``metrics/plots``.

The ``evaluate`` stage calls :func:`write_plot_data` with what it measured; the vega-lite templates
in ``.dvc/plots/`` draw the files (``dvc plots show``, ``make plots``). Every file is long
("tidy"): one row per drawn mark, a column saying which series the row belongs to, so a template
only filters and encodes. Accuracies and ratios are in percent, as in ``metrics/results.md``.

``tradeoff.csv`` -- top-1 against FLOPs (template ``slimcore_tradeoff``)::

    arch, series, ratio, label, true_ratio, mflops, top1, top5, top1_lo, top1_hi, images, label_row,
    point_label

  ``series`` is one of :data:`TRADEOFF_SERIES`: the dense baseline (``ratio`` 0, ``label`` and
  ``true_ratio`` empty), then per prune target three rows: the target's own sparse-trained model
  (``sparse-T``, its penalty sized for that target alone; dense FLOPs, ``true_ratio`` empty), that
  model pruned, before fine-tuning, and after it. ``ratio``/``true_ratio``: the channel ratio the
  target resolved to and the measured share of BN channels removed (%); ``label``: the target as
  the chart prints it (``20%``, ``FLOPs 50%``, ``params 30%``, ``safe (45%)``), on the sparse row
  too (which target the model was trained for); ``mflops``: thop's count / 10^6; ``top1``,
  ``top5``: test accuracy (%); ``top1_lo``, ``top1_hi``: its 95% Wilson interval (%) on ``images``
  test images (empty when the evaluation did not record its size), drawn as error bars and, for
  the dense baseline, as a band: one test image is ``100 / images`` points. ``label_row``
  (fine-tuned rows only): the row, from the top of the panel, of the point's ratio label, chosen so
  that labels of nearby points never overlap (:func:`label_rows`). ``point_label`` (sparse rows
  only): the label printed beside the sparse model's point; the sparse points all sit at the dense
  FLOPs, so points closer in top-1 than a label's height share one label naming all of their
  targets (``20%, 50%``), printed once at their mean top-1.

``curves.csv`` -- training curves (template ``slimcore_curves``)::

    arch, run, target, order, epoch, run_epoch, metric, value, lo, hi

  One row per (run, epoch, metric). Runs: ``baseline-train``, and per target T ``sparse-train-T``
  (T's own sparse model) and ``finetune-T``. ``target``: the line a run belongs to, ``dense
  baseline`` or T's label (``20%``, ``safe (45%)``): T's sparse training and its fine-tuning share
  it (one colour in the chart, the fine-tuning continuing its own sparse training). ``metric`` is
  one of :data:`CURVE_METRICS`: ``train_loss``, ``val_top1`` (%, the validation split each epoch
  evaluates; an empty cell where it had no images) and ``lr``, drawn by the template; runs with
  ``train.eval_test`` / ``finetune.eval_test`` add ``test_top1`` (%) rows
  (:data:`TEST_CURVE_METRIC`), in the file but not drawn: the chart compares runs on validation,
  the test split is for the final figures. ``run_epoch`` counts from 1 within the run; ``epoch``
  is the position on the shared axis: the baseline and every sparse training start at 1;
  ``finetune-T`` starts from T's pruned sparse model, so its epochs follow the last epoch of
  ``sparse-train-T`` (of ``baseline-train`` when that run is missing). ``order`` sorts the runs
  for the legend: the baseline, then per target (by ratio, then FLOPs, params and safe targets)
  its sparse training and its fine-tuning. ``lo``, ``hi`` (``val_top1`` rows only): the 95%
  Wilson interval (%) of the validation top-1 on the validation split's images (the sensitivity
  reports' ``val_images``), drawn as a band; empty when the size is unknown.

``gamma_hist.csv`` -- |gamma| histograms and pruning thresholds (template ``slimcore_gamma``)::

    arch, kind, model, label, bin_lo, bin_hi, gamma, pct, label_row

  ``kind=bin`` rows: ``model`` (``baseline``, and ``sparse-T`` for each target's own sparse model:
  one histogram each, a panel each in the chart), a log-spaced bin ``[bin_lo, bin_hi)``, its
  geometric centre ``gamma`` and ``pct``, the share of the model's BN channels in it (%). Bins are
  shared by all models of an arch: edges ``10**(k / BINS_PER_DECADE)`` for whole ``k``, from the
  last edge at or below the smallest non-zero |gamma| (at most :data:`MAX_DECADES` decades below
  the largest) to the first edge at or above the largest; smaller non-zero values are counted in
  the first bin. Exact zeros (what the proximal penalties leave) have a bin of their own, ``label``
  :data:`ZERO_BIN` and ``gamma`` 0, drawn left of the first edge, between the decade below it and
  the one before, at least two bins away (``bin_lo``/``bin_hi`` are then its place on the log
  axis, not |gamma| values: the axis labels decades only); it is there (for every model of the
  arch) when a model has an exact zero or a threshold is 0. ``kind=threshold`` rows: the
  threshold (``gamma``) at which ``model``, the target's own sparse model, was pruned for the
  target ``label`` (``20%``, ``FLOPs 50%``): the score of the last unit slimming removed in its
  ranking (a channel's |gamma|, combined over coupled BN layers by ``prune.group_score``); a 0 is
  drawn at the zero bin. ``label_row``: the row of the threshold's label among the thresholds of
  the same model, so that the labels of equal or nearby thresholds stack instead of overlapping.

``sensitivity.csv`` -- validation top-1 before fine-tuning at each ratio of the sensitivity grid
(template ``slimcore_sensitivity``, drawn against ``ratio`` and against ``mflops``)::

    arch, target, ratio, label, true_ratio, ratio_all_bn, mflops, params, top1, top5, drop,
    within_budget, safe_ratio, budget_top1, top1_lo, top1_hi, images, legend

  One curve per (arch, target): the sparse model trained for that target (``target``: its label,
  ``20%``, ``safe (45%)``), slimmed at every grid ratio. Each curve has one row per grid ratio,
  after one ``ratio`` 0 row for the unpruned sparse model (``label`` ``unpruned``). ``ratio``,
  ``true_ratio``, ``ratio_all_bn``: requested and measured share of BN channels removed (%);
  ``mflops``, ``params``: cost of the pruned model; ``top1``, ``top5``: validation accuracy (%),
  empty where slimming failed; ``drop``: points lost against the unpruned model;
  ``within_budget``: 1 or 0; ``safe_ratio`` (%) and ``budget_top1`` (the unpruned top-1 minus
  ``prune.max_drop``) repeat the curve's figures on every row, so the template can mark the safe
  point and the budget line; ``top1_lo``, ``top1_hi``: the 95% Wilson interval (%) on the
  ``images`` validation images (``val_images``), drawn as a band; ``legend``: the target and its
  safe ratio as the legend of the arch's panel names the line (``20% (safe 60%)``). Data:
  ``metrics/sensitivity/ARCH-T.json``.

Numbers are written with 6 significant digits and files are replaced atomically, so the same
inputs give the same bytes.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from slimcore.targets import Target, parse_target, target_label
from slimcore_pipeline.process import atomic_write_bytes

TRADEOFF_CSV, CURVES_CSV, GAMMA_CSV = "tradeoff.csv", "curves.csv", "gamma_hist.csv"
SENSITIVITY_CSV = "sensitivity.csv"

BASELINE, SPARSE = "dense baseline", "sparse-trained"
PRUNED, FINETUNED = "pruned, before fine-tune", "pruned + fine-tuned"
TRADEOFF_SERIES = (BASELINE, SPARSE, PRUNED, FINETUNED)
TRADEOFF_FIELDS = ("arch", "series", "ratio", "label", "true_ratio", "mflops", "top1", "top5", "top1_lo", "top1_hi",
                   "images", "label_row", "point_label")

CURVE_METRICS = ("train_loss", "val_top1", "lr")  # drawn, one row of panels each
TEST_CURVE_METRIC = "test_top1"  # only for epochs that evaluated the test split (eval_test); not drawn
CURVE_FIELDS = ("arch", "run", "target", "order", "epoch", "run_epoch", "metric", "value", "lo", "hi")
BASELINE_RUN = "baseline-train"
TARGET_RUNS = ("sparse-train", "finetune")  # per target T: sparse-train-T, then finetune-T (from its pruned model)

BASELINE_MODEL = "baseline"  # gamma_hist.csv's models: this one and sparse_model(T) per target
GAMMA_FIELDS = ("arch", "kind", "model", "label", "bin_lo", "bin_hi", "gamma", "pct", "label_row")
ZERO_BIN = "0"  # the label of the bin of exact zeros
SENSITIVITY_FIELDS = ("arch", "target", "ratio", "label", "true_ratio", "ratio_all_bn", "mflops", "params", "top1",
                      "top5", "drop", "within_budget", "safe_ratio", "budget_top1", "top1_lo", "top1_hi", "images",
                      "legend")
UNPRUNED = "unpruned"

BINS_PER_DECADE = 5
MAX_DECADES = 8

# Label placement (pixels of the templates' panels): tradeoff and gamma panels are 300 wide.
PANEL_WIDTH = 300.0
CHAR_WIDTH = 7.0  # an 11px bold label's mean character width, generously
LABEL_GAP = 4.0
# The tradeoff panel's y axis: 260 px high, 44 px of padding at either end (slimcore_tradeoff.json); its
# "nice" domain spans at most NICE_SLACK times the data's range, so labels this far apart in data never meet.
PANEL_HEIGHT, Y_PADDING, NICE_SLACK = 260.0, 44.0, 1.5
LABEL_HEIGHT = 12.0  # a 10px label's line

Row = dict[str, Any]


def sparse_model(tag: str) -> str:
    """The label of target ``tag``'s sparse model (``sparse-0.2``), as in metrics/eval.json and gamma_hist.csv."""
    return f"sparse-{tag}"


def format_value(value: Any) -> str:
    """One CSV cell: integers as they are, floats with 6 significant digits, missing/NaN empty."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


def render_csv(fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> bytes:
    """Rows as CSV text with a fixed header (a row may omit fields: empty cells)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        unknown = set(row) - set(fields)
        if unknown:
            raise ValueError(f"row has fields outside the header {list(fields)}: {sorted(unknown)}")
        writer.writerow([format_value(row.get(field)) for field in fields])
    return buffer.getvalue().encode()


def percent_label(ratio: float) -> str:
    """A pruning ratio as the charts and the table print it: ``0.2`` -> ``20%``."""
    return f"{100 * ratio:.4g}%"


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * float(fraction)


def interval_pct(top1_pct: float | None, images: int | None) -> tuple[float | None, float | None]:
    """The 95% Wilson interval (%) of an accuracy given in %, measured on ``images`` images;
    (None, None) when either is unknown (no band is drawn)."""
    from slimcore_pipeline.noise import accuracy_interval

    if top1_pct is None or not images or not math.isfinite(float(top1_pct)):
        return None, None
    lo, hi = accuracy_interval(float(top1_pct) / 100, int(images))
    return 100 * lo, 100 * hi


def label_rows(centres: Sequence[float], widths: Sequence[float], gap: float = LABEL_GAP) -> list[int]:
    """Rows for labels centred at ``centres`` (pixels) with ``widths`` so that no two labels in a row
    overlap: each label, taken left to right, goes to the first row whose last label ends ``gap``
    before it starts. Equal centres always get different rows."""
    rows = [0] * len(centres)
    ends: list[float] = []  # right edge of the last label of each row
    for i in sorted(range(len(centres)), key=lambda i: (centres[i], i)):
        left, right = centres[i] - widths[i] / 2, centres[i] + widths[i] / 2
        row = next((r for r, end in enumerate(ends) if end + gap <= left), len(ends))
        if row == len(ends):
            ends.append(right)
        else:
            ends[row] = right
        rows[i] = row
    return rows


# --------------------------------------------------------------------------------------------
# top-1 vs FLOPs
# --------------------------------------------------------------------------------------------


def _resolved_ratio(target: Target, prune_report: Mapping[str, Any]) -> float | None:
    ratio = prune_report.get("requested_ratio")
    return float(ratio) if ratio is not None else target.value if target.kind == "ratio" else None


def tradeoff_rows(arch: str, targets: Sequence[Target | float | str], evals: Mapping[str, Mapping[str, float]],
                  profile: Mapping[str, Mapping[str, Any]],
                  prunes: Mapping[str, Mapping[str, Any]]) -> list[Row]:
    """One arch's rows of ``tradeoff.csv``: the dense baseline, then three rows per target (``prunes``
    is keyed by the target's tag): its own sparse model (``sparse-T``), that model pruned, and fine-tuned."""

    def row(series: str, label: str, target: Target | None = None) -> Row:
        pr = prunes[target.tag] if target is not None else {}
        top1 = _pct(evals[label]["top1"])
        images = evals[label].get("test_images") or evals.get("baseline", {}).get("test_images")
        lo, hi = interval_pct(top1, images)
        return {"arch": arch, "series": series,
                "ratio": _pct(_resolved_ratio(target, pr)) if target is not None else 0.0,
                "label": "" if target is None else target_label(target, pr),
                "true_ratio": _pct(pr.get("true_ratio")) if series in (PRUNED, FINETUNED) else None,
                "mflops": profile[label]["flops"] / 1e6, "top1": top1,
                "top5": _pct(evals[label]["top5"]), "top1_lo": lo, "top1_hi": hi,
                "images": int(images) if images else None}

    rows = [row(BASELINE, "baseline")]
    for target in map(parse_target, targets):
        rows.append(row(SPARSE, sparse_model(target.tag), target))
        rows.append(row(PRUNED, f"pruned-{target.tag}", target))
        rows.append(row(FINETUNED, f"finetuned-{target.tag}", target))
    # the x axis runs from 0 to the largest MFLOPs of the panel: ratio labels in rows that never overlap
    labelled = [r for r in rows if r["series"] == FINETUNED]
    scale = PANEL_WIDTH / max((r["mflops"] for r in rows), default=1.0)
    for r, label_row in zip(labelled, label_rows([r["mflops"] * scale for r in labelled],
                                                 [CHAR_WIDTH * len(r["label"]) for r in labelled])):
        r["label_row"] = label_row
    _place_sparse_labels(rows)
    return rows


def _place_sparse_labels(rows: list[Row]) -> None:
    """Set ``point_label`` of the sparse rows: the text beside the sparse models' points. They share
    one x (dense FLOPs), so the points closer in top-1 than a label's height (at the smallest scale
    the y axis may take) form one group, and every row of a group carries the labels of all of it
    (``20%, 50%``): the chart prints one label per group, at the group's mean top-1."""
    values = [float(r[k]) for r in rows for k in ("top1", "top1_lo", "top1_hi")
              if r.get(k) is not None and math.isfinite(float(r[k]))]
    span = max(values) - min(values) if values else 0.0
    scale = (PANEL_HEIGHT - 2 * Y_PADDING) / (NICE_SLACK * span) if span > 0 else 0.0  # pixels per point, at least
    sparse = sorted((r for r in rows if r["series"] == SPARSE and r["top1"] is not None and math.isfinite(r["top1"])),
                    key=lambda r: -r["top1"])
    groups: list[list[Row]] = []
    for r in sparse:
        if groups and (groups[-1][-1]["top1"] - r["top1"]) * scale < LABEL_HEIGHT:
            groups[-1].append(r)
        else:
            groups.append([r])
    order = {id(r): i for i, r in enumerate(rows)}
    for group in groups:
        text = ", ".join(r["label"] for r in sorted(group, key=lambda r: order[id(r)]))  # in the targets' order
        for r in group:
            r["point_label"] = text


# --------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------


def run_target(run: str) -> tuple[str, Target] | None:
    """``sparse-train-0.2`` -> (``sparse-train``, the ratio 0.2), ``finetune-flops0.5`` ->
    (``finetune``, flops0.5); None for any other run (``baseline-train``)."""
    for kind in TARGET_RUNS:
        if run.startswith(f"{kind}-"):
            try:
                return kind, parse_target(run[len(kind) + 1:])
            except ValueError:
                return None
    return None


def _run_sort_key(run: str) -> tuple[int, tuple[int, float], int, str]:
    """The baseline, then per target (by ratio, then FLOPs, params and safe targets) its sparse
    training and its fine-tuning, then the rest."""
    if run == BASELINE_RUN:
        return (0, (0, 0.0), 0, run)
    found = run_target(run)
    if found is None:
        return (2, (0, 0.0), 0, run)
    kind, target = found
    return (1, target.sort_key(), TARGET_RUNS.index(kind), run)


def _run_label(run: str, labels: Mapping[str, str]) -> str:
    """The ``target`` cell of a run: the baseline, or the label of the target its run belongs to."""
    if run == BASELINE_RUN:
        return BASELINE
    found = run_target(run)
    if found is None:
        return run
    target = found[1]
    return labels.get(target.tag) or target_label(target)


def _epoch_offset(run: str, histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> int:
    """Where ``run`` starts on the shared epoch axis: a fine-tuning of T after the last epoch of
    T's own sparse training (the baseline's without it); every other run at 0."""
    found = run_target(run)
    if found is None or found[0] != "finetune":
        return 0
    sparse = histories.get(f"sparse-train-{found[1].tag}") or histories.get(BASELINE_RUN) or []
    return max((int(e["epoch"]) for e in sparse), default=0)


def curve_rows(arch: str, histories: Mapping[str, Sequence[Mapping[str, Any]]],
               val_images: int | None = None, labels: Mapping[str, str] | None = None) -> list[Row]:
    """One arch's rows of ``curves.csv``; a fine-tuning's epochs continue after its own sparse
    training's last (``val_images``: the validation split's size, for the 95% band of ``val_top1``;
    ``labels``: target tag -> label for the ``target`` column, e.g. ``safe (45%)``)."""
    rows: list[Row] = []
    for order, run in enumerate(sorted(histories, key=_run_sort_key)):
        shift, line = _epoch_offset(run, histories), _run_label(run, labels or {})
        for epoch in sorted(histories[run], key=lambda e: int(e["epoch"])):
            values = {"train_loss": epoch["train_loss"], "val_top1": _pct(epoch.get("val_top1", math.nan)),
                      "lr": epoch["lr"]}
            test = float(epoch.get("test_top1", math.nan))
            if math.isfinite(test):
                values[TEST_CURVE_METRIC] = _pct(test)
            for metric, value in values.items():
                lo, hi = interval_pct(value, val_images) if metric == "val_top1" else (None, None)
                rows.append({"arch": arch, "run": run, "target": line, "order": order,
                             "epoch": int(epoch["epoch"]) + shift, "run_epoch": int(epoch["epoch"]),
                             "metric": metric, "value": float(value), "lo": lo, "hi": hi})
    return rows


# --------------------------------------------------------------------------------------------
# |gamma| histograms
# --------------------------------------------------------------------------------------------


def log_bin_edges(values: Sequence[np.ndarray]) -> np.ndarray:
    """Log-spaced edges ``10**(k / BINS_PER_DECADE)`` spanning every non-zero value (see the module doc)."""
    positive = [v[v > 0] for v in values]
    positive = [v for v in positive if v.size]
    if not positive:  # all zero (or nothing): one decade below 1
        return 10.0 ** (np.arange(-BINS_PER_DECADE, 1) / BINS_PER_DECADE)
    top = math.ceil(round(math.log10(max(float(v.max()) for v in positive)) * BINS_PER_DECADE, 9))
    bottom = math.floor(round(math.log10(min(float(v.min()) for v in positive)) * BINS_PER_DECADE, 9))
    top = max(top, bottom + 1)
    bottom = max(bottom, top - MAX_DECADES * BINS_PER_DECADE)
    return 10.0 ** (np.arange(bottom, top + 1) / BINS_PER_DECADE)


class Threshold(NamedTuple):
    """One pruning threshold of ``gamma_hist.csv``: drawn on the histogram of ``model``
    (``sparse-T``, the model the target was pruned from), named ``label`` (``20%``)."""

    model: str
    label: str
    gamma: float


def _threshold_rows(arch: str, thresholds: Sequence[Threshold], edges: np.ndarray,
                    zero: tuple[float, float] | None) -> list[Row]:
    """The ``kind=threshold`` rows, with the rows of their labels: per model (a panel of its own),
    labels of equal or nearby thresholds stack (``zero``: the zero bin's place, when there is one)."""
    # where each rule is drawn, in pixels of the log axis: its labels (rotated, 10px wide) stack when close
    left, right = math.log10(zero[0] if zero else edges[0]), math.log10(edges[-1])
    scale = PANEL_WIDTH / max(right - left, 1e-9)
    rows: list[Row] = []
    for model in dict.fromkeys(t.model for t in thresholds):
        mine = [t for t in thresholds if t.model == model]
        at = [math.sqrt(zero[0] * zero[1]) if zero and t.gamma <= 0 else min(max(float(t.gamma), edges[0]), edges[-1])
              for t in mine]
        placed = label_rows([(math.log10(x) - left) * scale for x in at], [12.0] * len(at), gap=0.0)
        rows += [{"arch": arch, "kind": "threshold", "model": t.model, "label": t.label, "gamma": float(t.gamma),
                  "label_row": label_row} for t, label_row in zip(mine, placed)]
    return rows


def gamma_rows(arch: str, gammas: Mapping[str, Any], thresholds: Sequence[Threshold]) -> list[Row]:
    """One arch's rows of ``gamma_hist.csv``: shared log bins for each model (``gammas``: model ->
    |gamma| values, ``baseline`` and ``sparse-T``), then one row per threshold, on its own model."""
    arrays = {model: np.abs(np.asarray(g, dtype=np.float64).ravel()) for model, g in gammas.items()}
    edges = log_bin_edges(list(arrays.values()))
    zero_bin = any(bool((v == 0).any()) for v in arrays.values()) or any(t.gamma <= 0 for t in thresholds)
    # the zero bar lies strictly between two decades (the axis labels only decades) and 2+ bins left of the rest
    decade = math.floor(round(math.log10(edges[0]), 9))
    zero_lo, zero_hi = 10 ** (decade - 0.6), 10 ** (decade - 0.4)
    rows: list[Row] = []
    for model, values in arrays.items():
        total = max(values.size, 1)
        if zero_bin:
            rows.append({"arch": arch, "kind": "bin", "model": model, "label": ZERO_BIN, "bin_lo": zero_lo,
                         "bin_hi": zero_hi, "gamma": 0.0, "pct": 100 * int((values == 0).sum()) / total})
        counted = values[values > 0] if zero_bin else values
        counts, _ = np.histogram(np.clip(counted, edges[0], edges[-1]), bins=edges)
        for lo, hi, count in zip(edges[:-1], edges[1:], counts):
            rows.append({"arch": arch, "kind": "bin", "model": model, "label": "", "bin_lo": float(lo),
                         "bin_hi": float(hi), "gamma": math.sqrt(lo * hi), "pct": 100 * int(count) / total})
    return rows + _threshold_rows(arch, thresholds, edges, (zero_lo, zero_hi) if zero_bin else None)


# --------------------------------------------------------------------------------------------
# sensitivity
# --------------------------------------------------------------------------------------------


def sensitivity_rows(arch: str, report: Mapping[str, Any], target: str = "") -> list[Row]:
    """One (arch, target)'s rows of ``sensitivity.csv`` from ``metrics/sensitivity/ARCH-T.json``, the
    curve of T's own sparse model (``target``: T's label, e.g. ``20%``)."""
    reference = float(report["reference_top1"])
    images = report.get("val_images")
    safe = percent_label(float(report["safe_ratio"]))
    shared = {"arch": arch, "target": target, "safe_ratio": _pct(report["safe_ratio"]),
              "budget_top1": reference - float(report["max_drop"]), "images": images,
              "legend": f"{target} (safe {safe})" if target else f"{arch} (safe {safe})"}
    rows: list[Row] = [{**shared, "ratio": 0.0, "label": UNPRUNED, "true_ratio": 0.0, "ratio_all_bn": 0.0,
                        "mflops": float(report["reference_mflops"]), "params": int(report["reference_params"]),
                        "top1": reference, "top5": float(report["reference_top5"]), "drop": 0.0,
                        "within_budget": 1}]
    for point in sorted(report["points"], key=lambda p: p["ratio"]):
        rows.append({**shared, "ratio": _pct(point["ratio"]), "label": percent_label(point["ratio"]),
                     "true_ratio": _pct(point["true_ratio"]), "ratio_all_bn": _pct(point["ratio_all_bn"]),
                     "mflops": point["mflops"], "params": point["params"], "top1": point["top1"],
                     "top5": point["top5"], "drop": point["drop"], "within_budget": int(bool(point["within_budget"]))})
    for row in rows:
        row["top1_lo"], row["top1_hi"] = interval_pct(row["top1"], images)
    return rows


# --------------------------------------------------------------------------------------------
# all of it
# --------------------------------------------------------------------------------------------


def _val_images(reports: Mapping[str, Mapping[str, Any]]) -> int | None:
    """The validation split's size, from any of an arch's sensitivity reports (all measure the same split)."""
    return next((int(r["val_images"]) for r in reports.values() if r.get("val_images")), None)


def _arch_gamma_rows(arch: str, targets: Sequence[Target], labels: Mapping[str, str], gammas: Mapping[str, Any],
                     prunes: Mapping[str, Mapping[str, Any]]) -> list[Row]:
    """One arch's histograms: the baseline and each target's sparse model, with that target's threshold."""
    models = [BASELINE_MODEL, *(sparse_model(t.tag) for t in targets)]
    thresholds = [Threshold(sparse_model(t.tag), labels[t.tag], prunes[t.tag]["threshold"]) for t in targets]
    return gamma_rows(arch, {m: gammas[m] for m in models if m in gammas}, thresholds)


def plot_tables(*, archs: list[str], targets: Sequence[Target | float | str], evals: dict, profile: dict,
                prunes: dict, histories: dict, gammas: dict, sensitivity: dict | None = None) -> dict[str, bytes]:
    """The contents of every plot file, by file name (see :func:`write_plot_data`)."""
    tradeoff, curves, hist, sens = [], [], [], []
    parsed = [parse_target(t) for t in targets]
    for arch in archs:
        labels = {t.tag: target_label(t, prunes[arch][t.tag]) for t in parsed}
        reports = (sensitivity or {}).get(arch) or {}
        tradeoff += tradeoff_rows(arch, parsed, evals[arch], profile[arch], prunes[arch])
        curves += curve_rows(arch, histories.get(arch, {}), _val_images(reports), labels)
        hist += _arch_gamma_rows(arch, parsed, labels, gammas[arch], prunes[arch])
        for t in parsed:  # one curve per target's sparse model
            if t.tag in reports:
                sens += sensitivity_rows(arch, reports[t.tag], labels[t.tag])
    tables = {TRADEOFF_CSV: render_csv(TRADEOFF_FIELDS, tradeoff), CURVES_CSV: render_csv(CURVE_FIELDS, curves),
              GAMMA_CSV: render_csv(GAMMA_FIELDS, hist)}
    if sensitivity is not None:
        tables[SENSITIVITY_CSV] = render_csv(SENSITIVITY_FIELDS, sens)
    return tables


def write_plot_data(directory: Path, *, archs: list[str], targets: Sequence[Target | float | str],
                    evals: dict, profile: dict, prunes: dict, histories: dict, gammas: dict,
                    sensitivity: dict | None = None) -> None:
    """Write ``tradeoff.csv``, ``curves.csv``, ``gamma_hist.csv`` (and ``sensitivity.csv``) under ``directory``.

    Args:
        directory: where the files go (the pipeline passes ``metrics/plots``).
        archs, targets: what to draw, in this order (``params.archs``, ``params.prune.targets``:
            :class:`slimcore.targets.Target` objects or their spellings, ``0.2``, ``"flops0.5"``).
        evals: ``evals[arch][label] = {"top1": fraction, "top5": fraction, ...}`` for the labels
            ``baseline``, ``sparse-T``, ``pruned-T``, ``finetuned-T`` (``T`` the target's tag;
            ``pruned-T-nofold`` may be present and is not drawn).
        profile: ``profile[arch][label] = {"flops": float, ...}`` for the same labels.
        prunes: ``prunes[arch][T]``, the prune report (``threshold``, ``true_ratio``,
            ``requested_ratio``: the ratio the target resolved to, ...).
        histories: ``histories[arch][run] = [{"epoch", "lr", "train_loss", "val_top1", "test_top1", ...}, ...]``
            for runs ``baseline-train``, ``sparse-train-T``, ``finetune-T``; a missing run is not drawn.
        gammas: ``gammas[arch] = {"baseline": |gamma| values, "sparse-T": ...}``, any 1-D array-like
            (a CPU tensor works); a missing model has no histogram.
        sensitivity: ``sensitivity[arch][T]``, the sensitivity stage's ``metrics/sensitivity/ARCH-T.json``
            (the curve of T's sparse model); given, ``sensitivity.csv`` is written too.

    The same inputs always give the same bytes; each file is replaced atomically.
    """
    tables = plot_tables(archs=archs, targets=targets, evals=evals, profile=profile, prunes=prunes,
                         histories=histories, gammas=gammas, sensitivity=sensitivity)
    for name, content in tables.items():
        atomic_write_bytes(Path(directory) / name, content)


__all__ = ["BASELINE_MODEL", "CURVE_METRICS", "SENSITIVITY_FIELDS", "TEST_CURVE_METRIC", "TRADEOFF_SERIES", "ZERO_BIN",
           "Threshold", "curve_rows", "gamma_rows", "interval_pct", "label_rows", "log_bin_edges", "percent_label",
           "plot_tables", "render_csv", "run_target", "sensitivity_rows", "sparse_model", "target_label",
           "tradeoff_rows", "write_plot_data"]
