r"""Conjugate gradients for symmetric positive (semi-)definite operators, in torch.

Matrix-free: the operator is a callable ``v -> A v``. Runs on whatever device
and dtype its inputs have; used for :math:`g(w)^{-1} b` when neither a dense nor
an output-space solve is cheaper.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .validation import ConvergenceWarning, NotConvergedError

__all__ = ["SolveResult", "conjugate_gradient", "default_tolerance", "report_failure"]


@dataclass
class SolveResult:
    """Result of a linear solve :math:`A x = b`.

    Attributes
    ----------
    x : torch.Tensor
        The solution.
    residual : float
        Relative residual :math:`\\|b - A x\\| / \\|b\\|` (for direct methods, as measured
        with one extra product where it is checked, else 0).
    iterations : int
        Operator applications spent (0 for direct methods).
    converged : bool
        Whether ``residual <= tol``.
    method : str
        ``"cg"``, ``"output"`` or ``"dense"``.
    """

    x: torch.Tensor
    residual: float
    iterations: int
    converged: bool
    method: str


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance suited to ``dtype``: 1e-10 for float64, 1e-5 otherwise."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def report_failure(result: SolveResult, tol: float, on_failure: str) -> None:
    """Warn (``"warn"``), raise :class:`NotConvergedError` (``"raise"``) or do nothing
    (``"ignore"``) for a solve that did not converge."""
    if result.converged or on_failure == "ignore":
        return
    msg = (
        f"{result.method} solve stopped after {result.iterations} iterations with relative "
        f"residual {result.residual:.3e} > tol {tol:.1e}; increase maxiter or damping"
    )
    if on_failure == "raise":
        raise NotConvergedError(msg, result.residual, result.iterations)
    warnings.warn(msg, ConvergenceWarning, stacklevel=_first_frame_outside_package())


def _first_frame_outside_package() -> int:
    """The ``stacklevel`` that points a warning at the user's call, not at our internals."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
) -> SolveResult:
    r"""Solve :math:`A x = b` for symmetric positive semi-definite :math:`A`.

    Stops when :math:`\|b - A x\| \le \text{tol}\,\|b\|` or after ``maxiter``
    products. When the recursively updated residual meets the tolerance, the true
    one, :math:`b - Ax`, is computed with one more product and reported; CG goes on
    from it (up to 3 times) if it does not, since in finite precision, float32
    especially, the two drift apart. On a singular :math:`A` with :math:`b` in its
    range, CG started from zero returns the minimum-norm solution.

    Parameters
    ----------
    matvec : callable
        ``v -> A v``.
    b : torch.Tensor
        Right-hand side, 1-D.
    x0 : torch.Tensor, optional
        Warm start (default zero). One used only if it is better than zero: when
        :math:`\|b - A x_0\| \ge \|b\|` (or is not finite, e.g. a float32 product
        that overflowed) CG starts from zero instead, having spent one product.
    tol : float, optional
        Relative residual tolerance (default :func:`default_tolerance`).
    maxiter : int, optional
        Cap on products (default ``min(10 * b.numel(), 1000)``: in floating point CG
        needs more than the n steps of exact arithmetic, e.g. 16 on a 12-dimensional
        problem of condition 4e3).

    Returns
    -------
    SolveResult
        Never raises on non-convergence: the caller decides (see :func:`report_failure`).
    """
    tol = default_tolerance(b.dtype) if tol is None else float(tol)
    maxiter = min(10 * b.numel(), 1000) if maxiter is None else int(maxiter)
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return SolveResult(torch.zeros_like(b), 0.0, 0, True, "cg")
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
        its = 0
    else:
        x = x0.clone()
        r = b - matvec(x)
        its = 1
        rnorm = float(torch.linalg.vector_norm(r))
        if not rnorm < bnorm:  # worse than zero, or NaN/Inf: a stale guess would only cost
            x.zero_()
            r = b.clone()
    for _ in range(_RESTARTS):
        before = its
        x, r, its, res = _cg_run(matvec, x, r, bnorm, tol, its, maxiter)
        if res > tol or its == before:  # not converged, or r is b - A x itself
            break
        # The recursively updated residual drifts from b - A x in finite precision (in
        # float32 on a network it can claim convergence while the true residual is
        # orders of magnitude larger): check it with one product, continue if needed.
        r = b - matvec(x)
        its += 1
        res = float(torch.linalg.vector_norm(r)) / bnorm
        if not math.isfinite(res) or res <= tol or its >= maxiter:
            break
    return SolveResult(x, res, its, res <= tol, "cg")


#: Times CG may restart from the true residual after its recursive one met the tolerance.
_RESTARTS = 3


def _cg_run(matvec, x, r, bnorm, tol, its, maxiter):
    """CG iterations from ``x`` with residual ``r`` until the recursive residual meets
    ``tol``, ``maxiter`` products are spent, or a direction has no curvature."""
    p = r.clone()
    rr = torch.dot(r, r)
    res = float(rr.sqrt()) / bnorm
    while res > tol and its < maxiter:
        ap = matvec(p)
        its += 1
        pap = torch.dot(p, ap)
        if float(pap) <= 0.0:
            # Direction of zero (or negative, from round-off) curvature: A is singular
            # along p and b has a component outside its range. Stop with what we have.
            break
        alpha = rr / pap
        x.add_(p, alpha=float(alpha))
        r.sub_(ap, alpha=float(alpha))
        rr_new = torch.dot(r, r)
        res = float(rr_new.sqrt()) / bnorm
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
    return x, r, its, res
