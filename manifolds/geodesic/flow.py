r"""The geodesic flow of a pullback metric: the initial-value problem behind the exponential map.

The geodesic through :math:`w_0` with velocity :math:`v_0` solves

.. math::

    \dot w = v, \qquad \dot v = -\Gamma_w(v, v)
    \quad (\text{:meth:`~manifolds.PullbackMetric.acceleration`}),

integrated on :math:`t \in [0, t_1]` by the Runge–Kutta kernel of
:mod:`manifolds.geodesic.runge_kutta`, in one of two ways:

adaptive (``tol``; the default)
    Dormand–Prince 5(4) with step-size control: each accepted step has a local error
    estimate of norm :math:`\le 1` in the mixed norm with ``rtol = atol = tol`` over
    :math:`(w, v)`, so the user asks for an accuracy, not a step count. The global error
    at :math:`t_1` is typically a small multiple of ``tol`` for a smooth flow.
fixed (``steps``)
    Classical RK4 with ``steps`` equal steps (4 accelerations each); the global error is
    :math:`O((t_1 |v_0|/\text{steps})^4)`. Shooting uses it because its endpoint is a smooth
    function of :math:`v_0` (an adaptive mesh changes with :math:`v_0`).

The result is a :class:`~manifolds.geodesic.path.GeodesicPath` (``method="flow"``) with
an integer status. A flow that produces NaN or Inf (``NON_FINITE``), whose step size
underflows (``BREAKDOWN``) or that runs out of steps (``MAX_ITERATIONS``) says so, and so
does an adaptive flow whose speed :math:`\|v\|_g`, an exact invariant of the geodesic flow,
changes from :math:`t = 0` to :math:`t_1` by more than :math:`\sqrt{\text{tol}}` relatively
(``INACCURATE``: every step met the error test, the answer does not). A failed flow ends in
a NaN row at :math:`t_1`, never a finite point that is not :math:`\exp_{w_0}(t_1 v_0)`.
"""

from __future__ import annotations

import math

import torch

from ..status import Status
from .path import GeodesicPath
from .runge_kutta import AdaptiveRungeKutta, fixed_step_flow, tableau

__all__ = [
    "MetricAcceleration",
    "default_flow_tol",
    "expmap_approximation",
    "integrate_geodesic",
    "speed_drift",
]


def default_flow_tol(dtype: torch.dtype) -> float:
    r"""Default tolerance of an adaptive flow: :math:`10^{-8}` in float64, :math:`10^{-6}` in
    float32 (ten times its unit roundoff, so that rounding does not drive the error
    estimate), ten machine epsilons in lower precisions."""
    return {torch.float64: 1e-8, torch.float32: 1e-6}.get(dtype, 10 * torch.finfo(dtype).eps)


class MetricAcceleration:
    r"""The geodesic acceleration :math:`(w, v) \mapsto -\Gamma_w(v, v)` of a metric as the
    integrator's right-hand side, through :meth:`~manifolds.PullbackMetric.acceleration_result`.

    Each solve is warm-started from the previous acceleration (CG drops a start worse than
    zero); it counts the solves and keeps the largest solve residual. A non-finite state
    gets a NaN acceleration without a solve, so the driver sees the blow-up in its own
    checks rather than as the metric's input error.

    Parameters
    ----------
    metric : PullbackMetric
    method : str, optional
        The metric's solve method (``"dense"``, ``"output"``, ``"cg"``).
    """

    def __init__(self, metric, method: str | None = None):
        self.metric, self.method = metric, method
        self.previous: torch.Tensor | None = None
        self.solves = 0
        self.max_residual = 0.0

    def __call__(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not (_finite(w) and _finite(v)):
            return torch.full_like(v, math.nan)
        res = self.metric.acceleration_result(w, v, method=self.method, x0=self.previous)
        self.solves += 1
        self.max_residual = max(self.max_residual, float(res.residual))
        self.previous = res.x if _finite(res.x) else None
        return res.x


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.sum()))


def integrate_geodesic(
    metric,
    w0: torch.Tensor,
    v0: torch.Tensor,
    *,
    t1: float = 1.0,
    tol: float | None = None,
    steps: int | None = None,
    scheme: str | None = None,
    record: bool = False,
    speeds: bool = False,
    method: str | None = None,
    max_steps: int = 10_000,
    first_step: float | None = None,
) -> GeodesicPath:
    r"""Integrate the geodesic equation of ``metric`` from :math:`(w_0, v_0)` to :math:`t_1`.

    Parameters
    ----------
    metric : PullbackMetric
        The metric (only its public surface is used).
    w0, v0 : torch.Tensor
        Initial point and velocity (checked here).
    t1 : float
        Final time > 0; :math:`\exp_{w_0}(v_0)` is the point at :math:`t_1 = 1`.
    tol : float, optional
        Adaptive steps with ``rtol = atol = tol`` (default :func:`default_flow_tol`).
    steps : int, optional
        Fixed steps instead (not together with ``tol``).
    scheme : {"dopri5", "bs23", "rk4"}, optional
        The tableau: default ``"dopri5"`` for adaptive steps, ``"rk4"`` for fixed ones
        (an embedded pair runs fixed steps with its propagated solution).
    record : bool
        Keep every step's point and velocity (else only the ends).
    speeds : bool
        Also record :math:`\|v\|_g` at each kept point (one metric product each).
    method : str, optional
        Solver for the accelerations (see :meth:`~manifolds.PullbackMetric.solve`).
    max_steps : int
        Adaptive steps attempted (accepted and rejected) before giving up.
    first_step : float, optional
        First adaptive step (default: estimated at the cost of one acceleration).

    Returns
    -------
    GeodesicPath
        ``method="flow"``, ``length`` :math:`= t_1\|v_0\|_{g(w_0)}`, ``energy``
        :math:`= \tfrac12 t_1 \|v_0\|^2_{g(w_0)}`, ``solves`` and ``max_solve_residual``;
        ``iterations`` the accepted steps; ``metadata`` the scheme, the rejected steps and
        the last step size. ``status`` says whether :math:`t_1` was reached (see the
        module notes); :meth:`~GeodesicPath.raise_if_failed` raises if not.

    Raises
    ------
    TypeError, ValueError
        Bad metric inputs, ``steps < 1``, ``tol <= 0``, both given, ``t1 <= 0``.
    """
    w0 = metric.check_point(w0)
    v0 = metric.check_tangent("v0", v0, w0)
    t1 = float(t1)
    if not (math.isfinite(t1) and t1 > 0):
        raise ValueError(f"t1 must be a finite number > 0, got {t1}")
    if steps is not None and tol is not None:
        raise ValueError("give either tol (adaptive steps) or steps (fixed steps), not both")
    accel = MetricAcceleration(metric, method)
    with torch.no_grad():
        if steps is not None:
            steps = int(steps)
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            run = _fixed_flow(accel, w0, v0, t1, steps, tableau(scheme or "rk4"), record)
        else:
            tol = default_flow_tol(w0.dtype) if tol is None else float(tol)
            if not tol > 0:
                raise ValueError(f"tol must be > 0, got {tol}")
            stepper = AdaptiveRungeKutta(
                accel,
                w0,
                v0,
                t1,
                method=tableau(scheme or "dopri5"),
                rtol=tol,
                atol=tol,
                first_step=first_step,
                max_steps=max_steps,
            )
            run = _adaptive_flow(stepper, record)
        return _flow_path(metric, accel, run, t1, speeds)


class _FlowRun:
    """What a driver leaves: the kept states, how it ended, and its diagnostics."""

    def __init__(self, w0, v0, tol: float):
        self.ts, self.ws, self.vs = [0.0], [w0], [v0]
        self.tol, self.residual = tol, math.nan
        self.status, self.message = Status.CONVERGED, "converged"
        self.accepted = 0
        self.metadata: dict = {}

    def keep(self, t: float, w: torch.Tensor, v: torch.Tensor, replace: bool) -> None:
        """Append a state, or overwrite the last one kept after ``t = 0`` (``replace``)."""
        if replace and len(self.ts) > 1:
            self.ts[-1], self.ws[-1], self.vs[-1] = t, w, v
        else:
            self.ts.append(t)
            self.ws.append(w)
            self.vs.append(v)


def _fixed_flow(accel, w0, v0, t1, steps, method, record) -> _FlowRun:
    """Fixed steps; stops at the first non-finite state."""
    run = _FlowRun(w0, v0, math.nan)
    run.metadata = {"scheme": method.name, "steps": steps}
    run.message = f"converged (fixed {method.name} steps: no error estimate)"

    def on_step(t, w, v) -> bool:
        if not (_finite(w) and _finite(v)):
            run.status = Status.NON_FINITE
            run.message = (
                f"the flow produced non-finite weights or velocities at t = {t:.6g}; "
                "reduce |v0|, raise steps or the damping"
            )
            return False
        run.accepted += 1
        run.keep(t, w, v, replace=not record)
        return True

    fixed_step_flow(accel, w0, v0, t1, steps, method, on_step)
    return run


def _adaptive_flow(stepper: AdaptiveRungeKutta, record: bool) -> _FlowRun:
    """Adaptive steps until the stepper reaches :math:`t_1` or fails."""
    run = _FlowRun(stepper.w, stepper.v, stepper.rtol)
    while stepper.status is None:
        stepper.step()
        if stepper.accepted > run.accepted:
            run.accepted = stepper.accepted
            run.keep(stepper.t, stepper.w, stepper.v, replace=not record)
    run.status, run.message = stepper.status, stepper.message
    # max ||e / (atol + rtol |y|)|| <= 1 with atol = rtol = tol is ||e / (1 + |y|)|| <= tol
    run.residual = stepper.max_error * stepper.rtol
    run.metadata = {
        "scheme": stepper.method.name,
        "rejected_steps": stepper.rejected,
        "last_step": stepper.h,
    }
    return run


def _flow_path(metric, accel: MetricAcceleration, run: _FlowRun, t1: float, speeds: bool):
    """The :class:`GeodesicPath` of a run, after the speed check; a failed one ends in NaN."""
    s0 = float(_speed(metric, run.ws[0], run.vs[0]))
    if run.status == Status.CONVERGED and math.isfinite(run.tol):  # adaptive: check the speed
        _check_speed(run, s0, float(_speed(metric, run.ws[-1], run.vs[-1])))
    if run.status != Status.CONVERGED:
        nan = torch.full_like(run.ws[0], math.nan)
        run.metadata["t_reached"] = run.ts[-1]
        run.keep(t1, nan, nan, replace=run.ts[-1] >= t1)  # an INACCURATE end is not kept
    points, velocities = torch.stack(run.ws), torch.stack(run.vs)
    speed = None
    if speeds:
        speed = torch.stack([_speed(metric, p, u) for p, u in zip(points, velocities, strict=True)])
    return GeodesicPath(
        t=torch.tensor(run.ts, dtype=points.dtype, device=points.device),
        points=points,
        velocities=velocities,
        length=t1 * s0,
        energy=0.5 * t1 * s0 * s0,
        residual=run.residual,
        tol=run.tol,
        status=run.status,
        message=run.message,
        iterations=run.accepted,
        method="flow",
        speeds=speed,
        solves=accel.solves,
        max_solve_residual=accel.max_residual,
        metadata={"length_rule": "t1 |v0|_g(w0) (constant speed)"} | run.metadata,
    )


def _speed(metric, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`\|v\|_{g(w)}`, NaN for a non-finite state."""
    if _finite(w) and _finite(v):
        return metric.norm(w, v)
    return torch.full((), math.nan, dtype=w.dtype, device=w.device)


def speed_drift(s0: float, s1: float) -> float:
    r""":math:`|s_1 - s_0| / s_0`, the relative change of the speed :math:`\|v\|_g` (an exact
    invariant of the geodesic flow) between two states; :math:`|s_1|` when :math:`s_0 = 0`."""
    return abs(s1 - s0) / s0 if s0 > 0 else abs(s1)


def _check_speed(run: _FlowRun, s0: float, s1: float) -> None:
    r"""Record the speed drift of an adaptive flow from :math:`t = 0` to :math:`t_1` and mark
    the flow ``INACCURATE`` when it exceeds :math:`\sqrt{\text{tol}}` (e.g. a flow trapped
    where a chart ends, whose velocity collapses while every step meets the error test)."""
    drift = speed_drift(s0, s1)
    run.metadata["speed_drift_end"] = drift
    if not drift <= math.sqrt(run.tol):
        run.status = Status.INACCURATE
        run.message = (
            f"every step met the error test but the speed |v|_g, an exact invariant, drifted "
            f"by {drift:.2e} (relative) > sqrt(tol) = {math.sqrt(run.tol):.1e}: the flow "
            "left the chart or the accelerations are too inexact; shorten the velocity, tighten "
            "the metric's solver tolerance or raise the damping"
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
        return w + v + 0.5 * metric.acceleration(w, v)
    raise ValueError(f"order must be 1 or 2, got {order}")
