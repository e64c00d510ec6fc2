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
* every ``PullBack.every`` steps, FIP's Gauss–Newton Cauchy step on *all* fit anchors.

The drift measurement and :class:`DriftGuard` are FIP's. Steps that neither refresh nor
pull back draw no anchors at all.

Solves by thin factors
----------------------
Each factor is eigendecomposed through the smaller of its two Gram matrices, and only its
nonzero eigenpairs are kept. A wide input factor (a 512-channel 3x3 convolution has
:math:`A_l` of side 4609) seen through :math:`NT < e` patches :math:`P` (:math:`NT \times e`):
:math:`A = P^\top P/N` and :math:`PP^\top/N = V\operatorname{diag}(s)V^\top` give
:math:`A = U\operatorname{diag}(s)U^\top`, :math:`U = P^\top V \operatorname{diag}(Ns)^{-1/2}`;
likewise :math:`G_l` from fewer output-gradient rows than its side, and a normalisation
layer's exact block :math:`R^\top R` from :math:`RR^\top`. Off :math:`U_G \otimes U_A` the
block vanishes and its damped inverse is :math:`1/\lambda`:

.. math::

    (\hat g_l + \lambda I)^{-1}: V \mapsto \frac{V}{\lambda} + U_G\Big[R \circ
    \Big(\frac{1}{S + \lambda} - \frac1\lambda\Big)\Big]U_A^\top,
    \qquad R = U_G^\top V U_A,

with :math:`S = s^G s^{A\top}` (or the EKFAC eigenvalues). The same metric, at
:math:`\min(NT, e)^3` instead of :math:`e^3` per refresh; factors wider than 512 are
eigendecomposed in their own dtype (float64 where single precision fails to converge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from manifolds.affine_factors import AffineFactor
from manifolds.curvature_blocks import ExactBlock, KroneckerBlock
from manifolds.kronecker_metric import KroneckerMetric
from manifolds.layer_jacobian import FactoredJacobian, module_jacobian
from manifolds.normalization_factors import NormalizationFactor

from .policies import check_number

__all__ = ["Kronecker", "anchors_needed", "kronecker_metric", "kronecker_step"]


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


#: Factors up to this side are eigendecomposed in float64 (cheap); larger ones in their own
#: dtype, falling back to float64 where single-precision LAPACK fails to converge.
WIDE = 512


def _symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric positive semi-definite matrix, in its dtype (``float64`` for
    sides up to :data:`WIDE`, or when LAPACK fails in single precision); values clamped at 0."""
    sym = 0.5 * (matrix + matrix.T)
    if len(sym) > WIDE:
        try:
            values, vectors = torch.linalg.eigh(sym)
            return values.clamp_min(0), vectors
        except torch.linalg.LinAlgError:
            pass
    values, vectors = torch.linalg.eigh(sym.to(torch.float64))
    return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)


def _pairs(rows: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Nonzero eigenpairs ``(s, U)`` of :math:`M = \text{scale}\,R^\top R`, from the smaller
    of :math:`M` and the Gram matrix :math:`\text{scale}\,RR^\top = V\operatorname{diag}(s)V^\top`
    (then :math:`U = R^\top V\operatorname{diag}(s/\text{scale})^{-1/2}`). Eigenvalues below
    the rows' rounding are dropped: noise, whose vectors :math:`1/\sqrt{s}` would amplify
    (:math:`M` vanishes there up to rounding)."""
    if not bool(torch.isfinite(rows).all()):
        raise FloatingPointError(
            "the anchors' layer inputs or output gradients are not finite (the weights "
            "diverged): lower lr"
        )
    thin = rows.shape[0] < rows.shape[1]
    s, v = _symmetric_eigh(scale * (rows @ rows.T if thin else rows.T @ rows))
    keep = s > s.max().clamp_min(0) * 100 * torch.finfo(rows.dtype).eps
    s, v = s[keep], v[:, keep]
    return s, (rows.T @ v) / (s / scale).sqrt() if thin else v


class EigenKroneckerBlock(KroneckerBlock):
    r"""A layer's block held in the Kronecker eigenbasis of its factors: :math:`U_A` ``(cols, r)``
    and :math:`U_G` ``(d_out, q)`` with orthonormal columns (the nonzero eigenvectors of
    :math:`A` and :math:`G`) and eigenvalues :math:`S` ``(q, r)``, the block being
    :math:`\sum_{ij} S_{ij}\,(u^G_i u^{A\top}_j)(u^G_i u^{A\top}_j)^\top` on
    :math:`[W \mid b]`: :math:`S = s^G s^{A\top}` for KFAC, or the exact second moments of the
    per-sample Jacobian rows in that basis (EKFAC). It vanishes off :math:`U_G \otimes U_A`,
    where the damped inverse is :math:`1/\lambda`:

    .. math::

        (\hat g + \lambda I)^{-1}: V \mapsto \frac{V}{\lambda} + U_G\Big[R \circ
        \Big(\frac{1}{S + \lambda} - \frac1\lambda\Big)\Big]U_A^\top,
        \qquad R = U_G^\top V U_A.
    """

    def __init__(self, slots, u_a: torch.Tensor, u_g: torch.Tensor, eigenvalues: torch.Tensor):
        super().__init__(slots, None, None)
        self.u_a, self.u_g, self.eigenvalues = u_a, u_g, eigenvalues

    def matvec(self, v: torch.Tensor, out: torch.Tensor) -> None:
        inner = self.u_g.T @ (self.slots.matrix(v) @ self.u_a) * self.eigenvalues
        self.slots.add_to(self.u_g @ inner @ self.u_a.T, out)

    def solve(self, b: torch.Tensor, damping: float, out: torch.Tensor) -> None:
        mat = self.slots.matrix(b)
        rotated = self.u_g.T @ (mat @ self.u_a)  # (q, r): no (d, d) by (d, cols) product
        scale = 1.0 / (self.eigenvalues + damping) - 1.0 / damping
        self.slots.add_to(mat / damping + (self.u_g @ (rotated * scale)) @ self.u_a.T, out)

    def trace(self) -> float:
        return float(self.eigenvalues.sum())


class EigenExactBlock(ExactBlock):
    r"""A normalisation layer's exact block :math:`R^\top R` held by its nonzero eigenpairs
    (from :math:`RR^\top` when :math:`R` has fewer rows than columns)."""

    def __init__(self, slots, rows: torch.Tensor):
        super().__init__(slots, None)
        self.s, self.u = _pairs(rows, 1.0)

    def matvec(self, v: torch.Tensor, out: torch.Tensor) -> None:
        self.slots.add_to(((self.slots.gather(v) @ self.u) * self.s) @ self.u.T, out)

    def solve(self, b: torch.Tensor, damping: float, out: torch.Tensor) -> None:
        vec = self.slots.gather(b)
        rotated = (vec @ self.u) * (1.0 / (self.s + damping) - 1.0 / damping)
        self.slots.add_to(vec / damping + rotated @ self.u.T, out)

    def trace(self) -> float:
        return float(self.s.sum())


def _affine_block(factor: AffineFactor, corrected: bool) -> EigenKroneckerBlock:
    """The factor's KFC block (as :meth:`~manifolds.affine_factors.AffineFactor.curvature_block`)
    in the eigenbasis of its factors, each from the smaller of its two Gram matrices; with
    ``corrected``, the exact eigenvalues in that basis (:func:`_corrected_eigenvalues`)."""
    n, c, t, d = factor.deltas.shape
    e = factor.slots.cols
    deltas = factor.deltas.reshape(-1, d)
    patches = factor._inputs(0, n).reshape(-1, e)
    s_a, u_a = _pairs(patches, 1.0 / n)
    s_g, u_g = _pairs(deltas, 1.0 / t)
    if corrected:
        eigenvalues = _corrected_eigenvalues(factor, u_a, u_g)
    else:
        eigenvalues = s_g[:, None] * s_a[None, :]
    return EigenKroneckerBlock(factor.slots, u_a, u_g, eigenvalues)


def _corrected_eigenvalues(factor: AffineFactor, u_a: torch.Tensor, u_g: torch.Tensor):
    r""":math:`S_{ij} = \sum_{b,c}\big(u_i^{G\top} M_{bc}\, u^A_j\big)^2`,
    :math:`M_{bc} = \sum_t \delta_{bct}\tilde a_{bt}^\top` (sample :math:`b`'s Jacobian row
    :math:`c` as a matrix): the diagonal of the exact block :math:`J_l^\top J_l` in the
    Kronecker eigenbasis (EKFAC, George et al. 2018). Exact where KFAC is; elsewhere it
    keeps each basis direction's true curvature, which KFAC's product of means
    :math:`s^G_i s^A_j` underestimates when inputs and output gradients are large on the
    same samples. Cost :math:`NCT(q + r)\cdot` side plus :math:`NCTqr` for :math:`T > 1`."""
    n, c, t, d = factor.deltas.shape
    q, r = u_g.shape[1], u_a.shape[1]
    out = u_a.new_zeros(q, r)
    step = max(1, min(n, (1 << 22) // max(1, c * max(t, q) * r)))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        pa = factor._inputs(lo, hi) @ u_a  # (b, t, r)
        pd = factor.deltas[lo:hi] @ u_g  # (b, c, t, q)
        if t == 1:
            out += pd.pow(2).sum(1)[:, 0].T @ pa[:, 0].pow(2)
        else:
            out += torch.einsum("bctq,btr->bcqr", pd, pa).pow(2).sum((0, 1))
    return out


def _block(factor, corrected: bool):
    if isinstance(factor, AffineFactor):
        return _affine_block(factor, corrected)
    if isinstance(factor, NormalizationFactor):
        return EigenExactBlock(factor.slots, factor.rows)
    return factor.curvature_block()


def kronecker_metric(jacobian: FactoredJacobian, corrected: bool = False) -> KroneckerMetric:
    r""":class:`~manifolds.kronecker_metric.KroneckerMetric` of a factored Jacobian, with thin
    factors where they are cheaper (the same :math:`\hat g`), or with ``corrected`` the
    EKFAC eigenvalues (:func:`_corrected_eigenvalues`); every factor is eigendecomposed
    here, at the refresh, not on the first solve."""
    blocks = [_block(f, corrected) for f in jacobian.factors]
    like = jacobian.embedded
    return KroneckerMetric(blocks, jacobian.numel, like.dtype, like.device)


def refresh_due(policy: Kronecker, state: dict) -> bool:
    """Whether this step (``state["step"]``, already counted) rebuilds the factors."""
    return "kronecker" not in state or state["step"] - state["kronecker_step"] >= policy.refresh


def anchors_needed(policy: Kronecker, state: dict, pullback) -> bool:
    """Whether this step reads its anchors (a refresh, or the per-step pull-back); the other
    steps skip drawing them (and scoring their neighbourhood by the frozen network)."""
    if refresh_due(policy, state):
        return True
    every, since = policy.pull_every, state["step"] - state["kronecker_step"]
    return every is not None and since % every == 0 and pullback.strength > 0


def _line_searched(p: torch.Tensor, residual: torch.Tensor, jvp) -> torch.Tensor:
    r""":math:`\alpha p` for the Kronecker Gauss–Newton step :math:`p = (\hat g + \lambda I)^{-1}
    J^\top r`, :math:`\alpha = \min(1, r^\top Jp / \|Jp\|^2)` (at least 0): the exact line
    search on :math:`\tfrac12\|r - \alpha Jp\|^2`, capped at the full step. With the
    exact metric (:math:`\hat g = J^\top J`) :math:`\alpha = 1`, since
    :math:`r^\top Jp = r^\top K(K + \lambda)^{-1} r \ge \|Jp\|^2`; with an approximate one
    the full step can overshoot by orders of magnitude along directions :math:`\hat g`
    underestimates (one forward-mode pass over the step's anchors, free on a refresh)."""
    jp = jvp(p)
    denom = float(jp.pow(2).sum())
    alpha = min(1.0, max(0.0, float(torch.dot(residual, jp)) / denom)) if denom > 0 else 0.0
    return alpha * p


def kronecker_step(opt, gi, param_group, state, w, grad, x, y0):
    """``(secondary, correction, diagnostics)`` of a FIP step by the Kronecker route
    (:meth:`FIP._direction` with ``curvature=Kronecker(...)``); ``x`` is ``None`` on a step
    that needs no anchors (:func:`anchors_needed`)."""
    policy: Kronecker = opt.curvature
    lr, lam = param_group["lr"], state["damping"]
    pulled = residual = jvp = None
    if x is not None:
        seen = opt.step_output_metric(x, y0)
        metric = opt.step_metric(gi, x, lam, seen)
        target = seen.embed_samples(y0)
        if refresh_due(policy, state):
            jac = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
            if jac is None:
                raise ValueError(
                    "curvature=Kronecker needs a network with a factored Jacobian (nn.Linear, "
                    "nn.Conv2d and normalisation layers; see manifolds.layer_jacobian)"
                )
            state["kronecker"] = kronecker_metric(jac, policy.corrected)
            state["kronecker_step"] = state["step"]
            residual = jac.embedded - target
            pulled = jac.vjp(residual[None])[0]
            jvp = lambda v: jac.jvp(v[None])[0]  # noqa: E731
        elif opt.pullback.strength > 0:
            with torch.enable_grad():  # J^T r by one forward and one backward pass
                wp = w.detach().requires_grad_(True)
                embedded = metric.embed(wp)
                residual = embedded.detach() - target
                (pulled,) = torch.autograd.grad(embedded, wp, residual)
            jvp = lambda v: torch.func.jvp(metric.embed, (w,), (v,))[1]  # noqa: E731
    kfac: KroneckerMetric = state["kronecker"]
    rhs = grad[None] if pulled is None else torch.stack([grad, pulled])
    solved = kfac.solve(rhs, lam)
    direction = lam * solved[0]
    secondary = -lr * direction
    grad_norm = float(grad.norm())
    correction = torch.zeros_like(w)
    if pulled is not None and opt.pullback.strength > 0:
        correction = -opt.pullback.strength * _line_searched(solved[1], residual, jvp)
        cap = lr * max(grad_norm, float(pulled.norm()))
        cnorm = float(correction.norm())
        if cnorm > cap > 0:
            correction = correction * (cap / cnorm)
    pullback = opt.pullback
    if pullback.all_anchors and pullback.strength > 0 and state["step"] % pullback.every == 0:
        moved = w + secondary + correction
        correction = correction - pullback.strength * opt._cauchy_pullback(gi, moved)
    return (
        secondary,
        correction,
        {
            "kept_fraction": float(direction.norm()) / grad_norm if grad_norm > 0 else 0.0,
            "fit_residual": float("nan") if residual is None else float(residual.norm()),
        },
    )
