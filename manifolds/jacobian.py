r"""The Jacobian of the embedded outputs as an operator: :math:`Jv`, :math:`J^\top u`, :math:`JJ^\top`.

For flat weights :math:`w \in \mathbb{R}^n` and embedded outputs :math:`F(w) \in \mathbb{R}^m`
(:meth:`~manifolds.output_metrics.OutputMetric.embed_samples`), :math:`J = \partial F/\partial w`
at one point. Every output-space computation of the pullback metric
:math:`g = J^\top J + \lambda I` is written with three operations on :math:`J`,

* ``jvp(V)``: :math:`V J^\top`, the rows :math:`J v_i` for tangents ``V`` of shape ``(k, n)``;
* ``vjp(U)``: :math:`U J`, the rows :math:`J^\top u_i` for output vectors ``U`` of shape ``(k, m)``;
* ``gram()``: :math:`K = JJ^\top`, shape ``(m, m)`` (the empirical neural tangent kernel),

and never with :math:`J` itself. Two routes provide them:

:class:`AutogradJacobian`
    Any differentiable map, by :mod:`torch.func` (``jvp``/``vjp`` under ``vmap``); :math:`K` from
    :math:`m` reverse- and :math:`m` forward-mode products, a block of columns at a time. A
    single row goes without ``vmap``, whose batching rules pay for products one row does not
    need: its ``vjp`` is one backward pass, its ``jvp`` one dual-number forward pass
    (:func:`~manifolds.forward_ad.jacobian_vector_product`).
:mod:`manifolds.layer_jacobian`
    Networks whose moved weights all belong to supported layers: :math:`J` held exactly as
    layer inputs and output gradients, so the three operations are small matrix products.

:func:`jacobian_at` picks the factored route where it applies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jvp, vjp, vmap

from .forward_ad import jacobian_vector_product

__all__ = ["AutogradJacobian", "JacobianOperator", "jacobian_at"]


class JacobianOperator:
    """Interface of :math:`J = \\partial F/\\partial w` at one point.

    Attributes
    ----------
    embedded : torch.Tensor
        :math:`F(w)`, flat, length :math:`m`.
    """

    embedded: torch.Tensor

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`J v` for each row of ``v`` (shape ``(k, n)``); returns ``(k, m)``."""
        raise NotImplementedError

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """:math:`J^\\top u` for each row of ``u`` (shape ``(k, m)``); returns ``(k, n)``."""
        raise NotImplementedError

    def gram(self) -> torch.Tensor:
        """:math:`K = JJ^\\top`, symmetric, shape ``(m, m)``."""
        raise NotImplementedError

    def trace(self) -> float:
        """:math:`\\operatorname{tr} K = \\|J\\|_F^2`."""
        return float(self.gram().diagonal().sum())


class AutogradJacobian(JacobianOperator):
    """:math:`J` of any map ``embed: w -> F(w)`` at ``w``, by :mod:`torch.func`.

    One forward pass at construction records :math:`F(w)` and the reverse-mode graph that
    every ``vjp`` reuses; each ``jvp`` is a fresh forward-mode pass.

    Parameters
    ----------
    embed : callable
        ``w -> F(w)``, flat output.
    w : torch.Tensor
        The point, flat.
    chunk : int
        Rows batched in one ``vmap`` call (bounds memory).
    dual : bool
        Whether a single ``jvp`` row may take the dual-number pass of
        :mod:`torch.autograd.forward_ad` (default); ``False`` where ``embed`` runs under
        :func:`torch.autocast`, whose casts that pass does not apply to both operands of a
        product (:class:`~manifolds.MixedPrecision`).
    """

    def __init__(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        w: torch.Tensor,
        chunk=64,
        dual: bool = True,
    ):
        self._embed = embed
        self._w = w.detach()
        self._chunk = int(chunk)
        self._dual = bool(dual)
        self.embedded, self._pull = vjp(embed, self._w)

    def _rows(self, fn, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, 0)
        return torch.cat([vmap(fn)(x[i : i + self._chunk]) for i in range(0, len(x), self._chunk)])

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] == 1 and self._dual:
            return jacobian_vector_product(self._embed, self._w, v[0])[None]
        return self._rows(lambda t: jvp(self._embed, (self._w,), (t,))[1], v)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        if u.shape[0] == 1:
            return self._pull(u[0])[0][None]
        return self._rows(lambda r: self._pull(r)[0], u)

    def gram(self) -> torch.Tensor:
        m = self.embedded.numel()
        eye = torch.eye(m, dtype=self.embedded.dtype, device=self.embedded.device)
        blocks = [
            self.jvp(self.vjp(eye[start : start + self._chunk]))
            for start in range(0, m, self._chunk)
        ]
        gram = torch.cat(blocks, dim=0)
        return 0.5 * (gram + gram.T)


def jacobian_at(
    embed: Callable[[torch.Tensor], torch.Tensor],
    w: torch.Tensor,
    factored: Callable[[torch.Tensor], JacobianOperator | None] | None = None,
    dual: bool = True,
) -> JacobianOperator:
    """:math:`J` at ``w``: ``factored(w)`` when given and it applies (not ``None``), else
    :class:`AutogradJacobian` of ``embed`` (with ``dual``)."""
    if factored is not None:
        jac = factored(w)
        if jac is not None:
            return jac
    return AutogradJacobian(embed, w, dual=dual)
