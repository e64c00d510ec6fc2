r"""The geodesic acceleration by dense algebra, as a pure tensor function of the point and velocity.

For the pullback metric :math:`g = J^\top J + \lambda I` of an embedding :math:`F`,

.. math::

    \ddot w = -\Gamma_w(v, v) = -g^{-1} J^\top D^2F[v, v]

(see :mod:`manifolds.pullback`). :func:`dense_acceleration` computes it with no input checks
and no Python-side branching on values, so :mod:`torch.func` can differentiate and batch it:
shooting's batch of flows (``vmap``) and collocation's Jacobian of the right-hand side
(``jacfwd``) use it. It builds :math:`J` (:math:`m \times n`), so it is for small :math:`n`;
:meth:`~manifolds.PullbackMetric.acceleration` is the route for networks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jvp, vmap

__all__ = ["dense_acceleration"]


def dense_acceleration(
    embed: Callable[[torch.Tensor], torch.Tensor], damping: float, w: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    r""":math:`-g^{-1}J^\top D^2F[v, v]` for :math:`g = J^\top J + \lambda I`, :math:`J = \partial F/\partial w`.

    :math:`J` and :math:`D^2F[v, v]` come from one batched forward-over-forward JVP in the
    :math:`n + 1` directions :math:`(e_1, \dots, e_n, v)`. The solve is in weight space
    (:math:`n \times n`) when :math:`n \le m` or :math:`\lambda = 0` (least squares, so a
    singular :math:`g` gives the minimum-norm answer), else in output space,
    :math:`-J^\top (JJ^\top + \lambda I)^{-1} h`.

    Parameters
    ----------
    embed : callable
        ``w -> F(w)``, flat.
    damping : float
        :math:`\lambda \ge 0`.
    w, v : torch.Tensor
        Point and velocity, flat.
    """
    n = w.numel()

    def inner(x):
        return jvp(embed, (x,), (v,))

    def outer(u):
        return jvp(inner, (w,), (u,))[1]

    dirs = torch.cat([torch.eye(n, dtype=w.dtype, device=w.device), v.unsqueeze(0)])
    ju, huv = vmap(outer)(dirs)
    jac, h = ju[:n].T, huv[n]
    m = jac.shape[0]
    # LAPACK must not see NaN/Inf (lstsq aborts with an internal error on them, which
    # would end a shooting solve whose trial flow blew up). Solve with finite stand-ins
    # and let the non-finite values through to the answer instead, where the flow's
    # own check reports them; no data-dependent branch, so this stays vmap-able.
    poison = 0.0 * (jac.sum() + h.sum())
    jac, h = torch.nan_to_num(jac, 0.0, 0.0, 0.0), torch.nan_to_num(h, 0.0, 0.0, 0.0)
    if n <= m or damping == 0.0:
        g = jac.T @ jac
        if damping:
            g = g + damping * torch.eye(n, dtype=w.dtype, device=w.device)
        return poison - torch.linalg.lstsq(g, (jac.T @ h).unsqueeze(-1)).solution.squeeze(-1)
    k = jac @ jac.T + damping * torch.eye(m, dtype=w.dtype, device=w.device)
    return poison - jac.T @ torch.linalg.solve(k, h)
