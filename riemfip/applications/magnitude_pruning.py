r"""Global magnitude pruning: which weights are pruned, the masks, and the two magnitude baselines.

What is pruned
--------------
The weight matrices of every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` layer, ranked
together (global pruning); biases are kept (LeNet-300-100 has 410 biases and
266,200 such weights). ``sparsity`` is the fraction of those weights that are
zero. Masks are applied with :func:`torch.nn.utils.prune.custom_from_mask`, so a
pruned network is a standard pruned module (``weight_orig`` and ``weight_mask``;
:func:`torch.nn.utils.prune.remove` makes it permanent).

The baselines of :mod:`riemfip.applications.sparsify`: :func:`one_shot_prune`
(``"magnitude"``) and :func:`prune_finetune` (``"magnitude+finetune"``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune

from .classifiers import train_classifier

__all__ = [
    "prunable_weights",
    "global_magnitude_mask",
    "apply_masks",
    "weight_sparsity",
    "one_shot_prune",
    "prune_finetune",
]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number, got {type(sparsity).__name__}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    return float(sparsity)


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight tensors that are pruned, keyed ``"<module name>.weight"``.

    For a module already pruned with :mod:`torch.nn.utils.prune` this is the
    effective (masked) weight.

    Raises
    ------
    TypeError
        ``model`` is not a module.
    ValueError
        It has no ``Linear``/``Conv`` layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = {
        f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, _PRUNABLE)
    }
    if not out:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to prune")
    return out


def global_magnitude_mask(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the ``sparsity`` fraction of smallest-magnitude weights.

    Ranking is global over :func:`prunable_weights`; exactly
    ``round(sparsity * n)`` weights are pruned (ties broken by position).

    Parameters
    ----------
    model : torch.nn.Module
    sparsity : float in [0, 1)

    Returns
    -------
    dict
        ``"<module>.weight" -> bool tensor`` (True = kept), shaped like the weight.
    """
    sparsity = _check_sparsity(sparsity)
    weights = prunable_weights(model)
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    n_keep = flat.numel() - int(round(sparsity * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, n_keep, sorted=False).indices] = True
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start : start + w.numel()].view_as(w)
        start += w.numel()
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Prune ``model`` in place with :func:`torch.nn.utils.prune.custom_from_mask`.

    Parameters
    ----------
    model : torch.nn.Module
    masks : dict
        From :func:`global_magnitude_mask`: ``"<module>.weight" -> mask``.

    Returns
    -------
    torch.nn.Module
        ``model``, with ``weight_orig`` parameters and ``weight_mask`` buffers.
    """
    weights = prunable_weights(model)
    if not isinstance(masks, dict) or set(masks) != set(weights):
        got = sorted(masks) if isinstance(masks, dict) else type(masks).__name__
        raise ValueError(f"masks must be a dict with keys {sorted(weights)}, got {got}")
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if mask.shape != weights[name].shape:
            raise ValueError(
                f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(weights[name].shape)}"
            )
        module = modules[name.rsplit(".", 1)[0]]
        if prune.is_pruned(module):
            raise ValueError(f"{name} is already pruned; prune a fresh copy")
        prune.custom_from_mask(module, "weight", mask.to(weights[name].device))
    return model


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among :func:`prunable_weights` (the effective weights)."""
    weights = list(prunable_weights(model).values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def one_shot_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """A pruned copy of ``model``: global magnitude masks at ``sparsity``, no training."""
    pruned = copy.deepcopy(model)
    return apply_masks(pruned, global_magnitude_mask(pruned, sparsity))


def prune_finetune(
    model: nn.Module,
    sparsity: float,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """One-shot pruning of a copy of ``model``, then ``steps`` steps of masked Adam training.

    See :func:`~riemfip.applications.classifiers.train_classifier` for the
    training arguments.
    """
    pruned = one_shot_prune(model, sparsity)
    return train_classifier(
        pruned, x, y, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress
    )
