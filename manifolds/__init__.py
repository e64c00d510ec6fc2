"""Geometry of weight space: output metrics, the pullback metric, the WeightSpace manifold,
and its geodesics (:mod:`manifolds.geodesic`: the flow behind exp, the boundary-value
solvers behind log, one :class:`GeodesicPath`).

Nothing here imports :mod:`riemfip`; data flows one way, from a batch through
:class:`PullbackMetric` to :class:`WeightSpace` and its geodesics, and on to the
optimizers and applications in :mod:`riemfip`.
"""

import warnings

with warnings.catch_warnings():
    # geoopt 0.5.1 and torch's own forward-AD decompositions (imported lazily on the first
    # jvp) call torch.jit.script, which torch >= 2.9 deprecates with a FutureWarning per
    # call; the warning is theirs, not the user's, to act on, so load both quietly here.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import geoopt  # noqa: F401

    try:
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    except ImportError:  # a torch without this private module has nothing to silence
        pass

from .conjugate_gradient import SolveResult, conjugate_gradient
from .flat import FlatModule
from .geodesic import GeodesicPath, NonFiniteError, expmap_approximation, integrate_geodesic
from .gram import OutputGram
from .jacobian import AutogradJacobian, JacobianOperator
from .kronecker_metric import KroneckerMetric
from .output_metrics import Bhattacharyya, Euclidean, OutputMetric, SoftmaxFisher, get_output_metric
from .precision import MixedPrecision
from .pullback import PullbackMetric
from .spectrum import Spectrum, lanczos
from .status import Status
from .task_data import as_batches
from .validation import ConvergenceWarning, NotConvergedError
from .weight_space import WeightSpace, flat_parameter, write_point

__all__ = [
    "AutogradJacobian",
    "Bhattacharyya",
    "ConvergenceWarning",
    "Euclidean",
    "FlatModule",
    "GeodesicPath",
    "JacobianOperator",
    "KroneckerMetric",
    "MixedPrecision",
    "NonFiniteError",
    "NotConvergedError",
    "OutputGram",
    "OutputMetric",
    "PullbackMetric",
    "SoftmaxFisher",
    "SolveResult",
    "Spectrum",
    "Status",
    "WeightSpace",
    "as_batches",
    "conjugate_gradient",
    "expmap_approximation",
    "flat_parameter",
    "get_output_metric",
    "integrate_geodesic",
    "lanczos",
    "write_point",
]


def __getattr__(name: str):
    # GeodesicTrajectory was the flow's own path type; the flow now returns a GeodesicPath.
    if name == "GeodesicTrajectory":
        warnings.warn(
            "manifolds.GeodesicTrajectory is now manifolds.GeodesicPath",
            DeprecationWarning,
            stacklevel=2,
        )
        return GeodesicPath
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
