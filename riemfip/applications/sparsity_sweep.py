"""The sparsity sweep of :mod:`riemfip.applications.sparsify` and its record.

:func:`sparsify_sweep` prunes a dense network to every sparsity with every
method (``METHODS``) on the same step budget; :class:`SparsifyResult` holds
the dense accuracy and one :class:`SparsifyRow` per method and sparsity.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ..labelled import check_dataset
from ..plotting import png_figure
from ..records import JsonRecord, percent_cells
from .classifiers import accuracy
from .fip_pruning import _DEFAULT_FIP_OPTIONS, fip_prune
from .fip_settings import resolve_fip_settings
from .magnitude_pruning import _check_sparsity, one_shot_prune, prune_finetune, weight_sparsity

__all__ = ["sparsify_sweep", "SparsifyRow", "SparsifyResult", "evaluate_row"]


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
    done = _saved_rows(checkpoint, cfg, result.dense_test_accuracy)
    jobs = [(m, s) for s in sparsities for m in methods]
    for method, s in tqdm(jobs, disable=not progress, desc="sparsify", leave=False):
        prior = [r for r in done if r.method == method and math.isclose(r.target_sparsity, s)]
        if prior:
            result.rows.append(prior[0])
            continue
        t0 = time.perf_counter()
        pruned, used, extra = _prune(
            method, model, s, data, steps=steps, fip_steps=fip_steps, finetune_lr=finetune_lr,
            batch_size=batch_size, seed=seed, fip_settings=fip_settings,
        )  # fmt: skip
        extra["seconds"] = time.perf_counter() - t0
        result.rows.append(evaluate_row(method, s, pruned, data, used, extra))
        if checkpoint is not None:
            result.to_json(checkpoint)
    return result


def _saved_rows(
    checkpoint: str | Path | None, cfg: dict, dense_test_accuracy: float
) -> list[SparsifyRow]:
    """The rows of the sweep saved at ``checkpoint`` when it ran with the same ``cfg`` and
    dense accuracy, else none."""
    done: list[SparsifyRow] = []
    if checkpoint is not None and Path(checkpoint).is_file():
        saved = SparsifyResult.from_json(checkpoint)
        same = json.loads(json.dumps(cfg)) == saved.config
        if same and math.isclose(saved.dense_test_accuracy, dense_test_accuracy):
            done = saved.rows
    return done


def _prune(
    method: str,
    model: nn.Module,
    sparsity: float,
    data,
    *,
    steps: int,
    fip_steps: int,
    finetune_lr: float,
    batch_size: int,
    seed: int,
    fip_settings: dict | None,
) -> tuple[nn.Module, int, dict]:
    """``model`` pruned to ``sparsity`` by ``method``, the optimizer steps that took, and the
    method's diagnostics (the arguments are :func:`sparsify_sweep`'s)."""
    x, y, common = data.x_train, data.y_train, {"batch_size": batch_size, "seed": seed}
    if method == "magnitude":
        return one_shot_prune(model, sparsity), 0, {}
    if method == "magnitude+finetune":
        pruned = prune_finetune(model, sparsity, x, y, steps=steps, lr=finetune_lr, **common)
        return pruned, steps, {}
    pruned, extra = fip_prune(
        model, sparsity, x, y, steps=steps, fip_steps=fip_steps, finetune_lr=finetune_lr,
        **common, **(fip_settings or {}),
    )  # fmt: skip
    return pruned, steps, extra
