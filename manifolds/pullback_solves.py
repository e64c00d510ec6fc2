r"""How a :class:`~manifolds.pullback.PullbackMetric` inverts :math:`g`: the choice of route,
the dense, output-space and conjugate-gradient solves, and the geodesic acceleration.

Every route returns a :class:`~manifolds.conjugate_gradient.SolveResult`. The direct routes
(``"dense"``, ``"output"``) measure their residual :math:`\|b - g x\| / \|b\|` with one
:meth:`~manifolds.pullback.PullbackMetric.matvec` and are held to the direct tolerance of
:func:`~manifolds.conjugate_gradient.solve_tolerance`; ``"cg"`` reports its own. A result
that misses its tolerance is reported by the metric's ``on_failure``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .conjugate_gradient import (
    SolveResult,
    conjugate_gradient,
    report_failure,
    solve_tolerance,
    status_of,
)

if TYPE_CHECKING:
    from .pullback import PullbackMetric

__all__ = ["METHODS", "acceleration", "choose_method", "solve"]

#: The solve routes a :class:`~manifolds.pullback.PullbackMetric` takes as ``solver``/``method``.
METHODS = ("auto", "dense", "output", "cg")


def choose_method(metric: PullbackMetric, w: torch.Tensor, method: str | None) -> str:
    """The route for a solve at the checked point ``w``: ``method`` (default the metric's
    ``solver``), with ``"auto"`` resolved by the sizes :math:`n` and :math:`m` against the
    metric's ``dense_max`` and ``output_max``; always ``"cg"`` with a process group, where
    ``"dense"`` and ``"output"`` raise ``ValueError``."""
    method = metric.solver if method is None else method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if metric.data_parallel is not None:
        if method in ("dense", "output"):
            metric._single_process(f"the {method!r} solve")
        return "cg"
    if method != "auto":
        return method
    if w.numel() <= metric.dense_max:
        return "dense"
    if metric.output_dim(w) <= metric.output_max:
        return "output"
    return "cg"


def solve(metric: PullbackMetric, w, b, x0, method, tol, maxiter) -> SolveResult:
    r""":math:`g(w)^{-1} b` for a checked point, right-hand side and warm start, by the route
    :func:`choose_method` picks; reported by the metric's ``on_failure``."""
    method = choose_method(metric, w, method)
    with torch.no_grad():
        if method == "cg":
            res = conjugate_gradient(
                lambda v: metric._matvec(w, v),
                b,
                x0=x0,
                tol=solve_tolerance(b.dtype, metric.tol if tol is None else tol),
                maxiter=metric.maxiter if maxiter is None else maxiter,
            )
        elif method == "dense":
            res = _direct_result(metric, _dense_solve(metric.dense(w), b), w, b, tol, method)
        else:
            x = metric.gram_of(metric.jacobian_operator(w)).weight_solve(b)
            res = _direct_result(metric, x, w, b, tol, method)
    report_failure(res, metric.on_failure)
    return res


def acceleration(
    metric: PullbackMetric, w, v, method=None, tol=None, maxiter=None, x0=None
) -> SolveResult:
    r"""Geodesic acceleration :math:`-g^{-1} J^\top D^2F[v, v]` at a checked point and
    velocity, by the route :func:`choose_method` picks (see
    :meth:`~manifolds.pullback.PullbackMetric.acceleration`); its residual is that of the
    solve against :math:`-J^\top D^2F[v, v]`."""
    method = choose_method(metric, w, method)
    with torch.no_grad():
        h = metric._second_derivative(w, v)
        # the output route needs J itself; the others only -J^T h (one reverse pass)
        jac = metric.jacobian_operator(w) if method == "output" else metric.autograd_jacobian(w)
        rhs = -jac.vjp(h.unsqueeze(0))[0]  # the acceleration is g^{-1} of it
        if metric.data_parallel is not None:  # -sum_r J_r^T h_r
            rhs = metric.data_parallel.all_reduce_sum(rhs)
        if method == "cg":
            return solve(metric, w, rhs, x0, method, tol, maxiter)
        if method == "dense":
            a = metric.dense_acceleration(w, v)
        else:  # -J^T (K + l I)^{-1} h: no weight-space solve at all
            a = -metric.gram_of(jac).least_squares_step(h)
        res = _direct_result(metric, a, w, rhs, tol, method)
    report_failure(res, metric.on_failure)
    return res


def _residual(metric: PullbackMetric, w, x, b) -> float:
    r""":math:`\|b - g(w) x\| / \|b\|` (0 for :math:`b = 0`)."""
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0:
        return 0.0
    return float(torch.linalg.vector_norm(b - metric._matvec(w, x))) / bnorm


def _direct_result(metric: PullbackMetric, x, w, b, tol, method) -> SolveResult:
    """A direct solve's answer with its measured residual, held to the direct tolerance."""
    tol = solve_tolerance(b.dtype, metric.tol if tol is None else tol, direct=True)
    r = _residual(metric, w, x, b)
    return SolveResult(x, r, 0, status_of(r, tol), method, tol)


def _dense_solve(g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:math:`g^{-1} b` by Cholesky; the pseudo-inverse when :math:`g` is singular."""
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
    return torch.linalg.pinv(g, hermitian=True) @ b
