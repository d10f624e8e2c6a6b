"""Starting weights: initialise a freshly built model from a state_dict or a slimcore checkpoint.

``model.weights`` in params.yaml names a folder of ``ARCH.pt`` / ``ARCH.pth`` files (``ARCH``: the
entry of ``archs``; an arch without a file starts from random init) or one file used for every
arch.  A file holds either

* a plain ``state_dict`` (torchvision's, timm's, your own), possibly wrapped the usual ways:
  ``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``, keys prefixed with
  ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``); or
* a slimcore checkpoint of an unpruned model (e.g. another run's ``models/ARCH/baseline.pt``).

Files are read with ``torch.load(weights_only=True)``: nothing in them is executed.  Every tensor
must fit (keys and shapes; the error names what does not), except the classifier: when the file
was trained for another number of classes (1000 ImageNet classes, fine-tuned here on 10), the
classifier keeps its random init and the returned :class:`WeightsReport` says so.  Nothing is
ever downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimcore.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

SUFFIXES: tuple[str, ...] = (".pt", ".pth")
DEFAULT_WEIGHTS = "weights"  # model.weights' default (slimcore_pipeline.config): absent, it counts as an empty folder
_WRAPPERS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "module")
_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
_SHOWN = 5  # names listed per kind of mismatch


def weights_file(weights: str | Path, arch: str) -> Path | None:
    """The weights file for ``arch``: ``weights/ARCH.pt`` or ``.pth`` in a folder (None when there
    is neither), or ``weights`` itself when it is a file.  Any other path that does not exist is
    an error, except the default folder ``weights`` (a project without it starts from random init)."""
    path = Path(weights)
    if not path.exists() and path == Path(DEFAULT_WEIGHTS):
        return None
    if path.is_dir():
        found = [path / f"{arch}{suffix}" for suffix in SUFFIXES if (path / f"{arch}{suffix}").is_file()]
        if len(found) > 1:
            raise ModelError(f"model.weights: both {found[0]} and {found[1]} exist: keep one")
        return found[0] if found else None
    if path.is_file():
        return path
    raise ModelError(f"model.weights: {path} is neither a folder of ARCH.pt/ARCH.pth files nor a weights file")


@dataclass
class WeightsReport:
    """What :func:`load_weights` did."""

    path: Path
    kind: str  # "state_dict" or "slimcore checkpoint"
    loaded: int  # tensors copied into the model
    skipped: list[str] = field(default_factory=list)  # classifier tensors left at their init
    classes_in_file: int | None = None
    classes_in_model: int | None = None

    def message(self) -> str:
        text = f"initialised from {self.path} ({self.kind}): {self.loaded} tensors"
        if self.skipped:
            head = self.skipped[0].rpartition(".")[0]
            text += (f"; classifier {head} not loaded ({self.classes_in_file} classes in the file, "
                     f"{self.classes_in_model} here): it starts from random init")
        return text


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside the usual wrappers, with whole-dict prefixes removed."""
    import torch

    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))[:_SHOWN]
            raise ModelError(f"{path}: not a state_dict: entries {others} are not tensors (and none of "
                             f"{list(_WRAPPERS)} holds one)")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{path}: not a state_dict (a {type(obj).__name__})")
    state = {str(k): v for k, v in obj.items()}
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def classifier_name(model: nn.Module, num_classes: int | None = None) -> str | None:
    """Name of the model's logits layer: timm's ``get_classifier()``, else the last Linear/Conv2d
    (with ``num_classes`` outputs when given)."""
    from torch import nn

    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # a model whose get_classifier does not apply
            head = None
        if isinstance(head, (nn.Linear, nn.Conv2d)):
            name = next((n for n, m in model.named_modules() if m is head and n), None)
            if name:
                return name
    candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                  and (num_classes is None or m.weight.shape[0] == num_classes)]
    return candidates[-1] if candidates else None


def read_weights(path: Path | str, model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict in ``path`` (plain or wrapped state_dict, or unpruned slimcore checkpoint)."""
    from slimcore.checkpoint import FORMAT, checked_checkpoint, safe_torch_load
    from slimcore.models import SPEC_ATTR, ModelSpec

    path = Path(path)
    raw = safe_torch_load(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        ckpt = checked_checkpoint(raw, path)  # version check
        if ckpt["plan"]:
            raise ModelError(f"{path}: holds a pruned model ({len(ckpt['plan'])} pruning steps): start from an "
                             "unpruned one (a baseline or sparse checkpoint, or a state_dict)")
        spec = ModelSpec.from_dict(ckpt["spec"])
        own = getattr(model, SPEC_ATTR, None)
        if isinstance(own, ModelSpec) and (own.source, own.name) != (spec.source, spec.name):
            raise ModelError(f"{path}: holds a {spec.arch} model, but {own.arch} is being trained")
        return dict(ckpt["state_dict"]), "slimcore checkpoint"
    return _unwrap(raw, path), "state_dict"


def _listing(label: str, items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {label} ({', '.join(items[:_SHOWN])}{more})"


def load_weights(model: nn.Module, path: Path | str) -> WeightsReport:
    """Copy the weights in ``path`` into ``model`` (in place); see the module docstring.

    Raises:
        ModelError: keys missing or unexpected, or shapes that differ (all named), other than a
        classifier trained for another number of classes; a pruned checkpoint; another arch.
        CheckpointError: unreadable file, or one holding pickled objects.

    Example:
        >>> model = slimcore.build_model("resnet50", num_classes=10)
        >>> report = slimcore.load_weights(model, "resnet50-imagenet.pth")  # a 1000-class head is skipped
    """
    from slimcore.models import SPEC_ATTR

    path = Path(path)
    state, kind = read_weights(path, model)
    own = model.state_dict()
    spec = getattr(model, SPEC_ATTR, None)
    head = classifier_name(model, getattr(spec, "num_classes", None))
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    skipped: list[str] = []
    classes_in_file = classes_in_model = None
    wrong: list[str] = []
    for key in own:
        if key not in state or state[key].shape == own[key].shape:
            continue
        a, b = tuple(state[key].shape), tuple(own[key].shape)
        if head and key.startswith(head + ".") and len(a) == len(b) and a[1:] == b[1:]:
            skipped.append(key)  # classifier with another number of classes
            classes_in_file, classes_in_model = a[0], b[0]
        else:
            wrong.append(f"{key}: {a} in the file, {b} in the model")
    if missing or unexpected or wrong:
        problems = [_listing(label, items) for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if items]
        arch = getattr(spec, "arch", type(model).__name__)
        raise ModelError(f"{path}: weights do not fit {arch}: {'; '.join(problems)}")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return WeightsReport(path, kind, loaded=len(state) - len(skipped), skipped=skipped,
                         classes_in_file=classes_in_file, classes_in_model=classes_in_model)


__all__ = ["DEFAULT_WEIGHTS", "SUFFIXES", "WeightsReport", "classifier_name", "load_weights", "read_weights",
           "weights_file"]
