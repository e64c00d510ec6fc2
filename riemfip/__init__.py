"""riemfip: Riemannian optimization in the weight space of neural networks.

The geometry (output metrics, :class:`~manifolds.PullbackMetric`,
:class:`~manifolds.WeightSpace`) lives in the sibling package :mod:`manifolds`;
this package holds what is done with it:

:mod:`riemfip.geodesic`
    The boundary-value solvers of :mod:`manifolds.geodesic` (``shoot``, ``relax``,
    ``collocation``, each returning a ``GeodesicPath``), re-exported.
:mod:`riemfip.connectivity`
    :func:`connect` two trained networks by a geodesic and compare it with the
    straight line and a Bézier curve.
:mod:`riemfip.optim`
    The :class:`~riemfip.optim.FIP` optimizer (functionally invariant paths).
:mod:`riemfip.applications`
    Continual learning, sparsification, adversarially robust ensembles.
:mod:`riemfip.data`
    Offline datasets and task builders.
"""

from . import data, geodesic, optim
from .connectivity import connect
from .geodesic import GeodesicPath

__version__ = "0.1.0"

__all__ = ["GeodesicPath", "connect", "data", "geodesic", "optim", "__version__"]
