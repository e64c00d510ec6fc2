r"""Geodesics between two points by (multiple) shooting: Newton's method on the exponential map.

Single shooting solves :math:`R(v) = \exp_{w_0}(v) - w_1 = 0` for the initial velocity
:math:`v`, with :math:`\exp` the RK4 flow of :func:`manifolds.integrate_geodesic`.
Multiple shooting with :math:`S` segments adds the states at :math:`t_s = s/S` as
unknowns, :math:`z = (v_0, w_1', v_1', \dots, w_{S-1}', v_{S-1}')`, and asks the flow
:math:`\Phi_{1/S}` of each segment to meet the next one:

.. math::

    R(z) = \bigl(\Phi_{1/S}(w_s', v_s') - (w_{s+1}', v_{s+1}')\bigr)_{s < S-1},\;
    \pi_w \Phi_{1/S}(w_{S-1}', v_{S-1}') - w_1 ,

which is better conditioned on long or strongly curved paths (each segment's flow
is less sensitive to its initial velocity than the whole one).

Newton step :math:`DR(z)\,\delta = -R(z)`, then a backtracking line search on
:math:`\|R\|`. Two ways to get :math:`DR`:

``"dense"``
    The full Jacobian by forward differences of a *batched* flow: the
    :math:`\dim z + 1` initial conditions :math:`z, z + \epsilon e_i` are integrated
    together in one :func:`torch.func.vmap` call of an RK4 on
    :meth:`manifolds.PullbackMetric.dense_acceleration` (dense or
    output-space solve). Each trial point of the line search is evaluated this way,
    so an accepted Newton step costs about one flow. For small :math:`n`. (Forward
    mode through the same flow, :func:`torch.func.jacfwd`, i.e. the variational
    equation, gives the same Newton iterates but measured 2–4x slower: the
    nested transforms' Python overhead dominates at this size. A Jacobian error of
    :math:`O(\sqrt{\epsilon_{mach}})` only perturbs the Newton step, never the
    residual.)
``"krylov"``
    Matrix-free Newton–Krylov: GMRES (:func:`scipy.sparse.linalg.gmres` on a
    :class:`~scipy.sparse.linalg.LinearOperator`) with finite-difference products
    :math:`DR\,d \approx (R(z + \epsilon d) - R(z))/\epsilon`, each one flow of the
    metric's own solver (CG for networks), as in :func:`scipy.optimize.newton_krylov`.
    A forward-mode JVP through the CG loop is not available (it converts residuals
    to Python floats), which is why the difference quotient is used. The inner
    tolerance follows Eisenstat–Walker (choice 2).

The returned :class:`~riemfip.geodesic.path.GeodesicPath` always reports the
single-shooting residual :math:`\|\exp_{w_0}(v_0) - w_1\|` recomputed with
:func:`manifolds.integrate_geodesic` from the final :math:`v_0`, whatever route
found it.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, gmres
from torch.func import vmap

from manifolds import integrate_geodesic

from .endpoints import check_endpoints, default_tol
from .path import GeodesicPath

__all__ = ["shoot"]

_DENSE_MAX_UNKNOWNS = 256


def shoot(
    metric,
    w0: torch.Tensor,
    w1: torch.Tensor,
    *,
    v0: torch.Tensor | None = None,
    init: str = "line",
    steps: int = 32,
    segments: int = 1,
    tol: float | None = None,
    maxiter: int = 30,
    jacobian: str = "auto",
    krylov_maxiter: int = 30,
    line_search: bool = True,
    relax_options: dict | None = None,
    solver: str | None = None,
    strict: bool = False,
    verbose: bool = False,
    callback=None,
) -> GeodesicPath:
    r"""Solve :math:`\exp_{w_0}(v) = w_1` for :math:`v` by Newton shooting.

    Parameters
    ----------
    metric : manifolds.PullbackMetric
        The metric :math:`g`.
    w0, w1 : torch.Tensor
        Endpoints, flat, same dtype and device (the computation runs in these).
    v0 : torch.Tensor, optional
        Initial guess for the initial velocity (e.g. ``path.v0`` of an earlier,
        unfinished solve: this is how a long solve resumes). Overrides ``init``.
    init : {"line", "relax"}
        Initial guess when ``v0`` is not given: the straight line
        (:math:`v = w_1 - w_0`), or the start velocity of a discrete geodesic
        from :func:`~riemfip.geodesic.relax` (``relax_options`` passed on; more
        robust on curved problems).
    steps : int
        RK4 steps of the whole flow on :math:`[0, 1]` (a multiple of ``segments``).
    segments : int
        Number of shooting segments :math:`S` (1: single shooting).
    tol : float, optional
        Tolerance on :math:`\|\exp_{w_0}(v_0) - w_1\|` (Euclidean); default
        :func:`~riemfip.geodesic.endpoints.default_tol`.
    maxiter : int
        Newton iterations.
    jacobian : {"auto", "dense", "krylov"}
        How :math:`DR` is obtained (see the module notes). ``"auto"``: ``"dense"``
        when there are at most 256 unknowns :math:`n(2S - 1)`, else ``"krylov"``.
    krylov_maxiter : int
        GMRES iterations per Newton step (``"krylov"``), each one flow.
    line_search : bool
        Backtrack (halving, up to 10 times) until :math:`\|R\|` decreases.
    relax_options : dict, optional
        Keyword arguments for :func:`~riemfip.geodesic.relax` when ``init="relax"``.
    solver : str, optional
        The metric's solve method for accelerations (``"dense"``, ``"output"``, ``"cg"``).
    strict : bool
        Raise :class:`~manifolds.validation.NotConvergedError` instead of returning
        an unconverged path.
    verbose : bool
        Print one line per Newton iteration.
    callback : callable, optional
        ``callback(iteration, v0, residual_norm)`` after each accepted Newton step,
        with the current initial velocity: save ``v0`` there to checkpoint a long
        solve, and pass it back as ``v0=`` to resume.

    Returns
    -------
    GeodesicPath
        ``steps + 1`` points of the RK4 flow from ``w0`` with the final ``v0``;
        ``length`` :math:`= \|v_0\|_{g(w_0)}` (constant speed), ``energy``
        :math:`= \tfrac12 \|v_0\|^2_{g(w_0)}`; ``metadata`` has the residual history,
        flow count, the speed drift along the path, the route and wall time.

    Raises
    ------
    TypeError, ValueError
        Bad metric, endpoints or options.
    NotConvergedError
        With ``strict=True``, when the residual stays above ``tol``.
    """
    start = time.perf_counter()
    w0, w1 = check_endpoints(metric, w0, w1)
    n = w0.numel()
    steps, segments, maxiter = int(steps), int(segments), int(maxiter)
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    if steps < segments or steps % segments:
        raise ValueError(f"steps ({steps}) must be a positive multiple of segments ({segments})")
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")
    if init not in ("line", "relax"):
        raise ValueError(f"init must be 'line' or 'relax', got {init!r}")
    if jacobian not in ("auto", "dense", "krylov"):
        raise ValueError(f"jacobian must be 'auto', 'dense' or 'krylov', got {jacobian!r}")
    unknowns = n * (2 * segments - 1)
    if jacobian == "auto":
        jacobian = "dense" if unknowns <= _DENSE_MAX_UNKNOWNS else "krylov"
    tol = default_tol(w0, w1) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")

    # ---------------------------------------------------------------- start
    meta: dict = {"steps": steps, "segments": segments, "jacobian": jacobian}
    if v0 is not None:
        v_init = metric.check_tangent("v0", v0, w0)
        meta["init"] = "v0"
    elif init == "relax":
        from .relax import relax

        opts = {"n_points": 8 * segments + 1} | dict(relax_options or {})
        rpath = relax(metric, w0, w1, **opts)
        v_init = rpath.v0
        meta["init"] = "relax"
        meta["relax"] = {
            "iterations": rpath.iterations,
            "residual": rpath.residual,
            "converged": rpath.converged,
            "seconds": rpath.metadata.get("seconds", 0.0),
        }
    else:
        v_init = w1 - w0
        meta["init"] = "line"

    problem = _ShootingProblem(metric, w0, w1, steps, segments, solver, jacobian)
    z = problem.initial_unknowns(v_init)
    history: list[float] = []
    message = (
        "maximum number of Newton iterations reached; raise maxiter, segments or use init='relax'"
    )
    iterations = 0
    try:
        r = problem.residual(z)
        rnorm = _norm(r)
        history.append(rnorm)
        eta_prev, rnorm_prev = 0.1, None
        eta_floor = 10 * math.sqrt(torch.finfo(w0.dtype).eps)
        for it in range(maxiter):
            if problem.defect_ok(rnorm, tol):
                message = "converged"
                break
            iterations = it + 1
            if jacobian == "dense":
                delta = problem.dense_step(r)
                lin = float("nan")
            else:
                if rnorm_prev is None:
                    eta = 0.1
                else:
                    eta = 0.9 * (rnorm / rnorm_prev) ** 2
                    eta = eta if 0.9 * eta_prev**2 <= 0.1 else max(eta, 0.9 * eta_prev**2)
                    eta = min(0.5, max(eta, eta_floor))
                eta_prev = eta
                delta, lin = problem.krylov_step(z, r, eta, krylov_maxiter)
            alpha, z_new, r_new, rnorm_new = 1.0, None, None, math.inf
            blew_up = False
            for _ in range(11 if line_search else 1):
                z_try = z + alpha * delta
                try:
                    r_try = problem.residual(z_try)
                    rn_try = _norm(r_try)
                except FloatingPointError:  # a trial flow that blows up is a step too long
                    r_try, rn_try, blew_up = None, math.inf, True
                if math.isfinite(rn_try) and (
                    rn_try <= (1 - 1e-4 * alpha) * rnorm or not line_search
                ):
                    z_new, r_new, rnorm_new = z_try, r_try, rn_try
                    break
                alpha *= 0.5
            if verbose:
                print(
                    f"shoot {it + 1:3d}: |R| {rnorm:.3e} -> {rnorm_new:.3e}  step {alpha:.3g}  "
                    f"krylov residual {lin:.2e}  flows {problem.flows}"
                )
            if z_new is None:
                message = (
                    "line search failed: no step along the Newton direction reduced the "
                    "residual"
                    + (" (trial flows blew up)" if blew_up else "")
                    + "; try init='relax', more segments or more steps"
                )
                break
            rnorm_prev = rnorm
            z, r, rnorm = z_new, r_new, rnorm_new
            history.append(rnorm)
            if callback is not None:
                callback(iterations, problem.initial_velocity(z), rnorm)
        else:
            if problem.defect_ok(rnorm, tol):
                message = "converged"
    except FloatingPointError as exc:
        message = f"the flow blew up ({exc}); try init='relax', more segments or more steps"

    # ------------------------------------------------------------ the answer
    v_final = problem.initial_velocity(z)
    try:
        path = _path_from_velocity(metric, w0, w1, v_final, steps, solver, tol, start)
    except FloatingPointError as exc:
        path = _blown_up_path(w0, v_final, tol, exc)
    path.iterations = iterations
    path.metadata.update(meta)
    path.metadata.update(
        {
            "defect_history": history,
            "flows": problem.flows,
            "seconds": time.perf_counter() - start,
        }
    )
    if message == "converged" and not path.converged:
        message = (
            f"the segments met (defect {history[-1]:.2e}) but one flow from v0 misses w1 by "
            f"{path.residual:.2e}: the problem is too sensitive for single shooting at this "
            "accuracy; use more steps or relax"
        )
    elif message != "converged" and path.converged:
        message = "converged"
    path.message = message
    if strict:
        path.raise_if_failed()
    return path


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


def _path_from_velocity(metric, w0, w1, v0, steps, solver, tol, start) -> GeodesicPath:
    traj = integrate_geodesic(metric, w0, v0, steps=steps, record=True, method=solver)
    residual = _norm(traj.end - w1)
    with torch.no_grad():
        speed = float(metric.norm(w0, v0))
        speed_end = float(metric.norm(traj.end, traj.velocities[-1]))
    drift = abs(speed_end - speed) / speed if speed > 0 else abs(speed_end)
    ok = bool(math.isfinite(residual) and residual <= tol)
    return GeodesicPath(
        t=traj.t,
        points=traj.points,
        velocities=traj.velocities,
        v0=v0.detach().clone(),
        length=speed,
        energy=0.5 * speed * speed,
        residual=residual,
        tol=tol,
        converged=ok,
        message="converged" if ok else "not converged",
        iterations=0,
        method="shoot",
        metadata={
            "length_rule": "|v0|_g(w0) (constant speed)",
            "speed_drift_end": drift,
            "max_solve_residual": traj.max_solve_residual,
            "relative_residual": residual / max(_norm(w1 - w0), 1e-300),
        },
    )


def _blown_up_path(w0, v0, tol, exc) -> GeodesicPath:
    """The answer when the flow from the final ``v0`` is not finite: ``w0`` and NaN at
    :math:`t = 1`, infinite residual, not converged (never a made-up path)."""
    nan = torch.full_like(w0, math.nan)
    return GeodesicPath(
        t=torch.tensor([0.0, 1.0], dtype=w0.dtype, device=w0.device),
        points=torch.stack([w0, nan]),
        velocities=torch.stack([v0, nan]),
        v0=v0.detach().clone(),
        length=math.nan,
        energy=math.nan,
        residual=math.inf,
        tol=tol,
        converged=False,
        message=f"the flow from v0 blew up ({exc})",
        iterations=0,
        method="shoot",
        metadata={"relative_residual": math.inf},
    )


class _ShootingProblem:
    """The unknowns, residual and Newton steps of (multiple) shooting."""

    def __init__(self, metric, w0, w1, steps, segments, solver, jacobian):
        self.metric, self.w0, self.w1 = metric, w0, w1
        self.jacobian = jacobian
        self.n = w0.numel()
        self.S = segments
        self.seg_steps = steps // segments
        self.solver = solver
        self.flows = 0  # single-segment flows are counted as 1/S

    # -------------------------------------------------------- layout of z
    def initial_unknowns(self, v: torch.Tensor) -> torch.Tensor:
        if self.S == 1:
            return v.clone()
        traj = integrate_geodesic(
            self.metric, self.w0, v, steps=self.seg_steps * self.S, record=True, method=self.solver
        )
        if not bool(torch.isfinite(traj.points).all()):
            ts = torch.arange(self.S, dtype=v.dtype, device=v.device) / self.S
            ws = self.w0 + ts[:, None] * (self.w1 - self.w0)
            vs = (self.w1 - self.w0).expand(self.S, -1)
        else:
            idx = [s * self.seg_steps for s in range(self.S)]
            ws, vs = traj.points[idx], traj.velocities[idx]
        parts = [vs[0]] + [torch.cat([ws[s], vs[s]]) for s in range(1, self.S)]
        return torch.cat(parts)

    def split(self, z):
        n = self.n
        v_first = z[:n]
        rest = z[n:].reshape(self.S - 1, 2 * n) if self.S > 1 else z[:0].reshape(0, 2 * n)
        ws = [self.w0] + [rest[s, :n] for s in range(self.S - 1)]
        vs = [v_first] + [rest[s, n:] for s in range(self.S - 1)]
        return ws, vs

    def initial_velocity(self, z) -> torch.Tensor:
        return z[: self.n].detach().clone()

    # -------------------------------------------------------- residual
    def _assemble(self, ends, ws, vs):
        parts = []
        for s in range(self.S - 1):
            we, ve = ends[s]
            parts.append(we - ws[s + 1])
            parts.append(ve - vs[s + 1])
        parts.append(ends[-1][0] - self.w1)
        return torch.cat(parts)

    def residual(self, z) -> torch.Tensor:
        """:math:`R(z)`; in ``"dense"`` mode also the Jacobian at ``z`` (kept for :meth:`dense_step`)."""
        if self.jacobian == "dense":
            return self._dense_residual_and_jacobian(z)
        ws, vs = self.split(z)
        ends = []
        for w, v in zip(ws, vs, strict=True):
            traj = integrate_geodesic(
                self.metric, w, v, t1=1.0 / self.S, steps=self.seg_steps, method=self.solver
            )
            ends.append((traj.end, traj.velocities[-1]))
        self.flows += 1
        return self._assemble(ends, ws, vs)

    def defect_ok(self, rnorm: float, tol: float) -> bool:
        return math.isfinite(rnorm) and rnorm <= tol

    # -------------------------------------------------------- dense Jacobian
    def _flow(self, w, v):
        dt = 1.0 / (self.S * self.seg_steps)
        for _ in range(self.seg_steps):
            a1 = self.metric.dense_acceleration(w, v)
            a2 = self.metric.dense_acceleration(w + 0.5 * dt * v, v + 0.5 * dt * a1)
            a3 = self.metric.dense_acceleration(
                w + 0.5 * dt * (v + 0.5 * dt * a1), v + 0.5 * dt * a2
            )
            a4 = self.metric.dense_acceleration(w + dt * (v + 0.5 * dt * a2), v + dt * a3)
            w, v = (
                w + dt * v + (dt * dt / 6.0) * (a1 + a2 + a3),
                v + (dt / 6.0) * (a1 + 2 * a2 + 2 * a3 + a4),
            )
        return w, v

    def _residual_differentiable(self, z):
        ws, vs = self.split(z)
        ends = [self._flow(w, v) for w, v in zip(ws, vs, strict=True)]
        return self._assemble(ends, ws, vs)

    def _dense_residual_and_jacobian(self, z) -> torch.Tensor:
        size = z.numel()
        step = math.sqrt(torch.finfo(z.dtype).eps) * (1.0 + _norm(z))
        batch = torch.cat(
            [z.unsqueeze(0), z + step * torch.eye(size, dtype=z.dtype, device=z.device)]
        )
        with torch.no_grad():
            rs = vmap(self._residual_differentiable)(batch)
        self.flows += 1
        if not bool(torch.isfinite(rs).all()):
            raise FloatingPointError("the flow produced non-finite values")
        self._jac = (rs[1:] - rs[0]).T / step
        return rs[0]

    def dense_step(self, r) -> torch.Tensor:
        """Newton step :math:`-DR^{+} R` from the Jacobian of the last evaluated point."""
        return -torch.linalg.lstsq(self._jac, r.unsqueeze(-1)).solution.squeeze(-1)

    # -------------------------------------------------------- Newton-Krylov
    def krylov_step(self, z, r, eta, maxiter) -> tuple[torch.Tensor, float]:
        dtype, device = z.dtype, z.device
        eps = math.sqrt(torch.finfo(dtype).eps)
        znorm = _norm(z)

        def matvec(d_np):
            d = torch.as_tensor(np.asarray(d_np).reshape(-1), dtype=dtype, device=device)
            dn = _norm(d)
            if dn == 0.0:
                return np.zeros_like(d_np)
            step = eps * (1.0 + znorm) / dn
            out = (self.residual(z + step * d) - r) / step
            return out.detach().cpu().double().numpy()

        size = z.numel()
        op = LinearOperator((size, size), matvec=matvec, dtype=np.float64)
        b = -r.detach().cpu().double().numpy()
        seen: list[float] = []
        x, _ = gmres(
            op,
            b,
            rtol=eta,
            atol=0.0,
            restart=maxiter,
            maxiter=1,
            callback=seen.append,
            callback_type="pr_norm",
        )
        lin = seen[-1] if seen else float("nan")
        return torch.as_tensor(x, dtype=dtype, device=device), lin
