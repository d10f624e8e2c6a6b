"""slimcore against its peers at matched MACs, on real data: test top-1 before and after fine-tuning.

From one baseline checkpoint per arch, every method gets the same sparse-training epochs, the
same pruning budget (a MAC speed-up: the pruned model keeps 1/S of the baseline's MACs, matched
within 2%) and the same fine-tuning schedule:

* ``slimcore``: the pipeline's default (``penalty`` with its ``penalty.strength.ARCH``, ``prune`` policy and the
  ``speedupS`` target of the params file), i.e. what ``dvc repro`` does: one sparse model per speed-up,
  its penalty sized for that speed-up (``slimcore:bench.shared=1``: one sparse model for all of them,
  sized for the largest, the pipeline's behaviour before);
* ``paper``: the paper's recipe on slimcore's engine: the L1 subgradient on every gamma
  (``--paper-strength``, 1e-4 as in the paper) and global |gamma| ranking;
* ``tp-bnscale``: Torch-Pruning's ``BNScalePruner`` (its network-slimming pruner; L1 on BN
  scales, ``reg`` 1e-4 as in the issue that prompted this benchmark), global ranking;
* ``tp-groupnorm``: Torch-Pruning's ``GroupNormPruner`` (its strongest documented CNN pruner:
  growing group-norm regularisation, group magnitude importance), global ranking.

A method may carry overrides (``slimcore:penalty.target=0.4,bench.kd=0.5``): each variant
is its own row.  Every run is cached under ``--work`` by arch and method, so a second call only
computes what is new.  The test set is the dataset's full test split; every accuracy comes
with its 95% Wilson interval.

Run (Fashion-MNIST as Debian's ``dataset-fashion-mnist`` installs it; about 40 min on 2 cores)::

    python bench/peers.py --params configs/fashion-mnist.yaml
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcore.checkpoint import load_model, save_model  # noqa: E402
from slimcore.flops import count_flops  # noqa: E402
from slimcore.models import ModelSpec  # noqa: E402
from slimcore.penalty import PenaltySpec  # noqa: E402
from slimcore_pipeline.config import Params, load_params, with_overrides  # noqa: E402
from slimcore_pipeline.data import load_splits, make_loader  # noqa: E402
from slimcore_pipeline.runtime import current_context, evaluate  # noqa: E402
from slimcore_pipeline.train import Trainer  # noqa: E402

METHODS = ("slimcore", "paper", "tp-bnscale", "tp-groupnorm")
MAC_TOLERANCE = 0.02  # relative: a pruned model's MACs within 2% of baseline/S


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct/n, in percent."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def scored(model: nn.Module, loader: Any, ctx: Any) -> dict[str, float]:
    """Test top-1 (percent) with its 95% interval and the number of images."""
    result = evaluate(model, loader, ctx)
    n = int(result["samples"])
    correct = round(result["top1"] * n)
    low, high = wilson(correct, n)
    return {"top1": round(100 * correct / n, 2), "low": round(low, 2), "high": round(high, 2), "n": n}


class TorchPruningRegulariser:
    """Torch-Pruning's sparse-training hook in :class:`GammaPenalty`'s place inside the Trainer:
    ``pruner.regularize(model)`` between backward and the optimizer step."""

    def __init__(self, pruner: Any, model: nn.Module) -> None:
        self.pruner, self.model, self.steps = pruner, model, 0

    def before_step_(self) -> None:
        self.pruner.regularize(self.model)

    def after_step_(self, lr: float) -> None:
        self.steps += 1

    def penalty(self) -> float:
        return 0.0


def tp_pruner(method: str, model: nn.Module, example: torch.Tensor, ratio: float) -> Any:
    """A global Torch-Pruning pruner of ``model`` at channel ``ratio`` (classifier kept)."""
    import torch_pruning as tp

    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if method == "tp-bnscale":
        return tp.pruner.BNScalePruner(model, example, importance=tp.importance.BNScaleImportance(),
                                       reg=1e-4, global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored)
    return tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                     reg=5e-4, global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored)


def prune_tp(method: str, sparse: nn.Module, example: torch.Tensor, keep: float, size: int) -> tuple[nn.Module, float]:
    """The Torch-Pruning model whose MACs are closest to ``keep`` of the sparse model's (bisection
    over the global pruning ratio); returns it and the kept MAC fraction."""
    before = count_flops(sparse, size)
    low, high, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (low + high) / 2
        model = copy.deepcopy(sparse).eval()
        tp_pruner(method, model, example, mid).step()
        kept = count_flops(model, size) / before
        if best is None or abs(kept - keep) < abs(best[1] - keep):
            best = (model, kept)
        if abs(kept - keep) <= MAC_TOLERANCE * keep / 2:
            break
        low, high = (mid, high) if kept > keep else (low, mid)
    assert best is not None
    return best


class TeacherTap(nn.Module):
    """The student as the Trainer's network, running the frozen ``teacher`` on every training
    batch so that :class:`DistillLoss` can read its logits (knowledge distillation)."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student, self.teacher, self.last = student, teacher.eval(), None

    def train(self, mode: bool = True) -> TeacherTap:
        self.student.train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.last = self.teacher(x)
        return self.student(x)


class DistillLoss(nn.Module):
    """``(1 - w) * CE(label smoothed) + w * T^2 * KL(teacher/T || student/T)``."""

    def __init__(self, tap: TeacherTap, ce: nn.Module, weight: float, temperature: float) -> None:
        super().__init__()
        self.tap, self.ce, self.weight, self.t = tap, ce, weight, temperature

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.t
        kl = nn.functional.kl_div(nn.functional.log_softmax(logits / t, 1),
                                  nn.functional.log_softmax(self.tap.last / t, 1), log_target=True,
                                  reduction="batchmean")
        return (1 - self.weight) * self.ce(logits, y) + self.weight * t * t * kl


def distill_hook(teacher: nn.Module, weight: float, temperature: float) -> Callable[[Trainer], None]:
    def hook(trainer: Trainer) -> None:
        tap = TeacherTap(trainer.model, teacher)
        trainer.net = tap
        trainer.criterion = DistillLoss(tap, trainer.criterion, weight, temperature)
    return hook


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``slimcore:penalty.target=0.4,finetune.epochs=3`` -> ("slimcore", {...}) (values as YAML)."""
    import yaml

    name, _, rest = text.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}: one of {', '.join(METHODS)} (with :key=value,... overrides)")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def settings_digest(params: Params, sections: tuple[str, ...]) -> str:
    """12 hex digits that change with any of these params sections (``runtime`` is left out: it
    says how to compute, not what)."""
    return _digest(params.model_dump(include=set(sections)))


def _digest(dump: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dump, sort_keys=True, default=str).encode()).hexdigest()[:12]


def penalty_digest(params: Params) -> str:
    """:func:`settings_digest` of the penalty and prune sections, laid out as when the strengths
    were the top-level ``sparsity`` section, so run caches made then are found again."""
    dump = params.model_dump(include={"penalty", "prune"})
    dump["sparsity"] = dump["penalty"].pop("strength")
    return _digest(dump)


class Bench:
    """One arch's runs, cached under ``work/SETTINGS/ARCH`` (SETTINGS: a digest of the params)."""

    def __init__(self, params: Params, arch: str, work: Path, splits: Any, ctx: Any) -> None:
        self.params, self.arch, self.ctx, self.splits = params, arch, ctx, splits
        # cached by the settings every method shares (another data set or schedule never reuses these
        # runs); slimcore's own settings are in its runs' file names (see run_method)
        self.dir = work / settings_digest(params, ("seed", "data", "model", "train", "finetune")) / arch
        self.dir.mkdir(parents=True, exist_ok=True)
        size = params.data.image_size
        self.size = size
        self.example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(params.seed))
        self.test = make_loader(splits.test, 512, train=False, seed=params.seed, runtime=params.runtime)

    def loader(self, batch_size: int) -> Any:
        return make_loader(self.splits.train, batch_size, train=True, seed=self.params.seed,
                           runtime=self.params.runtime)

    def train(self, model: nn.Module, cfg: Any, desc: str, *, hook: Callable[[Trainer], None] | None = None,
              trainer_kw: dict[str, Any] | None = None) -> nn.Module:
        torch.manual_seed(self.params.seed)
        kw = trainer_kw or {}
        trainer = Trainer(model, cfg, self.ctx, self.loader(cfg.batch_size), None, desc=desc, **kw)
        if hook is not None:
            hook(trainer)
        trainer.fit()
        return model

    def cached(self, name: str, make: Callable[[], nn.Module]) -> nn.Module:
        path = self.dir / f"{name}.pt"
        if path.is_file():
            return load_model(path)
        model = make()
        save_model(path, model.cpu())
        return model

    def baseline(self) -> nn.Module:
        def make() -> nn.Module:
            choice = self.params.model_for(self.arch)
            torch.manual_seed(self.params.seed)
            model = ModelSpec(choice.source, choice.name, self.splits.num_classes, choice.stem, choice.width,
                              choice.kwargs).build()
            return self.train(model, self.params.train, f"baseline@{self.arch}")
        return self.cached("baseline", make)


def method_label(method: str, overrides: dict[str, Any]) -> str:
    """A method's row label: ``slimcore`` or ``slimcore:key=value,...`` (overrides sorted)."""
    return method + (":" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) if overrides else "")


def run_method(bench: Bench, method: str, overrides: dict[str, Any], speedups: list[float],
               paper_strength: float) -> dict[str, Any]:
    """Sparse-train from the baseline, prune to each speed-up, fine-tune; test top-1 at each step.

    slimcore with ``penalty.target: auto`` trains one sparse model per speed-up, its penalty sized
    for that speed-up alone, as the pipeline's ``sparse-train@ARCH-TARGET`` stages do: each cell
    then carries its own ``sparse`` figure.
    """
    if method == "slimcore" and overrides.get("bench.shared"):  # the previous default: one sparse model
        plain = {k: v for k, v in overrides.items() if k != "bench.shared"}
        return {**run_sized(bench, method, plain, speedups, paper_strength), "method": method_label(method, overrides)}
    if method == "slimcore" and len(speedups) > 1:
        own = {k: v for k, v in overrides.items() if not k.startswith("bench.")}
        params = with_overrides(bench.params, own) if own else bench.params
        if params.penalty.target == "auto" and params.penalty.method != "l1":
            runs = [run_sized(bench, method, overrides, [s], paper_strength) for s in speedups]
            cells = {key: {**cell, "sparse": run["sparse"]} for run in runs for key, cell in run["cells"].items()}
            return {"method": runs[0]["method"], "sparse": runs[-1]["sparse"], "cells": cells,
                    "seconds": round(sum(run["seconds"] for run in runs), 1)}
    return run_sized(bench, method, overrides, speedups, paper_strength)


def run_sized(bench: Bench, method: str, overrides: dict[str, Any], speedups: list[float],
              paper_strength: float) -> dict[str, Any]:
    """One sparse model (its penalty sized for all of ``speedups``), pruned to each of them."""
    label = method_label(method, overrides)
    bench_opts = {k.removeprefix("bench."): v for k, v in overrides.items() if k.startswith("bench.")}
    overrides = {k: v for k, v in overrides.items() if not k.startswith("bench.")}
    params = with_overrides(bench.params, overrides) if overrides else bench.params
    # cache names as before penalty.strength was named sparsity, so earlier runs are found again
    name = label.replace("penalty.strength.", "sparsity.").replace(":", "_").replace(",", "_").replace("=", "-")
    extra = {"paper": f"_paper{paper_strength:g}", "slimcore": "_" + penalty_digest(params)}.get(method, "")
    cache = bench.dir / f"{name}_x{'-'.join(f'{s:g}' for s in speedups)}{extra}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    arch, start = bench.arch, time.perf_counter()
    sparse = load_model(bench.dir / "baseline.pt")
    if method in ("slimcore", "paper"):
        from slimcore.prune import coupled_units

        if method == "slimcore":
            from slimcore.penalty_target import share_for_targets

            pen = params.penalty
            units = coupled_units(sparse, bench.example) if pen.method == "group" else None
            retarget = None
            if pen.target == "auto":  # as sparse-train resolves it (every epoch), for the speed-ups benchmarked
                def retarget(model: nn.Module) -> float:
                    return share_for_targets(model, [f"speedup{s:g}" for s in speedups], bench.example,
                                             input_size=bench.size, **params.prune.policy())
            kw = {"penalty": PenaltySpec(pen.strength[arch], pen.method, units, ramp_epochs=pen.ramp_epochs,
                                         target=0.0 if retarget else float(pen.target),
                                         close_epochs=pen.close_epochs),
                  "retarget": retarget}
        else:
            kw = {"penalty": PenaltySpec(paper_strength, "l1")}
        bench.train(sparse, params.train, f"sparse-{label}@{arch}", trainer_kw=kw)
    else:
        pruner = tp_pruner(method, sparse, bench.example, 0.5)
        if method == "tp-groupnorm":
            pruner.update_regularizer()
        bench.train(sparse, params.train, f"sparse-{label}@{arch}",
                    hook=lambda t: setattr(t, "gamma_penalty", TorchPruningRegulariser(pruner, sparse)))
    sparse.eval()
    out: dict[str, Any] = {"method": label, "sparse": scored(sparse, bench.test, bench.ctx), "cells": {}}
    base_macs = count_flops(sparse, bench.size)
    for s in speedups:
        keep = 1 / s
        if method in ("slimcore", "paper"):
            from slimcore.prune import slim_to

            pruned, report = slim_to(sparse, f"flops{keep:g}", bench.example, input_size=bench.size,
                                     **params.prune.policy())
            kept = report.flops_fraction
        else:
            pruned, kept = prune_tp(method, sparse, bench.example, keep, bench.size)
        before = scored(pruned, bench.test, bench.ctx)
        kd = float(bench_opts.get("kd", 0))
        hook = distill_hook(sparse, kd, float(bench_opts.get("kd_t", 4))) if kd else None
        bench.train(pruned, params.finetune, f"finetune-{label}@{arch}-x{s:g}", hook=hook)
        after = scored(pruned, bench.test, bench.ctx)
        out["cells"][f"{s:g}"] = {"macs_kept": round(kept, 4), "macs": count_flops(pruned, bench.size) / base_macs,
                                  "before": before, "after": after}
    out["seconds"] = round(time.perf_counter() - start, 1)
    cache.write_text(json.dumps(out, indent=1))
    return out


def fmt(r: dict[str, Any]) -> str:
    return f"{r['top1']:.2f} [{r['low']:.1f}, {r['high']:.1f}]"


def versus(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """``+2.56`` (beyond noise) or ``~ -1.01`` (within noise: :func:`slimcore_pipeline.noise.within_noise`)."""
    from slimcore_pipeline.noise import within_noise

    diff = ours["top1"] - theirs["top1"]
    same = within_noise(ours["top1"] / 100, theirs["top1"] / 100, int(ours["n"]))
    return f"{'~ ' if same else ''}{diff:+.2f}"


def shown(label: str, arch: str) -> str:
    """A method's label as the table prints it: without the other archs' ``penalty.strength.X`` overrides."""
    name, _, rest = label.partition(":")
    keep = [kv for kv in rest.split(",") if kv and not (kv.startswith("penalty.strength.") and
                                                          not kv.startswith(f"penalty.strength.{arch}="))]
    return name + (":" + ",".join(keep) if keep else "")


def table(results: dict[str, dict[str, Any]], speedups: list[float]) -> str:
    """The markdown table: per arch and speed-up, every method's test top-1 (95% interval) of the
    sparse model, the pruned one before and after fine-tuning; slimcore's rows also say how far
    they are from the best peer (``~``: within noise)."""
    lines = ["| arch | MACs | method | sparse | MACs kept | pruned, before FT | after FT | after FT vs best peer |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for arch, per in results.items():
        lines.append(f"| {arch} | 1x | baseline | {fmt(per['baseline'])} | 100% | | | |")
        for s in speedups:
            rows = [(m, r) for m, r in per["methods"].items() if f"{s:g}" in r["cells"]]  # a run of other speed-ups
            if not rows:
                continue
            peers = [r["cells"][f"{s:g}"] for m, r in rows if not m.startswith("slimcore")]
            best_peer = max(peers, key=lambda c: c["after"]["top1"]) if peers else None
            best = max(r["cells"][f"{s:g}"]["after"]["top1"] for _, r in rows)
            for m, r in rows:
                c = r["cells"][f"{s:g}"]
                after = fmt(c["after"])
                if c["after"]["top1"] == best:
                    after = f"**{after}**"
                gap = versus(c["after"], best_peer["after"]) if best_peer and m.startswith("slimcore") else ""
                lines.append(f"| {arch} | {s:g}x | {shown(m, arch)} | {fmt(c.get('sparse', r['sparse']))} | "
                             f"{100 * c['macs_kept']:.1f}% | {fmt(c['before'])} | {after} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="configs/fashion-mnist.yaml", help="the settings (a params file or preset)")
    ap.add_argument("--archs", nargs="*", default=None, help="default: the params file's archs")
    ap.add_argument("--methods", nargs="*", default=list(METHODS),
                    help=f"of {', '.join(METHODS)}, each with optional :key=value,... params overrides")
    ap.add_argument("--speedups", nargs="*", type=float, default=[2.0, 4.0], help="MAC speed-ups to prune to")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the params file for every method, e.g. runtime.threads=1")
    ap.add_argument("--paper-strength", type=float, default=1e-4)
    ap.add_argument("--work", type=Path, default=Path(".slimcore/bench-peers"),
                    help="cache of checkpoints and finished runs (a second call computes only what is new)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/peers.json"), help="every figure, as JSON")
    args = ap.parse_args()
    params = load_params(args.params)
    if args.sets:
        from slimcore_pipeline.preset import parse_sets

        params = with_overrides(params, parse_sets(args.sets))
    ctx = current_context(params.runtime)
    splits = load_splits(params.data)
    methods = [parse_method(m) for m in args.methods]
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    shown: dict[str, Any] = {}  # this call's archs and methods: the table (the file keeps every run)
    started = time.perf_counter()
    for arch in args.archs or params.archs:
        bench = Bench(params, arch, args.work, splits, ctx)
        t0 = time.perf_counter()
        base = bench.baseline().eval()
        per = results.setdefault(arch, {"methods": {}})
        per["baseline"] = scored(base, bench.test, ctx)
        shown[arch] = {"baseline": per["baseline"], "methods": {}}
        print(f"{arch}: baseline {fmt(per['baseline'])} ({time.perf_counter() - t0:.0f}s)", flush=True)
        for name, overrides in methods:
            r = run_method(bench, name, overrides, args.speedups, args.paper_strength)
            per["methods"][r["method"]] = shown[arch]["methods"][r["method"]] = r
            cells = "  ".join(f"x{s}: {fmt(c['before'])} -> {fmt(c['after'])} (MACs {100 * c['macs_kept']:.1f}%)"
                              for s, c in r["cells"].items())
            print(f"{arch} {r['method']}: sparse {fmt(r['sparse'])}  {cells}  ({r['seconds']}s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(table(shown, args.speedups))
    print(f"\n{len(splits.test)} test images; intervals are 95% Wilson intervals; "
          f"this call took {time.perf_counter() - started:.0f} s (cached runs are not recomputed)")


if __name__ == "__main__":
    main()
