r"""The geodesic acceleration as a pure tensor function, for transforms (``jacfwd``, ``vmap``).

:meth:`manifolds.PullbackMetric.acceleration` is the production route (CG for
networks, residual checks, warnings). Its CG loop converts residuals to Python
floats, so it cannot be differentiated or batched by :mod:`torch.func`. For small
:math:`n` this module gives the same quantity,

.. math::

    a(w, v) = -\Gamma_w(v, v) = -g^{-1} J^\top D^2F[v, v],
    \qquad g = J^\top J + \lambda I,

with dense linear algebra only, so that a batch of flows (the dense shooting
Jacobian, :mod:`riemfip.geodesic.shooting`) and the collocation right-hand side
and its Jacobian over a whole mesh (:mod:`riemfip.geodesic.collocation`) each come
from one :func:`torch.func.vmap` call.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vmap

__all__ = ["functional_acceleration"]


def functional_acceleration(metric, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`-g^{-1}J^\top D^2F[v, v]` by dense algebra; differentiable and ``vmap``-able.

    :math:`J` and :math:`D^2F[v, v]` come from one batched forward-over-forward JVP
    in the :math:`n + 1` directions :math:`(e_1, \dots, e_n, v)`. The solve is in
    weight space (:math:`n \times n`) when :math:`n \le m` or :math:`\lambda = 0`
    (least squares, so a singular :math:`g` gives the minimum-norm answer), else in
    output space, :math:`-J^\top (JJ^\top + \lambda I)^{-1} h`.
    """
    n = w.numel()

    def inner(x):
        return jvp(metric.embed, (x,), (v,))

    def outer(u):
        return jvp(inner, (w,), (u,))[1]

    dirs = torch.cat([torch.eye(n, dtype=w.dtype, device=w.device), v.unsqueeze(0)])
    ju, huv = vmap(outer)(dirs)
    jac, h = ju[:n].T, huv[n]
    m = jac.shape[0]
    lam = metric.damping
    # LAPACK must not see NaN/Inf (lstsq aborts with an internal error on them, which
    # would end a shooting solve whose trial flow blew up). Solve with finite stand-ins
    # and let the non-finite values through to the answer instead, where the flow's
    # own check reports them; no data-dependent branch, so this stays vmap-able.
    poison = 0.0 * (jac.sum() + h.sum())
    jac, h = torch.nan_to_num(jac, 0.0, 0.0, 0.0), torch.nan_to_num(h, 0.0, 0.0, 0.0)
    if n <= m or lam == 0.0:
        g = jac.T @ jac
        if lam:
            g = g + lam * torch.eye(n, dtype=w.dtype, device=w.device)
        return poison - torch.linalg.lstsq(g, (jac.T @ h).unsqueeze(-1)).solution.squeeze(-1)
    k = jac @ jac.T + lam * torch.eye(m, dtype=w.dtype, device=w.device)
    return poison - jac.T @ torch.linalg.solve(k, h)
