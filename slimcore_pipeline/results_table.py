"""The generated results table, ``metrics/results.md`` (the plot data: :mod:`slimcore_pipeline.plotdata`).

Everything here is a pure function of the metrics JSON the stages wrote, so the table can be
regenerated (and diffed) without touching a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from slimcore.targets import Target, target_label
from slimcore_pipeline import paths
from slimcore_pipeline.config import Params
from slimcore_pipeline.noise import accuracy_interval, image_points, within_noise
from slimcore_pipeline.reached import no_sparsity

SEED_COLUMNS = ["arch", "FLOPs", "params/M", "slim", "requested", "true ratio", "FLOPs after",
                "params after/M", "top1", "top5"]
EXTRA_COLUMNS = ["top1 95% CI", "top1 vs baseline", "MACs kept", "speed-up", "top1 sparse", "top1 pruned (no FT)",
                 "top1 pruned, no fold", "size/MB", "removed of all BN"]
NOISE_MARK = "~"  # a top-1 within noise of the dense baseline (slimcore_pipeline.noise.within_noise)


def _pct(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _flops_unit(flops: float) -> tuple[float, str]:
    """Gigas for full-size models (as the seed), megas when that would print 0.00."""
    return (1e9, "G") if flops >= 1e8 else (1e6, "M")


def _fmt(x: float, scale: float) -> str:
    v = x / scale
    return f"{v:.3f}" if v < 100 else f"{v:.2f}"


def format_strength(value: float) -> str:
    """An L1 strength as the seed wrote it: ``1e-4``, ``1.5e-2``, ``0``."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def test_images(evals: Mapping[str, Any]) -> int | None:
    """The size of the test set the arch's models were evaluated on (``test_images`` of its
    baseline's entry in metrics/eval.json); None when not recorded (an older eval.json)."""
    n = evals.get("baseline", {}).get("test_images")
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _interval(top1: float | None, n: int | None) -> str:
    """A top-1's 95% interval in % (``95.7-98.9``); ``n/a`` without the test set's size."""
    if n is None or not _finite(top1):
        return "n/a"
    lo, hi = accuracy_interval(float(top1), n)  # type: ignore[arg-type]
    return f"{100 * lo:.1f}-{100 * hi:.1f}"


def _is_noise(top1: float | None, baseline: float | None, n: int | None) -> bool:
    return n is not None and _finite(top1) and _finite(baseline) and within_noise(top1, baseline, n)  # type: ignore[arg-type]


def _marked(top1: float | None, baseline: float | None, n: int | None) -> str:
    """A top-1 in % with :data:`NOISE_MARK` when it is within noise of the baseline's."""
    return _pct(top1) + (f" {NOISE_MARK}" if _is_noise(top1, baseline, n) else "")


def _versus(top1: float | None, baseline: float | None, n: int | None) -> str:
    """The difference from the baseline's top-1 in points (``+0.28 ~``: within noise)."""
    if not (_finite(top1) and _finite(baseline)):
        return "n/a"
    diff = 100 * (float(top1) - float(baseline))  # type: ignore[arg-type]
    return f"{diff:+.2f}" + (f" {NOISE_MARK}" if _is_noise(top1, baseline, n) else "")


def _labels(targets: Sequence[Target], prunes: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Each target's tag -> its label as the table prints it (``20%``, ``safe (45%)``: a safe
    target's ratio comes from its prune report, when there is one)."""
    return {t.tag: target_label(t, dict(prunes.get(t.tag) or {})) for t in targets}


def _noise_line(evals: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """Under the training summary: the test set's size, the baseline's 95% interval and, per
    target (``labels``: tag -> label), its sparse model's, within noise of the baseline or not."""
    n = test_images(evals)
    if n is None:
        return ("Test set: size not recorded in metrics/eval.json (an older evaluate stage): run `dvc repro "
                "evaluate` for the 95% intervals.")
    b = evals["baseline"].get("top1")
    sparse = []
    for tag, label in labels.items():
        s = evals.get(f"sparse-{tag}", {}).get("top1")
        verdict = "within noise of" if _is_noise(s, b, n) else "beyond noise from"
        sparse.append(f"sparse for {label} {_pct(s, 2)} ({_interval(s, n)}), {verdict} the baseline")
    return (f"Test set: {n} images (one image = {image_points(n):.2f} pt). Top-1 with its 95% interval: "
            f"baseline {_pct(b, 2)} ({_interval(b, n)})" + "".join(f"; {part}" for part in sparse) + ".")


def _summary_lines(arch: str, sparsity: float, evals: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The seed's training summary: the baseline's two lines, then two per target (``labels``:
    tag -> label), for the sparse model trained for that target alone."""
    b = evals["baseline"]
    lines = ["```", f"# {arch} default training", f"total -  top1 acc: {_pct(b['top1'])}  top5 acc: {_pct(b['top5'])}"]
    for tag, label in labels.items():
        s = evals.get(f"sparse-{tag}", {})
        lines += [f"# {arch} slim {format_strength(sparsity)} pruning training, sized for {label}",
                  f"total -  top1 acc: {_pct(s.get('top1'))}  top5 acc: {_pct(s.get('top5'))}"]
    return [*lines, "```"]


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _all_bn(prune_report: Mapping[str, Any]) -> float:
    """Removed share of *all* BN channels (older reports, with nothing skipped: the true ratio)."""
    return float(prune_report.get("ratio_all_bn", prune_report["true_ratio"]))


def arch_rows(arch: str, params: Params, evals: Mapping[str, Any], profile: Mapping[str, Any],
              prunes: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one arch's pruning table (seed columns, then ours)."""
    base = profile["baseline"]
    f_scale, f_unit = _flops_unit(base["flops"])
    header = list(SEED_COLUMNS)
    header[1] = f"FLOPs/{f_unit}"
    header[6] = f"FLOPs after/{f_unit}"
    header += EXTRA_COLUMNS
    n, base_top1 = test_images(evals), evals["baseline"]["top1"]
    rows = []
    for target in params.prune.parsed_targets():
        tag = target.tag
        fin, pr = profile[f"finetuned-{tag}"], prunes[tag]
        top1 = evals[f"finetuned-{tag}"]["top1"]
        nofold = evals.get(f"pruned-{tag}-nofold", {}).get("top1")
        sparse = evals.get(f"sparse-{tag}", {}).get("top1")  # this row's own sparse model
        rows.append([
            arch, _fmt(base["flops"], f_scale), f"{base['params'] / 1e6:.3f}",
            format_strength(params.penalty.strength[arch]), target_label(target, pr), f"{100 * pr['true_ratio']:.2f}%",
            _fmt(fin["flops"], f_scale), f"{fin['params'] / 1e6:.3f}",
            _pct(top1), _pct(evals[f"finetuned-{tag}"]["top5"]),
            _interval(top1, n), _versus(top1, base_top1, n), *_macs(base["flops"], fin["flops"]),
            _marked(sparse, base_top1, n), _marked(evals[f"pruned-{tag}"]["top1"], base_top1, n),
            _marked(nofold, base_top1, n), f"{fin['bytes'] / 1e6:.3f}", f"{100 * _all_bn(pr):.2f}%",
        ])
    return header, rows


def _macs(before: float, after: float) -> tuple[str, str]:
    """MACs kept (% of the unpruned model's) and the MAC speed-up (``2.03x``)."""
    if not before or not after:
        return "n/a", "n/a"
    return f"{100 * after / before:.1f}%", f"{before / after:.2f}x"


def safe_ratio_line(arch: str, target: Target | float | str, sensitivity: Mapping[str, Any],
                    prune_report: Mapping[str, Any] | None = None) -> str:
    """The safe ratio of ``target``'s sparse model, as results.md prints it under the arch's pruning
    table (from ``metrics/sensitivity/ARCH-T.json``: see :mod:`slimcore_pipeline.sensitivity`);
    ``prune_report`` names a ``safe`` target's resolved ratio in its label.

    When that sparse-train reached no sparsity (:func:`no_sparsity`) the line says so instead, with
    what to raise: a 0% safe ratio beside an unchanged accuracy would read as a result.
    """
    tag = paths.target_tag(target)
    label = target_label(target, dict(prune_report or {}))
    safe = float(sensitivity["safe_ratio"])
    link = f"[metrics/sensitivity/{arch}-{tag}.json](sensitivity/{arch}-{tag}.json)"
    none, reached = no_sparsity(sensitivity)
    if none:
        return (f"sparse-train reached no sparsity for {label}: {reached}; raise penalty.strength.{arch} or "
                f"train.epochs (safe ratio {100 * safe:.4g}%; {link})")
    reference = float(sensitivity["reference_top1"])
    budget = (f"Safe ratio of the sparse model for {label} (validation top-1 drop <= "
              f"{float(sensitivity['max_drop']):g} pt before fine-tuning)")
    points = sorted(sensitivity.get("points", []), key=lambda p: float(p["ratio"]))
    if safe == 0 and points:  # the smallest ratio tried already fails: say by how much, not "97.2 -> 97.2"
        first = points[0]
        what = (f"validation top-1 {reference:.2f} -> {float(first['top1']):.2f}" if _finite(first.get("top1"))
                else "it cannot be slimmed")
        return f"{budget}: 0% (the smallest ratio tried, {100 * float(first['ratio']):.4g}%, fails: {what}; {link})"
    at_safe = next((p["top1"] for p in points if p["ratio"] == safe), reference)
    return f"{budget}: {100 * safe:.4g}% (validation top-1 {reference:.2f} -> {float(at_safe):.2f}; {link})"


def _safe_ratio_lines(arch: str, targets: Sequence[Target], sensitivity: Mapping[str, Mapping[str, Any]],
                      prunes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One :func:`safe_ratio_line` per target with a sensitivity report (``sensitivity``: tag -> JSON)."""
    return [safe_ratio_line(arch, t, sensitivity[t.tag], prunes.get(t.tag)) for t in targets if t.tag in sensitivity]


def _preamble(params: Params) -> list[str]:
    """results.md's title and the paragraphs that say what the run was and how to read its tables."""
    d, m, t, f = params.data, params.model, params.train, params.finetune
    return [
        "# Training Results",
        "",
        "<!-- Generated by the `evaluate` stage (`dvc repro`) from metrics/*.json: do not edit. -->",
        "",
        f"Data: `{d.name}` at {d.image_size}px; models: stem `{m.stem}`, width {m.width:g}; "
        f"training {t.epochs} epochs (the baseline, and one sparse model per prune target, its penalty sized "
        f"for that target alone), fine-tuning {f.epochs} epochs; "
        f"seed {params.seed}. Accuracies in %, on the test split. FLOPs: thop's count, which is "
        "multiply-accumulates (MACs, see README); MACs kept: FLOPs after / FLOPs; speed-up: FLOPs / FLOPs "
        "after, a ratio of MACs, not of measured time. "
        "params/M: millions of parameters; size/MB: checkpoint bytes on disk / 10^6. "
        "Requested: a share of BN channels to remove (20%), of FLOPs or parameters to keep (FLOPs 50%, "
        "params 30%), a MAC speed-up (speed-up 2x: keep half the FLOPs), or the safe ratio (safe (45%): "
        "the largest within prune.max_drop). "
        "Ratios count BN channels; the true ratio is measured on the pruned model, over the prunable "
        "BN channels; 'removed of all BN' counts every BN channel (lower when groups were held fixed). "
        "'top1 sparse': the row's own sparse model, before pruning; 'top1 pruned (no FT)': the same model "
        "pruned, before fine-tuning. "
        "CPU latency and wall-clock speedups: see [timings/latency.md](timings/latency.md).",
        "",
        "Noise: each arch's test-set size is under its training summary; 'top1 95% CI' is the fine-tuned "
        f"top-1's 95% Wilson score interval; '{NOISE_MARK}' marks a top-1 within noise of the dense baseline "
        "(the 95% interval of their difference includes zero: slimcore_pipeline/noise.py), so only unmarked "
        "differences are beyond noise.",
        "",
    ]


def results_markdown(params: Params, evals: Mapping[str, Any], profile: Mapping[str, Any],
                     prunes: Mapping[str, Mapping[str, Mapping[str, Any]]],
                     sensitivity: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None) -> str:
    """The whole ``metrics/results.md``: per arch, the training summary (the baseline and every
    target's sparse model), the pruning table and (given ``sensitivity[arch][tag]``, the sensitivity
    stage's JSON for that target's sparse model) one safe-ratio line per target."""
    targets = params.prune.parsed_targets()
    lines = _preamble(params)
    for arch in params.archs:
        labels = _labels(targets, prunes.get(arch, {}))
        header, rows = arch_rows(arch, params, evals[arch], profile[arch], prunes[arch])
        lines += [f"## {arch}", "", *_summary_lines(arch, params.penalty.strength[arch], evals[arch], labels), "",
                  _noise_line(evals[arch], labels), "", f"## {arch} pruning", "", *_md_table(header, rows), ""]
        safe_lines = _safe_ratio_lines(arch, targets, (sensitivity or {}).get(arch) or {}, prunes[arch])
        lines += [line for safe_line in safe_lines for line in (safe_line, "")]
    return "\n".join(lines)


def _pct2(x: float) -> float:
    return round(100 * x, 2)


def _top1_of(evals: Mapping[str, Any], label: str) -> float | None:
    """``label``'s test top-1 in % (2 decimals); None when metrics/eval.json has no such model."""
    top1 = evals.get(label, {}).get("top1")
    return _pct2(top1) if isinstance(top1, (int, float)) and not isinstance(top1, bool) else None


def macs_kept(before: float, after: float) -> float | None:
    """MACs kept, in % of the unpruned model's (2 decimals); None when either count is missing."""
    return round(100 * after / before, 2) if before and after else None


def summary(arch: str, params: Params, evals: Mapping[str, Any], profile: Mapping[str, Any],
            prunes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``metrics/summary/ARCH.json``, the pipeline's declared DVC metrics, small enough for a
    160-column terminal: per target, keyed by its position in ``prune.targets`` (``r1``, ``r2``, ...)
    so that runs with different target lists share names, the fine-tuned test top-1 (%) and the
    MACs kept (% of the baseline's); then the baseline's top-1.

    The keys do not repeat the arch (the file name says it), so ``dvc metrics show`` is one row per
    arch under shared columns; the order is the order of ``dvc exp show``'s columns: what each
    target kept and cost first.  Everything else (each target's sparse model and safe ratio
    included) is in :func:`details`.
    """
    base = profile["baseline"]["flops"]
    out: dict[str, Any] = {}
    for i, target in enumerate(params.prune.parsed_targets(), start=1):
        tag = target.tag
        out[f"r{i}"] = {"top1": _pct2(evals[f"finetuned-{tag}"]["top1"]),
                        "macs_kept": macs_kept(base, profile[f"finetuned-{tag}"]["flops"])}
    out["baseline"] = {"top1": _pct2(evals["baseline"]["top1"])}
    return out


def details(arch: str, params: Params, evals: Mapping[str, Any], profile: Mapping[str, Any],
            prunes: Mapping[str, Mapping[str, Any]],
            sensitivity: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """``metrics/details/ARCH.json`` (a plain output, not a declared metric: ``dvc metrics show
    metrics/details/ARCH.json`` and ``dvc metrics diff --targets ...`` read it): accuracy (%), FLOPs
    and parameters of the dense baseline, and per target, keyed by position as in :func:`summary`,
    what it was (``target``), the channel ratio it resolved to (``ratio``), what it removed, the
    top-1 of its own sparse model (``top1_sparse``), of that model pruned (``top1_pruned``) and
    fine-tuned, FLOPs and parameters; and (given ``sensitivity``: tag -> the sensitivity stage's
    JSON for that target's sparse model) its ``safe_ratio``."""
    def cost(label: str) -> dict[str, Any]:
        return {"mflops": round(profile[label]["flops"] / 1e6, 4), "params": int(profile[label]["params"])}

    out: dict[str, Any] = {
        "baseline": {"top1": _pct2(evals["baseline"]["top1"]), "top5": _pct2(evals["baseline"]["top5"]),
                     **cost("baseline")},
    }
    for i, target in enumerate(params.prune.parsed_targets(), start=1):
        tag, pr = target.tag, prunes[target.tag]
        out[f"r{i}"] = {
            "target": tag,
            "ratio": float(pr.get("requested_ratio", target.value or 0.0)),
            "removed_pct": _pct2(pr["true_ratio"]),
            "removed_all_bn_pct": _pct2(_all_bn(pr)),
            "top1_sparse": _top1_of(evals, f"sparse-{tag}"),
            "top1_pruned": _pct2(evals[f"pruned-{tag}"]["top1"]),
            "top1": _pct2(evals[f"finetuned-{tag}"]["top1"]),
            "top5": _pct2(evals[f"finetuned-{tag}"]["top5"]),
            "macs_kept": macs_kept(profile["baseline"]["flops"], profile[f"finetuned-{tag}"]["flops"]),
            **cost(f"finetuned-{tag}"),
        }
        if sensitivity is not None and tag in sensitivity:
            out[f"r{i}"]["safe_ratio"] = float(sensitivity[tag]["safe_ratio"])
    return out


__all__ = ["EXTRA_COLUMNS", "NOISE_MARK", "SEED_COLUMNS", "details", "format_strength", "macs_kept", "no_sparsity",
           "results_markdown", "safe_ratio_line", "summary", "target_label", "test_images"]
