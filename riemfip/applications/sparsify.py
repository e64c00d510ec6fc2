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
    A functionally invariant path toward the magnitude-pruned target, then the
    hard mask, then masked fine-tuning for the rest of the budget
    (:mod:`riemfip.applications.sparsify_fip`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from .classifiers import accuracy, train_classifier

__all__ = [
    "prunable_weights",
    "global_magnitude_mask",
    "apply_masks",
    "weight_sparsity",
    "one_shot_prune",
    "prune_finetune",
    "SparsifyRow",
    "SparsifyResult",
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


@dataclass
class SparsifyRow:
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
class SparsifyResult:
    """A sparsity sweep: dense accuracy and one :class:`SparsifyRow` per method and sparsity.

    Attributes
    ----------
    dense_test_accuracy, dense_train_accuracy : float
    rows : list of SparsifyRow
    config : dict
        Everything needed to rerun (architecture, data, budgets, seeds, learning rates).
    """

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

    def to_dict(self) -> dict:
        return {
            "application": "sparsify",
            "dense_test_accuracy": self.dense_test_accuracy,
            "dense_train_accuracy": self.dense_train_accuracy,
            "config": self.config,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as indented JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> SparsifyResult:
        data = json.loads(Path(path).read_text())
        if data.get("application") != "sparsify":
            raise ValueError(f"{path} is not a sparsify record")
        rows = [SparsifyRow(**r) for r in data["rows"]]
        return cls(data["dense_test_accuracy"], data["dense_train_accuracy"], rows, data["config"])

    def table(self) -> str:
        """Test accuracy (%) by method (rows) and target sparsity (columns)."""
        levels = sorted({r.target_sparsity for r in self.rows})
        head = f"{'method':<22}" + "".join(f"{100 * s:>8.0f}%" for s in levels)
        lines = [f"dense test accuracy {100 * self.dense_test_accuracy:.1f}%", head]
        for m in self.methods():
            cells = []
            for s in levels:
                try:
                    cells.append(f"{100 * self.row(m, s).test_accuracy:>9.1f}")
                except KeyError:
                    cells.append(f"{'-':>9}")
            lines.append(f"{m:<22}" + "".join(cells))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG of test accuracy against sparsity, one line per method, dense as a reference."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
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
        arch = self.config.get("architecture", "")
        ax.set_title(f"Pruning {arch}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


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
