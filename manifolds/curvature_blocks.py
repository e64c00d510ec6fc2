r"""One layer's block of an approximate anchor metric: a Kronecker product
(:class:`KroneckerBlock`, Linear and Conv2d layers) or a small exact block
(:class:`ExactBlock`, normalisation layers).

Each block acts on its layer's slots of flat vectors ``(k, n)`` and adds its result into an
output of the same shape, so that :class:`~manifolds.kronecker_metric.KroneckerMetric` is
the sum of its blocks (block-diagonal over layers). Both share three operations:
``matvec(v, out)`` (:math:`B v`), ``solve(b, damping, out)`` (:math:`(B + \lambda I)^{-1} b`
on the block's coordinates) and ``trace()``; the eigendecompositions that ``solve`` needs
are computed once, on its first call.
"""

from __future__ import annotations

import torch

from .parameter_slots import AffineSlots, VectorSlots

__all__ = ["ExactBlock", "KroneckerBlock"]


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: the matrix is a Gram matrix) and eigenvectors, computed in
    float64 whatever the factor's dtype: single-precision LAPACK fails to converge on the
    rank-deficient factors that few samples and dead ReLU features give (a 257-square input
    factor of 4 samples is enough), and the factors are small."""
    wide = matrix.to(torch.float64)
    values, vectors = torch.linalg.eigh(0.5 * (wide + wide.T))
    return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)


class KroneckerBlock:
    r"""A layer's metric block approximated as :math:`A \otimes G` (KFAC / KFC).

    For the augmented weight matrix :math:`V = [W \mid b]` (``(d_out, cols)``, see
    :class:`~manifolds.parameter_slots.AffineSlots`),

    .. math::

        V \mapsto G\, V A, \qquad
        (A \otimes G + \lambda I)^{-1} : V \mapsto
        U_G \Big[\frac{U_G^\top V U_A}{s^G s^{A\top} + \lambda}\Big] U_A^\top,

    with :math:`A = U_A \operatorname{diag}(s^A) U_A^\top` (``cols`` square, from the
    layer's inputs) and :math:`G = U_G \operatorname{diag}(s^G) U_G^\top` (``d_out`` square,
    from its output gradients); the division is elementwise. In the row-major flat order of
    :math:`W` the block is ``torch.kron(G, A)``, which is :math:`A \otimes G` of Martens &
    Grosse (2015) in their column-stacking order. Never forms the Kronecker product: a
    product costs two small matrix products per side.

    Parameters
    ----------
    slots : AffineSlots
        Where :math:`W` and :math:`b` sit in flat vectors.
    a, g : torch.Tensor
        The factors, ``(cols, cols)`` and ``(d_out, d_out)``, symmetric positive semi-definite.
    """

    def __init__(self, slots: AffineSlots, a: torch.Tensor, g: torch.Tensor):
        self.slots, self.a, self.g = slots, a, g
        self._spectra = None

    def matvec(self, v: torch.Tensor, out: torch.Tensor) -> None:
        self.slots.add_to(self.g @ self.slots.matrix(v) @ self.a, out)

    def solve(self, b: torch.Tensor, damping: float, out: torch.Tensor) -> None:
        if self._spectra is None:
            self._spectra = (_eigh(self.a), _eigh(self.g))
        (s_a, u_a), (s_g, u_g) = self._spectra
        rotated = u_g.T @ self.slots.matrix(b) @ u_a
        rotated = rotated / (s_g[:, None] * s_a[None, :] + damping)
        self.slots.add_to(u_g @ rotated @ u_a.T, out)

    def trace(self) -> float:
        return float(self.a.diagonal().sum() * self.g.diagonal().sum())


class ExactBlock:
    r"""A layer's exact metric block :math:`B = R^\top R` on a few per-channel parameters.

    :math:`R` holds the Jacobian rows of the layer's held parameters (``(m, size)``); for a
    normalisation layer ``size`` is at most twice its channels, so :math:`B` and its
    eigendecomposition are cheap.

    Parameters
    ----------
    slots : VectorSlots
        Where the parameters sit in flat vectors.
    block : torch.Tensor
        :math:`B`, ``(size, size)``.
    """

    def __init__(self, slots: VectorSlots, block: torch.Tensor):
        self.slots, self.block = slots, block
        self._spectrum = None

    def matvec(self, v: torch.Tensor, out: torch.Tensor) -> None:
        self.slots.add_to(self.slots.gather(v) @ self.block, out)

    def solve(self, b: torch.Tensor, damping: float, out: torch.Tensor) -> None:
        if self._spectrum is None:
            self._spectrum = _eigh(self.block)
        values, vectors = self._spectrum
        rotated = (self.slots.gather(b) @ vectors) / (values + damping)
        self.slots.add_to(rotated @ vectors.T, out)

    def trace(self) -> float:
        return float(self.block.diagonal().sum())
