"""A user's first ``slim`` call at 224px: one run per model, each in a fresh process, no warm-up.

    PYTHONPATH=. .venv/bin/python bench/slim_cold.py dpn68 densenet121 mixnet_s

Each timm model (random init, nothing downloaded) gets bimodal gammas (45% near zero, as in
``bench/prune_speed.py --timm``) and is slimmed at ratio 0.4 with 2 torch threads; the time
includes tracing, choosing, folding, surgery and the checks.  Needs timm.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

DEFAULT = ["dpn68", "densenet121", "mixnet_s", "res2net50_26w_4s", "hrnet_w18_small", "rexnet_100"]


def one(name: str, size: int) -> None:
    """Slim ``name`` once in this process and print its time and all-BN ratio."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from prune_speed import bimodal_gammas

    from slimcore.models import build_model
    from slimcore.prune import slim

    torch.set_num_threads(2)
    model = bimodal_gammas(build_model(f"timm:{name}", num_classes=100), 0.45).eval()
    start = time.perf_counter()
    _, report = slim(model, 0.4, torch.randn(1, 3, size, size))
    print(f"| {name} | {time.perf_counter() - start:.2f} | {report.ratio_all_bn:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        one(args.models[0], args.size)
        return
    print(f"cold slim at {args.size}px, ratio 0.4, 2 threads, one fresh process per model\n")
    print("| model | seconds | removed / all BN |\n|---|---:|---:|", flush=True)
    for name in args.models:
        subprocess.run([sys.executable, __file__, name, "--size", str(args.size), "--one"], check=True,
                       stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
