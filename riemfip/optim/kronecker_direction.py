r"""FIP's direction under a Kronecker-factored anchor metric, refreshed every few steps.

The exact FIP step (:mod:`riemfip.optim.fip`) factors the output Gram
:math:`JJ^\top + \lambda I` of the step's anchors at every step. This route replaces the
anchor metric :math:`J^\top J` by its block-diagonal Kronecker-factored approximation
(:class:`~manifolds.kronecker_metric.KroneckerMetric`; KFAC / KFC),

.. math::

    \hat g = \operatorname{diag}_l (A_l \otimes G_l) \approx J^\top J, \qquad
    d = \lambda(\hat g + \lambda I)^{-1}\nabla L,

with :math:`A_l` the second moment of layer :math:`l`'s (augmented) inputs on the anchors and
:math:`G_l` that of the output gradients :math:`\partial F/\partial z_l`. The factors are
built from the exact factored Jacobian of one step's anchors (:class:`AnchorSampling`: a
rotating batch of fit anchors and its random neighbourhood) and kept for
:attr:`Kronecker.refresh` steps; in between a step costs one solve per layer, two small
matrix products per side, and no pass over the anchors but the drift measurement and the
pull-back below. :math:`\lambda` is FIP's (``damping`` times the mean eigenvalue of the
exact metric's nonzero part at the starting weights).

Where KFAC is exact (one affine layer under the Euclidean output metric:
:math:`\partial F_{bc}/\partial z_b = N^{-1/2} e_c` does not depend on the sample)
:math:`\hat g = J^\top J` and :math:`d` is FIP's exact natural direction. Elsewhere
:math:`\hat g` has rank up to :math:`\operatorname{rank}A_l\cdot\operatorname{rank}G_l` per
layer instead of :math:`NC`: it protects the span of the anchors' layer inputs times that of
their output gradients (as GPM protects the span of the layer inputs), a larger subspace
than the exact metric's.

Eigenvalues: with ``Kronecker(corrected=True)`` each layer's block keeps the Kronecker
eigenbasis :math:`U_{G_l} \otimes U_{A_l}` but takes as eigenvalues the exact curvature of
each basis direction, :math:`\|J_l (u^G_i u^{A\top}_j)\|^2` (EKFAC, George et al. 2018),
instead of the products :math:`s^G_i s^A_j` of KFAC's means.

Pull-back toward the frozen outputs :math:`F(w_0)`, with :math:`r = F(w) - F(w_0)` on the
step's anchors:

* on refresh steps, and every :attr:`Kronecker.pull_every` steps in between, the
  Kronecker Gauss–Newton step :math:`p = (\hat g + \lambda I)^{-1}J^\top r`, line-searched
  (:math:`\alpha = \min(1, r^\top Jp/\|Jp\|^2)`, exact on the linear model; 1 where
  :math:`\hat g` is exact) and capped as FIP caps its own at
  :math:`\eta\max(\|\nabla L\|, \|J^\top r\|)`, times :math:`\gamma`. :math:`J^\top r` and
  :math:`Jp` are free on a refresh step (the factored Jacobian holds them), else one forward
  and backward pass and one forward-mode pass over the step's anchors. Without the line
  search the full step overshot by orders of magnitude along the directions that
  :math:`\hat g` underestimates, and every two-task benchmark diverged within ten steps;
* every ``PullBack.every`` steps, FIP's Gauss–Newton Cauchy step on *all* fit anchors
  (with an anchor batch, as in the exact route: :meth:`PullBack.all_anchors_due`).

The drift measurement and :class:`DriftGuard` are FIP's. Steps that neither refresh nor
pull back draw no anchors at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.profiler import record_function

from manifolds.jacobian import JacobianOperator
from manifolds.kronecker_eigenbasis import eigenbasis_metric
from manifolds.kronecker_metric import KroneckerMetric
from manifolds.layer_jacobian import FactoredJacobian

from .policies import check_number, rebuild_due

__all__ = ["Kronecker", "anchors_needed", "kronecker_step"]


@dataclass(frozen=True)
class Kronecker:
    """FIP's curvature route: the Kronecker-factored anchor metric (see the module notes).

    Attributes
    ----------
    refresh : int
        Steps between rebuilds of the factors (default 10; 1: every step). The factors of a
        refresh come from that step's anchors (``anchors``: batch, neighbourhood, sketched
        outputs) at that step's weights.
    pull_every : int or None
        Pull the step's anchor outputs back by the line-searched Kronecker Gauss–Newton step
        every this many steps after a refresh (default 1: every step; each costs one forward,
        one backward and one forward-mode pass over the step's anchors), besides on refresh
        steps (where it is free); ``None``: on refresh steps only.
    corrected : bool
        Eigenvalues of each layer's block: KFAC's products :math:`s^G_i s^A_j` (default), or
        the exact curvature of each direction of the Kronecker eigenbasis (EKFAC). EKFAC's
        are smaller where KFAC's products overestimate, so more of the gradient passes there:
        on the two-task benchmarks it kept less and diverged on 5 of 10 CNN runs at ``lr``
        0.4 (``benchmarks/README.md``).
    """

    refresh: int = 10
    pull_every: int | None = 1
    corrected: bool = False

    def __post_init__(self):
        object.__setattr__(self, "refresh", int(check_number("refresh", self.refresh, low=1)))
        if self.pull_every is not None:
            every = int(check_number("pull_every", self.pull_every, low=1))
            object.__setattr__(self, "pull_every", every)
        object.__setattr__(self, "corrected", bool(self.corrected))


def refresh_due(policy: Kronecker, state: dict) -> bool:
    """Whether this step (``state["step"]``, already counted) rebuilds the factors."""
    built = state["kronecker_step"] if "kronecker" in state else None
    return rebuild_due(policy.refresh, built, state.get("step", 0))


def anchors_needed(policy: Kronecker, state: dict, pullback) -> bool:
    """Whether this step reads its anchors (a refresh, or the per-step pull-back); the other
    steps skip drawing them (and scoring their neighbourhood by the frozen network)."""
    if refresh_due(policy, state):
        return True
    every, since = policy.pull_every, state["step"] - state["kronecker_step"]
    return every is not None and since % every == 0 and pullback.strength > 0


def _line_searched(p: torch.Tensor, residual: torch.Tensor, jac: JacobianOperator) -> torch.Tensor:
    r""":math:`\alpha p` for the Kronecker Gauss–Newton step :math:`p = (\hat g + \lambda I)^{-1}
    J^\top r`, :math:`\alpha = \min(1, r^\top Jp / \|Jp\|^2)` (at least 0): the exact line
    search on :math:`\tfrac12\|r - \alpha Jp\|^2`, capped at the full step. With the
    exact metric (:math:`\hat g = J^\top J`) :math:`\alpha = 1`, since
    :math:`r^\top Jp = r^\top K(K + \lambda)^{-1} r \ge \|Jp\|^2`; with an approximate one
    the full step can overshoot by orders of magnitude along directions :math:`\hat g`
    underestimates (one forward-mode pass over the step's anchors, free on a refresh)."""
    jp = jac.jvp(p[None])[0]
    denom = float(jp.pow(2).sum())
    alpha = min(1.0, max(0.0, float(torch.dot(residual, jp)) / denom)) if denom > 0 else 0.0
    return alpha * p


def kronecker_step(opt, gi, param_group, state, w, grad, x, y0):
    """``(secondary, correction, diagnostics)`` of a FIP step by the Kronecker route
    (:meth:`FIP._direction` with ``curvature=Kronecker(...)``); ``x`` is ``None`` on a step
    that needs no anchors (:func:`anchors_needed`)."""
    policy: Kronecker = opt.curvature
    lr, lam = param_group["lr"], state["damping"]
    pulled = residual = jac = None
    if x is not None:
        seen = opt.step_output_metric(x, y0)
        metric = opt.step_metric(gi, x, lam, seen)
        if refresh_due(policy, state):
            with record_function("riemfip.step_jacobian"):
                jac = metric.jacobian_operator(w)  # factored where the layers allow it
            if not isinstance(jac, FactoredJacobian):
                raise ValueError(
                    "curvature=Kronecker needs a network with a factored Jacobian (nn.Linear, "
                    "nn.Conv2d and normalisation layers; see manifolds.layer_jacobian)"
                )
            state["kronecker"] = eigenbasis_metric(jac, policy.corrected)
            state["kronecker_step"] = state["step"]
        elif opt.pullback.strength > 0:
            jac = metric.autograd_jacobian(w)  # J^T r by one forward and one backward pass
        if jac is not None:
            residual = jac.embedded - seen.embed_samples(y0)
            pulled = jac.vjp(residual[None])[0]
    kfac: KroneckerMetric = state["kronecker"]
    rhs = grad[None] if pulled is None else torch.stack([grad, pulled])
    solved = kfac.solve(rhs, lam)
    direction = lam * solved[0]
    secondary = -lr * direction
    grad_norm = float(grad.norm())
    correction = torch.zeros_like(w)
    if pulled is not None and opt.pullback.strength > 0:
        cap = lr * max(grad_norm, float(pulled.norm()))
        correction = opt.pullback.correction(_line_searched(solved[1], residual, jac), cap)
    correction = opt._with_all_anchor_pullback(gi, state, w, secondary, correction)
    return (
        secondary,
        correction,
        {
            "kept_fraction": float(direction.norm()) / grad_norm if grad_norm > 0 else 0.0,
            "fit_residual": float("nan") if residual is None else float(residual.norm()),
        },
    )
