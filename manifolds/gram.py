r"""The output-space Gram matrix :math:`K = JJ^\top` at one point, its factorizations, and the
weight-space operations they give.

With :math:`g = J^\top J + \lambda I` (:math:`J` of shape :math:`m \times n`), everything a solve
with :math:`g` needs happens in the :math:`m`-dimensional output space when :math:`m \ll n`
(Woodbury):

.. math::

    g^{-1} b = \lambda^{-1}\bigl(b - J^\top (K + \lambda I)^{-1} J b\bigr), \qquad
    g^{-1} J^\top r = J^\top (K + \lambda I)^{-1} r,

the second being the Levenberg–Marquardt (damped Gauss–Newton) step for an output residual
:math:`r`, and also the geodesic acceleration's solve. Undamped (:math:`\lambda = 0`, :math:`g`
singular when :math:`n > m`) they become the minimum-norm answers
:math:`g^+ b = J^\top K^{+2} J b` and :math:`J^\top K^{+} r`.

The top eigenpairs of :math:`g` come from those of :math:`K = V\Sigma V^\top`: :math:`g` has
eigenvalues :math:`\sigma_i + \lambda` with eigenvectors :math:`J^\top v_i/\sqrt{\sigma_i}`, and
:math:`\lambda` on the orthogonal complement.

:math:`K + \lambda I` is factored by Cholesky (damped solves) or by a symmetric
eigendecomposition (pseudo-inverses and spectra), each once per point, when first needed.
"""

from __future__ import annotations

import torch

from .jacobian import JacobianOperator
from .spectrum import Spectrum

__all__ = ["OutputGram"]


class OutputGram:
    r""":math:`K = JJ^\top` at one point, with :math:`\lambda`, factored on first use.

    Parameters
    ----------
    jacobian : JacobianOperator
        :math:`J` at the point.
    damping : float
        :math:`\lambda \ge 0`.
    solve_dtype : torch.dtype, optional
        Factor :math:`K + \lambda I` in this dtype (e.g. float64 for float32 weights; see
        :mod:`manifolds.precision`); answers come back in :math:`J`'s dtype. Default: that dtype.

    Notes
    -----
    Vectors may be single (1-D) or stacked as rows (2-D) throughout.
    """

    def __init__(
        self, jacobian: JacobianOperator, damping: float, solve_dtype: torch.dtype | None = None
    ):
        self.jacobian = jacobian
        self.damping = float(damping)
        self.solve_dtype = solve_dtype
        self._matrix: torch.Tensor | None = None
        self._cholesky: torch.Tensor | None = None
        self._eigh: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def matrix(self) -> torch.Tensor:
        """:math:`K`, ``(m, m)``."""
        if self._matrix is None:
            self._matrix = self.jacobian.gram()
        return self._matrix

    @property
    def size(self) -> int:
        """:math:`m`."""
        return self.jacobian.embedded.numel()

    def trace(self) -> float:
        r""":math:`\operatorname{tr} K = \|J\|_F^2`: :math:`m` times the mean nonzero-part
        eigenvalue of :math:`J^\top J`, the scale a relative damping refers to."""
        return float(self.matrix.diagonal().sum())

    def eigenpairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues of :math:`K` in descending order (clamped at 0) and eigenvectors (columns)."""
        if self._eigh is None:
            k = self.matrix
            evals, evecs = torch.linalg.eigh(
                k if self.solve_dtype is None else k.to(self.solve_dtype)
            )
            self._eigh = evals.flip(0).clamp_min(0).to(k.dtype), evecs.flip(1).to(k.dtype)
        return self._eigh

    def _damped_inverse(self, power: int) -> torch.Tensor:
        r""":math:`(\sigma_i + \lambda)^{-p}`, with a pseudo-inverse cut-off when undamped."""
        evals = self.eigenpairs()[0]
        shifted = evals + self.damping
        cut = shifted.max().clamp_min(torch.finfo(evals.dtype).tiny) * (
            evals.numel() * torch.finfo(evals.dtype).eps
        )
        inv = torch.where(shifted > cut, shifted.reciprocal(), torch.zeros_like(shifted))
        return inv**power

    def _spectral(self, r: torch.Tensor, power: int) -> torch.Tensor:
        evecs = self.eigenpairs()[1]
        return ((r @ evecs) * self._damped_inverse(power)) @ evecs.T

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        r""":math:`(K + \lambda I)^{-1} r` (Cholesky), or :math:`K^+ r` when :math:`\lambda = 0`."""
        if self.damping > 0 and self._cholesky is None and self._eigh is None:
            k = self.matrix if self.solve_dtype is None else self.matrix.to(self.solve_dtype)
            shifted = k + self.damping * torch.eye(self.size, dtype=k.dtype, device=k.device)
            chol, info = torch.linalg.cholesky_ex(shifted)
            if int(info) == 0:
                self._cholesky = chol
        if self._cholesky is not None:
            rows = r.reshape(-1, self.size).T.to(self._cholesky.dtype)
            return torch.cholesky_solve(rows, self._cholesky).T.reshape(r.shape).to(r.dtype)
        return self._spectral(r, 1)

    def least_squares_step(self, r: torch.Tensor) -> torch.Tensor:
        r""":math:`g^{-1} J^\top r = J^\top (K + \lambda I)^{-1} r`, the damped Gauss–Newton step
        that moves the outputs by :math:`-r` to first order (minimum-norm when undamped)."""
        return self._pull(self.solve(r))

    def weight_solve(self, b: torch.Tensor) -> torch.Tensor:
        r""":math:`g^{-1} b` by Woodbury; :math:`g^+ b = J^\top K^{+2} J b` when :math:`\lambda = 0`."""
        jb = self._push(b)
        if self.damping > 0:
            return (b - self._pull(self.solve(jb))) / self.damping
        return self._pull(self._spectral(jb, 2))

    def damped_projection(self, b: torch.Tensor) -> torch.Tensor:
        r""":math:`\lambda g^{-1} b = b - J^\top (K + \lambda I)^{-1} J b` (:math:`\lambda > 0`): the
        part of :math:`b` that leaves the outputs alone passes unchanged, the part along an
        eigendirection of :math:`J^\top J` with eigenvalue :math:`\sigma` is scaled by
        :math:`\lambda / (\sigma + \lambda)`."""
        if not self.damping > 0:
            raise ValueError("the damped projection needs damping > 0")
        return b - self._pull(self.solve(self._push(b)))

    def spectrum(self, k: int | None = None) -> Spectrum:
        r"""The top ``k`` eigenpairs of :math:`g` from those of :math:`K` (those with
        :math:`\sigma_i > 0`; at most :math:`\operatorname{rank} K`)."""
        evals, evecs = self.eigenpairs()
        tiny = evals[0].clamp_min(torch.finfo(evals.dtype).tiny) * (
            evals.numel() * torch.finfo(evals.dtype).eps
        )
        rank = int((evals > tiny).sum())
        k = rank if k is None else min(int(k), rank)
        vectors = self._pull(evecs[:, :k].T) / evals[:k].sqrt()[:, None]
        return Spectrum(evals[:k] + self.damping, vectors.T, self.damping)

    def _push(self, v: torch.Tensor) -> torch.Tensor:
        return self.jacobian.jvp(v.reshape(-1, v.shape[-1])).reshape(*v.shape[:-1], self.size)

    def _pull(self, u: torch.Tensor) -> torch.Tensor:
        out = self.jacobian.vjp(u.reshape(-1, self.size))
        return out.reshape(*u.shape[:-1], out.shape[-1])
