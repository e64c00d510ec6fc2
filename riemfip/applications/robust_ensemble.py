r"""Adversarial robustness of ensembles: independent networks vs networks sampled along a FIP.

Three classifiers of the same architecture are compared under white-box L∞
attacks (:mod:`riemfip.applications.attacks`) on the ensemble's mean softmax:

``"single"``
    One trained network.
``"independent"``
    ``size`` networks trained from different seeds (the first is ``"single"``).
``"fip"``
    ``"single"`` and ``size - 1`` networks sampled along a functionally
    invariant path that starts at it (:func:`fip_ensemble`): the path keeps the
    outputs on clean training inputs fixed and spends its freedom on
    disagreeing with the ensemble built so far on adversarial inputs.

The record (:class:`RobustnessResult`) holds clean, FGSM and PGD accuracy of
each at every ε, with every attack's ε, steps, step size and random start.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .attacks import AttackConfig, robust_accuracy
from .classifiers import Classifier, _check_data, _members, train_classifier

__all__ = [
    "independent_ensemble",
    "default_attacks",
    "RobustnessRow",
    "RobustnessResult",
    "evaluate_robustness",
]


def independent_ensemble(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    size: int,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[nn.Module]:
    """``size`` networks, member ``i`` initialised with ``torch.manual_seed(seed + i)``
    and trained on its own minibatch order (seed ``seed + i``).

    Parameters
    ----------
    make_model : callable
        ``() -> nn.Module``, a fresh untrained network (initialised from the global RNG).
    x, y : torch.Tensor
        Training inputs and labels.
    size : int
        Number of members (>= 1).
    steps, lr, batch_size
        As for :func:`~riemfip.applications.classifiers.train_classifier`.
    """
    if not callable(make_model):
        raise TypeError(f"make_model must be callable, got {type(make_model).__name__}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    _check_data(x, y)
    members = []
    for i in tqdm(range(size), disable=not progress, desc="independent ensemble", leave=False):
        torch.manual_seed(seed + i)
        net = make_model().to(device=x.device, dtype=x.dtype)
        members.append(
            train_classifier(
                net, x, y, steps=steps, lr=lr, batch_size=batch_size, seed=seed + i
            ).eval()
        )
    return members


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
class RobustnessRow:
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
class RobustnessResult:
    """Clean and adversarial accuracy of several classifiers.

    Attributes
    ----------
    rows : list of RobustnessRow
    config : dict
        Architecture, data, training budgets, FIP settings, seeds.
    diagnostics : dict
        Per-model extras (e.g. FIP drift, member accuracies).
    """

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

    def to_dict(self) -> dict:
        return {
            "application": "robust_ensemble",
            "config": self.config,
            "diagnostics": self.diagnostics,
            "rows": [
                {"model": r.model, "size": r.size, "attack": r.attack, "accuracy": r.accuracy}
                for r in self.rows
            ],
        }

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as indented JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> RobustnessResult:
        data = json.loads(Path(path).read_text())
        if data.get("application") != "robust_ensemble":
            raise ValueError(f"{path} is not a robust_ensemble record")
        rows = [RobustnessRow(**r) for r in data["rows"]]
        return cls(rows, data["config"], data.get("diagnostics", {}))

    def table(self) -> str:
        """Accuracy (%) by model (rows) and attack (columns)."""
        attacks = list(dict.fromkeys((r.attack["name"], r.attack["eps"]) for r in self.rows))
        head = f"{'model':<14}{'size':>5}" + "".join(
            f"{'clean' if a == 'clean' else f'{a} {e:g}':>12}" for a, e in attacks
        )
        lines = [head]
        for m in self.models():
            size = next(r.size for r in self.rows if r.model == m)
            cells = []
            for a, e in attacks:
                try:
                    cells.append(f"{100 * self.accuracy(m, a, e):>12.1f}")
                except KeyError:
                    cells.append(f"{'-':>12}")
            lines.append(f"{m:<14}{size:>5}" + "".join(cells))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG of accuracy against ε, one panel per attack (FGSM, PGD), one line per model."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [a for a in ("fgsm", "pgd") if any(r.attack["name"] == a for r in self.rows)]
        ncols = max(len(names), 1)
        fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4), squeeze=False)
        axes = list(axes[0])
        for ax, name in zip(axes, names, strict=False):
            for m in self.models():
                pts = sorted(
                    (r.attack["eps"], r.accuracy)
                    for r in self.rows
                    if r.model == m and r.attack["name"] == name
                )
                try:
                    pts = [(0.0, self.accuracy(m, "clean"))] + pts
                except KeyError:
                    pass
                size = next(r.size for r in self.rows if r.model == m)
                ax.plot(
                    [e for e, _ in pts],
                    [100 * a for _, a in pts],
                    marker="o",
                    label=f"{m} (n={size})",
                )
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
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


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
