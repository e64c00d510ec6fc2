r"""The boundary-value problem's checks: its inputs, and the endpoint rule that judges an answer.

The problem: find a geodesic :math:`w(t)`, :math:`t \in [0, 1]`, with :math:`w(0) = w_0`
and :math:`w(1) = w_1`. Shooting and collocation answer with an initial velocity
:math:`v_0`, and both are judged by one rule (:func:`endpoint_flow`): the fixed-step RK4
flow from :math:`(w_0, v_0)` must end within ``tol`` of :math:`w_1`,

.. math::

    \text{residual} = \|\exp_{w_0}(v_0) - w_1\| \le \text{tol}
    \quad\text{(Euclidean)},\qquad
    \text{tol} = \tau \max(1, \|w_1 - w_0\|) \text{ by default}.
"""

from __future__ import annotations

import math

import torch

from ..pullback import PullbackMetric
from ..status import Status
from .flow import integrate_geodesic, speed_drift
from .path import GeodesicPath

__all__ = ["check_endpoints", "default_tol", "endpoint_flow", "norm"]


def check_endpoints(metric, w0, w1) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the metric and both endpoints; return them detached.

    Raises
    ------
    TypeError
        ``metric`` is not a :class:`~manifolds.PullbackMetric`; an endpoint is not a
        floating tensor; dtypes differ.
    ValueError
        Shapes, lengths or devices differ; NaN/Inf.
    """
    if not isinstance(metric, PullbackMetric):
        raise TypeError(f"metric must be a manifolds.PullbackMetric, got {type(metric).__name__}")
    w0 = metric.check_point(w0)
    w1 = metric.check_tangent("w1", w1, w0)
    return w0, w1


def norm(x: torch.Tensor) -> float:
    """The Euclidean norm of the tolerance rules, as a float."""
    return float(torch.linalg.vector_norm(x))


def default_tol(w0: torch.Tensor, w1: torch.Tensor, tau: float | None = None) -> float:
    r"""Default endpoint tolerance :math:`\tau \max(1, \|w_1 - w_0\|)`; by default
    :math:`\tau = 10^{-9}` in float64 and :math:`10^{-5}` otherwise (shooting, which solves for
    the flow's own endpoint, can reach these)."""
    if tau is None:
        tau = 1e-9 if w0.dtype == torch.float64 else 1e-5
    return tau * max(1.0, norm(w1 - w0))


def endpoint_flow(
    metric, w0, w1, v0, *, steps: int, tol: float, solver: str | None = None
) -> GeodesicPath:
    r"""The RK4 flow from :math:`(w_0, v_0)` (``steps`` steps, every one recorded), judged by the
    endpoint rule.

    Returns
    -------
    GeodesicPath
        ``residual`` :math:`= \|\exp_{w_0}(v_0) - w_1\|` (:math:`\infty` when the flow is not
        finite), ``tol``; ``status`` ``CONVERGED`` when ``residual <= tol``, ``NON_FINITE``
        for a flow that blew up, else ``INACCURATE`` (the caller replaces the status and
        message with its own account). ``metadata`` has the flow's speed drift from
        :math:`t=0` to :math:`t=1` and the residual relative to :math:`\|w_1 - w_0\|`.
    """
    path = integrate_geodesic(metric, w0, v0, steps=steps, record=True, method=solver)
    path.tol = tol
    if not path.converged:
        path.residual = math.inf
        path.length = path.energy = math.nan
        path.metadata["relative_residual"] = math.inf
        return path
    residual = norm(path.end - w1)
    ok = math.isfinite(residual) and residual <= tol
    path.residual = residual
    path.status = Status.CONVERGED if ok else Status.INACCURATE
    path.message = "converged" if ok else f"exp(v0) misses w1 by {residual:.2e} > tol {tol:.1e}"
    path.metadata["relative_residual"] = residual / max(norm(w1 - w0), 1e-300)
    with torch.no_grad():
        speed_end = float(metric.norm(path.end, path.velocities[-1]))
    path.metadata["speed_drift_end"] = speed_drift(path.length, speed_end)
    return path
