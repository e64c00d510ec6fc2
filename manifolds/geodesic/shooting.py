r"""Geodesics between two points by (multiple) shooting: Newton's method on the exponential map.

Single shooting solves :math:`R(v) = \exp_{w_0}(v) - w_1 = 0` for the initial velocity
:math:`v`, with :math:`\exp` the fixed-step RK4 flow of
:func:`~manifolds.geodesic.integrate_geodesic` (fixed steps, so that :math:`R` is a smooth
function of :math:`v`).
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
    together in one :func:`torch.func.vmap` call of the RK4 flow
    (:func:`~manifolds.geodesic.runge_kutta.fixed_step_flow`) on
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

Tolerance rule (the endpoint rule of :mod:`manifolds.geodesic.endpoints`): the solve has
converged when one RK4 flow of ``steps`` steps from the final :math:`v_0` ends within ``tol``
of :math:`w_1`, :math:`\|\exp_{w_0}(v_0) - w_1\| \le \text{tol}`, whatever route found
:math:`v_0`; ``tol`` defaults to :math:`\tau\max(1, \|w_1 - w_0\|)`, :math:`\tau = 10^{-9}`
in float64 and :math:`10^{-5}` otherwise. Newton itself stops when the defect
:math:`\|R(z)\|` meets ``tol``; segments that meet while the one flow misses end as
``INACCURATE``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, gmres
from torch.func import vmap

from ..status import Status
from .endpoints import check_endpoints, default_tol, endpoint_flow, norm
from .flow import integrate_geodesic
from .path import GeodesicPath
from .relax import relax
from .runge_kutta import fixed_step_flow

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
        from :func:`~manifolds.geodesic.relax` (``relax_options`` passed on; more
        robust on curved problems).
    steps : int
        RK4 steps of the whole flow on :math:`[0, 1]` (a multiple of ``segments``).
    segments : int
        Number of shooting segments :math:`S` (1: single shooting).
    tol : float, optional
        The endpoint rule: converged when :math:`\|\exp_{w_0}(v_0) - w_1\| \le` ``tol``
        (Euclidean, one RK4 flow of ``steps`` steps); default
        :math:`\tau\max(1, \|w_1 - w_0\|)`, :math:`\tau = 10^{-9}` in float64 and
        :math:`10^{-5}` otherwise (:func:`~manifolds.geodesic.endpoints.default_tol`).
    maxiter : int
        Newton iterations.
    jacobian : {"auto", "dense", "krylov"}
        How :math:`DR` is obtained (see the module notes). ``"auto"``: ``"dense"``
        when there are at most 256 unknowns :math:`n(2S - 1)`, else ``"krylov"``; always
        ``"krylov"`` for a metric whose task data is split over a process group
        (:mod:`manifolds.data_parallel`), which ``"dense"`` refuses (``ValueError``): its
        flows use the metric's CG route, every reduction all-reduced, and every rank
        computes the Newton iterates of one process on the union of the shards (to rounding).
    krylov_maxiter : int
        GMRES iterations per Newton step (``"krylov"``), each one flow.
    line_search : bool
        Backtrack (halving, up to 10 times) until :math:`\|R\|` decreases.
    relax_options : dict, optional
        Keyword arguments for :func:`~manifolds.geodesic.relax` when ``init="relax"``.
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
        :math:`= \tfrac12 \|v_0\|^2_{g(w_0)}`; ``status`` ``CONVERGED``,
        ``MAX_ITERATIONS``, ``BREAKDOWN`` (the line search found no decrease),
        ``NON_FINITE`` (the flow blew up; ``residual`` is then :math:`\infty` and the
        path ends in NaN) or ``INACCURATE`` (the segments met, the one flow misses);
        ``metadata`` has the defect history, flow count, the speed drift along the path,
        the route and wall time.

    Raises
    ------
    TypeError, ValueError
        Bad metric, endpoints or options.
    NotConvergedError
        With ``strict=True``, when the solve did not converge
        (:class:`~manifolds.geodesic.NonFiniteError` when the flow blew up).
    """
    start = time.perf_counter()
    w0, w1 = check_endpoints(metric, w0, w1)
    steps, segments, maxiter = int(steps), int(segments), int(maxiter)
    _check_options(steps, segments, maxiter, init, jacobian)
    if jacobian == "auto":
        unknowns = w0.numel() * (2 * segments - 1)
        small = unknowns <= _DENSE_MAX_UNKNOWNS
        # the dense route needs the whole output Jacobian in one process
        split = getattr(metric, "data_parallel", None) is not None
        jacobian = "dense" if small and not split else "krylov"
    tol = default_tol(w0, w1) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")

    meta: dict = {"steps": steps, "segments": segments, "jacobian": jacobian}
    v_init = _initial_velocity(metric, w0, w1, v0, init, segments, relax_options, meta)
    problem = _ShootingProblem(metric, w0, w1, steps, segments, solver, jacobian)
    newton = _Newton(problem, tol, krylov_maxiter, line_search, verbose, callback)
    newton.run(problem.initial_unknowns(v_init), maxiter)

    path = endpoint_flow(
        metric, w0, w1, problem.initial_velocity(newton.z), steps=steps, tol=tol, solver=solver
    )
    path.status, path.message = _outcome(newton, path)
    path.method = "shoot"
    path.iterations = newton.iterations
    path.metadata.update(meta)
    path.metadata.update(
        {
            "defect_history": newton.history,
            "flows": problem.flows,
            "seconds": time.perf_counter() - start,
        }
    )
    return path.raise_if_failed() if strict else path


def _check_options(steps: int, segments: int, maxiter: int, init: str, jacobian: str) -> None:
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


def _initial_velocity(metric, w0, w1, v0, init, segments, relax_options, meta) -> torch.Tensor:
    """The start of Newton's iteration: ``v0``, the relaxed path's or the straight line's."""
    if v0 is not None:
        meta["init"] = "v0"
        return metric.check_tangent("v0", v0, w0)
    if init == "line":
        meta["init"] = "line"
        return w1 - w0
    options = {"n_points": 8 * segments + 1} | dict(relax_options or {})
    rpath = relax(metric, w0, w1, **options)
    meta["init"] = "relax"
    meta["relax"] = {
        "iterations": rpath.iterations,
        "residual": rpath.residual,
        "status": int(rpath.status),
        "converged": rpath.converged,
        "seconds": rpath.metadata.get("seconds", 0.0),
    }
    return rpath.v0


def _outcome(newton: _Newton, path: GeodesicPath) -> tuple[Status, str]:
    """The status and message of the solve: Newton's account, checked against the endpoint
    rule applied to one flow from the final :math:`v_0`."""
    if newton.status == Status.CONVERGED and not path.converged:
        if path.status == Status.NON_FINITE:
            return Status.NON_FINITE, f"the flow from v0 blew up ({path.message})"
        return Status.INACCURATE, (
            f"the segments met (defect {newton.history[-1]:.2e}) but one flow from v0 misses w1 "
            f"by {path.residual:.2e}: the problem is too sensitive for single shooting at this "
            "accuracy; use more steps or relax"
        )
    if path.converged:
        return Status.CONVERGED, "converged"
    return newton.status, newton.message


class _Newton:
    r"""Damped Newton (or Newton–Krylov) on :math:`R(z) = 0` with a backtracking line search.

    After :meth:`run`, ``z`` is the last accepted iterate, ``status``/``message`` how the
    iteration ended (``CONVERGED`` when :math:`\|R(z)\| \le` tol), ``history`` the defects.
    """

    def __init__(self, problem, tol, krylov_maxiter, line_search, verbose, callback):
        self.problem, self.tol = problem, tol
        self.krylov_maxiter, self.line_search = int(krylov_maxiter), bool(line_search)
        self.verbose, self.callback = verbose, callback
        self.status = Status.MAX_ITERATIONS
        self.message = (
            "maximum number of Newton iterations reached; raise maxiter, segments or use "
            "init='relax'"
        )
        self.iterations, self.history = 0, []

    def _met(self, rnorm: float) -> bool:
        return math.isfinite(rnorm) and rnorm <= self.tol

    def run(self, z: torch.Tensor, maxiter: int) -> None:
        """Iterate from ``z``; a flow that blows up outside the line search ends the run."""
        self.z = z
        try:
            self._iterate(maxiter)
        except FloatingPointError as exc:
            self.status = Status.NON_FINITE
            self.message = (
                f"the flow blew up ({exc}); try init='relax', more segments or more steps"
            )

    def _iterate(self, maxiter: int) -> None:
        problem = self.problem
        r = problem.residual(self.z)
        rnorm = norm(r)
        self.history.append(rnorm)
        forcing = _Forcing(self.z.dtype)
        for it in range(maxiter):
            if self._met(rnorm):
                break
            self.iterations = it + 1
            if problem.jacobian == "dense":
                delta, lin = problem.dense_step(r), float("nan")
            else:
                delta, lin = problem.krylov_step(self.z, r, forcing(rnorm), self.krylov_maxiter)
            z_new, r_new, rn_new, alpha, blew_up = self._search(delta, rnorm)
            if self.verbose:
                print(
                    f"shoot {it + 1:3d}: |R| {rnorm:.3e} -> {rn_new:.3e}  step {alpha:.3g}  "
                    f"krylov residual {lin:.2e}  flows {problem.flows}"
                )
            if z_new is None:
                self.status = Status.BREAKDOWN
                self.message = (
                    "line search failed: no step along the Newton direction reduced the residual"
                    + (" (trial flows blew up)" if blew_up else "")
                    + "; try init='relax', more segments or more steps"
                )
                return
            self.z, r, rnorm = z_new, r_new, rn_new
            self.history.append(rnorm)
            if self.callback is not None:
                self.callback(self.iterations, problem.initial_velocity(self.z), rnorm)
        if self._met(rnorm):
            self.status, self.message = Status.CONVERGED, "converged"

    def _search(self, delta, rnorm):
        r"""Halve the step (up to 10 times) until :math:`\|R\|` decreases enough; a trial flow
        that blows up counts as a step too long."""
        alpha, blew_up = 1.0, False
        for _ in range(11 if self.line_search else 1):
            z_try = self.z + alpha * delta
            try:
                r_try = self.problem.residual(z_try)
                rn_try = norm(r_try)
            except FloatingPointError:
                r_try, rn_try, blew_up = None, math.inf, True
            if math.isfinite(rn_try) and (
                rn_try <= (1 - 1e-4 * alpha) * rnorm or not self.line_search
            ):
                return z_try, r_try, rn_try, alpha, blew_up
            alpha *= 0.5
        return None, None, math.inf, alpha, blew_up


class _Forcing:
    """Eisenstat–Walker forcing terms (choice 2) for the inner GMRES tolerance."""

    def __init__(self, dtype: torch.dtype):
        self.floor = 10 * math.sqrt(torch.finfo(dtype).eps)
        self.eta, self.rnorm = 0.1, None

    def __call__(self, rnorm: float) -> float:
        if self.rnorm is not None:
            eta = 0.9 * (rnorm / self.rnorm) ** 2
            safeguard = 0.9 * self.eta**2
            eta = eta if safeguard <= 0.1 else max(eta, safeguard)
            self.eta = min(0.5, max(eta, self.floor))
        self.rnorm = rnorm
        return self.eta


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
        if not traj.converged:  # a start whose flow blows up: the straight line instead
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
            if not traj.converged:
                raise FloatingPointError(traj.message)
            ends.append((traj.end, traj.velocities[-1]))
        self.flows += 1
        return self._assemble(ends, ws, vs)

    # -------------------------------------------------------- dense Jacobian
    def _residual_differentiable(self, z):
        """:math:`R(z)` through the pure RK4 flow of the dense acceleration (vmap-able)."""
        ws, vs = self.split(z)
        ends = [
            fixed_step_flow(self.metric.dense_acceleration, w, v, 1.0 / self.S, self.seg_steps)
            for w, v in zip(ws, vs, strict=True)
        ]
        return self._assemble(ends, ws, vs)

    def _dense_residual_and_jacobian(self, z) -> torch.Tensor:
        size = z.numel()
        step = math.sqrt(torch.finfo(z.dtype).eps) * (1.0 + norm(z))
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
        znorm = norm(z)

        def matvec(d_np):
            d = torch.as_tensor(np.asarray(d_np).reshape(-1), dtype=dtype, device=device)
            dn = norm(d)
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
