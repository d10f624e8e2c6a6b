"""Network slimming on torch-pruning's DependencyGraph: global |gamma| ranking, physical removal.

``slim(model, ratio, example_inputs, **policy)`` returns a physically smaller copy of ``model``
and a :class:`SlimReport`.  torch-pruning finds the groups of coupled channels (residual adds,
depthwise convolutions, concatenations, flatten into a linear) and performs the surgery; the
policy is ours:

* every channel group is scored by the |gamma| of the BatchNorm layers it holds (``max`` by
  default: a residual channel is removable only when all its branches are);
* one global ranking over the *prunable* channels, each group weighted by how many BN layers
  it holds, so that the true ratio (BN channels removed / prunable BN channels) lands on the
  requested one, within one rounding unit;
* a floor of channels per group and rounding of kept channels to a multiple of ``round_to``,
  both decided by |gamma| (lowest first, ties by index), never at random;
* the classifier's outputs are never pruned; a group the engine cannot prune safely is left
  intact and named in the report;
* a removed channel whose gamma is ~0 outputs a constant (beta through the activation): that
  constant is folded into the next layer's bias (or the running mean of the BN that follows)
  before the channel is removed, so the pruned network computes what the original did wherever
  the next layer sees no zero padding.

The subpackage, one concept per module: :mod:`~slimcore.prune.policy` (the policy and report
types), :mod:`~slimcore.prune.trace` (the one traced pass), :mod:`~slimcore.prune.groups` (channel
groups over the dependency graph), :mod:`~slimcore.prune.selection` (the global selection),
:mod:`~slimcore.prune.search` (the FLOPs/params ratio search),
:mod:`~slimcore.prune.constant_folding`, :mod:`~slimcore.prune.surgery` (surgery with undo) and
:mod:`~slimcore.prune.api` (the public functions).  torch-pruning's workarounds live in
:mod:`slimcore.tp_compat`.
"""

from __future__ import annotations

from slimcore.plan import replay_plan
from slimcore.prune.api import coupled_units, slim, slim_to
from slimcore.prune.policy import GroupReport, SlimError, SlimPolicy, SlimReport
from slimcore.prune.search import TARGET_TOLERANCE

__all__: list[str] = ["TARGET_TOLERANCE", "GroupReport", "SlimError", "SlimPolicy", "SlimReport", "coupled_units",
                      "replay_plan", "slim", "slim_to"]
