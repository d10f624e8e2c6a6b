"""Coverage beyond the tests: slim timm models at 0.4 and check the checkpoint round trip.

    PYTHONPATH=. .venv/bin/python bench/timm_round_trip.py resnet18 skresnet18 ...

For each name: build ``timm:NAME`` (10 classes, random init, nothing downloaded), give it bimodal
gammas (45% near zero, as ``bench/prune_speed.py --timm``), slim at ratio 0.4 on a 64px input
(96px for inception_v3), ``save_model`` / ``load_model`` and compare outputs bit for bit.
Prints the share of all BN channels removed and whether the reloaded model is exact.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from prune_speed import bimodal_gammas

from slimcore.checkpoint import load_model, save_model
from slimcore.models import build_model
from slimcore.prune import slim

LARGER_INPUT = {"inception_v3": 96}


def check(name: str) -> tuple[float, bool]:
    """(share of all BN channels removed, reloaded outputs bit-identical) for timm model ``name``."""
    size = LARGER_INPUT.get(name, 64)
    model = bimodal_gammas(build_model(f"timm:{name}", num_classes=10), 0.45).eval()
    pruned, report = slim(model, 0.4, torch.randn(2, 3, size, size))
    with tempfile.TemporaryDirectory() as folder:
        save_model(Path(folder) / "m.pt", pruned)
        reloaded = load_model(Path(folder) / "m.pt")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return report.ratio_all_bn, torch.equal(pruned.eval()(x), reloaded(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print("| model | removed / all BN | round trip |\n|---|---:|---|")
    for name in args.models:
        try:
            ratio, exact = check(name)
            print(f"| {name} | {ratio:.3f} | {'exact' if exact else 'DIFFERS'} |", flush=True)
        except Exception as err:  # report and go on: one model must not hide the others
            print(f"| {name} | - | failed: {type(err).__name__}: {str(err)[:120]} |", flush=True)


if __name__ == "__main__":
    main()
