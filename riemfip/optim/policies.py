"""Small policy objects that group a path optimizer's options by what they decide.

:class:`AnchorSampling`
    Which anchors each step protects: all fit anchors or a rotating batch, each point or
    a random neighbourhood of it, and which share is held out to measure drift.
:class:`PullBack`
    How strongly each step pulls the anchor outputs back toward the frozen ones.
:class:`DriftGuard`
    What the held-out drift may do (grow by at most a factor per step, stay within a
    budget): the rules every step is certified against.
:class:`Exact`
    How often FIP rebuilds the exact anchor metric of its direction.

Each validates its fields when made, so a bad option fails where it is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .anchor_transforms import ScaledNoise

__all__ = ["AnchorSampling", "DriftGuard", "Exact", "PullBack", "check_number"]


def check_number(name, value, *, low=None, high=None, low_open=False, allow_none=False):
    """``value`` as a finite float within the bounds, or a ``TypeError``/``ValueError`` naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got bool")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    ok = math.isfinite(v)
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and v <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"{name} must be a finite number {lo} {hi}".rstrip() + f", got {value}")
    return v


@dataclass(frozen=True)
class AnchorSampling:
    """Which anchors each step protects.

    Attributes
    ----------
    batch : int or None
        Fit anchors per step (default 32; ``None``: all). The fit anchors are visited in
        rotating random order, ``batch`` at a time, so each step solves a system of
        ``batch`` :math:`\\times C` outputs instead of the whole anchor's, and every anchor
        is visited once per pass; the pull-back on all anchors (:class:`PullBack`) catches
        what a batch misses. A stochastic constraint costs a fraction of the full one and,
        on the benchmarks, keeps the old task better (``benchmarks/README.md``).
    transform : callable or None
        ``(x, generator) -> x'`` of the same shape (see
        :mod:`riemfip.optim.anchor_transforms`): each step protects a fresh transform
        of its anchors, scored by the frozen network, i.e. a neighbourhood of each
        anchor rather than the point. Default :class:`~riemfip.optim.ScaledNoise` (0.33 of
        the inputs' own spread; it leaves integer inputs such as token ids alone);
        ``None`` protects the points only. Drift is always measured on the untransformed
        held-out anchors.
    outputs : int or None
        Output directions per anchor per step (default 2; ``None``: all :math:`C`). With
        :math:`r < C`, each step constrains :math:`r` random combinations of each anchor's
        embedded outputs (:class:`~manifolds.output_metrics.Sketched`, an unbiased estimate
        of the metric), so the Jacobian takes :math:`r` instead of :math:`C` backward passes
        and the output-space system has ``batch`` :math:`\\times r` rows. Fresh directions
        each step cover every output over a few steps. A step constrains less, so more of
        the gradient is left to learn with; with FIP's default growth rule
        (:class:`DriftGuard`) two learned the new task faster than all :math:`C` on the
        benchmarks, at half the cost (``benchmarks/README.md``).
    holdout_fraction : float
        Share of the anchor inputs held out to measure drift (when no ``holdout_inputs``
        are given); 0 measures it on the fit anchors.
    seed : int
        Seed of the generator of the anchor order and the transform (saved in the
        optimizer's ``state_dict``).
    """

    batch: int | None = 32
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = field(
        default_factory=lambda: ScaledNoise(0.33)
    )
    outputs: int | None = 2
    holdout_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if self.batch is not None:
            object.__setattr__(self, "batch", int(check_number("batch", self.batch, low=1)))
        if self.outputs is not None:
            object.__setattr__(self, "outputs", int(check_number("outputs", self.outputs, low=1)))
        if self.transform is not None and not callable(self.transform):
            raise TypeError(f"transform must be callable, got {type(self.transform).__name__}")
        fraction = check_number("holdout_fraction", self.holdout_fraction, low=0, high=1)
        if fraction >= 1:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")
        object.__setattr__(self, "holdout_fraction", fraction)
        object.__setattr__(self, "seed", int(self.seed))


@dataclass(frozen=True)
class PullBack:
    r"""How each step pulls the anchor outputs back toward the frozen ones.

    Attributes
    ----------
    strength : float
        :math:`\gamma \in [0, 1]`, the share of the damped Gauss–Newton step toward the
        frozen outputs of the step's anchors, :math:`-\gamma\, g^{-1} J^\top (F(w) - F(w_0))`,
        taken each step (0: none).
    all_anchors : bool
        With an anchor ``batch``: after a step also pull the outputs on *all* fit
        anchors back, by a Gauss–Newton Cauchy step (steepest descent on
        :math:`\tfrac12\|F(w) - F(w_0)\|^2` with exact line search in the linear model:
        one forward and backward pass and one forward-mode pass over the fit anchors),
        scaled by :math:`\gamma`. No effect without a batch.
    every : int
        Take that all-anchor pull-back every this many steps (default 10; it costs about
        three passes over all fit anchors).
    """

    strength: float = 1.0
    all_anchors: bool = True
    every: int = 10

    def __post_init__(self):
        object.__setattr__(self, "strength", check_number("strength", self.strength, low=0, high=1))
        object.__setattr__(self, "all_anchors", bool(self.all_anchors))
        object.__setattr__(self, "every", int(check_number("every", self.every, low=1)))

    def all_anchors_due(self, step: int, batch: int | None) -> bool:
        """Whether step ``step`` (counted from 1) takes the all-anchor pull-back: only with
        an anchor ``batch`` (without one every step already sees every fit anchor), a
        nonzero ``strength``, every ``every`` steps."""
        return (
            self.all_anchors and batch is not None and self.strength > 0 and step % self.every == 0
        )

    def correction(self, gauss_newton: torch.Tensor, cap: float) -> torch.Tensor:
        r"""The pull-back :math:`-\gamma p` of a Gauss–Newton step :math:`p` toward the frozen
        outputs, its length capped at ``cap`` (a trust region: the path optimizer passes
        :math:`\eta\max(\|\nabla L\|, \|J^\top r\|)`; no cap when it is 0)."""
        step = -self.strength * gauss_newton
        norm = float(step.norm())
        return step * (cap / norm) if norm > cap > 0 else step


@dataclass(frozen=True)
class DriftGuard:
    """What the held-out drift may do: the rules each step is certified against.

    After every candidate step the mean divergence :math:`D_t = \\frac1{N'}\\sum_b D(f(w_t; x'_b), y^0_b)`
    on the held-out anchors is measured (the output metric's divergence:
    :math:`\\tfrac12\\|\\Delta y\\|^2`, KL, or Bhattacharyya). Two rules may shrink the
    secondary step (the pull-back is always taken):

    * **growth** (a line search on the drift): a candidate step with
      :math:`D_t > \\rho\\,D_{t-1} + \\phi\\,S` is halved, up to ``max_backtracks`` times,
      and the last halving is taken. :math:`S = \\tfrac1{2N}\\sum_b\\|e(y^0_b) - \\bar e\\|^2` is
      the spread of the embedded frozen outputs on the fit anchors, so :math:`\\phi` is
      relative to how far apart the anchors' own outputs lie. Drift that grows a little each
      step (learning the new task) passes; a jump, a step too long for the first-order
      constraint or the new loss's own overshoot, is cut back. The rule chooses steps by
      the held-out drift, so that drift is no longer an untouched estimate of the drift
      elsewhere (a budget uses it the same way); data the optimizer never sees is;
    * **budget**: a step whose drift exceeds ``budget`` is halved up to ``max_backtracks``
      times; if it still exceeds it, only the pull-back toward the frozen outputs is taken
      (when that lowers the drift), else the weights stay put, and the step's info says the
      budget was exceeded.

    Attributes
    ----------
    budget : float, optional
        Largest held-out drift a step may leave (``None``: no limit; drift is still
        measured and reported).
    max_backtracks : int
        Halvings of a step that breaks a rule before it is refused (budget) or taken
        (growth).
    growth : float or None
        :math:`\\rho \\ge 1`, the factor by which one step may multiply the held-out drift
        (``None``: no growth rule; :class:`~riemfip.optim.FIP`'s default guard uses 1.5).
    floor : float
        :math:`\\phi`, the drift any step may reach regardless, relative to the spread
        :math:`S` of the anchor outputs: what the first step may reach, from no drift.
    """

    budget: float | None = None
    max_backtracks: int = 5
    growth: float | None = None
    floor: float = 5e-5

    def __post_init__(self):
        object.__setattr__(
            self,
            "budget",
            check_number("budget", self.budget, low=0, low_open=True, allow_none=True),
        )
        object.__setattr__(
            self, "max_backtracks", int(check_number("max_backtracks", self.max_backtracks, low=0))
        )
        object.__setattr__(
            self, "growth", check_number("growth", self.growth, low=1, allow_none=True)
        )
        object.__setattr__(self, "floor", check_number("floor", self.floor, low=0))


@dataclass(frozen=True)
class Exact:
    r"""FIP's exact anchor metric, rebuilt every ``refresh`` steps (``curvature=Exact(...)``).

    A refresh step draws its anchors (:class:`AnchorSampling`) and factors the output Gram
    :math:`JJ^\top + \lambda I` of their Jacobian at the step's weights, as every FIP step
    does by default. The next ``refresh - 1`` steps keep those anchors, that Jacobian and
    its Cholesky factor, and re-measure only the residual :math:`F(w) - F(w_0)` on the
    anchors (one forward pass), so the direction and the pull-back use a metric up to
    ``refresh - 1`` steps old while the drift guard still measures every step. Such a step
    skips drawing and scoring anchors, the Jacobian's backward passes and the Gram.

    Attributes
    ----------
    refresh : int
        Steps between rebuilds (default 1: every step, FIP's default). On the two-task
        benchmarks 2 cost less per step and kept a little less of the old task, and
        diverged at a larger ``lr``; 5 went stale and diverged (``benchmarks/README.md``).
    """

    refresh: int = 1

    def __post_init__(self):
        object.__setattr__(self, "refresh", int(check_number("refresh", self.refresh, low=1)))

    def due(self, state: dict) -> bool:
        """Whether this step (``state["step"]``, already counted) rebuilds the metric."""
        built = state["exact"]["step"] if "exact" in state else None
        return rebuild_due(self.refresh, built, state.get("step", 0))


def rebuild_due(refresh: int, built_at: int | None, step: int) -> bool:
    """Whether step ``step`` rebuilds a curvature built at step ``built_at`` (``None``: never)
    and kept for ``refresh`` steps; the one rule of :class:`Exact` and
    :class:`~riemfip.optim.Kronecker`."""
    return built_at is None or step - built_at >= refresh
