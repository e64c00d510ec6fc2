r"""Pruning along a functionally invariant path: the FIP route of
:mod:`riemfip.applications.sparsify`.

The FIP route starts from the authors' sparsification code (design notes §2):
at every step the target is the current network with its smallest-magnitude
``sparsity`` fraction of weights set to zero. Their secondary objective,
:math:`\tfrac12\|w - \text{target}\|^2`, alone does not reach a network that
survives the hard mask within a few hundred steps: an L2 pull spreads the
function over many small pruned weights, and masking them at the end still
costs most of the accuracy at 99% (measured: 44% train accuracy after the
mask, see the report). :func:`pruning_objective` therefore adds the *pruning
gap*: the divergence, on a training batch, between the target network (the
current one, masked) and the current network. FIP keeps the current network's
outputs on the anchor where the dense network had them, so descending the gap
moves the masked network onto the dense network's function, and the final hard
mask costs little.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from manifolds.output_metrics import get_output_metric

from ..labelled import check_labelled
from .classifiers import accuracy, minibatches, train_classifier
from .fip_settings import random_anchor
from .magnitude_pruning import _check_sparsity, apply_masks, global_magnitude_mask, prunable_weights

__all__ = ["pruning_penalty", "pruning_objective", "fip_prune"]

_DEFAULT_FIP_OPTIONS = {"mode": "penalty", "beta": 3.0}


def pruning_penalty(model: nn.Module, sparsity: float) -> torch.Tensor:
    r""":math:`\tfrac12\|w - \text{target}\|^2`, the target being ``model`` magnitude-pruned
    to ``sparsity`` now: half the squared norm of the weights that pruning would zero.

    Differentiable in the model's weights (the target is recomputed, not differentiated).
    """
    masks = global_magnitude_mask(model, sparsity)
    weights = prunable_weights(model)
    return 0.5 * sum((weights[n] * ~masks[n]).pow(2).sum() for n in weights)


def pruning_objective(
    model: nn.Module,
    sparsity: float,
    x: torch.Tensor,
    *,
    penalty_weight: float = 0.1,
    metric: str = "bhattacharyya",
) -> torch.Tensor:
    r"""The FIP route's secondary objective: pruning gap on ``x`` plus a pull to the target.

    .. math::

        L(w) = \sum_{b} D\big(f(w \odot m_w; x_b),\, \operatorname{sg} f(w; x_b)\big)
               + c\,\tfrac12 \|w - w \odot m_w\|^2,

    :math:`m_w` the global magnitude mask of the current weights at ``sparsity``
    (recomputed, not differentiated), :math:`\operatorname{sg}` stop-gradient,
    :math:`D` the output metric's divergence (summed over the batch, as the
    authors sum theirs), :math:`c` = ``penalty_weight``.

    Parameters
    ----------
    model : torch.nn.Module
        Unpruned network returning logits.
    sparsity : float in [0, 1)
    x : torch.Tensor
        A batch of training inputs.
    penalty_weight : float
        :math:`c \ge 0`.
    metric : str
        ``"bhattacharyya"``, ``"fisher"`` (KL) or ``"euclidean"``
        (see :mod:`manifolds.output_metrics`).
    """
    if penalty_weight < 0:
        raise ValueError(f"penalty_weight must be >= 0, got {penalty_weight}")
    divergence = get_output_metric(metric).divergence
    masks = global_magnitude_mask(model, sparsity)
    params = dict(model.named_parameters())
    masked = {n: p * masks[n] if n in masks else p for n, p in params.items()}
    with torch.no_grad():
        y = model(x)
    gap = divergence(functional_call(model, masked, (x,)), y).sum()
    pull = 0.5 * sum((params[n] * ~m).pow(2).sum() for n, m in masks.items())
    return gap + penalty_weight * pull


def fip_prune(
    model: nn.Module,
    sparsity: float,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    fip_steps: int,
    anchor_size: int = 256,
    lr: float = 1.0,
    lr_schedule: str = "cosine",
    penalty_weight: float = 0.1,
    finetune_lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    fip_options: dict | None = None,
    progress: bool = False,
) -> tuple[nn.Module, dict]:
    """Prune a copy of ``model`` along a functionally invariant path, then mask and fine-tune.

    Each path step draws a training batch (:func:`~riemfip.applications.classifiers.minibatches`),
    takes the gradient of :func:`pruning_objective` and lets :class:`riemfip.optim.FIP`
    step; FIP keeps the outputs on the anchor inputs at the dense network's.
    After the path the global magnitude mask is applied (``torch.nn.utils.prune``)
    and the remaining budget is spent on masked fine-tuning.

    Parameters
    ----------
    model : torch.nn.Module
        The dense trained network (left untouched).
    sparsity : float in [0, 1)
    x, y : torch.Tensor
        Training data: the anchor is ``anchor_size`` of these inputs (a seeded
        random choice), the fine-tuning uses inputs and labels.
    steps : int
        Total optimizer-step budget: ``fip_steps`` FIP steps, then
        ``steps - fip_steps`` masked fine-tuning steps.
    fip_steps : int
        Steps along the path, ``0 <= fip_steps <= steps``.
    anchor_size : int
        Anchor inputs whose outputs the path keeps.
    lr : float
        FIP learning rate (see :class:`riemfip.optim.FIP`; in the default penalty
        mode the Euclidean length of each step).
    lr_schedule : {"constant", "cosine"}
        ``"cosine"`` anneals the FIP learning rate to 0 over the path
        (:class:`torch.optim.lr_scheduler.CosineAnnealingLR`), so that
        fixed-length (penalty-mode) steps settle instead of circling the target.
    penalty_weight : float
        Weight :math:`c` of the pull toward the target in :func:`pruning_objective`.
    finetune_lr, batch_size, seed
        Masked fine-tuning (Adam), as for :func:`prune_finetune`.
    fip_options : dict, optional
        Keyword arguments of :func:`riemfip.optim.path_optimizer`; default
        ``{"mode": "penalty", "beta": 3.0}`` (the authors' formulation: summed
        Bhattacharyya distance to the frozen dense outputs on the anchor).
    progress : bool
        tqdm bar over the path.

    Returns
    -------
    pruned : torch.nn.Module
        A standard pruned module (``torch.nn.utils.prune``) at exactly ``sparsity``.
    diagnostics : dict
        ``penalty_start``/``penalty_end`` (:func:`pruning_penalty` before and after
        the path); after a path also ``drift_divergence`` and ``drift_agreement``
        (held-out anchor divergence and arg-max agreement with the dense network at
        the path's end) and the ``mode`` of the FIP step.
    """
    sparsity = _check_sparsity(sparsity)
    check_labelled(x, y, name="training data")
    if not (isinstance(steps, int) and isinstance(fip_steps, int) and 0 <= fip_steps <= steps):
        raise ValueError(f"need integers 0 <= fip_steps <= steps, got {fip_steps} and {steps}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    anchor = random_anchor(x, anchor_size, seed)
    net = copy.deepcopy(model)
    diagnostics: dict = {"fip_steps": fip_steps, "finetune_steps": steps - fip_steps}
    with torch.no_grad():
        diagnostics["penalty_start"] = float(pruning_penalty(net, sparsity))
    if fip_steps:
        diagnostics.update(
            _walk_pruning_path(
                net, sparsity, x, anchor, fip_steps=fip_steps, lr=lr, lr_schedule=lr_schedule,
                penalty_weight=penalty_weight, batch_size=batch_size, seed=seed,
                fip_options=fip_options, progress=progress,
            )
        )  # fmt: skip
    with torch.no_grad():
        diagnostics["penalty_end"] = float(pruning_penalty(net, sparsity))
    apply_masks(net, global_magnitude_mask(net, sparsity))
    diagnostics["hard_mask_train_accuracy"] = accuracy(net, x, y)
    train_classifier(
        net, x, y, steps=steps - fip_steps, lr=finetune_lr, batch_size=batch_size, seed=seed
    )
    return net, diagnostics


def _walk_pruning_path(
    net: nn.Module,
    sparsity: float,
    x: torch.Tensor,
    anchor: torch.Tensor,
    *,
    fip_steps: int,
    lr: float,
    lr_schedule: str,
    penalty_weight: float,
    batch_size: int,
    seed: int,
    fip_options: dict | None,
    progress: bool,
) -> dict:
    """The path of :func:`fip_prune`: ``fip_steps`` FIP steps of ``net`` (in place) down
    :func:`pruning_objective`, the outputs on ``anchor`` kept. Returns the drift at the
    path's end and the ``mode`` of the step (the arguments are :func:`fip_prune`'s)."""
    from riemfip.optim import path_optimizer

    options = _DEFAULT_FIP_OPTIONS if fip_options is None else fip_options
    opt = path_optimizer(net.parameters(), model=net, anchor_inputs=anchor, lr=lr, **options)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, fip_steps)
        if lr_schedule == "cosine"
        else None
    )
    batches = minibatches(len(x), batch_size, fip_steps, seed=seed + 1, device=x.device)
    for idx in tqdm(batches, total=fip_steps, disable=not progress, desc="FIP prune", leave=False):
        opt.zero_grad()
        pruning_objective(net, sparsity, x[idx], penalty_weight=penalty_weight).backward()
        opt.step()
        if sched is not None:
            sched.step()
    drift = opt.anchor_drift()
    opt.zero_grad()
    return {
        "drift_divergence": drift.divergence,
        "drift_agreement": drift.agreement,
        "mode": options.get("mode", "natural"),
    }
