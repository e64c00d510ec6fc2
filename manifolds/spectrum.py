r"""The top of a metric's spectrum: the low-rank subspaces that weights can move around.

For the pullback metric :math:`g = J^\top J + \lambda I` the top eigenvectors span the
directions in which the outputs on the task data move most per unit of weight change;
the Nature Machine Intelligence paper's claim is that networks can move in the complement
of such a low-rank subspace without forgetting. :class:`Spectrum` holds the top :math:`k`
eigenpairs and measures how much of a direction lies in their span.

:func:`lanczos` finds them matrix-free for large problems, by
:func:`scipy.sparse.linalg.eigsh` (implicitly restarted Lanczos) on a
:class:`~scipy.sparse.linalg.LinearOperator` that calls the metric-vector product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

__all__ = ["Spectrum", "lanczos"]


@dataclass
class Spectrum:
    r"""The top :math:`k` eigenpairs of a metric :math:`g`.

    Attributes
    ----------
    eigenvalues : torch.Tensor
        Shape ``(k,)``, descending (of :math:`g`, damping included).
    eigenvectors : torch.Tensor
        Shape ``(n, k)``, orthonormal columns :math:`U`.
    damping : float
        :math:`\lambda`, the eigenvalue of :math:`g` on the complement of the span of :math:`U`
        when :math:`g = J^\top J + \lambda I` and :math:`k \ge \operatorname{rank} J`.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    damping: float = 0.0

    @property
    def rank(self) -> int:
        """:math:`k`."""
        return int(self.eigenvalues.numel())

    def fraction(self, v: torch.Tensor) -> float:
        r""":math:`\|U^\top v\|^2 / \|v\|^2`, the share of the direction ``v`` (Euclidean) that
        lies in the span of the top-:math:`k` eigenvectors (0 for ``v = 0``)."""
        vv = float(v.pow(2).sum())
        if vv == 0.0:
            return 0.0
        return float((self.eigenvectors.T @ v).pow(2).sum()) / vv

    def project(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`UU^\top v`, the part of ``v`` in the top-:math:`k` subspace."""
        return self.eigenvectors @ (self.eigenvectors.T @ v)


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    k: int,
    *,
    tol: float = 0.0,
    damping: float = 0.0,
    v0: torch.Tensor | None = None,
) -> Spectrum:
    r"""Top ``k`` eigenpairs of the symmetric operator ``matvec`` on vectors shaped like ``like``.

    Runs :func:`scipy.sparse.linalg.eigsh` (``which="LA"``) in float64 on the CPU, each
    iteration one ``matvec`` in ``like``'s dtype and device; ``tol`` is eigsh's relative
    accuracy of the eigenvalues (0: machine precision). ``v0`` is the start vector (length
    :math:`n`; default ARPACK's own random one, which differs from call to call): a fixed one
    makes the iterations reproducible, e.g. the same on every rank of a process group.

    Raises
    ------
    ValueError
        ``k`` not in ``[1, n - 1]`` (Lanczos needs ``k < n``; use a dense eigendecomposition
        for the whole spectrum).
    """
    n = like.numel()
    k = int(k)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for Lanczos on n = {n}, got {k}")

    def apply(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=like.dtype, device=like.device)
        return matvec(v).detach().double().cpu().numpy()

    op = LinearOperator((n, n), matvec=apply, dtype=np.float64)
    start = None if v0 is None else v0.detach().reshape(-1).double().cpu().numpy()
    evals, evecs = eigsh(op, k=k, which="LA", tol=tol, v0=start)
    order = np.argsort(evals)[::-1]
    values = torch.as_tensor(evals[order].copy(), dtype=like.dtype, device=like.device)
    vectors = torch.as_tensor(evecs[:, order].copy(), dtype=like.dtype, device=like.device)
    return Spectrum(values, vectors, float(damping))
