r"""Global magnitude pruning: masks, baselines, and the record of a sparsity sweep.

What is pruned
--------------
The weight matrices of every ``nn.Linear`` and ``nn.Conv{1,2,3}d`` layer, ranked
together (global pruning); biases are kept (LeNet-300-100 has 410 biases and
266,200 such weights). ``sparsity`` is the fraction of those weights that are
zero. Masks are applied with :func:`torch.nn.utils.prune.custom_from_mask`, so a
pruned network is a standard pruned module (``weight_orig`` and ``weight_mask``;
:func:`torch.nn.utils.prune.remove` makes it permanent).

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
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import prune
from tqdm.auto import tqdm

from manifolds.output_metrics import get_output_metric

from ..labelled import check_dataset, check_labelled
from ..plotting import png_figure
from ..records import JsonRecord, percent_cells
from .classifiers import accuracy, minibatches, train_classifier
from .fip_settings import random_anchor, resolve_fip_settings

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

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DEFAULT_FIP_OPTIONS = {"mode": "penalty", "beta": 3.0}


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


@dataclass
class SparsifyRow(JsonRecord):
    """One pruned network.

    Attributes
    ----------
    method : str
    target_sparsity : float
    sparsity : float
        Measured fraction of zero prunable weights.
    test_accuracy, train_accuracy : float
    steps : int
        Optimizer steps the method spent (FIP steps + fine-tuning steps).
    extra : dict
        Method-specific diagnostics (e.g. FIP drift).
    """

    method: str
    target_sparsity: float
    sparsity: float
    test_accuracy: float
    train_accuracy: float
    steps: int
    extra: dict = field(default_factory=dict)


@dataclass
class SparsifyResult(JsonRecord):
    """A sparsity sweep: dense accuracy and one :class:`SparsifyRow` per method and sparsity.

    Attributes
    ----------
    dense_test_accuracy, dense_train_accuracy : float
    rows : list of SparsifyRow
    config : dict
        Everything needed to rerun (architecture, data, budgets, seeds, learning rates).

    Notes
    -----
    The JSON record (:meth:`to_json`) is tagged ``"application": "sparsify"``.
    """

    application = "sparsify"

    dense_test_accuracy: float
    dense_train_accuracy: float
    rows: list[SparsifyRow] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.rows))

    def row(self, method: str, target_sparsity: float) -> SparsifyRow:
        """The row of ``method`` at ``target_sparsity`` (KeyError if absent)."""
        for r in self.rows:
            if r.method == method and math.isclose(r.target_sparsity, target_sparsity):
                return r
        raise KeyError(f"no row for method {method!r} at sparsity {target_sparsity}")

    def table(self) -> str:
        """Test accuracy (%) by method (rows) and target sparsity (columns)."""
        levels = sorted({r.target_sparsity for r in self.rows})
        head = f"{'method':<22}" + "".join(f"{100 * s:>8.0f}%" for s in levels)
        lines = [f"dense test accuracy {100 * self.dense_test_accuracy:.1f}%", head]
        for m in self.methods():
            cells = percent_cells(lambda s, m=m: self.row(m, s).test_accuracy, levels, 9)
            lines.append(f"{m:<22}" + cells)
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG of test accuracy against sparsity, one line per method, dense as a reference."""
        with png_figure(path, figsize=(6, 4)) as (fig, ax):
            for m in self.methods():
                rows = sorted((r for r in self.rows if r.method == m), key=lambda r: r.sparsity)
                ax.plot(
                    [100 * r.sparsity for r in rows],
                    [100 * r.test_accuracy for r in rows],
                    marker="o",
                    label=m,
                )
            ax.axhline(100 * self.dense_test_accuracy, color="k", ls="--", lw=1, label="dense")
            ax.set_xlabel("global weight sparsity (%)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"Pruning {self.config.get('architecture', '')}".strip())
            ax.grid(alpha=0.3)
            ax.legend()
        return Path(path)


def evaluate_row(
    method: str,
    target_sparsity: float,
    model: nn.Module,
    data,
    steps: int,
    extra: dict | None = None,
) -> SparsifyRow:
    """Measure a pruned ``model`` on ``data`` (a :class:`~riemfip.data.Dataset`)."""
    return SparsifyRow(
        method=method,
        target_sparsity=float(target_sparsity),
        sparsity=weight_sparsity(model),
        test_accuracy=accuracy(model, data.x_test, data.y_test),
        train_accuracy=accuracy(model, data.x_train, data.y_train),
        steps=int(steps),
        extra=dict(extra or {}),
    )


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
    from riemfip.optim import path_optimizer

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
        options = _DEFAULT_FIP_OPTIONS if fip_options is None else fip_options
        opt = path_optimizer(net.parameters(), model=net, anchor_inputs=anchor, lr=lr, **options)
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, fip_steps)
            if lr_schedule == "cosine"
            else None
        )
        batches = minibatches(len(x), batch_size, fip_steps, seed=seed + 1, device=x.device)
        for idx in tqdm(
            batches, total=fip_steps, disable=not progress, desc="FIP prune", leave=False
        ):
            opt.zero_grad()
            pruning_objective(net, sparsity, x[idx], penalty_weight=penalty_weight).backward()
            opt.step()
            if sched is not None:
                sched.step()
        drift = opt.anchor_drift()
        diagnostics.update(
            drift_divergence=drift.divergence,
            drift_agreement=drift.agreement,
            mode=options.get("mode", "natural"),
        )
        opt.zero_grad()
    with torch.no_grad():
        diagnostics["penalty_end"] = float(pruning_penalty(net, sparsity))
    apply_masks(net, global_magnitude_mask(net, sparsity))
    diagnostics["hard_mask_train_accuracy"] = accuracy(net, x, y)
    train_classifier(
        net, x, y, steps=steps - fip_steps, lr=finetune_lr, batch_size=batch_size, seed=seed
    )
    return net, diagnostics


METHODS = ("magnitude", "magnitude+finetune", "fip")
_FIP_SETTINGS = ("anchor_size", "lr", "lr_schedule", "penalty_weight", "fip_options")


def _fip_settings(settings: dict | None) -> dict:
    """The :func:`fip_prune` settings in effect: defaults updated by ``settings``."""
    return resolve_fip_settings(fip_prune, _FIP_SETTINGS, settings, _DEFAULT_FIP_OPTIONS)


def sparsify_sweep(
    model: nn.Module,
    data,
    sparsities: Sequence[float],
    *,
    steps: int,
    fip_steps: int,
    methods: Sequence[str] = METHODS,
    finetune_lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    fip_settings: dict | None = None,
    config: dict | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = False,
) -> SparsifyResult:
    """Prune ``model`` to every sparsity with every method and record the accuracies.

    Each method starts from the dense ``model`` at each sparsity (no schedule),
    and every method that trains gets ``steps`` optimizer steps.

    Parameters
    ----------
    model : torch.nn.Module
        Dense trained network.
    data : riemfip.data.Dataset
        Training data (fine-tuning, anchor) and test data (the reported accuracy).
    sparsities : sequence of float in [0, 1)
    steps, fip_steps : int
        Step budget per method and sparsity, and the FIP share of it.
    methods : sequence of {"magnitude", "magnitude+finetune", "fip"}
    finetune_lr, batch_size, seed
        Masked fine-tuning (all methods) and minibatch order.
    fip_settings : dict, optional
        Keyword arguments of :func:`fip_prune` (``lr``, ``lr_schedule``,
        ``penalty_weight``, ``anchor_size``, ``fip_options``); the record's
        config holds the values used, defaults included.
    checkpoint : path, optional
        JSON written after every row; when it was written with the same config
        and dense accuracy, its rows (same method and sparsity) are reused, so an
        interrupted sweep resumes.
    config : dict, optional
        Extra entries for the record's ``config`` (architecture, dense training, ...).

    Returns
    -------
    SparsifyResult
    """
    sparsities = [_check_sparsity(s) for s in sparsities]
    if not sparsities:
        raise ValueError("sparsities must hold at least one level")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    check_dataset(data)
    cfg = {
        "sparsities": sparsities,
        "methods": list(methods),
        "pruned": "weights of Linear/Conv layers, ranked globally; biases kept",
        "steps": steps,
        "fip_steps": fip_steps,
        "finetune": {"optimizer": "adam", "lr": finetune_lr, "batch_size": batch_size},
        "fip": _fip_settings(fip_settings),
        "seed": seed,
        "data": data.describe(),
        **(config or {}),
    }
    result = SparsifyResult(
        accuracy(model, data.x_test, data.y_test),
        accuracy(model, data.x_train, data.y_train),
        [],
        cfg,
    )
    done: list[SparsifyRow] = []
    if checkpoint is not None and Path(checkpoint).is_file():
        saved = SparsifyResult.from_json(checkpoint)
        same = json.loads(json.dumps(cfg)) == saved.config
        if same and math.isclose(saved.dense_test_accuracy, result.dense_test_accuracy):
            done = saved.rows
    jobs = [(m, s) for s in sparsities for m in methods]
    for method, s in tqdm(jobs, disable=not progress, desc="sparsify", leave=False):
        prior = [r for r in done if r.method == method and math.isclose(r.target_sparsity, s)]
        if prior:
            result.rows.append(prior[0])
            continue
        t0 = time.perf_counter()
        extra: dict = {}
        x, y, common = data.x_train, data.y_train, {"batch_size": batch_size, "seed": seed}
        if method == "magnitude":
            pruned, used = one_shot_prune(model, s), 0
        elif method == "magnitude+finetune":
            pruned, used = (
                prune_finetune(model, s, x, y, steps=steps, lr=finetune_lr, **common),
                steps,
            )
        else:
            pruned, extra = fip_prune(
                model, s, x, y, steps=steps, fip_steps=fip_steps, finetune_lr=finetune_lr,
                **common, **(fip_settings or {}),
            )  # fmt: skip
            used = steps
        extra["seconds"] = time.perf_counter() - t0
        result.rows.append(evaluate_row(method, s, pruned, data, used, extra))
        if checkpoint is not None:
            result.to_json(checkpoint)
    return result
