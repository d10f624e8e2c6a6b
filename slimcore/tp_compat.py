"""Every workaround for torch-pruning's internals, in one place, applied when a graph is built.

torch-pruning (the supported range is :data:`SUPPORTED`) traces a model into a
DependencyGraph and performs the channel surgery.  A few of its internals get channel splits,
concatenations and slices wrong, or never stop on some graphs; slimcore replaces them here:

* :func:`ensure_applied` (process-wide, once; idempotent): the concat index mapping leaves a
  concat of unknown input sizes unmapped instead of failing the trace; ``SlicePruner`` moves a
  slice's ``end`` only; shape inference maps each channel split's outputs by the chunk they
  read and reads concat input sizes from autograd; the split index mapping follows those chunks.
* :func:`patch_graph` (per graph): ``get_pruning_group`` with a bound on the index propagation
  (:class:`UnmappableGroup` instead of a group that grows forever), and
  :func:`frozen_index_mapping` to update the index mapping once while many groups are built.
* :func:`channel_slice` and :func:`expands_channels_only_spatially` read what autograd saved
  about a slice or an expand, which torch-pruning does not expose.

:func:`slimcore.plan.build_graph` calls :func:`ensure_applied` before tracing and
:func:`patch_graph` after; importing slimcore changes nothing in torch-pruning.  Both check the
installed version first: 1.5.x lacks ``torch_pruning.dependency.dependency`` (and this module's
targets), 1.7 is untested.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import numpy as np
import torch_pruning as tp
from torch import nn

SUPPORTED = ">=1.6,<1.7"
_RANGE = ((1, 6), (1, 7))  # [low, high) as (major, minor)
_applied = False


class UnsupportedVersionError(RuntimeError):
    """The installed torch-pruning is outside :data:`SUPPORTED`; the message names both."""


class UnmappableGroup(Exception):
    """torch-pruning's channel propagation does not converge for this root (e.g. channel slices)."""


def installed_version() -> str:
    """The installed torch-pruning's version (``torch_pruning.__version__``, else its metadata)."""
    version = getattr(tp, "__version__", None)
    if not version:
        try:
            version = metadata.version("torch-pruning")
        except metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def check_version() -> None:
    """Raise :class:`UnsupportedVersionError` unless the installed torch-pruning is in :data:`SUPPORTED`."""
    version = installed_version()
    try:
        major_minor = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        major_minor = ()
    if len(major_minor) != 2 or not _RANGE[0] <= major_minor < _RANGE[1]:
        raise UnsupportedVersionError(f"slimcore supports torch-pruning {SUPPORTED}, but torch-pruning {version} is "
                           f"installed: pip install 'torch-pruning{SUPPORTED}'")


def ensure_applied() -> None:
    """Replace torch-pruning's split/concat/slice handling by slimcore's (once per process)."""
    global _applied
    check_version()
    if _applied:
        return
    tp.dependency.index_mapping.update_concat_index_mapping = _tolerant_concat_mapping
    tp.ops.SlicePruner.prune_out_channels = _slice_prune
    tp.ops.SlicePruner.prune_in_channels = _slice_prune
    tp.dependency.shape_infer.init_shape_information = _split_shapes
    tp.dependency.index_mapping.update_split_index_mapping = _split_mapping
    _applied = True


def patch_graph(graph: tp.DependencyGraph) -> tp.DependencyGraph:
    """Give ``graph`` the bounded ``get_pruning_group`` (see :func:`bounded_pruning_group`)."""
    check_version()
    graph.get_pruning_group = types.MethodType(bounded_pruning_group, graph)  # type: ignore[method-assign]
    return graph


@contextmanager
def frozen_index_mapping(graph: tp.DependencyGraph) -> Iterator[None]:
    """Update the graph's index mapping once, and not again in each ``get_pruning_group``, while
    nothing is pruned (building every group of a graph)."""
    tp.dependency.index_mapping.update_index_mapping(graph)
    graph._slim_mapping_fresh = True
    try:
        yield
    finally:
        graph._slim_mapping_fresh = False


# --------------------------------------------------------------------------------------------
# get_pruning_group, bounded


def bounded_pruning_group(self: tp.DependencyGraph, module: nn.Module, pruning_fn: Any, idxs: Any) -> Any:
    """torch-pruning's ``DependencyGraph.get_pruning_group`` with a bound on the propagation.

    Index mappings through channel slices (e.g. ReXNet's ``x[:, :c] += shortcut``) can make the
    original loop grow its group forever; here it stops after a number of steps proportional
    to the graph's size and raises :class:`UnmappableGroup`, so that group is skipped instead.
    """
    from torch_pruning import _helpers
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.dependency.group import Group

    if module not in self.module2node:
        raise ValueError(f"Module {module} is not in the dependency graph.")
    if isinstance(module, tp.ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels
    if isinstance(idxs, (int, np.integer)):
        idxs = [int(idxs)]
    idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
    if not getattr(self, "_slim_mapping_fresh", False):  # no surgery since the last update (frozen_index_mapping)
        tp.dependency.index_mapping.update_index_mapping(self)
    group = Group()
    root_node = self.module2node[module]
    group.add_dep(dep=Dependency(pruning_fn, pruning_fn, source=root_node, target=root_node), idxs=idxs)
    # groups that converge take at most ~len(module2node) steps on timm's CNNs (DPN: 3 per node)
    limit = 3 * len(self.module2node) + 64
    widest = getattr(self, "_slim_widest", None)
    if widest is None:  # the widest layer's channels, once per graph
        widest = self._slim_widest = max(
            (max(getattr(m, "in_channels", 0), getattr(m, "out_channels", 0), getattr(m, "in_features", 0),
                 getattr(m, "out_features", 0)) for m in self.module2node if isinstance(m, (nn.Conv2d, nn.Linear))),
            default=0)
    visited: set[Any] = set()
    stack = [(group[0].dep, idxs)]
    steps = 0
    while stack:
        dep, cur = stack.pop(-1)
        steps += 1
        if steps > limit:
            raise UnmappableGroup(f"channel index propagation does not converge after {limit} steps")
        node, fn = dep.target, dep.handler
        visited.add(node)
        for new_dep in node.dependencies:
            if new_dep.is_triggered_by(fn):
                new_idxs = cur
                for mapping in new_dep.index_mapping:
                    if mapping is not None:
                        new_idxs = mapping(new_idxs)
                if len(new_idxs) == 0:
                    continue
                if len(new_idxs) > 2 * widest:  # more indices than any layer has: a mapping that multiplies
                    raise UnmappableGroup(f"channel index propagation explodes ({len(new_idxs)} indices at "
                                          f"{self._module2name.get(new_dep.target.module, new_dep.target.name)})")
                if new_dep.target in visited and group.has_pruning_op(new_dep, new_idxs):
                    continue
                group.add_dep(new_dep, new_idxs)
                stack.append((new_dep, new_idxs))
    merged = Group()
    for dep, item_idxs in group.items:
        if isinstance(dep.target.module, nn.Parameter) and any(dep.target.module is p for p in self.ignored_params):
            continue
        merged.add_and_merge(dep, item_idxs)
    merged._DG = self
    for i in range(len(merged)):
        hybrid = merged[i].idxs
        merged[i] = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(hybrid))
        merged[i].root_idxs = _helpers.to_root_idxs(hybrid)
    return merged


# --------------------------------------------------------------------------------------------
# what autograd saved about a node


def module_names(graph: tp.DependencyGraph) -> dict[nn.Module, str]:
    """The graph's qualified name of every module it traced (torch-pruning keeps it private)."""
    return graph._module2name


def history_length(graph: tp.DependencyGraph) -> int:
    """How many pruning steps the graph has recorded (its private pruning history)."""
    return len(graph._pruning_history)


def truncate_history(graph: tp.DependencyGraph, length: int) -> None:
    """Forget the pruning steps recorded after the first ``length`` (an undone surgery)."""
    del graph._pruning_history[length:]


def channel_slice(node: Any) -> tuple[int, int, int] | None:
    """(start, end, input channels) of a ``x[:, start:end]`` slice (step 1) of a 4D tensor, or None."""
    fn = node.grad_fn
    sizes = getattr(fn, "_saved_self_sym_sizes", None)
    if node.type != tp.ops.OPTYPE.SLICE or sizes is None or len(sizes) != 4 or int(fn._saved_dim) != 1 \
            or int(fn._saved_step) != 1:
        return None
    return int(fn._saved_start), min(int(fn._saved_end), int(sizes[1])), int(sizes[1])


def expands_channels_only_spatially(node: Any) -> bool:
    """An ``expand``/``expand_as`` of a ``(N, C, 1, 1)`` tensor (ECA/SE-style gates): channel i
    stays channel i, so torch-pruning's identity index mapping through it is right."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    return sizes is not None and len(sizes) == 4 and int(sizes[1]) > 1 and int(sizes[2]) == int(sizes[3]) == 1


# --------------------------------------------------------------------------------------------
# channel splits, concatenations and slices (installed by ensure_applied)


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


def _slice_prune(self: Any, layer: Any, idxs: Sequence[int]) -> None:
    """torch-pruning's ``SlicePruner``, fixed: the indices that reach a slice are its *output*
    channels (mapped on the way in), all inside ``[start, end)``: only ``end`` moves.  (The
    original read them as input channels and moved ``start`` for outputs below it: after the
    first surgery on DPN's ``x[:, num_1x1_c:]`` every later mapping through it was shifted.)"""
    if layer.grad_fn is not None and layer.end < 2 ** 62:
        layer.end -= len(set(idxs)) * layer.step


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
    split_map = tp.dependency.index_mapping._SplitIndexMapping
    for out, c in zip(node.outputs, chunks):
        for dep in node.dependencies:
            if dep.target is out:
                dep.index_mapping[0] = split_map(offset=offsets[c:c + 2], reverse=False)
        for dep in out.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = split_map(offset=offsets[c:c + 2], reverse=True)


# torch-pruning's originals that the replacements above call (None before 1.6: check_version refuses)
_dependency = getattr(tp, "dependency", None)
_concat_mapping = getattr(getattr(_dependency, "index_mapping", None), "update_concat_index_mapping", None)
_shape_infer = getattr(_dependency, "shape_infer", None)
_init_shapes = getattr(_shape_infer, "init_shape_information", None)


__all__ = [
    "SUPPORTED",
    "UnmappableGroup",
    "UnsupportedVersionError",
    "bounded_pruning_group",
    "channel_slice",
    "check_version",
    "ensure_applied",
    "expands_channels_only_spatially",
    "frozen_index_mapping",
    "history_length",
    "installed_version",
    "module_names",
    "patch_graph",
    "truncate_history",
]
