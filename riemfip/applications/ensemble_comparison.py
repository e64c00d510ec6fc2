"""The comparison of :mod:`riemfip.applications.robust_ensemble`: a single network, an
independent ensemble and a FIP ensemble built, saved, attacked and recorded.

:func:`compare_ensembles` builds every classifier (each ensemble cached in a
checkpoint, so an interrupted comparison resumes), attacks each with
:func:`~riemfip.applications.robustness_evaluation.evaluate_robustness` and returns
a :class:`~riemfip.applications.robustness_evaluation.RobustnessResult`.

The FIP ensemble, :func:`~riemfip.applications.robust_ensemble.fip_ensemble`, is
defined in :mod:`riemfip.applications.robust_ensemble`, which re-exports this
module's names; it is imported where it is called, so the two modules do not
import each other at import time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import resume_checkpoint, save_checkpoint
from ..labelled import check_dataset
from .attacks import AttackConfig
from .classifiers import accuracy
from .fip_settings import resolve_fip_settings
from .independent_ensembles import independent_ensemble
from .robustness_evaluation import RobustnessResult, evaluate_robustness

__all__ = ["compare_ensembles"]


_FIP_SETTINGS = (
    "objective",
    "eps",
    "attack_steps",
    "anchor_size",
    "lr",
    "fip_options",
)


def _fip_settings(settings: dict | None) -> dict:
    """The :func:`fip_ensemble` settings in effect: defaults updated by ``settings``."""
    from .robust_ensemble import _DEFAULT_FIP_OPTIONS, fip_ensemble

    return resolve_fip_settings(fip_ensemble, _FIP_SETTINGS, settings, _DEFAULT_FIP_OPTIONS)


def _members_cached(
    path: Path | None,
    settings: dict,
    make_model: Callable[[], nn.Module],
    like: torch.Tensor,
    build: Callable[[], tuple[list[nn.Module], dict]],
) -> tuple[list[nn.Module], dict]:
    """``build() -> (members, diagnostics)``, or what a build with the same ``settings``
    saved at ``path`` (:mod:`riemfip.checkpoint`; one written with other settings is
    refused). Members are rebuilt with ``make_model`` on ``like``'s device and dtype."""
    saved = resume_checkpoint(path, settings, map_location=like.device)
    if saved is not None:
        members = []
        for state in saved.state["members"]:
            net = make_model().to(device=like.device, dtype=like.dtype)
            net.load_state_dict(state)
            members.append(net.eval())
        return members, saved.state["diagnostics"]
    members, diagnostics = build()
    if path is not None:
        state = {"members": [m.state_dict() for m in members], "diagnostics": diagnostics}
        save_checkpoint(path, state, settings=settings, step=len(members))
    return members, diagnostics


@dataclass(frozen=True)
class _Budget:
    """What :func:`compare_ensembles` spends: its arguments of the same names."""

    size: int
    train_steps: int
    steps_per_member: int
    lr: float
    batch_size: int
    seed: int
    adversarial_training: AttackConfig | None


def _build_classifiers(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    settings: dict,
    b: _Budget,
    checkpoint_dir: str | Path | None,
    progress: bool,
) -> tuple[dict[str, nn.Module | list[nn.Module]], dict, dict]:
    """The classifiers :func:`compare_ensembles` attacks, each ensemble built on ``x, y`` or
    read back from ``checkpoint_dir``; with the FIP path's diagnostics and the wall time of
    each build (``seconds``)."""
    from .robust_ensemble import fip_ensemble

    common = {"size": b.size, "batch_size": b.batch_size, "seed": b.seed, "progress": progress}
    train_key = {
        "size": b.size,
        "steps": b.train_steps,
        "lr": b.lr,
        "batch": b.batch_size,
        "seed": b.seed,
    }
    seconds: dict = {}

    def cached(file: str, key: dict, build, timing: str) -> tuple[list[nn.Module], dict]:
        t0 = time.perf_counter()
        path = None if checkpoint_dir is None else Path(checkpoint_dir) / file
        out = _members_cached(path, key, make_model, x, build)
        seconds[timing] = time.perf_counter() - t0
        return out

    def trained(adversarial: AttackConfig | None) -> tuple[list[nn.Module], dict]:
        members = independent_ensemble(
            make_model, x, y, steps=b.train_steps, lr=b.lr, adversarial=adversarial, **common
        )
        return members, {}

    independent, _ = cached("independent.pt", train_key, lambda: trained(None), "independent")
    fip_members, fip_diag = cached(
        "fip.pt",
        {**train_key, "steps_per_member": b.steps_per_member, **settings},
        lambda: fip_ensemble(
            independent[0], x, y, steps_per_member=b.steps_per_member, **common, **settings
        ),
        "fip_path",
    )
    classifiers = {"single": independent[0], "independent": independent, "fip": fip_members}
    if b.adversarial_training is not None:
        classifiers["independent-adv"], _ = cached(
            "independent_adversarial.pt",
            {**train_key, "adversarial": b.adversarial_training.to_dict()},
            lambda: trained(b.adversarial_training),
            "independent_adversarial",
        )
    return classifiers, fip_diag, seconds


def _comparison_config(
    data, attacks: list[AttackConfig], settings: dict, b: _Budget, config: dict | None
) -> dict:
    """The ``config`` of :func:`compare_ensembles`'s record: budgets, FIP settings, attacks,
    data, seeds, and the caller's ``config`` entries."""
    return {
        "size": b.size,
        "member_training": {
            "optimizer": "adam",
            "lr": b.lr,
            "steps": b.train_steps,
            "batch_size": b.batch_size,
            "seeds": [b.seed + i for i in range(b.size)],
        },
        "fip": {
            "steps_per_member": b.steps_per_member,
            "path_steps": (b.size - 1) * b.steps_per_member,
            "training_steps_total": b.train_steps + (b.size - 1) * b.steps_per_member,
            **settings,
        },
        "independent_training_steps_total": b.size * b.train_steps,
        "adversarial_training": None
        if b.adversarial_training is None
        else {**b.adversarial_training.to_dict(), "steps_per_member": b.train_steps},
        "attacks": [a.to_dict() for a in attacks],
        "threat_model": "white-box L-inf on the ensemble's mean softmax, inputs clipped to [0, 1]",
        "data": data.describe(),
        "seed": b.seed,
        **(config or {}),
    }


def compare_ensembles(
    make_model: Callable[[], nn.Module],
    data,
    *,
    size: int,
    train_steps: int,
    steps_per_member: int,
    attacks: Sequence[AttackConfig],
    fip_settings: dict | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    config: dict | None = None,
    checkpoint_dir: str | Path | None = None,
    adversarial_training: AttackConfig | None = None,
    progress: bool = False,
) -> RobustnessResult:
    """Single network vs independent ensemble vs FIP ensemble, under ``attacks``.

    Parameters
    ----------
    make_model : callable
        ``() -> nn.Module``, a fresh network.
    data : riemfip.data.Dataset
        Training data (members, FIP anchor and secondary objective) and test
        data (every reported accuracy), pixels in [0, 1].
    size : int
        Ensemble size, the same for both ensembles.
    train_steps : int
        Adam steps for each independently trained network (member 0 of both
        ensembles is the same network, the ``"single"`` one).
    steps_per_member : int
        FIP path steps between sampled members (see
        :func:`~riemfip.applications.robust_ensemble.fip_ensemble`).
    attacks : sequence of AttackConfig
        E.g. :func:`~riemfip.applications.robustness_evaluation.default_attacks`.
    fip_settings : dict, optional
        Keyword arguments of :func:`~riemfip.applications.robust_ensemble.fip_ensemble`
        (``objective``, ``eps``, ``attack_steps``, ``anchor_size``, ``lr``,
        ``fip_options``); the record's config holds the values used, defaults included.
    checkpoint_dir : path, optional
        Each ensemble is saved there when built (``independent.pt``, ``fip.pt``,
        ``independent_adversarial.pt``; :mod:`riemfip.checkpoint`) with the settings
        that built it, and reused by a rerun with the same settings, so an interrupted
        comparison resumes after its last finished ensemble. A file written with
        other settings is refused (:class:`~riemfip.checkpoint.SettingsMismatchError`).
    adversarial_training : AttackConfig, optional
        Also an ``"independent-adv"`` ensemble: the same size and steps, each
        member adversarially trained with this attack (:func:`independent_ensemble`).
        The FIP ensemble sees adversarial examples while it is built and the plain
        independent one does not; this baseline does.

    Returns
    -------
    RobustnessResult
        Rows for ``"single"``, ``"independent"``, ``"fip"`` (and
        ``"independent-adv"`` when asked); diagnostics with
        each member's clean test accuracy, FIP drift and wall times.
    """
    check_dataset(data)
    settings = _fip_settings(fip_settings)
    attacks = list(attacks)
    budget = _Budget(
        size, train_steps, steps_per_member, lr, batch_size, seed, adversarial_training
    )
    classifiers, fip_diag, seconds = _build_classifiers(
        make_model, data.x_train, data.y_train, settings, budget, checkpoint_dir, progress
    )
    t0 = time.perf_counter()
    rows = evaluate_robustness(classifiers, data.x_test, data.y_test, attacks, progress=progress)
    seconds["attacks"] = time.perf_counter() - t0
    cfg = _comparison_config(data, attacks, settings, budget, config)
    diagnostics = {
        "member_clean_accuracy": {
            name: [accuracy(m, data.x_test, data.y_test) for m in classifiers[name]]
            for name in classifiers
            if name != "single"
        },
        "fip_path": fip_diag,
        "seconds": seconds,
    }
    return RobustnessResult(rows, cfg, diagnostics)
