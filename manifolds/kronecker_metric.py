r"""A Kronecker-factored approximation of the anchor metric :math:`J^\top J` (KFAC / KFC).

Scale convention
----------------
The same as :class:`~manifolds.pullback.PullbackMetric` without its damping:
:math:`J = \partial F/\partial w` for the embedded outputs
:math:`F = N^{-1/2}(\phi(f(w; x_b)))_b` (:meth:`~manifolds.pullback.PullbackMetric.embed`), so
the exact metric is :math:`J^\top J = \frac1N \sum_b J_b^\top G(y_b) J_b`, and where KFAC is
exact (below) :class:`KroneckerMetric` equals it, not a multiple of it.

Approximation
-------------
Block-diagonal over layers. For a Linear or Conv2d layer :math:`l` with augmented patches
:math:`\tilde a_{bt} = (a_{bt}, 1)` (the 1 for the bias; only the parts the flat vector
holds) at positions :math:`t = 1..T` (:math:`T = 1` for a Linear layer on ``(N, d)``
inputs) and output gradients :math:`\delta_{bct} = \partial F_{bc} / \partial z_{bt}`,

.. math::

    g_l \approx A_l \otimes G_l, \qquad
    A_l = \frac1N \sum_{b,t} \tilde a_{bt} \tilde a_{bt}^\top, \qquad
    G_l = \frac1T \sum_{b,c,t} \delta_{bct} \delta_{bct}^\top

(Martens & Grosse 2015 for :math:`T = 1`; Grosse & Martens 2016, KFC, for convolutions:
:math:`A_l` is their :math:`\Omega`, a sum over positions, :math:`G_l` their :math:`\Gamma`,
a mean). :math:`\delta` carries :math:`F`'s :math:`N^{-1/2}` and the output metric
(:math:`\sum_c \delta_{bc}\delta_{bc}^\top = D_b^\top G(y_b) D_b` with :math:`D_b` the
derivative of the outputs by :math:`z_b`). The approximation is exact when the
:math:`\delta_{b\cdot}` do not depend on the sample :math:`b` (the last Linear layer under the
Euclidean output metric) or when there is one sample and one position. A grouped convolution
gets one Kronecker block per channel group (the blocks between groups are dropped).
Normalisation layers' parameters get their *exact* block :math:`R^\top R` (a few channels,
see :mod:`manifolds.normalization_factors`).

Only the product :math:`A_l \otimes G_l` enters :meth:`KroneckerMetric.matvec` and
:meth:`KroneckerMetric.solve`: splitting a factor :math:`T` differently between :math:`A`
and :math:`G` (curvlinops puts :math:`1/T` on :math:`A`) changes nothing here.

Cost
----
Built from one :class:`~manifolds.layer_jacobian.FactoredJacobian` (one forward pass and
one batched backward pass over the :math:`C` outputs). :math:`A_l` costs
:math:`NT e^2` and :math:`G_l` :math:`NCT d^2` (:math:`e = d_\text{in} k^2 + 1`,
:math:`d = d_\text{out}`); the first :meth:`~KroneckerMetric.solve` eigendecomposes each
:math:`A_l` (:math:`e \times e`) and :math:`G_l` (:math:`d \times d`); each product or solve
then costs two small matrix products per side per layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .layer_jacobian import FactoredJacobian, module_jacobian

if TYPE_CHECKING:
    from .pullback import PullbackMetric

__all__ = ["KroneckerMetric"]


class KroneckerMetric:
    r"""Block-diagonal Kronecker-factored :math:`\hat g \approx J^\top J` on flat weights
    (see the module docstring for the factors and the scale).

    Parameters
    ----------
    blocks : list
        Per-layer blocks (:class:`~manifolds.curvature_blocks.KroneckerBlock`,
        :class:`~manifolds.curvature_blocks.ExactBlock`) covering every flat coordinate once.
    dim : int
        :math:`n`, the length of the flat weights.
    dtype, device : optional
        Those of the factors; vectors must match them.

    Examples
    --------
    Natural-gradient direction and its filter with damping set from the mean eigenvalue:

    >>> from torch import nn
    >>> from manifolds import PullbackMetric
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> metric = PullbackMetric.from_module(net, torch.randn(16, 4, dtype=torch.float64))
    >>> w = metric.module.flatten()
    >>> kfac = KroneckerMetric.from_pullback(metric, w)
    >>> lam = 0.1 * kfac.trace() / kfac.dim
    >>> grad = torch.randn(kfac.dim, dtype=torch.float64)
    >>> step = kfac.solve(grad, lam)           # (A (x) G + lam I)^-1 grad
    >>> filtered = kfac.project(grad, lam)     # lam (A (x) G + lam I)^-1 grad
    >>> torch.allclose(kfac.matvec(step) + lam * step, grad)
    True
    """

    def __init__(self, blocks: list, dim: int, dtype=None, device=None):
        self.blocks, self.dim = blocks, int(dim)
        self.dtype, self.device = dtype, device

    @classmethod
    def from_jacobian(cls, jacobian: FactoredJacobian) -> KroneckerMetric:
        """The approximation from the factors of an exact factored Jacobian."""
        blocks = [factor.curvature_block() for factor in jacobian.factors]
        like = jacobian.embedded
        return cls(blocks, jacobian.numel, like.dtype, like.device)

    @classmethod
    def from_pullback(cls, metric: PullbackMetric, w: torch.Tensor) -> KroneckerMetric:
        """The approximation of a :meth:`~manifolds.pullback.PullbackMetric.from_module`
        metric's :math:`J^\\top J` at flat weights ``w`` (its damping is not included).

        Raises
        ------
        ValueError
            A metric not built from a module, or a network without a factored Jacobian
            (see :mod:`manifolds.layer_jacobian`).
        """
        if metric.module is None:
            raise ValueError("KroneckerMetric.from_pullback needs a PullbackMetric.from_module")
        w = metric.check_point(w)
        jacobian = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
        if jacobian is None:
            raise ValueError(
                f"{type(metric.module.module).__name__} has no factored Jacobian: every "
                "parameter must belong to an nn.Linear, nn.Conv2d or normalisation layer "
                "applied once per batch, in eval mode (see manifolds.layer_jacobian)"
            )
        return cls.from_jacobian(jacobian)

    def _rows(self, name: str, v: object) -> torch.Tensor:
        """``v`` as ``(k, n)`` rows, checked."""
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {type(v).__name__}")
        if v.ndim not in (1, 2) or v.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must have shape ({self.dim},) or (k, {self.dim}), got {tuple(v.shape)}"
            )
        if self.dtype is not None and (v.dtype, v.device) != (self.dtype, self.device):
            raise ValueError(
                f"{name} is {v.dtype} on {v.device}, the metric {self.dtype} on {self.device}"
            )
        return v.reshape(-1, self.dim)

    @staticmethod
    def _damping(damping: float) -> float:
        damping = float(damping)
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"damping must be a finite number > 0, got {damping}")
        return damping

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`\hat g v` for flat ``v`` ``(n,)`` or ``(k, n)`` (same shape back)."""
        rows = self._rows("v", v)
        out = torch.zeros_like(rows)
        for block in self.blocks:
            block.matvec(rows, out)
        return out.reshape(v.shape)

    def solve(self, b: torch.Tensor, damping: float) -> torch.Tensor:
        r""":math:`(\hat g + \lambda I)^{-1} b`, block by block through the eigendecompositions
        of the factors (never forming a Kronecker product); ``damping`` :math:`\lambda > 0`."""
        rows, damping = self._rows("b", b), self._damping(damping)
        out = torch.zeros_like(rows)
        for block in self.blocks:
            block.solve(rows, damping, out)
        return out.reshape(b.shape)

    def project(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        r""":math:`\lambda(\hat g + \lambda I)^{-1} v`: a natural-gradient filter that keeps the
        directions of small curvature (eigenvalues :math:`s \ll \lambda`, factor
        :math:`\approx 1`) and damps those of large curvature (factor
        :math:`\lambda / (s + \lambda)`)."""
        return self._damping(damping) * self.solve(v, damping)

    def trace(self) -> float:
        r""":math:`\operatorname{tr}\hat g = \sum_l \operatorname{tr}A_l\,\operatorname{tr}G_l`
        (plus the exact blocks' traces); ``trace() / dim`` is the mean eigenvalue."""
        return sum(block.trace() for block in self.blocks)
