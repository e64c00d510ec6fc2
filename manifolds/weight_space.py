r"""Weight space as a :class:`geoopt.Manifold` with a task-induced pullback metric.

Points are flat 1-D weight vectors :math:`w \in \mathbb{R}^n`; every tangent space
is :math:`\mathbb{R}^n` with the inner product :math:`\langle u, v\rangle_{g(w)}` of a
:class:`~manifolds.pullback.PullbackMetric`.

Contracts
---------
``retr(x, u) = x + u``
    The first-order exponential map (a retraction: :math:`R_x(0)=x`, :math:`DR_x(0)=I`).
``transp(x, y, v) = v``
    The identity vector transport in the global chart. It is a valid vector
    transport for this retraction (tangent spaces are all :math:`\mathbb{R}^n`), but not
    parallel transport and not an isometry of :math:`g`.
``expmap(x, u)``
    The geodesic flow at :math:`t = 1`: Dormand–Prince 5(4) with adaptive steps to
    ``expmap_tol`` (or RK4 with ``expmap_steps`` fixed steps), by
    :func:`manifolds.geodesic.integrate_geodesic`. A flow that fails (blows up, leaves
    the chart, step size underflow) raises instead of returning a point.
``egrad2rgrad(x, u) = g(x)^{-1} u``
    The natural gradient.
``logmap(x, y)``, ``dist(x, y)``
    The initial velocity and the length of the geodesic from ``x`` to ``y``, by
    Newton shooting (:func:`manifolds.geodesic.shoot`) on the fixed-step RK4 flow. With
    ``expmap_steps`` set, shooting uses the same steps, so ``logmap(x, expmap(x, u)) = u``
    to the shooting tolerance; with adaptive ``expmap`` they agree to the accuracy of the
    two flows. A failed solve raises :class:`~manifolds.validation.NotConvergedError`.

With these, ``geoopt.optim.RiemannianSGD`` takes the natural-gradient step
:math:`w \leftarrow w - \eta\, g(w)^{-1}\nabla L(w)`.

Pickling and copying
--------------------
geoopt keeps the manifold on every :class:`geoopt.ManifoldParameter`, so it
travels with ``pickle``/``torch.save``/``copy.deepcopy`` of the parameter. A
:class:`WeightSpace` holds a network and its task data, which must not travel:
``copy.deepcopy`` shares the manifold (no copy of network or data), and
pickling stores an *unbound* manifold whose metric methods raise until the
parameter gets a new one (``param.manifold = WeightSpace(metric)``).
"""

from __future__ import annotations

import geoopt
import torch
from torch import nn

from .flat import FlatModule
from .geodesic import GeodesicPath, expmap_approximation, integrate_geodesic, shoot
from .pullback import PullbackMetric
from .validation import NotConvergedError

__all__ = ["WeightSpace", "flat_parameter", "write_point"]

#: Fixed RK4 steps of the flow that :meth:`WeightSpace.logmap` shoots on when the manifold's
#: ``expmap`` is adaptive (``shoot``'s own default).
_LOGMAP_STEPS = 32


class WeightSpace(geoopt.Manifold):
    r"""Flat weights with the pullback metric ``metric``.

    Parameters
    ----------
    metric : PullbackMetric
        The metric :math:`g(w)`.
    expmap_tol : float, optional
        Tolerance of the adaptive flow of :meth:`expmap` and :meth:`geodesic` (``rtol =
        atol``; see :func:`~manifolds.geodesic.integrate_geodesic`); default
        :func:`~manifolds.geodesic.default_flow_tol` (1e-8 in float64, 1e-6 in float32).
    expmap_steps : int, optional
        Fixed RK4 steps instead (4 acceleration solves each; not with ``expmap_tol``);
        the error falls as ``steps**-4``.
    logmap_options : dict, optional
        Keyword arguments for :func:`manifolds.geodesic.shoot` used by :meth:`logmap`
        and :meth:`dist` (e.g. ``init="relax"``, ``segments``, ``tol``, ``maxiter``);
        ``steps`` defaults to ``expmap_steps``, else 32.
    """

    name = "WeightSpace"
    ndim = 1
    reversible = False

    def __init__(
        self,
        metric: PullbackMetric | None,
        *,
        expmap_tol: float | None = None,
        expmap_steps: int | None = None,
        logmap_options: dict | None = None,
    ):
        super().__init__()
        if metric is not None and not isinstance(metric, PullbackMetric):
            raise TypeError(f"metric must be a PullbackMetric, got {type(metric).__name__}")
        if logmap_options is not None and not isinstance(logmap_options, dict):
            raise TypeError(f"logmap_options must be a dict, got {type(logmap_options).__name__}")
        if expmap_tol is not None and expmap_steps is not None:
            raise ValueError("give expmap_tol (adaptive steps) or expmap_steps (fixed), not both")
        if expmap_tol is not None and not float(expmap_tol) > 0:
            raise ValueError(f"expmap_tol must be > 0, got {expmap_tol}")
        if expmap_steps is not None and int(expmap_steps) < 1:
            raise ValueError(f"expmap_steps must be >= 1, got {expmap_steps}")
        self._metric = metric
        self.expmap_tol = None if expmap_tol is None else float(expmap_tol)
        self.expmap_steps = None if expmap_steps is None else int(expmap_steps)
        self.logmap_options = dict(logmap_options or {})
        for key in ("strict", "v0"):
            if key in self.logmap_options:
                raise ValueError(
                    f"logmap_options may not set {key!r} (logmap always raises on failure)"
                )

    # -------------------------------------------------------------- plumbing
    @property
    def metric(self) -> PullbackMetric:
        """The pullback metric (raises on a manifold restored from a pickle)."""
        if self._metric is None:
            raise RuntimeError(
                "this WeightSpace was restored from a pickle without its metric (network and "
                "data are never pickled); assign param.manifold = WeightSpace(metric)"
            )
        return self._metric

    def __reduce_ex__(self, protocol):
        return (
            _unbound_weight_space,
            (self.expmap_steps, self.logmap_options, self.expmap_tol),
        )

    def __deepcopy__(self, memo):
        return self

    def extra_repr(self) -> str:
        return repr(self._metric) if self._metric is not None else "unbound"

    def _check_shape(self, shape, name):
        ok = len(shape) == 1
        if self._metric is not None and self._metric.dim is not None:
            ok = ok and shape[0] == self._metric.dim
        return (
            ok,
            None if ok else f"{name} must be a flat vector of the right length, got {tuple(shape)}",
        )

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        ok = bool(torch.isfinite(x).all())
        return ok, None if ok else "point has non-finite entries"

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        ok = bool(torch.isfinite(u).all())
        return ok, None if ok else "vector has non-finite entries"

    # -------------------------------------------------------------- metric
    def inner(self, x, u, v=None, *, keepdim=False) -> torch.Tensor:
        r""":math:`\langle u, v\rangle_{g(x)}`; ``keepdim`` gives shape ``(1,)``."""
        out = self.metric.inner(x, u, v)
        return out.reshape(1) if keepdim else out

    def norm(self, x, u, *, keepdim=False) -> torch.Tensor:
        r""":math:`\|u\|_{g(x)}`."""
        return self.inner(x, u, keepdim=keepdim).clamp_min(0).sqrt()

    def proju(self, x, u) -> torch.Tensor:
        """Identity: every tangent space is the whole of :math:`\\mathbb{R}^n`."""
        return u

    def projx(self, x) -> torch.Tensor:
        """Identity: every finite vector is a point."""
        return x

    def egrad2rgrad(self, x, u) -> torch.Tensor:
        r"""Natural gradient :math:`g(x)^{-1} u` (see :meth:`PullbackMetric.solve`).

        Raises
        ------
        NotConvergedError
            The solve missed its tolerance (its residual and iterations attached). An
            optimizer stepping through this method then writes nothing: a natural gradient
            that was not found is never applied. On a singular metric (damping 0, more
            weights than outputs) the Euclidean gradient has a part the metric cannot see,
            and no solve can meet the tolerance: use damping > 0.
        """
        res = self.metric.solve_result(x, u)
        if not res.converged:
            raise NotConvergedError(
                f"the natural gradient was not found, so no step is taken: {res.message}"
                + ("; the metric is undamped (singular)" if not self.metric.damping else ""),
                res.residual,
                res.iterations,
            )
        return res.x

    # -------------------------------------------------------------- maps
    def retr(self, x, u) -> torch.Tensor:
        """:math:`x + u`."""
        return x + u

    def transp(self, x, y, v) -> torch.Tensor:
        """Identity vector transport in the global chart."""
        return v

    def retr_transp(self, x, u, v):
        """:math:`(x + u, v)`."""
        return x + u, v

    def expmap(self, x, u) -> torch.Tensor:
        r""":math:`\exp_x(u)`: the geodesic flow at :math:`t=1` (adaptive to ``expmap_tol``, or
        ``expmap_steps`` fixed RK4 steps).

        Raises
        ------
        NonFiniteError
            The flow produced NaN or Inf (also a :class:`FloatingPointError`).
        NotConvergedError
            The adaptive flow's step size underflowed or it ran out of steps.
        """
        return self.geodesic(x, u).end

    def expmap_approx(self, x, u, *, order: int = 2) -> torch.Tensor:
        r"""Taylor approximation of :math:`\exp_x(u)`: ``order=1`` is :math:`x+u`,
        ``order=2`` is :math:`x + u - \tfrac12\Gamma_x(u, u)`."""
        x = self.metric.check_point(x)
        return expmap_approximation(self.metric, x, self.metric.check_tangent("u", u, x), order)

    def _geodesic_to(self, x, y) -> GeodesicPath:
        r"""The geodesic from ``x`` to ``y``: a :class:`~manifolds.geodesic.GeodesicPath` from
        :func:`~manifolds.geodesic.shoot` with ``logmap_options`` (raises if it fails)."""
        options = {"steps": self.expmap_steps or _LOGMAP_STEPS} | self.logmap_options
        return shoot(self.metric, x, y, strict=True, **options)

    def logmap(self, x, y) -> torch.Tensor:
        r""":math:`\log_x(y)`, the initial velocity of the geodesic from ``x`` to ``y`` at
        :math:`t = 1`, so that ``expmap(x, logmap(x, y)) = y`` to the shooting tolerance.

        Raises
        ------
        NotConvergedError
            The shooting did not reach its tolerance (message and residual attached);
            try ``logmap_options={"init": "relax"}`` or more ``segments``.
        """
        return self._geodesic_to(x, y).v0

    def dist(self, x, y, *, keepdim=False) -> torch.Tensor:
        r"""Geodesic distance :math:`\|\log_x(y)\|_{g(x)}` (0-D tensor; ``(1,)`` with ``keepdim``).

        It is the length of the geodesic that shooting finds; on a manifold with
        several geodesics between two points that is not necessarily the shortest.
        """
        path = self._geodesic_to(x, y)
        out = torch.tensor(path.length, dtype=path.v0.dtype, device=path.v0.device)
        return out.reshape(1) if keepdim else out

    def geodesic(
        self,
        x,
        u,
        *,
        t1: float = 1.0,
        tol: float | None = None,
        steps: int | None = None,
        record: bool = False,
        speeds: bool = False,
        strict: bool = True,
    ) -> GeodesicPath:
        r"""The geodesic :math:`t \mapsto \exp_x(t u)` on :math:`[0, t_1]`.

        ``tol`` (adaptive steps) or ``steps`` (fixed RK4 steps) override the manifold's
        ``expmap_tol``/``expmap_steps`` for this call. With ``speeds=True`` the result
        carries :math:`\|\dot w\|_g` at each kept point and
        :attr:`~manifolds.geodesic.GeodesicPath.speed_drift`, the speed-conservation
        diagnostic (exactly 0 for an exact geodesic). A flow that fails raises (as
        :meth:`expmap`) unless ``strict=False``, which returns it with its ``status``.
        """
        x = self.metric.check_point(x)
        u = self.metric.check_tangent("u", u, x)
        if tol is None and steps is None:
            tol, steps = self.expmap_tol, self.expmap_steps
        path = integrate_geodesic(
            self.metric, x, u, t1=t1, tol=tol, steps=steps, record=record, speeds=speeds
        )
        return path.raise_if_failed() if strict else path

    def random(self, *size, dtype=None, device=None, **kwargs):
        raise NotImplementedError("WeightSpace has no natural distribution; start from a network")


def _unbound_weight_space(
    expmap_steps: int | None, logmap_options: dict | None = None, expmap_tol: float | None = None
) -> WeightSpace:
    # argument order of the first pickles, which had (expmap_steps, logmap_options)
    return WeightSpace(
        None, expmap_tol=expmap_tol, expmap_steps=expmap_steps, logmap_options=logmap_options
    )


def flat_parameter(module: nn.Module, manifold: WeightSpace) -> geoopt.ManifoldParameter:
    """The module's weights as one flat :class:`geoopt.ManifoldParameter` on ``manifold``.

    All weights form one parameter because the metric couples them (geoopt steps
    each parameter on its own). Evaluate the network at it with a
    :class:`~manifolds.flat.FlatModule` (``manifold.metric.module(param, x)`` for a
    metric built by :meth:`PullbackMetric.from_module`), and write the result
    back with :func:`write_point`.

    Raises
    ------
    ValueError
        The module's architecture differs from the metric's (names the parameter).
    """
    flat = FlatModule(module)
    metric = manifold.metric
    if metric.module is not None:
        metric.module.check_same_architecture(flat)
    elif metric.dim is not None and metric.dim != flat.dim:
        raise ValueError(f"module has {flat.dim} weights, the metric expects {metric.dim}")
    return geoopt.ManifoldParameter(flat.flatten(), manifold=manifold)


def write_point(module: nn.Module, w: torch.Tensor) -> None:
    """Copy the flat point ``w`` into ``module``'s parameters (the flat order of
    ``parameters_to_vector(module.parameters())``)."""
    FlatModule(module).write(w)
