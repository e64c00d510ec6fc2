r"""Linear solves with symmetric positive (semi-)definite operators: the one result type, the
one tolerance rule, and (preconditioned) conjugate gradients.

Tolerance rule (every linear solve in :mod:`manifolds`)
--------------------------------------------------------
A solve of :math:`A x = b` has converged when its relative residual
:math:`\|b - Ax\| / \|b\|` is at most ``tol``. ``tol`` defaults to :math:`10^{-10}` in
float64 and :math:`10^{-5}` otherwise (:func:`default_tolerance`). A direct solve (dense
or output-space factorization), whose residual is set by round-off and not by
iterations, is held to :math:`\max(\text{tol}, 10^3 \epsilon)` (:func:`solve_tolerance`).
The residual is always measured, never assumed.

Matrix-free: the operator is a callable. :func:`conjugate_gradient` solves one right-hand
side (``b`` of shape ``(n,)``) or several at once (``(k, n)``, the operator then acting on
rows), with an optional preconditioner :math:`M \approx A^{-1}`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .status import MESSAGES, Status
from .validation import ConvergenceWarning, NotConvergedError

__all__ = [
    "SolveResult",
    "conjugate_gradient",
    "default_tolerance",
    "report_failure",
    "solve_tolerance",
]


@dataclass
class SolveResult:
    """Result of a linear solve :math:`A x = b`.

    Attributes
    ----------
    x : torch.Tensor
        The solution (same shape as ``b``).
    residual : float
        Relative residual :math:`\\|b - A x\\| / \\|b\\|` (the largest over right-hand sides).
    iterations : int
        Operator applications spent (a batched application counts once; 0 for a direct
        solve apart from its residual check).
    status : Status
        ``CONVERGED``, ``MAX_ITERATIONS``, ``BREAKDOWN`` or ``NON_FINITE``.
    method : str
        ``"cg"``, ``"output"`` or ``"dense"``.
    tol : float
        The tolerance the residual was held to.
    """

    x: torch.Tensor
    residual: float
    iterations: int
    status: Status
    method: str
    tol: float = 0.0

    @property
    def converged(self) -> bool:
        """``status == Status.CONVERGED``."""
        return self.status == Status.CONVERGED

    @property
    def message(self) -> str:
        """The outcome in words, with the residual and what to try."""
        if self.converged:
            return f"{self.method} solve converged (relative residual {self.residual:.3e})"
        return (
            f"{self.method} solve: {MESSAGES[self.status]}; stopped after {self.iterations} "
            f"iterations with relative residual {self.residual:.3e} > tol {self.tol:.1e}; "
            "increase maxiter or damping"
        )


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance suited to ``dtype``: 1e-10 for float64, 1e-5 otherwise."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def solve_tolerance(dtype: torch.dtype, tol: float | None = None, *, direct: bool = False) -> float:
    """The tolerance rule of the module docstring: ``tol`` (default :func:`default_tolerance`),
    floored at ``1e3 * eps`` for direct solves."""
    tol = default_tolerance(dtype) if tol is None else float(tol)
    return max(tol, 1e3 * torch.finfo(dtype).eps) if direct else tol


def status_of(residual: float, tol: float) -> Status:
    """``CONVERGED``, ``MAX_ITERATIONS`` or ``NON_FINITE`` for a measured residual."""
    if residual != residual or residual == float("inf"):
        return Status.NON_FINITE
    return Status.CONVERGED if residual <= tol else Status.MAX_ITERATIONS


def report_failure(result: SolveResult, on_failure: str) -> None:
    """Warn (``"warn"``), raise :class:`NotConvergedError` (``"raise"``) or do nothing
    (``"ignore"``) for a solve that did not converge."""
    if result.converged or on_failure == "ignore":
        return
    if on_failure == "raise":
        raise NotConvergedError(result.message, result.residual, result.iterations)
    warnings.warn(result.message, ConvergenceWarning, stacklevel=_first_frame_outside_package())


def _first_frame_outside_package() -> int:
    """The ``stacklevel`` that points a warning at the user's call, not at our internals."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


#: Times CG may restart from the true residual after its recursive one met the tolerance.
_RESTARTS = 3


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SolveResult:
    r"""Solve :math:`A x = b` for symmetric positive semi-definite :math:`A` by
    (preconditioned) conjugate gradients.

    Stops when every right-hand side meets the tolerance rule, or after ``maxiter``
    operator applications. When the recursively updated residual meets the tolerance,
    the true one, :math:`b - Ax`, is computed with one more product and reported; CG goes
    on from it (up to 3 times) if it does not, since in finite precision, float32
    especially, the two drift apart. On a singular :math:`A` with :math:`b` in its range,
    CG started from zero returns the minimum-norm solution; with :math:`b` outside it,
    CG stops at a direction of zero curvature with status ``BREAKDOWN``, as it does when the
    true residual stays above the tolerance after every restart (the attainable accuracy).

    Parameters
    ----------
    matvec : callable
        ``v -> A v`` on tensors shaped like ``b`` (rows of a 2-D ``b`` are independent
        vectors).
    b : torch.Tensor
        Right-hand side(s), shape ``(n,)`` or ``(k, n)``.
    x0 : torch.Tensor, optional
        Warm start (default zero), shaped like ``b``. A row is used only if it is better
        than zero: where :math:`\|b - A x_0\| \ge \|b\|` (or is not finite, e.g. a float32
        product that overflowed) that row starts from zero, having spent one product.
    tol : float, optional
        Relative residual tolerance (default :func:`default_tolerance`).
    maxiter : int, optional
        Cap on products (default ``min(10 n, 1000)``: in floating point CG needs more than
        the :math:`n` steps of exact arithmetic).
    preconditioner : callable, optional
        ``r -> M r`` with :math:`M` symmetric positive definite, :math:`M \approx A^{-1}`.

    Returns
    -------
    SolveResult
        Never raises on non-convergence: the caller decides (see :func:`report_failure`).
    """
    single = b.ndim == 1
    B = b.unsqueeze(0) if single else b
    if single:

        def op(v):
            return matvec(v[0]).unsqueeze(0)

        precond = None if preconditioner is None else (lambda r: preconditioner(r[0]).unsqueeze(0))
    else:
        op, precond = matvec, preconditioner
    tol = default_tolerance(b.dtype) if tol is None else float(tol)
    maxiter = min(10 * B.shape[-1], 1000) if maxiter is None else int(maxiter)
    bnorm = torch.linalg.vector_norm(B, dim=-1)
    live = bnorm > 0
    scale = torch.where(live, bnorm, torch.ones_like(bnorm))
    x = torch.zeros_like(B)
    r = B.clone()
    its = 0
    if x0 is not None and bool(live.any()):
        X0 = x0.unsqueeze(0) if single else x0
        r0 = B - op(X0)
        its = 1
        better = torch.isfinite(r0).all(-1) & (torch.linalg.vector_norm(r0, dim=-1) < bnorm)
        x = torch.where(better[:, None], X0, x)
        r = torch.where(better[:, None], r0, r)
    broke = torch.zeros_like(live)
    for _ in range(_RESTARTS + 1):
        before = its
        x, r, its, broke = _pcg_run(op, precond, x, r, scale, live, broke, tol, its, maxiter)
        res = torch.linalg.vector_norm(r, dim=-1) / scale
        if not bool((res[live & ~broke] <= tol).all()) or its == before:
            break
        # The recursively updated residual drifts from b - A x in finite precision (in
        # float32 on a network it can claim convergence while the true residual is
        # orders of magnitude larger): check it with one product, continue if needed.
        r = torch.where(live[:, None], B - op(x), r)
        its += 1
        res = torch.linalg.vector_norm(r, dim=-1) / scale
        if not bool(torch.isfinite(res).all()) or bool((res[live] <= tol).all()):
            break
    res = torch.where(live, torch.linalg.vector_norm(r, dim=-1) / scale, torch.zeros_like(scale))
    worst = float(res.max())
    if not bool(torch.isfinite(res).all()):
        status = Status.NON_FINITE
    elif worst <= tol:
        status = Status.CONVERGED
    elif bool(broke.any()) or its < maxiter:
        # zero curvature, or the true residual stalled above tol after every restart
        status = Status.BREAKDOWN
    else:
        status = Status.MAX_ITERATIONS
    return SolveResult(x[0] if single else x, worst, its, status, "cg", tol)


def _pcg_run(op, precond, x, r, scale, live, broke, tol, its, maxiter):
    """PCG iterations on every live row from ``x`` with residual ``r`` until each row's
    recursive residual meets ``tol``, ``maxiter`` products are spent, or a row meets a
    direction without curvature (it is then frozen and marked in ``broke``)."""
    z = r if precond is None else precond(r)
    p = z.clone()
    rz = (r * z).sum(-1)
    active = live & ~broke & (torch.linalg.vector_norm(r, dim=-1) > tol * scale)
    zero = torch.zeros_like(rz)
    while bool(active.any()) and its < maxiter:
        ap = op(p)
        its += 1
        pap = (p * ap).sum(-1)
        # Zero (or, from round-off, negative) curvature along p: A is singular along it
        # and b has a component outside its range. That row stops with what it has.
        flat = active & ~(pap > 0)
        broke = broke | flat
        active = active & ~flat
        alpha = torch.where(active, rz / torch.where(active, pap, torch.ones_like(pap)), zero)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        active = active & (torch.linalg.vector_norm(r, dim=-1) > tol * scale)
        if not bool(active.any()):
            break
        z = r if precond is None else precond(r)
        rz_new = (r * z).sum(-1)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), zero)
        rz = torch.where(active, rz_new, rz)
        p = torch.where(active[:, None], z + beta[:, None] * p, p)
    return x, r, its, broke
