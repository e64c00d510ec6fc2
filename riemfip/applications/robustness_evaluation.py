"""Robustness of classifiers under attacks: the attacks, the evaluation, and its record.

:func:`evaluate_robustness` measures every classifier (a network or an
ensemble) under every attack of, e.g., :func:`default_attacks`;
:class:`RobustnessResult` holds the rows of :mod:`riemfip.applications.robust_ensemble`'s
comparison with its config and diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..labelled import check_labelled
from ..plotting import png_figure
from ..records import JsonRecord, percent_cells
from .attacks import AttackConfig, robust_accuracy
from .classifiers import Classifier, _members

__all__ = ["default_attacks", "RobustnessRow", "RobustnessResult", "evaluate_robustness"]


def default_attacks(
    eps: Sequence[float] = (0.05, 0.1, 0.15, 0.2),
    *,
    pgd_steps: int = 20,
    random_start: bool = True,
    seed: int = 0,
) -> list[AttackConfig]:
    """Clean, then FGSM and PGD (``pgd_steps`` steps of ``eps / 10``) at every ε.

    At ε = 0.1 this is the calibration setting: PGD 20 steps of 0.01 from a
    random start, FGSM 0.1.
    """
    configs = [AttackConfig.clean()]
    for e in eps:
        configs.append(AttackConfig.fgsm(e))
        configs.append(AttackConfig.pgd(e, steps=pgd_steps, random_start=random_start, seed=seed))
    return configs


@dataclass
class RobustnessRow(JsonRecord):
    """Accuracy of one classifier under one attack.

    Attributes
    ----------
    model : str
        ``"single"``, ``"independent"``, ``"fip"``, ...
    size : int
        Ensemble size (1 for a single network).
    attack : dict
        :meth:`AttackConfig.to_dict`: name, eps, steps, step_size, random_start, seed.
    accuracy : float
    """

    model: str
    size: int
    attack: dict
    accuracy: float


@dataclass
class RobustnessResult(JsonRecord):
    """Clean and adversarial accuracy of several classifiers.

    Attributes
    ----------
    rows : list of RobustnessRow
    config : dict
        Architecture, data, training budgets, FIP settings, seeds.
    diagnostics : dict
        Per-model extras (e.g. FIP drift, member accuracies).

    Notes
    -----
    The JSON record (:meth:`to_json`) is tagged ``"application": "robust_ensemble"``.
    """

    application = "robust_ensemble"

    rows: list[RobustnessRow] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)

    def models(self) -> list[str]:
        return list(dict.fromkeys(r.model for r in self.rows))

    def accuracy(self, model: str, attack: str, eps: float = 0.0) -> float:
        """Accuracy of ``model`` under ``attack`` (``"clean"``, ``"fgsm"``, ``"pgd"``) at ``eps``."""
        for r in self.rows:
            if (
                r.model == model
                and r.attack["name"] == attack
                and (attack == "clean" or math.isclose(r.attack["eps"], eps))
            ):
                return r.accuracy
        raise KeyError(f"no row for {model!r} under {attack!r} at eps {eps}")

    def table(self) -> str:
        """Accuracy (%) by model (rows) and attack (columns)."""
        attacks = list(dict.fromkeys((r.attack["name"], r.attack["eps"]) for r in self.rows))
        head = f"{'model':<14}{'size':>5}" + "".join(
            f"{'clean' if a == 'clean' else f'{a} {e:g}':>12}" for a, e in attacks
        )
        lines = [head]
        for m in self.models():
            size = next(r.size for r in self.rows if r.model == m)
            cells = percent_cells(lambda attack, m=m: self.accuracy(m, *attack), attacks, 12)
            lines.append(f"{m:<14}{size:>5}" + cells)
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG of accuracy against ε, one panel per attack (FGSM, PGD), one line per model."""
        names = [a for a in ("fgsm", "pgd") if any(r.attack["name"] == a for r in self.rows)]
        ncols = max(len(names), 1)
        with png_figure(path, ncols=ncols, figsize=(5 * ncols, 4), squeeze=False) as (_, axes):
            for ax, name in zip(axes[0], names, strict=False):
                for m in self.models():
                    self._plot_model(ax, m, name)
                example = next(r.attack for r in self.rows if r.attack["name"] == name)
                detail = (
                    f"{example['steps']} steps of eps/10, "
                    f"{'random start' if example['random_start'] else 'no random start'}"
                    if name == "pgd"
                    else "one step of eps"
                )
                ax.set_title(f"{name.upper()} (L∞, white-box, mean softmax): {detail}", fontsize=9)
                ax.set_xlabel("ε (pixels in [0, 1])")
                ax.set_ylabel("test accuracy (%)")
                ax.grid(alpha=0.3)
                ax.legend()
        return Path(path)

    def _plot_model(self, ax, model: str, attack: str) -> None:
        """Accuracy of ``model`` against ε under ``attack``, from its clean accuracy at ε = 0."""
        pts = sorted(
            (r.attack["eps"], r.accuracy)
            for r in self.rows
            if r.model == model and r.attack["name"] == attack
        )
        try:
            pts = [(0.0, self.accuracy(model, "clean"))] + pts
        except KeyError:
            pass
        size = next(r.size for r in self.rows if r.model == model)
        ax.plot(
            [e for e, _ in pts],
            [100 * a for _, a in pts],
            marker="o",
            label=f"{model} (n={size})",
        )


def evaluate_robustness(
    classifiers: dict[str, Classifier],
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[AttackConfig],
    *,
    progress: bool = False,
) -> list[RobustnessRow]:
    """Accuracy of every classifier (a model or an ensemble) under every attack.

    Parameters
    ----------
    classifiers : dict
        ``name -> model, callable or list of models``.
    x, y : torch.Tensor
        Test inputs in [0, 1] and labels.
    attacks : sequence of AttackConfig
    """
    if not isinstance(classifiers, dict) or not classifiers:
        raise ValueError("classifiers must be a non-empty dict name -> model or ensemble")
    check_labelled(x, y, name="test data")
    attacks = list(attacks)
    if not attacks:
        raise ValueError("attacks must hold at least one AttackConfig")
    for a in attacks:
        if not isinstance(a, AttackConfig):
            raise TypeError(f"attacks must be AttackConfig objects, got {type(a).__name__}")
    rows = []
    jobs = [(name, clf, a) for name, clf in classifiers.items() for a in attacks]
    for name, clf, a in tqdm(jobs, disable=not progress, desc="attacks", leave=False):
        size = len(_members(clf))
        rows.append(RobustnessRow(name, size, a.to_dict(), robust_accuracy(clf, x, y, a)))
    return rows
