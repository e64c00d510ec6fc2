"""Independently trained ensembles, the baselines of :mod:`riemfip.applications.robust_ensemble`.

:func:`independent_ensemble` trains ``size`` networks from different seeds
(``"independent"``), or, given an attack, each adversarially on half of every
minibatch (``"independent-adv"``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..labelled import check_labelled
from .attacks import AttackConfig, attack
from .classifiers import trained_classifier

__all__ = ["independent_ensemble"]


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
    adversarial: AttackConfig | None = None,
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
    adversarial : AttackConfig, optional
        Adversarial training: half of each minibatch is replaced by this attack's
        examples against the member's current weights (a fresh random start each
        step), for the same number of steps. The fair baseline for an ensemble that sees adversarial
        examples while it is built.
    """
    if adversarial is not None and not isinstance(adversarial, AttackConfig):
        raise TypeError(f"adversarial must be an AttackConfig, got {type(adversarial).__name__}")
    if not callable(make_model):
        raise TypeError(f"make_model must be callable, got {type(make_model).__name__}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    check_labelled(x, y, name="training data")
    members = []
    for i in tqdm(range(size), disable=not progress, desc="independent ensemble", leave=False):
        perturb = None if adversarial is None else _attacker(adversarial, seed=1000 * (seed + i))
        members.append(
            trained_classifier(
                make_model, x, y, steps=steps, lr=lr, batch_size=batch_size, seed=seed + i,
                perturb=perturb,
            )
        )  # fmt: skip
    return members


def _attacker(config: AttackConfig, seed: int):
    """``perturb(model, xb, yb)`` for :func:`train_classifier`: the first half of each
    minibatch replaced by ``config``'s attack (a new random-start seed at every call),
    the rest kept clean.

    Half and half is Goodfellow et al.'s (2015) mix, :math:`\tfrac12 L(x) + \tfrac12
    L(x_{adv})`; measured here, all-adversarial training of a small MLP from scratch
    at ε = 0.1 collapsed to chance (10%) where the mix kept learning.
    """
    calls = itertools.count(seed)

    def perturb(model, xb, yb):
        half = (len(xb) + 1) // 2
        adv = attack(model, xb[:half], yb[:half], dataclasses.replace(config, seed=next(calls)))
        return torch.cat([adv, xb[half:]])

    return perturb
