"""Surgery for slimming: apply a selection, check the model still runs, undo what breaks it.

torch-pruning performs the surgery (:func:`apply_selection`, which records the plan);
:class:`Snapshot` undoes it without a deep copy; :func:`probe_input` and :func:`check_runs` tell
whether the pruned model still runs; :func:`breaking_groups` finds, by bisection, the groups
whose surgery breaks the model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from slimcore.plan import sync_split_sizes
from slimcore.prune.groups import ChannelGroup
from slimcore.prune.selection import Selection
from slimcore.tp_compat import history_length, truncate_history

Removals = list[tuple[ChannelGroup, torch.Tensor]]  # (group, root channels removed), as Selection.removals()


def apply_selection(dg: tp.DependencyGraph, selection: Selection) -> None:
    """Remove the selected channels, group by group (torch-pruning records the history)."""
    _apply(dg, selection.removals())


def _apply(dg: tp.DependencyGraph, removals: Removals) -> None:
    for g, removed_idxs in removals:
        pruner = dg.get_pruner_of_module(g.root)
        dg.get_pruning_group(g.root, pruner.prune_out_channels, removed_idxs.tolist()).prune()
    sync_split_sizes(dg.model)


_LIST_ATTRS = ("shape", "concat_sizes", "split_sizes", "offsets")


class Snapshot:
    """The state of every module of the model and of the graph's ops, without copying tensors.

    torch-pruning's surgery and our folding assign new tensors and attributes, never modify
    tensors in place, so restoring each module's attribute dict (and the graph's pruning
    history) undoes them: a failed try costs no deep copy and no retrace.
    """

    def __init__(self, model: nn.Module, dg: tp.DependencyGraph) -> None:
        modules = {id(m): m for m in model.modules()}
        modules.update({id(m): m for m in dg.module2node if isinstance(m, nn.Module)})
        self.states = [(m, self._copy(m.__dict__)) for m in modules.values()]
        self.history = history_length(dg)

    @staticmethod
    def _copy(state: dict[str, Any]) -> dict[str, Any]:
        out = dict(state)
        for key in ("_parameters", "_buffers"):
            if key in out:
                out[key] = dict(out[key])
        for key in _LIST_ATTRS:
            if isinstance(out.get(key), list):
                out[key] = list(out[key])
        return out

    def restore(self, dg: tp.DependencyGraph) -> None:
        for module, state in self.states:
            module.__dict__.clear()
            module.__dict__.update(self._copy(state))
        truncate_history(dg, self.history)


def _run_once(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Size | None, str | None]:
    """(output shape, None) when ``model`` runs on ``inputs``, else (None, what went wrong)."""
    try:
        with torch.no_grad():
            return model(inputs).shape, None
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"


def probe_input(model: nn.Module, example_inputs: torch.Tensor, expected: torch.Size) -> torch.Tensor:
    """The cheapest input that judges whether surgery broke the model: one sample at a quarter
    of the resolution when the unpruned model gives the expected output shape on it, else
    ``example_inputs``.  A channel mismatch fails at any size the original model accepts."""
    if example_inputs.dim() == 4 and min(example_inputs.shape[2:]) >= 128:
        h, w = example_inputs.shape[2:]
        small = example_inputs[:1, :, : h // 4, : w // 4].contiguous()
        shape, _ = _run_once(model, small)
        if shape is not None and shape[1:] == expected[1:]:
            return small
    return example_inputs


def check_runs(model: nn.Module, probe: torch.Tensor, expected: torch.Size) -> str | None:
    """None when the pruned model runs on ``probe`` (see :func:`probe_input`) and gives the
    original output shape (batch aside), else what went wrong."""
    shape, problem = _run_once(model, probe)
    if problem is None and shape[1:] != expected[1:]:
        problem = f"output shape {tuple(shape)} != {tuple(expected)}"
    return problem


def breaking_groups(model: nn.Module, dg: tp.DependencyGraph, selection: Selection,
                    probe: torch.Tensor, expected: torch.Size) -> dict[str, str]:
    """Find the groups whose surgery breaks the model by bisection: a set of groups is applied
    and checked with one forward pass; a set that breaks is undone and its halves tried in turn
    (the ones that pass stay applied).  k breaking groups out of n cost about 2k log2(n/k)
    forward passes instead of n.  Returns {root name: what went wrong}."""
    bad: dict[str, str] = {}

    def attempt(part: Removals) -> None:
        before = Snapshot(model, dg)
        try:
            _apply(dg, part)
            problem = check_runs(model, probe, expected)
        except Exception as err:  # torch-pruning's own surgery failed
            problem = f"{type(err).__name__}: {err}"
        if problem is None:
            return
        before.restore(dg)
        if len(part) == 1:
            bad[part[0][0].root_name] = f"surgery breaks the model ({problem[:200]})"
            return
        attempt(part[: len(part) // 2])
        attempt(part[len(part) // 2:])

    todo = selection.removals()
    if todo:
        attempt(todo[: len(todo) // 2])
        attempt(todo[len(todo) // 2:])
    return bad


__all__ = ["Snapshot", "apply_selection", "breaking_groups", "check_runs", "probe_input"]
