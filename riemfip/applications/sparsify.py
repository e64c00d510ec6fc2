"""Global magnitude pruning: masks, baselines, and the record of a sparsity sweep.

Methods compared (same optimizer-step budget for every method that trains)
--------------------------------------------------------------------------
``"magnitude"``
    One-shot global magnitude pruning of the dense network, no training.
``"magnitude+finetune"``
    One-shot pruning, then ``steps`` Adam steps of masked cross-entropy training.
``"fip"``
    A functionally invariant path toward the magnitude-pruned target
    (:func:`fip_prune`), then the hard mask, then masked fine-tuning for the rest
    of the budget.

Modules
-------
The application lives in three modules; every public name of theirs is importable
from here.

:mod:`~riemfip.applications.magnitude_pruning`
    What is pruned, the global magnitude masks (``torch.nn.utils.prune``) and the
    two magnitude baselines.
:mod:`~riemfip.applications.fip_pruning`
    The FIP route: its secondary objective (and why it holds a pruning gap) and
    the path toward the pruned target.
:mod:`~riemfip.applications.sparsity_sweep`
    The sweep over sparsities and methods, and its JSON record.
"""

from __future__ import annotations

from .fip_pruning import fip_prune, pruning_objective, pruning_penalty
from .magnitude_pruning import (
    apply_masks,
    global_magnitude_mask,
    one_shot_prune,
    prunable_weights,
    prune_finetune,
    weight_sparsity,
)
from .sparsity_sweep import METHODS as METHODS
from .sparsity_sweep import SparsifyResult, SparsifyRow, evaluate_row, sparsify_sweep

__all__ = [
    "prunable_weights",
    "global_magnitude_mask",
    "apply_masks",
    "weight_sparsity",
    "one_shot_prune",
    "prune_finetune",
    "pruning_penalty",
    "pruning_objective",
    "fip_prune",
    "sparsify_sweep",
    "SparsifyRow",
    "SparsifyResult",
    "evaluate_row",
]
