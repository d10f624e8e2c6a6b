"""slimcore: Network Slimming (Liu et al., ICCV 2017) for torchvision-style CNNs.

Train with an L1 (group) penalty on every BatchNorm scale factor (gamma), rank all channels
globally by |gamma|, remove the lowest ones for real (a physically smaller network), and save
it in a checkpoint that rebuilds it without running code from the file.

In short (every public name, with an example, is listed below)::

    import torch, slimcore

    model = slimcore.build_model("resnet50", num_classes=10, stem="cifar", width=0.25)
    x = torch.randn(2, 3, 32, 32)
    penalty = slimcore.GammaPenalty(model, 1e-4, "group", slimcore.coupled_units(model, x))
    # in your training loop, after optimizer.step():  penalty.after_step_(lr)
    small, report = slimcore.slim_to(model, "speedup2", x)     # or slimcore.slim(model, 0.4, x)
    slimcore.save_model("small.pt", small)
    same = slimcore.load_model("small.pt")

Engine only: torch, torchvision, torch-pruning, thop and numpy.  The DVC pipeline built on it is
the separate package ``slimcore_pipeline`` (``pip install 'slimcore[pipeline]'``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# name -> the module that defines it.  Imported on first use (PEP 562), so `import slimcore` and
# modules that only need, e.g., slimcore.targets do not load torch.
_API = {
    "slim": "slimcore.prune", "slim_to": "slimcore.prune", "SlimPolicy": "slimcore.prune",
    "SlimReport": "slimcore.prune", "SlimError": "slimcore.prune", "coupled_units": "slimcore.prune",
    "GammaPenalty": "slimcore.penalty", "share_for_targets": "slimcore.penalty_target",
    "build_model": "slimcore.models", "save_model": "slimcore.checkpoint", "load_model": "slimcore.checkpoint",
    "load_weights": "slimcore.weights", "count_flops": "slimcore.flops", "count_params": "slimcore.flops",
    "export_onnx": "slimcore.export", "fold_batchnorms": "slimcore.export",
    "SlimcoreError": "slimcore.errors", "ModelError": "slimcore.errors", "evaluate": "slimcore.accuracy",
}

try:
    __version__ = version("slimcore")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimcore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
