"""One file per model: ``state_dict`` + model spec + pruning plan; never a pickled module.

Files are written atomically (temp file in the same folder, fsync, rename) and read with
``torch.load(weights_only=True)``, so reading a file never executes code from it.  A model is
rebuilt as: check the file (digest, spec, sizes) -> build the spec (through its source:
torchvision, timm or a Python factory) -> replay the pruning plan (traced at the recorded input
size) -> cast to the recorded dtype -> load the weights (strict).

A file names its architecture; it never chooses code to run.  torchvision and timm models are
rebuilt by name with only the bounded keyword arguments of
:data:`slimcore.models.LOADABLE_KWARGS`; a ``python`` source (``module:function``) is imported
and called only when the caller trusts it (``load_model(path, trusted=...)``).  Every check
runs before any import, allocation or file access (docs/security.md).

Version 3 (this one) adds a digest of the whole content (every tensor's name, dtype, shape and
bytes, and the plain data around them) and the model's dtype.  Version 2 stores the spec as
``{source, name, num_classes, stem, width, kwargs}`` and the traced input size
(``trace_size``); version-1 files (``{arch, num_classes, stem, width}``, torchvision only, no
trace size) are still read.  Version-1/2 files have no digest: they load with a warning.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from slimcore.archs import parse_arch
from slimcore.checks import check_finite
from slimcore.errors import CheckpointError, ModelError, SlimcoreError
from slimcore.files import atomic_write_bytes  # tmp file + fsync + rename: never half a file
from slimcore.models import PLAN_ATTR, TRACE_ATTR, ModelSpec, check_rebuildable, short_repr, spec_of

FORMAT = "slimcore-checkpoint"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
DIGEST_SINCE = 3  # files of this version and later carry a digest, and must
DTYPES = ("float32", "float16", "bfloat16", "float64")  # a model's parameters, as recorded
MAX_TRACE_SIDE = 1024  # pixels: a plan is replayed on one input of this size at most


def torch_bytes(obj: Any) -> bytes:
    """What ``torch.save(obj, file)`` would write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` through :func:`slimcore.files.atomic_write_bytes`."""
    atomic_write_bytes(path, torch_bytes(obj))


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
    """The checkpoint's dictionary, validated as a slimcore checkpoint (digest verified)."""
    return checked_checkpoint(safe_torch_load(path), path)


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written before digests (version 1 or 2) was read: its tensors were not verified."""


def checked_checkpoint(ckpt: Any, path: Path | str) -> dict[str, Any]:
    """``ckpt`` (what ``path`` held) if it is a slimcore checkpoint of a readable version whose
    parts have their types and bounds and whose content matches its digest."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a slimcore checkpoint (no '{FORMAT}' header)")
    version = ckpt.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint version {short_repr(version)} is not one of "
                              f"{list(READABLE_VERSIONS)} (written by another slimcore?)")
    _check_fields(ckpt, path)
    if version >= DIGEST_SINCE:
        _verify_digest(ckpt, path)
    else:
        warnings.warn(f"{path}: a version-{version} checkpoint has no digest, so its tensors were not "
                      "verified; save it again (load_model, then save_model) to add one",
                      UnverifiedCheckpointWarning, stacklevel=3)
    return ckpt


_FIELDS = {"spec": dict, "plan": list, "state_dict": dict, "meta": dict}
_DAMAGED = "re-create it with the stage that writes it (e.g. dvc repro --force STAGE)"
_NOTHING = "nothing was imported or built (damaged or hand-made file?)"


def _check_fields(ckpt: dict[str, Any], path: Path | str) -> None:
    """Every part a model is rebuilt from is there, with its type and within bounds (a damaged or
    hand-made file is not)."""
    for key, kind in _FIELDS.items():
        if not isinstance(ckpt.get(key), kind):
            what = "missing" if key not in ckpt else f"a {type(ckpt[key]).__name__}, not a {kind.__name__}"
            raise CheckpointError(f"{path}: damaged checkpoint: its '{key}' is {what}; {_DAMAGED}")
    for i, entry in enumerate(ckpt["plan"]):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)):
            raise CheckpointError(f"{path}: damaged checkpoint: plan entry {i} is not [module name, is_output, "
                                  "indices]; re-create it with the stage that writes it")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise CheckpointError(f"{path}: damaged checkpoint: its state_dict holds more than named tensors; "
                              f"{_DAMAGED}")
    size = ckpt.get("trace_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2 and all(
            isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_TRACE_SIDE for s in size)):
        raise CheckpointError(f"{path}: refused to rebuild its model: its trace_size {short_repr(size)} is not "
                              f"two sides in 1..{MAX_TRACE_SIDE} px; {_NOTHING}")
    if ckpt.get("dtype", "float32") not in DTYPES:
        raise CheckpointError(f"{path}: refused to rebuild its model: its dtype {short_repr(ckpt.get('dtype'))} "
                              f"is not one of {', '.join(DTYPES)}; {_NOTHING}")


# --------------------------------------------------------------------------------------------
# Integrity: a digest of the whole content, written with it and verified on every read
# --------------------------------------------------------------------------------------------

def _feed(digest: Any, value: Any) -> None:
    """Feed ``value`` (plain data and tensors, as a checkpoint holds them) to ``digest``, typed and
    framed so that different contents never give the same bytes; dict keys in sorted order."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"T{str(data.dtype).removeprefix('torch.')}{list(data.shape)}:".encode())
        digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: repr(kv[0]))
        digest.update(f"D{len(items)}:".encode())
        for key, item in items:
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        digest.update(f"{type(value).__name__[0]}{len(text)}:{text}".encode())
    else:
        raise CheckpointError(f"cannot digest a {type(value).__name__}: a checkpoint holds plain data and "
                              "tensors only")


def content_digest(ckpt: Mapping[str, Any]) -> str:
    """``sha256:HEX`` over everything in ``ckpt`` but its ``digest``: each tensor's dtype, shape and
    bytes and every plain value, keys in sorted order.  The same content always gives the same
    digest (checkpoints stay byte-identical for identical inputs).  It detects changed or
    corrupted bytes; it is not a signature (whoever writes a file can write its digest)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in ckpt.items() if k != "digest"})
    return f"sha256:{digest.hexdigest()}"


def _verify_digest(ckpt: dict[str, Any], path: Path | str) -> None:
    recorded = ckpt.get("digest")
    if not isinstance(recorded, str):
        raise CheckpointError(f"{path}: damaged checkpoint: a version-{ckpt['version']} file without its digest; "
                              f"{_REDO}")
    if content_digest(ckpt) != recorded:
        raise CheckpointError(f"{path}: integrity check failed: its content does not match the digest written "
                              f"with it (a changed or corrupted byte); nothing was built; {_REDO}")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s wrapper (``_orig_mod``) and ``DataParallel`` /
    ``DistributedDataParallel`` (``.module``), however nested; ``model`` itself otherwise."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, parallel):
            model = model.module
        elif isinstance(model._modules.get("_orig_mod"), nn.Module):  # torch.compile's OptimizedModule
            model = model._modules["_orig_mod"]
        else:
            return model


def model_dtype(model: nn.Module) -> str:
    """The floating dtype of ``model``'s parameters (``float32``, ``float16``, ...), one for all."""
    found = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    if len(found) > 1:
        raise CheckpointError(f"cannot save the model: its parameters mix {', '.join(found)}; cast it to one "
                              "dtype first (model.float(), model.half(), model.bfloat16())")
    dtype = found[0] if found else "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"cannot save the model: its parameters are {dtype}, not one of {', '.join(DTYPES)}")
    return dtype


def save_model(path: Path | str, model: nn.Module, spec: ModelSpec | None = None, **meta: Any) -> Path:
    """Save ``model`` as state_dict + spec + pruning plan + dtype (+ plain ``meta``) with the
    digest of it all, atomically.  A ``torch.compile`` / ``DataParallel`` / DDP wrapper is
    unwrapped first: the file holds the model inside.

    >>> save_model("models/slim.pt", slimmed, note="resnet50 at 0.3")  # doctest: +SKIP
    PosixPath('models/slim.pt')
    >>> model = load_model("models/slim.pt")  # rebuilt at its slimmed widths  # doctest: +SKIP
    """
    atomic_write_bytes(path, model_bytes(model, spec, **meta))
    return Path(path)


def model_bytes(model: nn.Module, spec: ModelSpec | None = None, **meta: Any) -> bytes:
    """The bytes :func:`save_model` writes (for a caller with its own writer)."""
    model = unwrap_model(model)
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
    ckpt: dict[str, Any] = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), "plan": plan,
                            "trace_size": trace_size, "dtype": model_dtype(model), "state_dict": state,
                            "meta": meta}
    ckpt["digest"] = content_digest(ckpt)
    return torch_bytes(ckpt)


# --------------------------------------------------------------------------------------------
# Loading: what the file may ask for, then the model
# --------------------------------------------------------------------------------------------

class ModelEntry(Protocol):
    """A model named by source, name and builder kwargs: a :class:`ModelSpec`, or params.yaml's
    ``models`` entry as :meth:`slimcore_pipeline.config.Params.model_for` resolves it."""

    @property
    def source(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def kwargs(self) -> Mapping[str, Any]: ...


# ``load_model(trusted=...)``: one item or a list/tuple/set of them.  A ``module:function`` string
# trusts that Python factory with the plain kwargs the file gives; a ModelEntry trusts exactly that
# source, name and kwargs (any source: its kwargs then need not be on the allow-list).
Trusted = str | ModelEntry | list[str | ModelEntry] | tuple[str | ModelEntry, ...] | set[str] | frozenset[str] | None


def _trusted_items(trusted: Trusted) -> list[str | ModelEntry]:
    if trusted is None:
        return []
    if isinstance(trusted, (list, tuple, set, frozenset)):
        return list(trusted)
    return [trusted]


def trusted_factory(item: str) -> str:
    """The ``module:function`` a ``trusted`` string names (``python:`` prefix allowed); ValueError
    for anything else (a timm or torchvision name needs no trust: it runs no code of the file's)."""
    try:
        source, name = parse_arch(item)
    except ValueError as err:
        raise ValueError(f"trusted {item!r}: {err}") from None
    if source != "python":
        raise ValueError(f"trusted {item!r}: not a Python factory 'package.module:function' (torchvision and "
                         "timm models are rebuilt by name, without trust)")
    return name


def _trust(spec: ModelSpec, trusted: Trusted) -> tuple[bool, bool]:
    """(may its ``python`` factory run, are its kwargs the caller's own) for ``spec`` under ``trusted``."""
    code = own = False
    for item in _trusted_items(trusted):
        if isinstance(item, str):
            code = code or (spec.source == "python" and trusted_factory(item) == spec.name)
        elif (item.source, item.name) == (spec.source, spec.name) and dict(item.kwargs) == dict(spec.kwargs):
            code = own = True
    return code, own


def _call_text(spec: ModelSpec) -> str:
    args = ", ".join([f"num_classes={spec.num_classes}"]
                     + [f"{k}={short_repr(v)}" for k, v in list(spec.kwargs.items())[:6]])
    more = ", ..." if len(spec.kwargs) > 6 else ""
    return f"{spec.name}({args}{more})"


def check_rebuild(spec: ModelSpec, path: Path | str, trusted: Trusted = None) -> None:
    """Raise :class:`CheckpointError` unless the model ``path`` describes may be built: a
    ``python`` factory only when ``trusted`` names it (or the exact entry), torchvision / timm
    kwargs only from the allow-list (or the caller's own entry), every size bounded.  Imports,
    allocates and opens nothing."""
    code, own = _trust(spec, trusted)
    try:
        check_rebuildable(spec, own_kwargs=own)
    except ModelError as err:
        raise CheckpointError(f"{path}: refused to rebuild its model: {err}; {_NOTHING}") from None
    if spec.source == "python" and not code:
        raise CheckpointError(
            f"{path}: refused to run code: the file asks for Python factory {_call_text(spec)} to rebuild its "
            f"model, and nothing was imported; if you trust this file and that code, pass "
            f"trusted={spec.name!r} to load_model (slimcore.export: --trust-code {spec.name})")


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
    """The :class:`ModelSpec` a checkpoint holds (no model is built, nothing is imported)."""
    return _spec_of_checkpoint(read_checkpoint(path), path)


def _spec_of_checkpoint(ckpt: dict[str, Any], path: Path | str) -> ModelSpec:
    try:
        return ModelSpec.from_dict(ckpt["spec"])
    except (TypeError, KeyError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed model spec: {err}") from None


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, with what the file recorded around it."""

    model: nn.Module
    meta: dict[str, Any]
    spec: ModelSpec
    trace_size: tuple[int, int] | None  # the input size its pruning plan was traced with
    dtype: str
    version: int


def load_checkpoint(path: Path | str, expected_arch: str | None = None,
                    trusted: Trusted = None) -> LoadedCheckpoint:
    """Rebuild a model from a checkpoint (checks -> spec -> replay pruning plan -> dtype -> load
    weights, strict), with the file's ``meta``, spec, trace size, dtype and version.

    ``expected_arch`` (an arch string as :func:`slimcore.models.build_model` takes it, e.g. a
    params.yaml short name resolved by :meth:`slimcore_pipeline.config.Params.model_for`) must name the
    model the file holds.  ``trusted`` says which code the file may run: ``"module:function"``
    (a Python factory, called with the file's plain kwargs), an exact entry (a
    :class:`ModelSpec` or params.yaml's resolved ``models`` entry: that source, name and kwargs),
    or a list of them.  Without it a ``python`` model is refused in one line naming what the file
    asks for; torchvision and timm models never need it.
    """
    from slimcore.plan import replay_plan  # torch-pruning: imported only when a plan is replayed

    ckpt = read_checkpoint(path)
    spec = _spec_of_checkpoint(ckpt, path)
    if expected_arch is not None and not same_arch(spec, expected_arch):
        raise CheckpointError(f"{path}: holds a {spec.arch} model, but {expected_arch} was requested")
    check_rebuild(spec, path, trusted)
    try:
        model = spec.build()
    except SlimcoreError as err:
        raise CheckpointError(f"{path}: cannot rebuild its {spec.arch} model: {err}") from err
    recorded = ckpt.get("trace_size")
    trace_size = (int(recorded[0]), int(recorded[1])) if recorded else None
    if ckpt["plan"]:
        modules = dict(model.named_modules())
        unknown = [name for name, _, _ in ckpt["plan"] if name not in modules]
        if unknown:
            raise CheckpointError(f"{path}: damaged or foreign checkpoint: its pruning plan names module "
                                  f"{unknown[0]!r}, which the rebuilt {spec.arch} does not have; re-create it "
                                  "with the stage that writes it")
        try:
            plan = [[name, bool(is_out), torch.as_tensor(idxs).tolist()] for name, is_out, idxs in ckpt["plan"]]
            replay_plan(model, plan, spec, trace_size)
        except Exception as err:  # torch-pruning: a model that does not trace at that size, a foreign plan
            raise CheckpointError(f"{path}: cannot replay the pruning plan on the rebuilt {spec.arch} "
                                  f"(traced at {trace_size or spec.min_image_size}px): "
                                  f"{type(err).__name__}: {err}") from err
    _materialise_folded_biases(model, ckpt["state_dict"])
    dtype = ckpt.get("dtype", "float32")
    model.to(getattr(torch, dtype))
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the rebuilt {spec.arch}: "
                              f"{' '.join(str(err).split())}") from None
    check_finite(model, str(path))
    model.eval()
    return LoadedCheckpoint(model, dict(ckpt["meta"]), spec, trace_size, dtype, int(ckpt["version"]))


def load_model_and_meta(path: Path | str, expected_arch: str | None = None,
                        trusted: Trusted = None) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_checkpoint`'s model and the ``meta`` it was saved with."""
    loaded = load_checkpoint(path, expected_arch, trusted)
    return loaded.model, loaded.meta


def load_model(path: Path | str, expected_arch: str | None = None, trusted: Trusted = None) -> nn.Module:
    """Rebuild a model from a checkpoint: checks -> spec -> replay pruning plan -> load weights
    (strict).  ``trusted``: the Python code the file may run (see :func:`load_checkpoint`).

    Example:
        >>> model = slimcore.load_model("models/resnet50/pruned-0.4.pt")   # no code from the file runs
        >>> mine = slimcore.load_model("mynet.pt", trusted=["mypkg.nets:build"])  # my own factory
    """
    return load_checkpoint(path, expected_arch, trusted).model


def checkpoint_meta(path: Path | str) -> dict[str, Any]:
    """The ``meta`` a checkpoint was saved with (no model is built)."""
    return dict(read_checkpoint(path)["meta"])


__all__ = [
    "DTYPES",
    "MAX_TRACE_SIDE",
    "CheckpointError",
    "LoadedCheckpoint",
    "ModelEntry",
    "Trusted",
    "UnverifiedCheckpointWarning",
    "atomic_torch_save",
    "atomic_write_bytes",
    "check_rebuild",
    "checked_checkpoint",
    "checkpoint_meta",
    "checkpoint_spec",
    "content_digest",
    "load_checkpoint",
    "load_model",
    "load_model_and_meta",
    "model_bytes",
    "model_dtype",
    "read_checkpoint",
    "safe_torch_load",
    "same_arch",
    "save_model",
    "torch_bytes",
    "trusted_factory",
    "unwrap_model",
]
