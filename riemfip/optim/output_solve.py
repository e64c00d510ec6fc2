r"""Solves with the anchor metric in output space, preconditioned by a stored spectrum.

On the anchor inputs, with embedded outputs :math:`F(w) \in \mathbb{R}^m`
(:math:`F_b = N^{-1/2}\phi(f(w; x_b))`, :math:`\phi` the output metric's embedding,
see :mod:`manifolds.output_metrics`) and :math:`J = \partial F / \partial w`, the
pullback metric is :math:`g = J^\top J + \lambda I`. Everything a FIP step needs
is a solve with the small :math:`m \times m` matrix :math:`JJ^\top + \lambda I`
(Woodbury):

.. math::

    \lambda\, g^{-1} \nabla = \nabla - J^\top (JJ^\top + \lambda I)^{-1} J \nabla ,
    \qquad
    J^\top (JJ^\top + \lambda I)^{-1} r \;\;\text{(Levenberg–Marquardt step for a residual } r).

The first is the natural gradient in units where the metric's null space has
unit length: the part of :math:`\nabla` that moves the anchor outputs is damped by
:math:`\lambda/(\sigma + \lambda)` (:math:`\sigma` the eigenvalues of :math:`JJ^\top`),
the rest passes unchanged, much as OGD/GPM project gradients off stored directions.

:math:`J` must be the Jacobian at the *current* weights: a metric factored once
and reused goes stale within a few steps (directions that left the anchor alone
at :math:`w_0` stop doing so), and the outputs then drift without bound. So each
step solves with the current :math:`J` by preconditioned conjugate gradients
(:func:`solve_output_system`), each iteration one forward-mode and one reverse-mode
product over the anchor batch, and the spectrum :math:`JJ^\top = V\Sigma V^\top`
factored once (:func:`anchor_spectrum`) serves as preconditioner: while
:math:`J` stays close to the :math:`J` it was factored at, a few iterations suffice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import jacrev, jvp, vjp, vmap

from manifolds.output_metrics import OutputMetric

__all__ = [
    "AnchorSpectrum",
    "OutputSolve",
    "anchor_spectrum",
    "embedded_outputs",
    "solve_output_system",
]


def embedded_outputs(metric: OutputMetric, y: torch.Tensor) -> torch.Tensor:
    r""":math:`F = N^{-1/2}(\phi(y_b))_b`, flat: outputs ``(N, C)`` as the metric sees them."""
    return metric.embed(y).reshape(-1) * (1.0 / math.sqrt(y.shape[0]))


@dataclass
class AnchorSpectrum:
    r"""Top eigenpairs of :math:`K = JJ^\top` at some weights, and the damping :math:`\lambda`.

    Attributes
    ----------
    eigenvectors : torch.Tensor
        :math:`V`, shape ``(m, k)``, orthonormal columns.
    eigenvalues : torch.Tensor
        :math:`\sigma`, shape ``(k,)``, descending, all :math:`\ge` ``rank_rtol`` :math:`\lambda`.
    damping : float
        :math:`\lambda` (absolute).
    trace : float
        :math:`\operatorname{tr} K`, over all eigenvalues, kept or not.
    """

    eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor
    damping: float
    trace: float

    @property
    def rank(self) -> int:
        """:math:`k`."""
        return int(self.eigenvalues.numel())

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        r""":math:`(V\Sigma V^\top + \lambda I)^{-1} r`, for ``r`` of shape ``(..., m)``."""
        v, lam = self.eigenvectors, self.damping
        coef = (r @ v) * ((self.eigenvalues + lam).reciprocal() - 1.0 / lam)
        return r / lam + coef @ v.T

    def state(self) -> dict:
        """Entries for an optimizer's state; scalars stay Python floats (exact round trip)."""
        return {
            "eigenvectors": self.eigenvectors,
            "eigenvalues": self.eigenvalues,
            "damping": self.damping,
            "trace": self.trace,
        }

    @classmethod
    def from_state(cls, state: dict) -> AnchorSpectrum:
        """Inverse of :meth:`state`."""
        return cls(
            state["eigenvectors"],
            state["eigenvalues"],
            float(state["damping"]),
            float(state["trace"]),
        )


def anchor_spectrum(
    outputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    metric: OutputMetric,
    w: torch.Tensor,
    x: torch.Tensor,
    *,
    damping: float,
    relative_damping: bool = True,
    rank_rtol: float = 1.0,
    max_rank: int | None = None,
    chunk_rows: int | None = None,
) -> AnchorSpectrum:
    r"""Eigendecomposition of :math:`K = JJ^\top` (:math:`m\times m`) at ``w``.

    :math:`K` is built a block of rows at a time without :math:`J` ever existing
    whole: rows :math:`J_i` from per-sample Jacobians (a few samples at a time),
    then :math:`J J_i^\top` by forward-mode products over the whole anchor batch.
    The eigendecomposition runs in float64.

    Parameters
    ----------
    outputs : callable
        ``(w, x) -> outputs`` of shape ``(N, C)``; must accept one sample ``x[i:i+1]``.
    metric : OutputMetric
        Output metric :math:`G = D\phi^\top D\phi`.
    w : torch.Tensor
        Flat weights, 1-D.
    x : torch.Tensor
        Anchor inputs, ``(N, ...)``.
    damping : float
        :math:`\lambda`; with ``relative_damping`` a multiple of the mean eigenvalue
        :math:`\operatorname{tr}(K)/m`, invariant to the scale of the outputs and to :math:`N`.
    rank_rtol : float
        Keep eigenpairs with :math:`\sigma_i \ge` ``rank_rtol`` :math:`\cdot\lambda`
        (the rest are within a factor ``1 + rank_rtol`` of :math:`\lambda` after damping).
    max_rank : int, optional
        Cap on :math:`k`.
    chunk_rows : int, optional
        Rows of :math:`J` held at once (default: about 32 MB worth).

    Raises
    ------
    ValueError
        :math:`K = 0` (the outputs do not depend on these weights) or ``damping`` 0.
    """
    w = w.detach()
    n_samples = x.shape[0]
    scale = 1.0 / math.sqrt(n_samples)

    def embed_all(v):
        return metric.embed(outputs(v, x)).reshape(-1) * scale

    def embed_one(v, xi):
        return metric.embed(outputs(v, xi.unsqueeze(0))).reshape(-1) * scale

    with torch.no_grad():
        width = embed_one(w, x[0]).numel()
        m = n_samples * width
        if chunk_rows is None:
            chunk_rows = max(width, (2**23) // max(1, w.numel()))
        per_chunk = max(1, chunk_rows // width)
        sample_jac = vmap(jacrev(embed_one), in_dims=(None, 0))
        blocks = []
        for start in range(0, n_samples, per_chunk):
            rows = sample_jac(w, x[start : start + per_chunk]).reshape(-1, w.numel())
            blocks.append(vmap(lambda r: jvp(embed_all, (w,), (r,))[1])(rows))
        gram = torch.cat(blocks, dim=0).double()
        evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.T))
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    trace = float(evals.sum())
    lam = float(damping) * (trace / m if relative_damping else 1.0)
    if not lam > 0:
        raise ValueError(
            "the anchor metric is zero (the outputs on the anchor do not depend on these "
            "weights) or damping is 0; FIP needs a positive damping"
        )
    k = int((evals >= rank_rtol * lam).sum())
    if max_rank is not None:
        k = min(k, int(max_rank))
    return AnchorSpectrum(evecs[:, :k].to(w.dtype), evals[:k].to(w.dtype), lam, trace)


@dataclass
class OutputSolve:
    r"""Solution of :math:`(JJ^\top + \lambda I) Z = B` for a few right-hand sides.

    Attributes
    ----------
    z : torch.Tensor
        Solutions, shape ``(c, m)``.
    pulled_back : torch.Tensor
        :math:`J^\top z_i`, shape ``(c, n)``.
    iterations : int
        CG iterations (each one batched JVP and VJP over the anchor).
    residual : float
        Largest relative residual over the right-hand sides.
    """

    z: torch.Tensor
    pulled_back: torch.Tensor
    iterations: int
    residual: float


def solve_output_system(
    embed: Callable[[torch.Tensor], torch.Tensor],
    w: torch.Tensor,
    rhs: torch.Tensor,
    spectrum: AnchorSpectrum,
    *,
    tol: float = 1e-3,
    maxiter: int = 50,
) -> OutputSolve:
    r"""Preconditioned CG for :math:`(J J^\top + \lambda I) z = b`, :math:`J` at ``w``.

    Parameters
    ----------
    embed : callable
        ``w -> F(w)``, the embedded anchor outputs, flat.
    w : torch.Tensor
        Current weights.
    rhs : torch.Tensor
        Right-hand sides, shape ``(c, m)``; solved independently, in one batch.
    spectrum : AnchorSpectrum
        Preconditioner (and :math:`\lambda`).
    tol, maxiter
        Relative residual at which each system stops; iteration cap.
    """
    w = w.detach()
    lam = spectrum.damping
    _, vjp_fn = vjp(embed, w)

    def pull(z):  # J^T z, batched over rows
        return vmap(lambda u: vjp_fn(u)[0])(z)

    def push(v):  # J v, batched over rows
        return vmap(lambda t: jvp(embed, (w,), (t,))[1])(v)

    bnorm = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    z = torch.zeros_like(rhs)
    jt_z = torch.zeros(rhs.shape[0], w.numel(), dtype=w.dtype, device=w.device)
    r = rhs.clone()
    y = spectrum.precondition(r)
    p = y.clone()
    jt_p = pull(p)
    ry = (r * y).sum(1)
    iterations = 0
    tiny = torch.finfo(rhs.dtype).tiny
    zero = torch.zeros_like(ry)
    done = r.norm(dim=1) <= tol * bnorm
    while iterations < maxiter and not bool(done.all()):
        iterations += 1
        ap = push(jt_p) + lam * p
        alpha = torch.where(done, zero, ry / (p * ap).sum(1).clamp_min(tiny))
        z = z + alpha[:, None] * p
        jt_z = jt_z + alpha[:, None] * jt_p
        r = r - alpha[:, None] * ap
        done = r.norm(dim=1) <= tol * bnorm
        if bool(done.all()):
            break
        y = spectrum.precondition(torch.where(done[:, None], 0.0, r))
        ry_new = (r * y).sum(1)
        beta = torch.where(done, zero, ry_new / ry.clamp_min(tiny))
        ry = ry_new
        p = y + beta[:, None] * p
        jt_p = pull(p)
    residual = float((r.norm(dim=1) / bnorm).max())
    return OutputSolve(z, jt_z, iterations, residual)
