r"""The Kronecker-factored metric held in the eigenbasis of its factors (KFAC, or EKFAC
eigenvalues), built from a factored Jacobian with each factor eigendecomposed at once.

:class:`~manifolds.kronecker_metric.KroneckerMetric` holds each layer's factors
:math:`A_l, G_l` and eigendecomposes them on the first solve, at :math:`e^3` for a factor of
side :math:`e`. :func:`eigenbasis_metric` gives the same metric (or, with ``corrected``, its
EKFAC variant) with every block in its eigenbasis, from the smaller of each factor's two Gram
matrices.

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

import torch

from .affine_factors import AffineFactor
from .curvature_blocks import ExactBlock, KroneckerBlock
from .kronecker_metric import KroneckerMetric
from .layer_jacobian import FactoredJacobian
from .normalization_factors import NormalizationFactor

__all__ = ["EigenExactBlock", "EigenKroneckerBlock", "eigenbasis_metric"]


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
            "the anchors' layer inputs or output gradients are not finite (the weights diverged)"
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


def eigenbasis_metric(jacobian: FactoredJacobian, corrected: bool = False) -> KroneckerMetric:
    r""":class:`~manifolds.kronecker_metric.KroneckerMetric` of a factored Jacobian, with thin
    factors where they are cheaper (the same :math:`\hat g`), or with ``corrected`` the
    EKFAC eigenvalues (:func:`_corrected_eigenvalues`); every factor is eigendecomposed
    here, at the refresh, not on the first solve."""
    blocks = [_block(f, corrected) for f in jacobian.factors]
    like = jacobian.embedded
    return KroneckerMetric(blocks, jacobian.numel, like.dtype, like.device)
