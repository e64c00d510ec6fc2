r"""Geodesics of a pullback metric: the initial- and boundary-value problems, one path type.

The exponential map and its inverse are the manifold's (:meth:`~manifolds.WeightSpace.expmap`,
:meth:`~manifolds.WeightSpace.logmap`); this package holds the solvers behind them. Every
solver returns a :class:`GeodesicPath` with an integer ``status``
(:class:`~manifolds.status.Status`; ``converged`` is ``status == Status.CONVERGED``), a
``residual``, the ``tol`` it was held to and a ``message``; none returns a wrong path
silently (``strict=True`` or :meth:`GeodesicPath.raise_if_failed` raises instead).

Initial-value problem
    :func:`integrate_geodesic`: :math:`\dot w = v`, :math:`\dot v = -\Gamma_w(v, v)` by the
    Runge–Kutta kernel of :mod:`.runge_kutta`: Dormand–Prince 5(4) with adaptive steps
    (``tol``; the default) or RK4 with fixed ``steps``.
Boundary-value problem, :math:`w(0) = w_0`, :math:`w(1) = w_1`
    :func:`shoot`
        Newton (–Krylov) shooting on the fixed-step flow, single or multiple; the accurate
        solver, giving :math:`v_0 = \log_{w_0} w_1`.
    :func:`relax`
        Minimises the discrete path energy of :math:`K` points (:mod:`.energy`; L-BFGS,
        autograd only): robust, no linear solves, a start for :func:`shoot`.
    :func:`relax_minibatches`
        The same energy over data too large for one metric: Adam on minibatch energies
        (:mod:`.minibatch_relax`), stopped when a held-out energy stops improving.
    :func:`collocation`
        :func:`scipy.integrate.solve_bvp` on the geodesic ODE: a reference for a handful
        of weights, to cross-check the others.

Tolerance rules, one per family
-------------------------------
flow (adaptive ``integrate_geodesic``)
    Every accepted step's local error estimate :math:`e` over :math:`(w, v)` satisfies
    :math:`\|e / (\text{atol} + \text{rtol}\max(|y|, |y'|))\|_{\rm rms} \le 1` with
    ``rtol = atol = tol`` (default :math:`10^{-8}` in float64, :math:`10^{-6}` in float32);
    ``residual`` is the largest :math:`\|e/(1 + |y|)\|_{\rm rms}` of an accepted step, so
    ``residual <= tol``; and the speed :math:`\|v\|_g` at :math:`t_1` is within
    :math:`\sqrt{\text{tol}}` of its value at 0, relatively (else ``INACCURATE``). Fixed
    steps have no estimate (``residual`` NaN).
shooting and collocation: the endpoint rule
    Converged when one fixed-step RK4 flow from the answer's :math:`v_0` ends within ``tol``
    of :math:`w_1`: :math:`\|\exp_{w_0}(v_0) - w_1\| \le \text{tol}` (Euclidean), with
    ``tol`` :math:`= \tau\max(1, \|w_1 - w_0\|)` by default, :math:`\tau = 10^{-9}`
    (float64) or :math:`10^{-5}` for :func:`shoot`, :math:`\tau = 10^{-6}` for
    :func:`collocation`.
minibatch relaxation: the held-out rule
    Converged when the best energy on a fixed evaluation set over the last ``patience``
    epochs improves on the best before them by at most ``rtol``, relatively.
relax: the gradient rule
    Converged when the Euclidean norm of the gradient of the discrete energy over the
    interior points is at most ``tol``, by default :math:`\tau\max(1, \|\nabla E(\text{start})\|)`,
    :math:`\tau = 10^{-6}` (float64) or :math:`10^{-4}`.
"""

from .collocation import collocation
from .endpoints import check_endpoints, default_tol, endpoint_flow
from .energy import (
    chord_energy,
    chord_lengths,
    discrete_energy,
    feature_chord_lengths,
    midpoint_speeds,
)
from .flow import MetricAcceleration, default_flow_tol, expmap_approximation, integrate_geodesic
from .minibatch_relax import Minibatch, full_data_energy, relax_minibatches
from .path import GeodesicPath, NonFiniteError, hermite
from .relax import relax
from .runge_kutta import ButcherTableau, fixed_step_flow, rk_step
from .shooting import shoot

__all__ = [
    "ButcherTableau",
    "GeodesicPath",
    "MetricAcceleration",
    "Minibatch",
    "NonFiniteError",
    "check_endpoints",
    "chord_energy",
    "chord_lengths",
    "collocation",
    "default_flow_tol",
    "default_tol",
    "discrete_energy",
    "endpoint_flow",
    "expmap_approximation",
    "feature_chord_lengths",
    "fixed_step_flow",
    "full_data_energy",
    "hermite",
    "integrate_geodesic",
    "midpoint_speeds",
    "relax",
    "relax_minibatches",
    "rk_step",
    "shoot",
]
