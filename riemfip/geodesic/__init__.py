r"""Geodesic boundary-value solvers, re-exported from :mod:`manifolds.geodesic`.

The solvers are the geometry's (the exponential map and its inverse are
:class:`~manifolds.WeightSpace`'s): they live in :mod:`manifolds.geodesic`, with the
tolerance rule of each solver family in its package docstring. This name keeps
``from riemfip.geodesic import shoot, relax, collocation, GeodesicPath, discrete_energy``
working.
"""

from manifolds.geodesic import GeodesicPath, collocation, discrete_energy, relax, shoot

__all__ = [
    "GeodesicPath",
    "collocation",
    "discrete_energy",
    "relax",
    "shoot",
]
