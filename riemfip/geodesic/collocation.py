r"""A collocation reference for small :math:`n`: :func:`scipy.integrate.solve_bvp` on the geodesic ODE.

The first-order system :math:`y = (w, v)`, :math:`\dot w = v`,
:math:`\dot v = -\Gamma_w(v, v)` (:meth:`manifolds.PullbackMetric.acceleration`),
with :math:`w(0) = w_0`, :math:`w(1) = w_1`, is solved by scipy's fourth-order
collocation with residual control and mesh refinement. The right-hand side
and its Jacobian are evaluated on the whole mesh at once (:func:`torch.func.vmap` of
:meth:`manifolds.PullbackMetric.dense_acceleration` and its ``jacfwd``),
in float64; it is for checking the other solvers on problems with a handful of
weights, not for networks.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from scipy.integrate import solve_bvp
from torch.func import jacfwd, vmap

from manifolds import integrate_geodesic

from .endpoints import check_endpoints
from .path import GeodesicPath

__all__ = ["collocation"]

_MAX_DIM = 64


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
        Initial guess instead of the straight line (its points and velocities
        at ``n_nodes`` times).
    steps : int
        RK4 steps of the independent check :math:`\|\exp_{w_0}(v_0) - w_1\|`.
    n_points : int
        Points of the returned path (from scipy's :math:`C^1` interpolant).
    tol : float, optional
        Tolerance of that check, default :math:`10^{-6}\max(1, \|w_1 - w_0\|)`: it
        compares two different discretisations (collocation at ``bvp_tol``, RK4
        with ``steps`` steps), so it cannot be tighter than the larger of their errors.
    strict : bool
        Raise :class:`~manifolds.validation.NotConvergedError` on failure.

    Returns
    -------
    GeodesicPath
        ``converged`` needs both scipy's success and the RK4 endpoint check;
        ``length`` :math:`= \|v_0\|_{g(w_0)}`; ``iterations`` is the final mesh size;
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
    tol = 1e-6 * max(1.0, float(torch.linalg.vector_norm(w1 - w0))) if tol is None else float(tol)
    out_dtype, out_device = w0.dtype, w0.device
    a = w0.detach().double().cpu()
    b = w1.detach().double().cpu()

    def rhs(y):
        return torch.cat([y[n:], metric.dense_acceleration(y[:n], y[n:])])

    batched_rhs, batched_jac = vmap(rhs), vmap(jacfwd(rhs))

    def fun(_t, y):
        return batched_rhs(torch.from_numpy(np.ascontiguousarray(y.T))).numpy().T

    def fun_jac(_t, y):
        jac = batched_jac(torch.from_numpy(np.ascontiguousarray(y.T)))
        return np.ascontiguousarray(jac.permute(1, 2, 0).numpy())

    def bc(ya, yb):
        return np.concatenate([ya[:n] - a.numpy(), yb[:n] - b.numpy()])

    nodes = np.linspace(0.0, 1.0, int(n_nodes))
    if init is None:
        y0 = np.concatenate(
            [
                a.numpy()[:, None] + (b - a).numpy()[:, None] * nodes[None, :],
                np.repeat((b - a).numpy()[:, None], nodes.size, axis=1),
            ]
        )
    else:
        tt = torch.as_tensor(nodes, dtype=init.t.dtype, device=init.t.device)
        pts = init.at(tt).double().cpu().numpy().T
        vel = np.stack([_hermite_velocity(init, float(s)) for s in nodes], axis=1)
        y0 = np.concatenate([pts, vel])

    with torch.no_grad():
        sol = solve_bvp(fun, bc, nodes, y0, fun_jac=fun_jac, tol=bvp_tol, max_nodes=int(max_nodes))
    t = np.linspace(0.0, 1.0, int(n_points))
    ys = sol.sol(t)
    points = torch.from_numpy(np.ascontiguousarray(ys[:n].T)).to(out_dtype).to(out_device)
    velocities = torch.from_numpy(np.ascontiguousarray(ys[n:].T)).to(out_dtype).to(out_device)
    v0 = torch.from_numpy(sol.y[n:, 0].copy()).to(out_dtype).to(out_device)

    finite = bool(np.isfinite(sol.y).all())
    residual = math.inf
    speed = math.nan
    if finite:
        traj = integrate_geodesic(metric, w0, v0, steps=steps)
        residual = float(torch.linalg.vector_norm(traj.end - w1))
        speed = float(metric.norm(w0, v0))
    converged = bool(sol.success and residual <= tol)
    if converged:
        message = "converged"
    elif not sol.success:
        message = f"solve_bvp failed: {sol.message}"
    else:
        message = (
            f"solve_bvp succeeded but exp(v0) misses w1 by {residual:.2e} > tol {tol:.1e}: "
            "raise steps or tighten bvp_tol"
        )
    path = GeodesicPath(
        t=torch.as_tensor(t, dtype=out_dtype, device=out_device),
        points=points,
        velocities=velocities,
        v0=v0,
        length=speed,
        energy=0.5 * speed * speed,
        residual=residual,
        tol=tol,
        converged=converged,
        message=message,
        iterations=int(sol.x.size),
        method="collocation",
        metadata={
            "length_rule": "|v0|_g(w0) (constant speed)",
            "max_rms_residual": float(np.max(sol.rms_residuals)) if finite else math.inf,
            "scipy_status": int(sol.status),
            "steps": int(steps),
            "seconds": time.perf_counter() - start,
        },
    )
    if strict:
        path.raise_if_failed()
    return path


def _hermite_velocity(path: GeodesicPath, s: float) -> np.ndarray:
    """Derivative of :meth:`GeodesicPath.at` at time ``s``."""
    tk = path.t.double().cpu()
    k = int(torch.searchsorted(tk, torch.tensor([s], dtype=tk.dtype), right=True)) - 1
    k = min(max(k, 0), tk.numel() - 2)
    h = float(tk[k + 1] - tk[k])
    u = min(max((s - float(tk[k])) / h, 0.0), 1.0)
    p0, p1 = path.points[k].double().cpu(), path.points[k + 1].double().cpu()
    m0, m1 = path.velocities[k].double().cpu(), path.velocities[k + 1].double().cpu()
    d = (
        (6 * u * u - 6 * u) * p0 / h
        + (3 * u * u - 4 * u + 1) * m0
        + (-6 * u * u + 6 * u) * p1 / h
        + (3 * u * u - 2 * u) * m1
    )
    return d.numpy()
