r"""Mixed precision for a pullback metric: which dtype each kind of arithmetic runs in.

A metric's work is of two kinds:

*products*
    passes through the network: the forward pass, forward-mode :math:`Jv` and reverse-mode
    :math:`J^\top u` (every :meth:`~manifolds.PullbackMetric.matvec`, the factored Jacobian's
    layer inputs and output gradients). These are most of the arithmetic and tolerate low
    precision: run under :func:`torch.autocast` they take bfloat16 (or float16) matrix
    products with float32 accumulation on hardware that has them.
*solves and accumulations*
    the output-space Gram matrix :math:`K = JJ^\top` assembled from the factors, its
    Cholesky or eigendecomposition, and the solves with it. Their error grows with the
    condition number :math:`(\sigma_{\max} + \lambda)/\lambda`, so they run in the weights'
    dtype or higher (float64 here), whatever the products ran in.

Outputs of the products are cast back to the weights' dtype before the output metric's
embedding (softmax, square roots) and everything after it, so every vector a metric returns
has the weights' dtype.

Where it is safe. A product in bfloat16 carries a relative rounding error of about
:math:`u = 2^{-8}`, so :math:`g v` is off by about :math:`u\,\|g\|\|v\|`. Uses that only need
products to that accuracy are safe: FIP-style damped projections, path energies and their
gradients, spectra to a few digits. A *certified* solve is not: the relative residual
:math:`\|b - g x\| / \|b\|` that any solve can show with such products has a floor of about
:math:`u\,\kappa(g)`, so the default solve tolerance of a metric with low-precision products
is :attr:`MixedPrecision.tolerance` (:math:`16u`), which certifies little when :math:`g` is
ill-conditioned. For certified solves (shooting, geodesic accelerations to
:math:`10^{-8}`) keep ``products=None``; ``solves=torch.float64`` alone is always safe.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["MixedPrecision"]

_PRODUCTS = (torch.bfloat16, torch.float16)
_SOLVES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class MixedPrecision:
    """The dtypes a metric's products and solves run in (see the module notes).

    Attributes
    ----------
    products : torch.dtype or None
        Network passes under :func:`torch.autocast` in this dtype (``torch.bfloat16`` or
        ``torch.float16``); ``None``: the weights' own dtype (float32 or float64), no autocast.
    solves : torch.dtype or None
        Output-space Gram matrices are factored and solved in this dtype (``torch.float64``
        by default; ``torch.float32``), the answers cast back to the weights' dtype; ``None``:
        the weights' dtype.
    """

    products: torch.dtype | None = torch.bfloat16
    solves: torch.dtype | None = torch.float64

    def __post_init__(self):
        if self.products is not None and self.products not in _PRODUCTS:
            raise ValueError(f"products must be one of {_PRODUCTS} or None, got {self.products}")
        if self.solves is not None and self.solves not in _SOLVES:
            raise ValueError(f"solves must be one of {_SOLVES} or None, got {self.solves}")

    @property
    def tolerance(self) -> float | None:
        """Default solve tolerance with these products: 16 units of roundoff of ``products``
        (``None`` without autocast: the usual tolerance rule of
        :mod:`manifolds.conjugate_gradient`)."""
        if self.products is None:
            return None
        return 16 * torch.finfo(self.products).eps

    def autocast(self, device: torch.device):
        """The context the network passes run in on ``device``."""
        if self.products is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.products)

    def check_weights(self, dtype: torch.dtype) -> None:
        """Solves and accumulations need float32 or float64 weights (``TypeError`` otherwise)."""
        if dtype not in _SOLVES:
            raise TypeError(
                f"weights of dtype {dtype}: mixed precision keeps solves and accumulations "
                "in the weights' dtype or higher, which must be float32 or float64 (keep "
                "float32 weights and set products=torch.bfloat16 instead)"
            )
