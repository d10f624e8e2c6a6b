"""ONNX out: ``python -m slimcore.export CHECKPOINT model.onnx``.

A checkpoint is rebuilt with :func:`slimcore.checkpoint.load_model`, every ``BatchNorm2d`` that
directly follows a convolution is folded into it (:func:`fold_batchnorms`), and the folded model
is exported with torch's TorchScript-based ONNX exporter (``dynamo=False``: it needs no
``onnxscript``, works offline and writes the same bytes for the same checkpoint).  The file is
then checked: onnxruntime (CPU) runs it on a random input and its output must be within
``atol`` (1e-4) of the *unfolded* PyTorch model in eval mode, or nothing is written.  The input
size is the checkpoint's recorded ``trace_size``, else params.yaml's ``data.image_size``
(``--image-size`` overrides both); a float16/bfloat16 model is exported in float32.  A model
built by a Python factory is rebuilt only with ``--trust-code MODULE:FN`` (docs/security.md).

Folding: in eval mode a BN computes ``(y - mean) / sqrt(var + eps) * gamma + beta`` per channel,
an affine map of the conv's output ``y = W * x + b``; with ``s = gamma / sqrt(var + eps)`` the
conv ``W' = s * W`` (per output channel, grouped and depthwise convs alike) and
``b' = (b - mean) * s + beta`` computes both layers at once, and the BN becomes an identity.
A BN is folded only when its sole input is a conv's output that nothing else reads (found on the
traced graph: torch.fx, or torch-pruning's DependencyGraph where fx cannot trace the model);
any other BN stays as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slimcore.errors import SlimcoreError
from slimcore.files import atomic_write_bytes

DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"
Method = Literal["auto", "fx", "graph"]


class ExportError(SlimcoreError):
    """The model could not be exported, or its ONNX file does not compute what PyTorch does."""


# --------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------

def _plain_bn(module: nn.Module) -> bool:
    """A BatchNorm2d whose forward is BatchNorm's own: once folded it is an identity."""
    return isinstance(module, nn.BatchNorm2d) and type(module).forward is nn.modules.batchnorm._BatchNorm.forward


def _foldable_bn(module: nn.Module, subclasses: bool) -> bool:
    """A BatchNorm2d that normalises with running statistics in eval mode; with ``subclasses``, also
    BN subclasses with a forward of their own (timm's ``BatchNormAct2d``: BN, then an activation)."""
    return (isinstance(module, nn.BatchNorm2d) and (subclasses or _plain_bn(module))
            and module.track_running_stats and module.running_mean is not None)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d)


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps every conv and BN (subclasses too) as one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, module_qualified_name)


def _pairs_fx(model: nn.Module, subclasses: bool) -> list[tuple[str, str]]:
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable_bn(modules[node.target], subclasses) or calls[node.target] != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and _is_conv(modules[src.target])
                and calls[src.target] == 1 and list(src.users) == [node]):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_graph(model: nn.Module, example_inputs: torch.Tensor, subclasses: bool) -> list[tuple[str, str]]:
    from slimcore.plan import build_graph  # torch-pruning's autograd trace

    names = {m: n for n, m in model.named_modules()}
    dg = build_graph(model, example_inputs)
    pairs = []
    for module, node in dg.module2node.items():
        if not _foldable_bn(module, subclasses) or len(node.inputs) != 1:
            continue
        src = node.inputs[0]
        if _is_conv(src.module) and [n.module for n in src.outputs] == [module]:
            pairs.append((names[src.module], names[module]))
    return sorted(pairs, key=lambda p: list(names.values()).index(p[1]))


def conv_bn_pairs(model: nn.Module, example_inputs: torch.Tensor | None = None,
                  method: Method = "auto", subclasses: bool = True) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` of every BatchNorm2d fed only by a convolution that feeds only it.

    ``method``: ``fx`` (symbolic trace), ``graph`` (torch-pruning's DependencyGraph, needs
    ``example_inputs``) or ``auto`` (fx, then graph where fx cannot trace the model, then no pair:
    the export's check still compares the result with the model).  ``subclasses``: include BN
    subclasses with a forward of their own (see :func:`fold_batchnorms`).
    """
    if method in ("auto", "fx"):
        try:
            return _pairs_fx(model, subclasses)
        except Exception as err:  # fx rejects data-dependent control flow and more: many kinds
            if method == "fx":
                raise ExportError(f"torch.fx cannot trace the model: {type(err).__name__}: {err}") from None
    if example_inputs is None:
        raise ExportError("finding conv -> BN pairs without torch.fx needs example inputs")
    was_training = model.training
    try:
        return _pairs_graph(model.eval(), example_inputs, subclasses)
    except Exception as err:  # torch-pruning's tracer raises many kinds too
        if method == "graph":
            raise ExportError(f"torch-pruning cannot trace the model: {type(err).__name__}: {err}") from None
        return []
    finally:
        model.train(was_training)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (eval-mode statistics) into ``conv`` in place; ``bn`` is then to be dropped."""
    if conv.out_channels != bn.num_features:
        raise ExportError(f"conv has {conv.out_channels} output channels but the BN after it "
                          f"{bn.num_features}")
    dtype = conv.weight.dtype
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = bn.bias.double() if bn.affine else torch.zeros_like(scale)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight.copy_(weight.to(dtype))
    new_bias = ((bias - bn.running_mean.double()) * scale + shift).to(dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


@torch.no_grad()
def _neutralise(bn: nn.BatchNorm2d) -> None:
    """Make a BN's normalisation an exact identity (mean 0, var 1, eps 0, gamma 1, beta 0)."""
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0
    if bn.affine:
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def fold_batchnorms(model: nn.Module, example_inputs: torch.Tensor | None = None, method: Method = "auto",
                    subclasses: bool = True) -> tuple[nn.Module, list[tuple[str, str]]]:
    """An eval-mode copy of ``model`` with every conv -> BN pair folded, and the pairs folded.

    A folded ``BatchNorm2d`` becomes ``nn.Identity``; a BN subclass with a forward of its own (timm's
    ``BatchNormAct2d``, which applies an activation after normalising) stays in place with its
    normalisation made an exact identity (mean 0, var 1, eps 0, gamma 1, beta 0), so what it adds
    still runs (``subclasses=False`` leaves those alone).  A BN that does not directly follow a conv
    (or whose conv output is also read elsewhere) is left as it is.  ``model`` is not modified.

    Example:
        >>> folded, pairs = slimcore.fold_batchnorms(pruned, torch.zeros(1, 3, 32, 32))
        >>> len(pairs)   # conv -> BN pairs folded; folded(x) matches pruned.eval()(x)
    """
    folded = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(folded, example_inputs, method, subclasses)
    for conv_name, bn_name in pairs:
        bn = folded.get_submodule(bn_name)
        fold_conv_bn(folded.get_submodule(conv_name), bn)
        if _plain_bn(bn):
            _set_submodule(folded, bn_name, nn.Identity())
        else:
            _neutralise(bn)
    return folded, pairs


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# --------------------------------------------------------------------------------------------
# ONNX export and the onnxruntime check
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The TorchScript exporter warns that it is the legacy one; that is a choice here (see module doc)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def onnx_bytes(model: nn.Module, image_size: int, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
               batch: int = 1) -> bytes:
    """The ONNX serialisation of ``model`` (eval mode, CPU) for ``batch x 3 x size x size`` inputs."""
    example = torch.zeros(batch, 3, image_size, image_size)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    buffer = io.BytesIO()
    model = model.eval().cpu()
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                              do_constant_folding=True)
    except Exception as err:  # the exporter raises many kinds (unsupported op, opset, tracing)
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from None
    return buffer.getvalue()


def ort_session(model: bytes | str | Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def max_abs_diff(reference: nn.Module, session: Any, image_size: int, batch: int = 1, seed: int = 0) -> float:
    """Max |onnxruntime - PyTorch| over the outputs for one random input batch."""
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    expected = reference.eval()(x)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if tuple(got.shape) != tuple(expected.shape):
        raise ExportError(f"onnxruntime output shape {tuple(got.shape)} != PyTorch's {tuple(expected.shape)}")
    return float((torch.from_numpy(got) - expected).abs().max())


@torch.no_grad()
def _same_outputs(folded: nn.Module, reference: nn.Module, image_size: int, atol: float) -> bool:
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return bool((folded(x) - reference(x)).abs().max() <= atol)


@dataclass
class ExportReport:
    """What an export did: sizes, folded layers and the onnxruntime check."""

    image_size: int
    opset: int
    dynamic_batch: bool
    nodes: int
    bn_total: int
    bn_folded: int
    bn_left: int  # BatchNormalization nodes in the ONNX graph (BNs that follow no conv)
    bytes: int
    md5: str
    max_abs_diff: float
    atol: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.nodes} ONNX nodes (opset {self.opset}), {self.bn_folded} of {self.bn_total} BatchNorm "
                f"layers folded ({self.bn_left} left in the graph), {self.bytes / 1e6:.3f} MB, "
                f"{self.image_size}px input"
                f"{' (dynamic batch)' if self.dynamic_batch else ''}; onnxruntime vs PyTorch max |diff| "
                f"{self.max_abs_diff:.2e} (<= {self.atol:g})")


def export_model(model: nn.Module, image_size: int, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                 atol: float = DEFAULT_ATOL, threads: int = 1) -> tuple[bytes, ExportReport]:
    """Fold, export and check ``model``: the ONNX bytes and their report.

    Raises :class:`ExportError` when the export fails or onnxruntime's output differs from the
    unfolded model's by more than ``atol``.
    """
    import onnx

    reference = model.eval().cpu()
    example = torch.zeros(1, 3, image_size, image_size)
    try:
        with torch.no_grad():
            reference(example)
    except Exception as err:
        raise ExportError(f"the model does not run on 1x3x{image_size}x{image_size} inputs "
                          f"({type(err).__name__}: {err}); pass a larger --image-size") from None
    folded, pairs = fold_batchnorms(reference, example)
    if pairs and not _same_outputs(folded, reference, image_size, atol):
        folded, pairs = fold_batchnorms(reference, example, subclasses=False)  # a BN subclass broke it
    data = onnx_bytes(folded, image_size, opset, dynamic_batch)
    proto = onnx.load_from_string(data)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the exported ONNX model is invalid: {err}") from None
    session = ort_session(data, threads)
    diff = max(max_abs_diff(reference, session, image_size, b) for b in ((1, 2) if dynamic_batch else (1,)))
    if not diff <= atol:  # also catches NaN
        raise ExportError(f"onnxruntime's output differs from PyTorch's by {diff:.3g} (> {atol:g}): "
                          "the ONNX model does not compute what the checkpoint does")
    report = ExportReport(image_size=image_size, opset=opset, dynamic_batch=dynamic_batch,
                          nodes=len(proto.graph.node), bn_total=count_batchnorms(reference), bn_folded=len(pairs),
                          bn_left=sum(n.op_type == "BatchNormalization" for n in proto.graph.node),
                          bytes=len(data), md5=hashlib.md5(data).hexdigest(), max_abs_diff=diff, atol=atol)
    return data, report


def _params_image_size(params_file: Path) -> int | None:
    """``data.image_size`` of a slimcore params file, when there is a readable one.

    Read line by line (the engine does not depend on a YAML parser): the ``image_size: N`` line
    of the top-level ``data:`` block, in block style as slimcore writes its params files; any
    other layout gives None (then the model's minimum size is used)."""
    if not params_file.is_file():
        return None
    try:
        lines = params_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    in_data, indent = False, None
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        depth = len(line) - len(line.lstrip(" "))
        if depth == 0:
            in_data, indent = re.fullmatch(r"data:\s*(#.*)?", line) is not None, None
            continue
        if not in_data:
            continue
        indent = depth if indent is None else indent
        found = re.fullmatch(r"\s*image_size:\s*(\d+)\s*(#.*)?", line)
        if found and depth == indent:
            return int(found[1]) or None
    return None


def default_image_size(model: nn.Module, meta: dict[str, Any], params_file: Path = Path("params.yaml"),
                       trace_size: Sequence[int] | None = None) -> tuple[int, str]:
    """The export's input size and where it came from: the size the checkpoint's pruning plan was
    traced with (``trace_size``, when square), else a size in its ``meta``, else the project's
    ``data.image_size``, else the smallest size the model accepts."""
    if trace_size is not None and len(trace_size) == 2 and trace_size[0] == trace_size[1]:
        return int(trace_size[0]), "the checkpoint's trace_size"
    for key in ("image_size", "input_size"):
        size = meta.get(key)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size, f"checkpoint meta '{key}'"
    size = _params_image_size(params_file)
    if size is not None:
        return size, f"{params_file} data.image_size"
    from slimcore.models import spec_of

    try:
        spec = spec_of(model)
        minimum = getattr(spec, "min_image_size", None)
    except ValueError:
        minimum = None
    if isinstance(minimum, int):
        return minimum, "the model's minimum input size"
    return 224, "default"


def export_onnx(model: nn.Module, out: Path | str, image_size: int, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False, atol: float = DEFAULT_ATOL) -> ExportReport:
    """Write ``model`` to ``out`` as ONNX, BatchNorm folded into the convolutions, once
    onnxruntime's output matched PyTorch's within ``atol`` (needs ``slimcore[onnx]``).

    Example:
        >>> report = slimcore.export_onnx(pruned, "pruned.onnx", image_size=32)
        >>> report.bn_left   # 0: every BatchNorm was folded
    """
    data, report = export_model(model, image_size, opset, dynamic_batch, atol)
    atomic_write_bytes(out, data)
    return report


def export_checkpoint(checkpoint: Path | str, out: Path | str, image_size: int | None = None,
                      opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                      atol: float = DEFAULT_ATOL, trusted: Sequence[str] = ()) -> tuple[ExportReport, str]:
    """Export a slimcore checkpoint to ``out``: its report and where the input size came from.

    ``trusted``: the Python factories (``module:function``) the checkpoint may call to rebuild its
    model (see :func:`slimcore.checkpoint.load_checkpoint`); none by default.  ``out`` is written
    atomically, and only once onnxruntime's check passed.
    """
    from slimcore.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint, trusted=list(trusted))
    model = loaded.model.float()  # the onnxruntime check runs in float32, whatever the file's dtype
    source = "--image-size"
    if image_size is None:
        image_size, source = default_image_size(model, loaded.meta, trace_size=loaded.trace_size)
    return export_onnx(model, out, image_size, opset, dynamic_batch, atol), source


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    def positive(value: str) -> int:
        if not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
        return int(value)

    def opset(value: str) -> int:
        if not value.isdigit() or not 7 <= int(value) <= 20:
            raise argparse.ArgumentTypeError(f"{value!r} is not in the range 7 to 20")
        return int(value)

    parser = argparse.ArgumentParser(prog="python -m slimcore.export", description=(
        "Export CHECKPOINT as ONNX with BatchNorm folded into the convolutions, checked with onnxruntime."))
    parser.add_argument("checkpoint", type=Path, help="a slimcore checkpoint (models/ARCH/*.pt)")
    parser.add_argument("out", type=Path, help="the ONNX file to write")
    parser.add_argument("--image-size", type=positive, default=None, metavar="N",
                        help="input side in pixels (default: the checkpoint's recorded size, else params.yaml's "
                             "data.image_size, else the model's minimum)")
    parser.add_argument("--opset", type=opset, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--batch", choices=("1", "dynamic"), default="1",
                        help="1: a fixed batch of one (default); dynamic: any batch size")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"largest |onnxruntime - PyTorch| accepted (default {DEFAULT_ATOL:g})")
    parser.add_argument("--trust-code", action="append", default=[], metavar="MODULE:FN",
                        help="let the checkpoint rebuild its model by calling this Python factory (repeatable); "
                             "only for files and code you trust")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m slimcore.export CHECKPOINT OUT [options]``: 0 when exported, 2 on a clear error
    (said in one ``error:`` line on stderr, nothing written)."""
    args = _parser().parse_args(argv)  # a bad option: argparse's usage line and exit status 2
    from slimcore.checkpoint import trusted_factory

    for item in args.trust_code:
        try:
            trusted_factory(item)
        except ValueError as err:
            print(f"error: --trust-code: {err}", file=sys.stderr)
            return 2
    if args.out.resolve() == args.checkpoint.resolve():
        print("error: OUT would overwrite the checkpoint", file=sys.stderr)
        return 2
    try:
        report, source = export_checkpoint(args.checkpoint, args.out, args.image_size, args.opset,
                                           args.batch == "dynamic", args.atol, args.trust_code)
    except SlimcoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint} -> {args.out}: {report.summary()}; input size from {source}")
    print(f"md5 {report.md5}")
    return 0


__all__ = [
    "ExportError",
    "ExportReport",
    "conv_bn_pairs",
    "count_batchnorms",
    "default_image_size",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "fold_batchnorms",
    "fold_conv_bn",
    "main",
    "max_abs_diff",
    "onnx_bytes",
    "ort_session",
]

if __name__ == "__main__":
    sys.exit(main())
