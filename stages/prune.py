"""Stage ``prune@ARCH-RATIO``: slim the sparse-trained model by a global |gamma| threshold."""

from __future__ import annotations

from pathlib import Path

import typer

from stages._common import PARAMS_OPTION, check_ratio, console, params_for, run_app, stage, write_json

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    arch: str = typer.Option(..., help="architecture, one of params.yaml's archs"),
    ratio: float = typer.Option(..., help="fraction of prunable BN channels to remove, in [0, 1)"),
    params_file: Path = PARAMS_OPTION,
) -> None:
    """Write models/ARCH/pruned-RATIO.pt (+ -nofold ablation), metrics/prune/ARCH-RATIO.json and
    the slimming time to metrics/timings/ARCH/prune-RATIO.json."""
    with stage(f"prune@{arch}-{ratio}"):
        params = params_for(params_file, arch)
        check_ratio(params, ratio)
        from slimcore import paths
        from slimcore.checks import check_disk, check_writable, tensor_bytes

        check_writable(paths.pruned(arch, ratio).parent, paths.prune_report(arch, ratio).parent,
                       paths.timings(arch, paths.prune_run(ratio)).parent)
        import torch

        from slimcore.checkpoint import load_model, save_model
        from slimcore.models import spec_of
        from slimcore.profile import count_params
        from slimcore.prune import slim

        sparse = load_model(paths.checkpoint(arch, "sparse"), expected_arch=params.model_for(arch).arch)
        check_disk(paths.pruned(arch, ratio).parent, 2 * tensor_bytes(sparse), "the two pruned checkpoints")
        generator = torch.Generator().manual_seed(params.seed)
        size = params.data.image_size
        example = torch.randn(2, 3, size, size, generator=generator)
        policy = params.prune.model_dump(exclude={"ratios", "max_drop"})
        pruned, report = slim(sparse, ratio, example, **policy)
        save_model(paths.pruned(arch, ratio), pruned, run="prune", ratio=ratio,
                   true_ratio=report.true_ratio, threshold=report.threshold)
        nofold, _ = slim(sparse, ratio, example, **{**policy, "fold_constants": False})
        save_model(paths.pruned(arch, ratio, fold=False), nofold, run="prune-nofold", ratio=ratio)
        summary = {
            "requested_ratio": report.requested_ratio,
            "true_ratio": report.true_ratio,
            "ratio_all_bn": report.ratio_all_bn,
            "threshold": report.threshold,
            "exact": report.exact,
            "removed_bn_channels": report.removed_bn_channels,
            "prunable_bn_channels": report.prunable_bn_channels,
            "total_bn_channels": report.total_bn_channels,
            "skipped_bn_channels": report.skipped_bn_channels,
            "params_before": count_params(sparse),
            "params_after": count_params(pruned),
            "bound_by": report.bound_by,
            "skipped": report.skipped,
            "policy": report.policy,
            "spec": spec_of(pruned).to_dict(),
            "channels": report.channels_per_layer,
        }
        write_json(paths.prune_report(arch, ratio), summary)
        write_json(paths.timings(arch, paths.prune_run(ratio)), {"seconds": round(report.seconds, 3)})
        console.log(f"prune@{arch}-{ratio}: removed {report.true_ratio:.2%} of {report.prunable_bn_channels} "
                    f"BN channels (threshold |gamma| <= {report.threshold:.3g}), params "
                    f"{summary['params_before'] / 1e6:.3f}M -> {summary['params_after'] / 1e6:.3f}M")
        if short_of_request(report.ratio_all_bn, ratio):
            console.print(f"[yellow]warning: prune@{arch}-{ratio}: only {report.ratio_all_bn:.2%} of all "
                          f"{report.total_bn_channels} BN channels removed for a requested {ratio:.0%}: "
                          f"{report.skipped_bn_channels} BN channels are held fixed in skipped groups "
                          f"(see 'skipped' in {paths.prune_report(arch, ratio)})[/]")


def short_of_request(ratio_all_bn: float, requested: float, tolerance: float = 0.01) -> bool:
    """True when the share of all BN channels removed falls short of the request by > 1 pt."""
    return ratio_all_bn < requested - tolerance


if __name__ == "__main__":
    run_app(app)
