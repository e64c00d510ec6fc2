r"""The geodesic flow of a pullback metric: the initial-value problem behind the exponential map.

The geodesic through :math:`w_0` with velocity :math:`v_0` solves the first-order system

.. math::

    \dot w = v, \qquad \dot v = -\Gamma_w(v, v)
    \quad (\text{:meth:`PullbackMetric.acceleration`}),

integrated here by the classical fourth-order Runge–Kutta method with a fixed
number of steps on :math:`t \in [0, t_1]`. Along an exact geodesic the speed
:math:`\|v\|_{g(w)}` is constant; :attr:`GeodesicTrajectory.speed_drift` measures
how far the discrete one strays, which is the integrator's own error estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["GeodesicTrajectory", "integrate_geodesic", "expmap_approximation"]


@dataclass
class GeodesicTrajectory:
    """A discretised geodesic from an initial point and velocity.

    Attributes
    ----------
    t : torch.Tensor
        Times, shape ``(K,)``.
    points : torch.Tensor
        :math:`w(t_k)`, shape ``(K, n)``.
    velocities : torch.Tensor
        :math:`\\dot w(t_k)`, shape ``(K, n)``.
    speeds : torch.Tensor or None
        :math:`\\|\\dot w(t_k)\\|_{g}`, shape ``(K,)``, when asked for.
    solves : int
        Acceleration evaluations spent (4 per step).
    max_solve_residual : float
        Largest relative residual of the linear solves inside the accelerations.
    """

    t: torch.Tensor
    points: torch.Tensor
    velocities: torch.Tensor
    speeds: torch.Tensor | None = None
    solves: int = 0
    max_solve_residual: float = 0.0
    metadata: dict = field(default_factory=dict)

    @property
    def end(self) -> torch.Tensor:
        """The final point."""
        return self.points[-1]

    @property
    def speed_drift(self) -> float:
        r""":math:`\max_k |s_k - s_0| / s_0`, the relative drift of the speed (0 if not recorded)."""
        if self.speeds is None or self.speeds.numel() == 0:
            return 0.0
        s0 = float(self.speeds[0])
        if s0 == 0.0:
            return float(self.speeds.abs().max())
        return float((self.speeds - s0).abs().max()) / s0


def integrate_geodesic(
    metric,
    w0: torch.Tensor,
    v0: torch.Tensor,
    *,
    t1: float = 1.0,
    steps: int = 32,
    record: bool = False,
    speeds: bool = False,
    method: str | None = None,
) -> GeodesicTrajectory:
    r"""Integrate the geodesic equation of ``metric`` by RK4.

    Parameters
    ----------
    metric : PullbackMetric
        Supplies ``_acceleration(w, v, method, tol, maxiter, x0)``.
    w0, v0 : torch.Tensor
        Initial point and velocity (checked by the caller).
    t1 : float
        Final time; :math:`\exp_{w_0}(v_0)` is the point at :math:`t_1 = 1`.
    steps : int
        Number of RK4 steps (4 acceleration solves each); the global error is
        :math:`O((t_1 |v_0|/\text{steps})^4)`.
    record : bool
        Keep every step's point and velocity (else only the ends).
    speeds : bool
        Also record :math:`\|v\|_g` at each kept point (one metric product each).
    method : str, optional
        Solver for the accelerations (see :meth:`PullbackMetric.solve`).

    Returns
    -------
    GeodesicTrajectory
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    h = float(t1) / steps
    w, v = w0.detach().clone(), v0.detach().clone()
    acc_prev = None
    n_solves, worst = 0, 0.0

    def accel(x, u):
        nonlocal acc_prev, n_solves, worst
        # A flow that has blown up stops here with FloatingPointError (what callers such
        # as shooting catch), not deeper down with the metric's ValueError for bad input.
        if not (bool(torch.isfinite(x.sum())) and bool(torch.isfinite(u.sum()))):
            raise FloatingPointError(
                "geodesic integration produced non-finite weights or velocities; "
                "reduce |v0| or raise steps/damping"
            )
        res = metric._acceleration(x, u, method, None, None, acc_prev)
        acc_prev = res.x
        n_solves += 1
        worst = max(worst, res.residual)
        return res.x

    ts, ws, vs = [0.0], [w], [v]
    with torch.no_grad():
        for k in range(steps):
            k1w, k1v = v, accel(w, v)
            k2w, k2v = v + 0.5 * h * k1v, accel(w + 0.5 * h * k1w, v + 0.5 * h * k1v)
            k3w, k3v = v + 0.5 * h * k2v, accel(w + 0.5 * h * k2w, v + 0.5 * h * k2v)
            k4w, k4v = v + h * k3v, accel(w + h * k3w, v + h * k3v)
            w = w + (h / 6.0) * (k1w + 2 * k2w + 2 * k3w + k4w)
            v = v + (h / 6.0) * (k1v + 2 * k2v + 2 * k3v + k4v)
            if record or k == steps - 1:
                ts.append((k + 1) * h)
                ws.append(w)
                vs.append(v)
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError(
                "geodesic integration produced non-finite weights; reduce |v0| or raise steps/damping"
            )
        points, velocities = torch.stack(ws), torch.stack(vs)
        speed = None
        if speeds:
            speed = torch.stack(
                [metric.norm(p, u) for p, u in zip(points, velocities, strict=True)]
            )
    return GeodesicTrajectory(
        t=torch.tensor(ts, dtype=w.dtype, device=w.device),
        points=points,
        velocities=velocities,
        speeds=speed,
        solves=n_solves,
        max_solve_residual=worst,
    )


def expmap_approximation(metric, w: torch.Tensor, v: torch.Tensor, order: int = 2) -> torch.Tensor:
    r"""Taylor approximations of :math:`\exp_w(v)`.

    ``order=1``: :math:`w + v` (the retraction); ``order=2``:
    :math:`w + v + \tfrac12 \ddot w` with :math:`\ddot w = -\Gamma_w(v, v)`, accurate to
    :math:`O(|v|^3)`.
    """
    if order == 1:
        return w + v
    if order == 2:
        return w + v + 0.5 * metric._acceleration(w, v).x
    raise ValueError(f"order must be 1 or 2, got {order}")
