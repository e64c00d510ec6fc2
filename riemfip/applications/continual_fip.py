"""Continual learning by functionally invariant paths: :class:`FIPMethod` and the drift
certificate it records after each task.

Re-exported from :mod:`riemfip.applications.continual_methods`, with the other methods.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict

import torch

from .continual_base import ContinualMethod

__all__ = ["DriftBudgetWarning", "FIPMethod"]


class DriftBudgetWarning(UserWarning):
    """A FIP task whose held-out anchor drift went over its :class:`~riemfip.optim.DriftGuard`
    budget (see :meth:`FIPMethod.drift_certificate`)."""


class FIPMethod(ContinualMethod):
    """Functionally invariant path: learn the new task while the outputs on the memory stay put.

    From task 1 on, each task is trained with :class:`riemfip.optim.FIP`, anchored on
    the stored inputs of all earlier tasks (the memory, without its labels) at the
    weights reached after the previous task; the loss is the new task's
    cross-entropy alone. Task 0 has nothing to keep and is trained with SGD.

    Parameters
    ----------
    lr_scale : float
        FIP steps use ``lr_scale`` times the run's learning rate (task 0's SGD uses
        the run's own, so that it matches the other methods). Natural-mode FIP
        passes only the part of each gradient that leaves the anchor outputs alone
        (``mean_kept_fraction`` in the diagnostics), so it usually wants a larger rate.
    **options
        Keyword arguments of :func:`riemfip.optim.path_optimizer` other than ``params``,
        ``model``, ``anchor_inputs`` and ``lr`` (e.g. ``mode="penalty", beta=10``,
        ``damping``, ``guard=DriftGuard(0.01)``,
        ``anchors=AnchorSampling(transform=GaussianNoise(0.3))``); recorded in the result
        (objects by their ``repr``).

    Notes
    -----
    **Drift certificate.** After each FIP task the diagnostics (and so the run's JSON
    record) hold the held-out anchor drift at the end of the task (``holdout_divergence``,
    ``holdout_agreement``), the largest held-out drift after any step
    (``max_step_drift``), the budget of the :class:`~riemfip.optim.DriftGuard`
    (``drift_budget``, ``None`` without one), the steps that ended over it
    (``steps_over_budget``) and ``budget_exceeded``: whether the drift went over the budget
    after any step or at the end (``None`` without a budget). A task whose drift went over
    its budget also raises a :class:`DriftBudgetWarning` at its end.
    """

    name = "fip"

    def __init__(self, *, lr_scale: float = 1.0, **options):
        reserved = {"params", "model", "anchor_inputs", "lr"} & set(options)
        if reserved:
            raise ValueError(f"{sorted(reserved)} are set by the continual run, not by options")
        lr_scale = float(lr_scale)
        if not (math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"lr_scale must be a positive number, got {lr_scale}")
        super().__init__(momentum=0.0)
        self.lr_scale = lr_scale
        self.options = dict(options)
        self._optimizer = None
        self._steps: list = []

    def config(self) -> dict:
        """``lr_scale`` and the FIP options; objects (e.g. an anchor transform) by ``repr``."""
        plain = (bool, int, float, str, type(None))
        options = {k: v if isinstance(v, plain) else repr(v) for k, v in self.options.items()}
        return {"lr_scale": self.lr_scale, **options}

    def optimizer(self, model, lr, t, memory):
        self._steps = []
        if t == 0 or len(memory) == 0:
            self._optimizer = None
            return torch.optim.SGD(model.parameters(), lr=lr)
        from riemfip.optim import path_optimizer

        self._optimizer = path_optimizer(
            model.parameters(),
            model=model,
            anchor_inputs=memory.x,
            lr=lr * self.lr_scale,
            **self.options,
        )
        return self._optimizer

    def after_step(self, model, lr):
        if self._optimizer is not None:
            self._steps.append(self._optimizer.last_info[0])

    def end_task(self, model, task, t, heads):
        """Warn (:class:`DriftBudgetWarning`) when the task's drift went over its budget."""
        cert = self.drift_certificate()
        if cert.get("budget_exceeded"):
            warnings.warn(
                f"FIP, task {t}: the held-out anchor drift went over its budget "
                f"{cert['drift_budget']:g} (largest after a step {cert['max_step_drift']:.4g}, "
                f"{cert['steps_over_budget']} of {len(self._steps)} steps over, "
                f"{cert['holdout_divergence']:.4g} at the end)",
                DriftBudgetWarning,
                stacklevel=2,
            )

    def drift_certificate(self) -> dict:
        """Held-out drift at the end of the task and over its steps, against the budget.

        Returns
        -------
        dict
            ``holdout_divergence`` and ``holdout_agreement`` (the held-out drift at the
            current weights), ``max_step_drift`` (largest held-out divergence after a step;
            ``None`` before any step), ``drift_budget`` (``None`` without a budget),
            ``steps_over_budget`` and ``budget_exceeded`` (whether the divergence was over
            the budget after any step or is now; ``None`` without a budget). Empty while no
            FIP optimizer has run (task 0).
        """
        opt = self._optimizer
        if opt is None:
            return {}
        out = {f"holdout_{k}": v for k, v in _jsonable(opt.anchor_drift()).items()}
        budget = opt.guard.budget
        over = sum(s.within_budget is False for s in self._steps)
        final_over = budget is not None and out["holdout_divergence"] > budget
        return out | {
            "max_step_drift": max((s.drift.divergence for s in self._steps), default=None),
            "drift_budget": budget,
            "steps_over_budget": over,
            "budget_exceeded": None if budget is None else bool(over or final_over),
        }

    def diagnostics(self) -> dict:
        """The drift certificate (:meth:`drift_certificate`) and step statistics of the
        task's FIP run."""
        out = self.drift_certificate()
        if self._steps:
            n = len(self._steps)
            out |= {
                "steps": n,
                "shrunk_steps": sum(bool(s.shrunk) for s in self._steps),
                "mean_kept_fraction": sum(s.kept_fraction for s in self._steps) / n,
                "mean_protected_share": sum(s.protected_share for s in self._steps) / n,
            }
        return out


def _jsonable(obj) -> dict:
    """A dataclass (e.g. FIP's drift report) as a dict of plain numbers and strings."""
    out = {}
    for k, v in asdict(obj).items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        out[k] = v
    return out
