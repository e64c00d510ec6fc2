r"""A collocation reference for small :math:`n`: :func:`scipy.integrate.solve_bvp` on the geodesic ODE.

The first-order system :math:`y = (w, v)`, :math:`\dot w = v`,
:math:`\dot v = -\Gamma_w(v, v)` (:meth:`manifolds.PullbackMetric.acceleration`),
with :math:`w(0) = w_0`, :math:`w(1) = w_1`, is solved by scipy's fourth-order
collocation with residual control and mesh refinement. The right-hand side
and its Jacobian are evaluated on the whole mesh at once (:func:`torch.func.vmap` of
:meth:`manifolds.PullbackMetric.dense_acceleration` and its ``jacfwd``),
in float64; it is for checking the other solvers on problems with a handful of
weights, not for networks.

Tolerance rule (the endpoint rule of :mod:`manifolds.geodesic.endpoints`, as for
:func:`~manifolds.geodesic.shoot`): converged when scipy reports success and one RK4 flow of
``steps`` steps from the collocation's :math:`v_0` ends within ``tol`` of :math:`w_1`,
:math:`\|\exp_{w_0}(v_0) - w_1\| \le \text{tol}`; ``tol`` defaults to
:math:`10^{-6}\max(1, \|w_1 - w_0\|)`, looser than shooting's because it compares two
different discretisations (collocation at ``bvp_tol``, RK4 with ``steps`` steps).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.integrate import solve_bvp
from torch.func import jacfwd, vmap

from ..status import Status
from .endpoints import check_endpoints, default_tol, endpoint_flow
from .path import GeodesicPath

__all__ = ["collocation"]

_MAX_DIM = 64

#: scipy's solve_bvp status -> ours: 1 the mesh-size cap, 2 a singular Jacobian, 3 the
#: boundary conditions not met.
_SCIPY_STATUS = {1: Status.MAX_ITERATIONS, 2: Status.BREAKDOWN, 3: Status.BREAKDOWN}


def collocation(
    metric,
    w0: torch.Tensor,
    w1: torch.Tensor,
    *,
    n_nodes: int = 11,
    bvp_tol: float = 1e-8,
    max_nodes: int = 5000,
    init: GeodesicPath | None = None,
    steps: int = 64,
    n_points: int = 65,
    tol: float | None = None,
    strict: bool = False,
) -> GeodesicPath:
    r"""Geodesic from ``w0`` to ``w1`` by :func:`scipy.integrate.solve_bvp`.

    Parameters
    ----------
    metric : manifolds.PullbackMetric
        The metric; at most 64 weights.
    w0, w1 : torch.Tensor
        Endpoints; computations run in float64 on the CPU and the result comes
        back in the endpoints' dtype and device.
    n_nodes : int
        Initial mesh nodes (straight line, constant velocity :math:`w_1 - w_0`).
    bvp_tol : float
        ``solve_bvp``'s relative tolerance on the collocation residuals.
    max_nodes : int
        Mesh size cap.
    init : GeodesicPath, optional
        Initial guess instead of the straight line (its Hermite interpolant's points and
        velocities at ``n_nodes`` times).
    steps : int
        RK4 steps of the endpoint rule's flow.
    n_points : int
        Points of the returned path (from scipy's :math:`C^1` interpolant).
    tol : float, optional
        The endpoint rule: converged when :math:`\|\exp_{w_0}(v_0) - w_1\| \le` ``tol``;
        default :math:`10^{-6}\max(1, \|w_1 - w_0\|)`.
    strict : bool
        Raise :class:`~manifolds.validation.NotConvergedError` on failure.

    Returns
    -------
    GeodesicPath
        ``status`` ``CONVERGED`` needs both scipy's success and the endpoint rule;
        ``MAX_ITERATIONS`` / ``BREAKDOWN`` from scipy's status, ``NON_FINITE``, or
        ``INACCURATE`` (scipy succeeded, the RK4 check did not); ``length``
        :math:`= \|v_0\|_{g(w_0)}`; ``iterations`` is the final mesh size;
        ``metadata["max_rms_residual"]`` is scipy's collocation residual.
    """
    start = time.perf_counter()
    w0, w1 = check_endpoints(metric, w0, w1)
    n = w0.numel()
    if n > _MAX_DIM:
        raise ValueError(
            f"collocation is a reference for small problems (n <= {_MAX_DIM}), got n = {n}; "
            "use shoot or relax"
        )
    if int(n_nodes) < 2:
        raise ValueError(f"n_nodes must be >= 2, got {n_nodes}")
    tol = default_tol(w0, w1, 1e-6) if tol is None else float(tol)
    nodes = np.linspace(0.0, 1.0, int(n_nodes))
    sol = _solve_bvp(metric, w0, w1, nodes, _initial_guess(w0, w1, nodes, init), bvp_tol, max_nodes)
    t = np.linspace(0.0, 1.0, int(n_points))
    ys = sol.sol(t)

    def back(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(dtype=w0.dtype, device=w0.device)

    v0 = back(sol.y[n:, 0])
    finite = bool(np.isfinite(sol.y).all())
    check = endpoint_flow(metric, w0, w1, v0, steps=int(steps), tol=tol) if finite else None
    status, message = _outcome(sol, check, finite)
    path = GeodesicPath(
        t=back(t),
        points=back(ys[:n].T),
        velocities=back(ys[n:].T),
        v0=v0,
        length=check.length if check else float("nan"),
        energy=check.energy if check else float("nan"),
        residual=check.residual if check else float("inf"),
        tol=tol,
        status=status,
        message=message,
        iterations=int(sol.x.size),
        method="collocation",
        metadata={
            "length_rule": "|v0|_g(w0) (constant speed)",
            "max_rms_residual": float(np.max(sol.rms_residuals)) if finite else float("inf"),
            "scipy_status": int(sol.status),
            "steps": int(steps),
            "seconds": time.perf_counter() - start,
        },
    )
    return path.raise_if_failed() if strict else path


def _initial_guess(w0, w1, nodes: np.ndarray, init: GeodesicPath | None) -> np.ndarray:
    """:math:`(w, v)` at the nodes, shape ``(2n, len(nodes))``: the straight line, or ``init``'s
    Hermite interpolant and its derivative."""
    if init is None:
        a, d = w0.double().cpu().numpy(), (w1 - w0).double().cpu().numpy()
        return np.concatenate(
            [a[:, None] + d[:, None] * nodes[None, :], np.repeat(d[:, None], nodes.size, axis=1)]
        )
    tt = torch.as_tensor(nodes, dtype=init.t.dtype, device=init.t.device)
    pts, vel = init.at(tt), init.velocity_at(tt)
    return torch.cat([pts, vel], dim=1).double().cpu().numpy().T


def _solve_bvp(metric, w0, w1, nodes, y0, bvp_tol, max_nodes):
    r""":func:`scipy.integrate.solve_bvp` on :math:`\dot y = (v, a(w, v))` with
    :math:`w(0) = w_0`, :math:`w(1) = w_1`; the right-hand side and its Jacobian batched over
    the mesh by :func:`torch.func.vmap` of the pure dense acceleration."""
    n = w0.numel()
    a, b = w0.detach().double().cpu().numpy(), w1.detach().double().cpu().numpy()

    def rhs(y):
        return torch.cat([y[n:], metric.dense_acceleration(y[:n], y[n:])])

    batched_rhs, batched_jac = vmap(rhs), vmap(jacfwd(rhs))

    def fun(_t, y):
        return batched_rhs(torch.from_numpy(np.ascontiguousarray(y.T))).numpy().T

    def fun_jac(_t, y):
        jac = batched_jac(torch.from_numpy(np.ascontiguousarray(y.T)))
        return np.ascontiguousarray(jac.permute(1, 2, 0).numpy())

    def bc(ya, yb):
        return np.concatenate([ya[:n] - a, yb[:n] - b])

    with torch.no_grad():
        return solve_bvp(fun, bc, nodes, y0, fun_jac=fun_jac, tol=bvp_tol, max_nodes=int(max_nodes))


def _outcome(sol, check: GeodesicPath | None, finite: bool) -> tuple[Status, str]:
    """Status and message from scipy's result and the endpoint rule's check."""
    if not finite:
        return Status.NON_FINITE, f"solve_bvp produced non-finite values ({sol.message})"
    if not sol.success:
        return _SCIPY_STATUS.get(int(sol.status), Status.BREAKDOWN), (
            f"solve_bvp failed: {sol.message}"
        )
    if check.converged:
        return Status.CONVERGED, "converged"
    if check.status == Status.NON_FINITE:
        return Status.NON_FINITE, f"solve_bvp succeeded but the RK4 check blew up ({check.message})"
    return Status.INACCURATE, (
        f"solve_bvp succeeded but exp(v0) misses w1 by {check.residual:.2e} > tol "
        f"{check.tol:.1e}: raise steps or tighten bvp_tol"
    )
