r"""Geodesic boundary-value problems in weight space: the path from :math:`w_0` to :math:`w_1`.

Three solvers, one result type:

:func:`shoot`
    Newton (–Krylov) shooting on the exponential map, single or multiple; the
    accurate solver, giving :math:`v_0 = \log_{w_0} w_1`.
:func:`relax`
    Minimises the discrete path energy of :math:`K` points (L-BFGS, autograd only):
    robust, no linear solves, a start for :func:`shoot`.
:func:`collocation`
    :func:`scipy.integrate.solve_bvp` on the geodesic ODE: a reference for a handful
    of weights, used to cross-check the others.

Each returns a :class:`GeodesicPath` with ``converged``, ``residual`` and
``message``; none returns a wrong path silently (``strict=True`` raises instead).
"""

from .collocation import collocation
from .path import GeodesicPath
from .relax import discrete_energy, relax
from .shooting import shoot

__all__ = [
    "GeodesicPath",
    "collocation",
    "discrete_energy",
    "relax",
    "shoot",
]
