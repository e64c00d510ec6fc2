r"""Discrete geodesics by minimising the path energy of :math:`K` points with fixed ends.

With :math:`F` the metric's embedding (:meth:`manifolds.PullbackMetric.embed`, so that
:math:`g = J_F^\top J_F + \lambda I`) and points :math:`w_0 = p_0, p_1, \dots, p_{K-1} = w_1`
at times :math:`t_k = k/(K-1)`, the discrete energy is the chord energy of
:mod:`manifolds.geodesic.energy`,

.. math::

    E(p) = \frac{K-1}{2} \sum_{k=0}^{K-2}
        \Bigl( \|F(p_{k+1}) - F(p_k)\|^2 + \lambda \|p_{k+1} - p_k\|^2 \Bigr),

which tends to :math:`\tfrac12\int_0^1 \|\dot w\|_g^2\,dt` as :math:`K \to \infty`. Its
minimisers over the interior points are discrete geodesics; they approach the
geodesic at :math:`O(K^{-2})` (a chord of the curved image :math:`F(w(t))` is shorter
than its arc, so a finite :math:`K` slightly under-estimates energy and bends the path).
Minimisation is by L-BFGS (:class:`torch.optim.LBFGS`, strong Wolfe line search):
matrix-free, one forward and one backward pass of :math:`F` per interior point per
evaluation, no linear solves. That makes it the robust start for
:func:`~manifolds.geodesic.shoot` and a solver in its own right for very large :math:`n`.

Tolerance rule (the gradient rule): the solve has converged when the Euclidean norm of the
gradient of :math:`E` over the interior points is at most ``tol``,
:math:`\|\nabla_{p_1..p_{K-2}} E\| \le \text{tol}`; ``tol`` defaults to
:math:`\tau\max(1, \|\nabla E(\text{start})\|)`, :math:`\tau = 10^{-6}` in float64 and
:math:`10^{-4}` otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..status import Status
from .endpoints import check_endpoints, norm
from .energy import chord_energy, discrete_energy, midpoint_speeds
from .path import GeodesicPath

__all__ = ["relax"]


def relax(
    metric,
    w0: torch.Tensor,
    w1: torch.Tensor,
    n_points: int = 17,
    *,
    init: torch.Tensor | GeodesicPath | None = None,
    tol: float | None = None,
    maxiter: int = 500,
    history_size: int = 20,
    strict: bool = False,
    verbose: bool = False,
) -> GeodesicPath:
    r"""A discrete geodesic from ``w0`` to ``w1`` by minimising the path energy.

    Parameters
    ----------
    metric : manifolds.PullbackMetric
        The metric :math:`g`.
    w0, w1 : torch.Tensor
        Endpoints (flat, same dtype and device; the computation runs in these).
    n_points : int
        :math:`K \ge 3`, points including both ends.
    init : tensor of shape (K, n) or GeodesicPath, optional
        Starting points (ends must equal ``w0``, ``w1``), or an earlier path
        resampled at the :math:`K` times by :meth:`GeodesicPath.at` (how a long
        relaxation resumes). Default: the straight line.
    tol : float, optional
        The gradient rule: converged when :math:`\|\nabla E\| \le` ``tol`` (Euclidean,
        over the interior points). Default :math:`\tau \max(1, \|\nabla E(\text{start})\|)`,
        :math:`\tau = 10^{-6}` in float64 and :math:`10^{-4}` otherwise. The discrete
        path is itself only :math:`O(K^{-2})` from the geodesic, so a gradient
        reduced by more than about :math:`10^{6}` rarely moves the points in a way
        that matters; a network-sized relaxation reaches this in a few hundred
        L-BFGS iterations, where :math:`10^{-8}` was out of reach.
    maxiter : int
        L-BFGS iterations.
    history_size : int
        L-BFGS memory.
    strict : bool
        Raise :class:`~manifolds.validation.NotConvergedError` when not converged.
    verbose : bool
        Print progress every 10 iterations.

    Returns
    -------
    GeodesicPath
        ``points`` are the :math:`K` relaxed points; ``velocities`` second-order
        finite differences (central inside, one-sided at the ends), so ``v0`` is
        accurate to :math:`O(K^{-2})`; ``length`` :math:`= \sum_k \|p_{k+1} - p_k\|_{g(\bar p_k)}`
        and ``energy`` :math:`= \frac{K-1}{2}\sum_k \|p_{k+1} - p_k\|^2_{g(\bar p_k)}` with
        :math:`\bar p_k` the segment midpoints (midpoint rule); ``residual`` is
        :math:`\|\nabla E\|`. ``metadata`` holds the discrete objective, its value on the
        straight line, the spread of segment speeds (0 for constant speed) and timing.
    """
    start = time.perf_counter()
    w0, w1 = check_endpoints(metric, w0, w1)
    K, maxiter = int(n_points), int(maxiter)
    if K < 3 or maxiter < 0:
        raise ValueError(
            f"n_points must be >= 3 (two ends and an interior point) and maxiter >= 0, got "
            f"n_points={K}, maxiter={maxiter}"
        )
    t = torch.linspace(0.0, 1.0, K, dtype=w0.dtype, device=w0.device)
    line = w0 + t[:, None] * (w1 - w0)
    x0 = line if init is None else _starting_points(init, w0, w1, t)
    problem = _EnergyProblem(metric, w0, w1, x0[1:-1])
    e_start, g_start = problem.energy_and_gradient_norm()
    e_line = e_start if init is None else float(discrete_energy(metric, line).detach())
    scale = 1e-6 if w0.dtype == torch.float64 else 1e-4
    tol = scale * max(1.0, g_start) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    run = problem.minimise(e_start, g_start, tol, maxiter, int(history_size), verbose)

    with torch.no_grad():
        points = torch.cat([w0.unsqueeze(0), problem.interior.detach(), w1.unsqueeze(0)])
        velocities = _differences(points, 1.0 / (K - 1))
        speeds = midpoint_speeds(metric, points)
        length = float(speeds.sum())
        spread = float((speeds.max() - speeds.min()) / speeds.mean()) if length > 0 else 0.0
    path = GeodesicPath(
        t=t,
        points=points,
        velocities=velocities,
        length=length,
        energy=float(chord_energy(speeds, 0.0, t, 0.0)),
        residual=run.residual,
        tol=tol,
        status=run.status,
        message=run.message,
        iterations=run.iterations,
        method="relax",
        metadata={
            "length_rule": "sum of |p_{k+1} - p_k|_g at segment midpoints",
            "objective": run.energy,
            "objective_line": e_line,
            "speed_spread": spread,
            "n_points": K,
            "seconds": time.perf_counter() - start,
        },
    )
    return path.raise_if_failed() if strict else path


def _starting_points(init, w0, w1, t) -> torch.Tensor:
    """The :math:`K` starting points from ``init`` (points, or a path resampled at ``t``),
    checked: right shape, finite, ends at ``w0`` and ``w1``."""
    K, n = t.numel(), w0.numel()
    if isinstance(init, GeodesicPath):
        x0 = init.at(t).to(dtype=w0.dtype, device=w0.device)
    elif isinstance(init, torch.Tensor):
        if init.shape != (K, n):
            raise ValueError(f"init must have shape {(K, n)}, got {tuple(init.shape)}")
        x0 = init.detach().to(dtype=w0.dtype, device=w0.device)
    else:
        raise TypeError(f"init must be a tensor, a GeodesicPath or None, got {type(init).__name__}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("init contains non-finite values")
    ends_err = max(norm(x0[0] - w0), norm(x0[-1] - w1))
    if ends_err > 1e-6 * max(1.0, norm(w1 - w0)):
        raise ValueError(f"init must start at w0 and end at w1 (off by {ends_err:.3e})")
    return x0


@dataclass
class _Run:
    """How the minimisation ended."""

    energy: float
    residual: float
    iterations: int
    status: Status
    message: str


class _EnergyProblem:
    """The discrete energy as a function of the interior points, and its L-BFGS minimisation."""

    def __init__(self, metric, w0, w1, interior):
        self.metric = metric
        self.a, self.b = w0.unsqueeze(0), w1.unsqueeze(0)
        self.interior = interior.clone().requires_grad_(True)

    def objective(self) -> torch.Tensor:
        return discrete_energy(self.metric, torch.cat([self.a, self.interior, self.b]))

    def energy_and_gradient_norm(self) -> tuple[float, float]:
        with torch.enable_grad():
            e = self.objective()
            (grad,) = torch.autograd.grad(e, self.interior)
        return float(e.detach()), norm(grad)

    def minimise(self, energy, residual, tol, maxiter, history_size, verbose) -> _Run:
        """L-BFGS (strong Wolfe) in rounds of up to 10 iterations until the gradient rule holds."""
        opt = torch.optim.LBFGS(
            [self.interior],
            lr=1.0,
            max_iter=10,
            max_eval=25,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            history_size=history_size,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            e = self.objective()
            e.backward()
            return e

        run = _Run(energy, residual, 0, Status.MAX_ITERATIONS, _MAXITER_MESSAGE)
        while run.residual > tol and run.iterations < maxiter:
            opt.param_groups[0]["max_iter"] = min(10, maxiter - run.iterations)
            opt.param_groups[0]["max_eval"] = 25 * opt.param_groups[0]["max_iter"] // 10 + 5
            before = opt.state[self.interior].get("n_iter", 0) if self.interior in opt.state else 0
            with torch.enable_grad():
                opt.step(closure)
            after = opt.state[self.interior].get("n_iter", 0)
            energy_prev = run.energy
            run.energy, run.residual = self.energy_and_gradient_norm()
            run.iterations += max(after - before, 1)
            if not math.isfinite(run.energy):
                run.status, run.message = Status.NON_FINITE, _NON_FINITE_MESSAGE
                return run
            if verbose and run.iterations % 10 == 0:
                print(
                    f"relax {run.iterations:5d}: energy {run.energy:.8e}  |grad| {run.residual:.3e}"
                )
            if after == before or (run.energy >= energy_prev and run.residual > tol):
                run.status, run.message = Status.BREAKDOWN, _STALLED_MESSAGE
                break
        if math.isfinite(run.residual) and run.residual <= tol:
            run.status, run.message = Status.CONVERGED, "converged"
        return run


_MAXITER_MESSAGE = (
    "maximum number of L-BFGS iterations reached; raise maxiter (or resume with init=path)"
)
_NON_FINITE_MESSAGE = "the energy became non-finite; check the metric or start from a shorter path"
_STALLED_MESSAGE = (
    "L-BFGS made no progress (line search stalled at the precision of the energy); the "
    "residual is as small as this dtype allows, or lower n_points"
)


def _differences(p: torch.Tensor, h: float) -> torch.Tensor:
    """Second-order finite-difference velocities of equally spaced points."""
    v = torch.empty_like(p)
    v[1:-1] = (p[2:] - p[:-2]) / (2 * h)
    v[0] = (-3 * p[0] + 4 * p[1] - p[2]) / (2 * h)
    v[-1] = (3 * p[-1] - 4 * p[-2] + p[-3]) / (2 * h)
    return v
