"""Pruning plans: torch-pruning's record of which channels were removed, replayed on load.

A plan is a list of ``[layer name, is_output_channels, [channel indices]]`` (plain ints, so
it travels inside a ``weights_only`` checkpoint).  Replaying it on a freshly built model
reproduces the pruned architecture exactly; the checkpoint's weights then load strictly.
Replay traces the model with an input of the size it was pruned with: :func:`build_graph`
records the traced input size on the model (``TRACE_ATTR``), checkpoints store it, so models that
need large inputs (many timm models) replay as they were traced.
Kept apart from :mod:`slimcore.prune` so that loading a model never depends on the slimming
policy (and DVC does not re-run training when the policy changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from slimcore.models import PLAN_ATTR, TRACE_ATTR, ModelSpec

Plan = list[list[Any]]


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's DependencyGraph of ``model`` (traced with autograd on).

    Records the input's spatial size on the model (``TRACE_ATTR``): a plan recorded on this
    graph is replayed with an input of that size (see :func:`replay_plan`).  A 1-in 1-out Conv1d
    (ECA-style attention, convolving along the channel axis) is left out of the trace, so
    torch-pruning sees it as the element-wise op it is for channel indices.
    """
    channel_convs = [m for m in model.modules()
                     if isinstance(m, nn.Conv1d) and m.in_channels == m.out_channels == 1]
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False,
                                                      ignored_layers=channel_convs)
    if isinstance(example_inputs, torch.Tensor) and example_inputs.dim() == 4:
        setattr(model, TRACE_ATTR, (int(example_inputs.shape[2]), int(example_inputs.shape[3])))
    return graph


def _tolerant_concat_mapping(graph: tp.DependencyGraph, cat_node: Any) -> None:
    """torch-pruning's concat index mapping, leaving a concat whose input sizes it cannot infer
    unmapped (its ``offsets`` stay None) instead of failing the whole trace.  A concat whose
    sizes :func:`_concat_sizes` read from autograd skips torch-pruning's check of their sum
    against its own recursive inference of the output size (wrong after DPN's slices)."""
    infer = _shape_infer.infer_in_channels_recursively
    if getattr(cat_node.module, "sizes_from_autograd", False):
        _shape_infer.infer_in_channels_recursively = lambda *args, **kwargs: None
    try:
        _concat_mapping(graph, cat_node)
    except TypeError:
        cat_node.module.offsets = None
    finally:
        _shape_infer.infer_in_channels_recursively = infer


_concat_mapping = tp.dependency.index_mapping.update_concat_index_mapping
_shape_infer = tp.dependency.shape_infer
tp.dependency.index_mapping.update_concat_index_mapping = _tolerant_concat_mapping


def _slice_prune(self: Any, layer: Any, idxs: Sequence[int]) -> None:
    """torch-pruning's ``SlicePruner``, fixed: the indices that reach a slice are its *output*
    channels (mapped on the way in), all inside ``[start, end)``: only ``end`` moves.  (The
    original read them as input channels and moved ``start`` for outputs below it: after the
    first surgery on DPN's ``x[:, num_1x1_c:]`` every later mapping through it was shifted.)"""
    if layer.grad_fn is not None and layer.end < 2 ** 62:
        layer.end -= len(set(idxs)) * layer.step


tp.ops.SlicePruner.prune_out_channels = _slice_prune
tp.ops.SlicePruner.prune_in_channels = _slice_prune


def _chunk_of(split_fn: Any, consumer: Any) -> int | None:
    """Which output of the split autograd node ``split_fn`` the consumer node reads (None: several
    or none)."""
    found = {nr for fn, nr in getattr(consumer.grad_fn, "next_functions", ()) if fn is split_fn}
    return found.pop() if len(found) == 1 else None


def _split_chunks(node: Any) -> tuple[list[int], list[int]] | None:
    """(chunk sizes, chunk read by each of the node's outputs) of a channel split, or None."""
    fn = node.grad_fn
    sizes_in = getattr(fn, "_saved_self_sym_sizes", None)
    if sizes_in is None or len(sizes_in) != 4 or int(getattr(fn, "_saved_dim", -1)) != 1:
        return None
    total = int(sizes_in[1])
    if hasattr(fn, "_saved_split_sizes"):
        sizes = [int(c) for c in fn._saved_split_sizes]
    elif hasattr(fn, "_saved_split_size"):
        step = int(fn._saved_split_size)
        sizes = [min(step, total - i) for i in range(0, total, step)]
    else:
        return None
    chunks = [_chunk_of(fn, out) for out in node.outputs]
    if sum(sizes) != total or any(c is None or c >= len(sizes) for c in chunks):
        return None
    return sizes, chunks  # type: ignore[return-value]


def _split_shapes(graph: tp.DependencyGraph) -> None:
    """torch-pruning's shape inference, with each channel split's outputs mapped by the chunk
    they read.  torch-pruning assumes one output node per chunk, in chunk order; a chunk read
    by two layers (CSP's ``xb`` feeds the first block and its shortcut) or consumers traced out
    of chunk order got another chunk's channel offsets.  Here ``split_sizes`` holds the size
    read by each output node (what torch-pruning's shape inference indexes by output position),
    ``offsets`` the chunk boundaries and ``output_chunks`` the chunk of each output node."""
    _init_shapes(graph)
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT:
            continue
        found = _split_chunks(node)
        if found is None:
            node.module.offsets = None
            continue
        sizes, chunks = found
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        node.module.split_sizes = [sizes[c] for c in chunks]
        node.module.offsets = offsets
        node.module.output_chunks = chunks
        node.module.chunk_sizes = sizes
        node.module.equal_chunks = hasattr(node.grad_fn, "_saved_split_size")  # split(x, int): sizes from code
    _concat_sizes(graph)


def _out_channels(graph: tp.DependencyGraph, node: Any, reader: Any, memo: dict[Any, int | None]) -> int | None:
    """Channels of ``node``'s output as ``reader`` sees it, from the layers and autograd
    (slices: ``_saved_start/_saved_end``; split chunks: by output), None when unknown."""
    key = (node, reader if node.type == tp.ops.OPTYPE.SPLIT else None)
    if key in memo:
        return memo[key]
    memo[key] = None  # cycle guard
    ch: int | None = None
    fn = node.grad_fn
    if isinstance(node.module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        ch = graph.get_out_channels(node.module)
    elif node.type == tp.ops.OPTYPE.SPLIT:
        sizes = getattr(node.module, "split_sizes", None)
        pos = [i for i, out in enumerate(node.outputs) if out is reader]
        ch = int(sizes[pos[0]]) if sizes is not None and len(pos) == 1 and pos[0] < len(sizes) else None
    elif node.type == tp.ops.OPTYPE.SLICE:
        shape = getattr(fn, "_saved_self_sym_sizes", None)
        if shape is not None and len(shape) == 4 and int(fn._saved_dim) == 1:
            ch = len(range(int(fn._saved_start), min(int(fn._saved_end), int(shape[1])), int(fn._saved_step)))
        elif node.inputs:
            ch = _out_channels(graph, node.inputs[0], node, memo)
    elif node.type == tp.ops.OPTYPE.CONCAT:
        parts = [_out_channels(graph, n, node, memo) for n in node.inputs]
        ch = None if any(p is None for p in parts) else sum(parts)  # type: ignore[misc]
    elif node.type == tp.ops.OPTYPE.ELEMENTWISE:  # adds, activations: any input's channels
        for n in node.inputs:
            ch = _out_channels(graph, n, node, memo)
            if ch is not None:
                break
    memo[key] = ch
    return ch


def _concat_sizes(graph: tp.DependencyGraph) -> None:
    """Each channel concat's input sizes from the layers and autograd (slices included), where
    all are known: torch-pruning's recursive inference gets slices of a fixed size wrong (DPN's
    ``x[:, :num_1x1_c]`` / ``x[:, num_1x1_c:]``).  Inputs are in ``next_functions`` order, the
    order of ``torch.cat``'s arguments."""
    memo: dict[Any, int | None] = {}
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.CONCAT or int(getattr(node.grad_fn, "_saved_dim", 1)) != 1:
            continue
        if len(node.inputs) != len([f for f, _ in node.grad_fn.next_functions if f is not None]):
            continue  # an input read twice: leave it to torch-pruning
        sizes = [_out_channels(graph, n, node, memo) for n in node.inputs]
        if all(s is not None for s in sizes):
            node.module.concat_sizes = sizes
            node.module.sizes_from_autograd = True


def _split_mapping(graph: tp.DependencyGraph, node: Any) -> None:
    """Index mapping between a split and each output node, by the chunk that output reads."""
    chunks = getattr(node.module, "output_chunks", None)
    if node.type != tp.ops.OPTYPE.SPLIT or chunks is None or node.module.offsets is None:
        return
    offsets = node.module.offsets
    for out, c in zip(node.outputs, chunks):
        for dep in node.dependencies:
            if dep.target is out:
                dep.index_mapping[0] = _SplitMap(offset=offsets[c:c + 2], reverse=False)
        for dep in out.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _SplitMap(offset=offsets[c:c + 2], reverse=True)


_SplitMap = tp.dependency.index_mapping._SplitIndexMapping
_init_shapes = tp.dependency.shape_infer.init_shape_information
tp.dependency.shape_infer.init_shape_information = _split_shapes
tp.dependency.index_mapping.update_split_index_mapping = _split_mapping


def sync_split_sizes(model: nn.Module) -> nn.Module:
    """Update fixed channel-split sizes after surgery: called after pruning and after replaying
    a plan.  timm's MixedConv2d keeps ``splits`` (the input channels of each of its convs),
    CSP stages split ``conv_exp``'s output in halves of ``expand_chs // 2``, Res2Net blocks
    split ``conv1``'s output in chunks of ``width`` (the input channels of each of ``convs``);
    slimming prunes those splits by the same offsets in every chunk, so they stay equal."""
    for module in model.modules():
        exp = getattr(module, "conv_exp", None)
        if isinstance(getattr(module, "expand_chs", None), int) and exp is not None:
            conv = exp if isinstance(exp, nn.Conv2d) else getattr(exp, "conv", None)
            if isinstance(conv, nn.Conv2d):
                module.expand_chs = conv.out_channels
        convs = getattr(module, "convs", None)
        if isinstance(getattr(module, "width", None), int) and isinstance(getattr(module, "scale", None), int) \
                and isinstance(convs, nn.ModuleList) and len(convs) and isinstance(convs[0], nn.Conv2d):
            module.width = convs[0].in_channels
        splits = getattr(module, "splits", None)
        convs = list(module.children())
        if isinstance(splits, (list, tuple)) and len(splits) == len(convs) \
                and all(isinstance(c, nn.Conv2d) for c in convs):
            module.splits = [c.in_channels for c in convs]
            module.in_channels = sum(module.splits)
            module.out_channels = sum(c.out_channels for c in convs)
    return model


def plain_plan(history: Sequence[Sequence[Any]]) -> Plan:
    """A plan as plain Python values (str, bool, list of int)."""
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def replay_plan(model: nn.Module, plan: Sequence[Sequence[Any]], spec: ModelSpec,
                trace_size: Sequence[int] | None = None) -> nn.Module:
    """Re-apply a recorded pruning plan to a freshly built model (in place), for loading.

    ``trace_size`` is the (H, W) the plan was traced with (default: the spec's smallest input).
    """
    was_training = model.training
    model.eval()
    height, width = (int(trace_size[0]), int(trace_size[1])) if trace_size else (spec.min_image_size,) * 2
    dg = build_graph(model, torch.randn(1, 3, height, width))
    dg.load_pruning_history(plain_plan(plan))
    sync_split_sizes(model)
    setattr(model, PLAN_ATTR, plain_plan(plan))
    model.train(was_training)
    return model


__all__ = ["Plan", "build_graph", "plain_plan", "replay_plan", "sync_split_sizes"]
