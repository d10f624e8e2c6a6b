"""One file per model: ``state_dict`` + model spec + pruning plan; never a pickled module.

Files are written atomically (temp file in the same folder, fsync, rename) and read with
``torch.load(weights_only=True)``, so loading never executes code from the file.  A model is
rebuilt as: build the spec (through its source: torchvision, timm or a Python factory) ->
replay the pruning plan (traced at the recorded input size) -> load the weights (strict).

Version 2 (this one) stores the spec as ``{source, name, num_classes, stem, width, kwargs}`` and
the traced input size (``trace_size``); version-1 files (``{arch, num_classes, stem, width}``,
torchvision only, no trace size) are still read.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimcore.archs import parse_arch
from slimcore.checks import check_finite
from slimcore.errors import CheckpointError, SlimcoreError
from slimcore.models import PLAN_ATTR, TRACE_ATTR, ModelSpec, spec_of
from slimcore.process import atomic_write_bytes  # the one writer of every output file

FORMAT = "slimcore-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and what went wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(
                f"{path}: refused to load: it holds a pickled {found.group(1)} object, not only tensors and "
                "plain data (nothing in it was executed); re-save its state_dict from code you trust"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupt or not a torch file; "
                              f"nothing in it was executed){_unpickler_detail(err)}; {_REDO}") from None
    except Exception as err:  # the weights-only unpickler raises many kinds
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, corrupt or not a torch file; nothing in it was "
            f"executed){_unpickler_detail(err)}; {_REDO}"
        ) from None


_REDO = "re-create it (dvc repro) or restore it from the cache (dvc checkout)"


def _unpickler_detail(err: Exception) -> str:
    """torch's reason in one sentence (``: REASON``, or nothing), without its advice to load
    with the unsafe unpickler (never right for a file one did not write: it runs its code)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    advice = ("weights_only", "Weights only load failed", "Check the documentation", "Please file", "safe_globals")
    line = next((line.strip() for line in text.splitlines()
                 if line.strip() and not any(a in line for a in advice)), "")
    sentence = re.split(r"(?<=\.) (?=[A-Z])", line)[0]
    name = type(err).__name__
    return f": {name}: {sentence}" if sentence else f": {name}"


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """The checkpoint's dictionary, validated as a slimcore checkpoint."""
    return checked_checkpoint(safe_torch_load(path), path)


def checked_checkpoint(ckpt: Any, path: Path | str) -> dict[str, Any]:
    """``ckpt`` (what ``path`` held) if it is a slimcore checkpoint of a readable version."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a slimcore checkpoint (no '{FORMAT}' header)")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} is not one of "
                              f"{list(READABLE_VERSIONS)} (written by another slimcore?)")
    _check_fields(ckpt, path)
    return ckpt


_FIELDS = {"spec": dict, "plan": list, "state_dict": dict, "meta": dict}


def _check_fields(ckpt: dict[str, Any], path: Path | str) -> None:
    """Every part a model is rebuilt from is there, with its type (a damaged or hand-made file is not)."""
    for key, kind in _FIELDS.items():
        if not isinstance(ckpt.get(key), kind):
            what = "missing" if key not in ckpt else f"a {type(ckpt[key]).__name__}, not a {kind.__name__}"
            raise CheckpointError(f"{path}: damaged checkpoint: its '{key}' is {what}; re-create it with the "
                                  "stage that writes it (e.g. dvc repro --force STAGE)")
    for i, entry in enumerate(ckpt["plan"]):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)):
            raise CheckpointError(f"{path}: damaged checkpoint: plan entry {i} is not [module name, is_output, "
                                  "indices]; re-create it with the stage that writes it")


def _check_plain(value: Any, where: str) -> None:
    """Spec kwargs must be plain data: ``torch.load(weights_only=True)`` reads nothing else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for k, item in value.items():
            _check_plain(item, f"{where}.{k}")
        return
    raise CheckpointError(f"cannot save the model spec: {where} is a {type(value).__name__}; builder kwargs "
                          "must be plain data (numbers, strings, lists, dicts) to rebuild the model on load")


def _trace_size(model: nn.Module) -> list[int] | None:
    """(H, W) the model's pruning plan was traced with (recorded by slimcore.plan.build_graph)."""
    size = getattr(model, TRACE_ATTR, None)
    if size is not None:
        return [int(s) for s in size]
    cfg = getattr(model, "pretrained_cfg", None)  # timm: the input size the model was designed for
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (list, tuple)) and len(cfg["input_size"]) == 3:
        return [int(cfg["input_size"][1]), int(cfg["input_size"][2])]
    return None


def save_model(path: Path | str, model: nn.Module, spec: ModelSpec | None = None, **meta: Any) -> Path:
    """Save ``model`` as state_dict + spec + pruning plan (+ plain ``meta``), atomically."""
    try:
        spec = spec or spec_of(model)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    # Index lists as int64 tensors: plain data that torch.load(weights_only=True) reads fast.
    plan = [[str(name), bool(is_out), torch.as_tensor([int(i) for i in idxs], dtype=torch.int64)]
            for name, is_out, idxs in getattr(model, PLAN_ATTR, [])]
    _check_plain(dict(spec.kwargs), "kwargs")
    trace_size = _trace_size(model) if plan else None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(
        {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), "plan": plan,
         "trace_size": trace_size, "state_dict": state, "meta": meta},
        path,
    )
    return Path(path)


def _materialise_folded_biases(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give bias-free layers the bias that constant folding added to them before saving."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if leaf == "bias" and module is not None and getattr(module, "bias", 0) is None:
            module.bias = nn.Parameter(torch.zeros_like(value))


def same_arch(spec: ModelSpec, arch: str) -> bool:
    """True when ``arch`` (``resnet50``, ``torchvision:resnet50``, ``timm:X``, ``pkg.mod:fn``) names
    the model ``spec`` describes (same source and name; builder kwargs are not compared)."""
    try:
        return parse_arch(arch) == (spec.source, spec.name)
    except ValueError:
        return False


def checkpoint_spec(path: Path | str) -> ModelSpec:
    """The :class:`ModelSpec` a checkpoint holds (no model is built)."""
    return _spec_of_checkpoint(read_checkpoint(path), path)


def _spec_of_checkpoint(ckpt: dict[str, Any], path: Path | str) -> ModelSpec:
    try:
        return ModelSpec.from_dict(ckpt["spec"])
    except (TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{path}: malformed model spec: {err}") from None


def load_model_and_meta(path: Path | str, expected_arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint (spec -> replay pruning plan -> load weights, strict),
    and return it with the ``meta`` it was saved with.

    ``expected_arch`` (an arch string as :func:`slimcore.models.build_model` takes it, e.g. a
    params.yaml short name resolved by :meth:`slimcore.config.Params.model_for`) must name the
    model the file holds.
    """
    from slimcore.plan import replay_plan  # torch-pruning: imported only when a plan is replayed

    ckpt = read_checkpoint(path)
    spec = _spec_of_checkpoint(ckpt, path)
    if expected_arch is not None and not same_arch(spec, expected_arch):
        raise CheckpointError(f"{path}: holds a {spec.arch} model, but {expected_arch} was requested")
    try:
        model = spec.build()
    except SlimcoreError as err:
        raise CheckpointError(f"{path}: cannot rebuild its {spec.arch} model: {err}") from err
    if ckpt["plan"]:
        modules = dict(model.named_modules())
        unknown = [name for name, _, _ in ckpt["plan"] if name not in modules]
        if unknown:
            raise CheckpointError(f"{path}: damaged or foreign checkpoint: its pruning plan names module "
                                  f"{unknown[0]!r}, which the rebuilt {spec.arch} does not have; re-create it "
                                  "with the stage that writes it")
        try:
            plan = [[name, bool(is_out), torch.as_tensor(idxs).tolist()] for name, is_out, idxs in ckpt["plan"]]
            replay_plan(model, plan, spec, ckpt.get("trace_size"))
        except Exception as err:  # torch-pruning: a model that does not trace at that size, a foreign plan
            raise CheckpointError(f"{path}: cannot replay the pruning plan on the rebuilt {spec.arch} "
                                  f"(traced at {ckpt.get('trace_size') or spec.min_image_size}px): "
                                  f"{type(err).__name__}: {err}") from err
    _materialise_folded_biases(model, ckpt["state_dict"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the rebuilt {spec.arch}: "
                              f"{' '.join(str(err).split())}") from None
    check_finite(model, str(path))
    model.eval()
    return model, dict(ckpt["meta"])


def load_model(path: Path | str, expected_arch: str | None = None) -> nn.Module:
    """Rebuild a model from a checkpoint: spec -> replay pruning plan -> load weights (strict)."""
    return load_model_and_meta(path, expected_arch)[0]


def checkpoint_meta(path: Path | str) -> dict[str, Any]:
    """The ``meta`` a checkpoint was saved with (no model is built)."""
    return dict(read_checkpoint(path)["meta"])


__all__ = [
    "CheckpointError", "atomic_torch_save", "atomic_write_bytes", "checked_checkpoint", "checkpoint_meta",
    "checkpoint_spec", "load_model", "load_model_and_meta", "read_checkpoint", "safe_torch_load", "same_arch",
    "save_model",
]
