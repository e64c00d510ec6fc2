"""Geometry of weight space: output metrics, the pullback metric, the WeightSpace manifold.

Nothing here imports :mod:`riemfip`; data flows one way, from a batch through
:class:`PullbackMetric` to :class:`WeightSpace` and on to the solvers and
optimizers in :mod:`riemfip`.
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
from .geodesic_flow import GeodesicTrajectory, expmap_approximation, integrate_geodesic
from .kronecker_metric import KroneckerMetric
from .output_metrics import Bhattacharyya, Euclidean, OutputMetric, SoftmaxFisher, get_output_metric
from .pullback import PullbackMetric, as_batches
from .validation import ConvergenceWarning, NotConvergedError
from .weight_space import WeightSpace, flat_parameter, write_point

__all__ = [
    "Bhattacharyya",
    "ConvergenceWarning",
    "Euclidean",
    "FlatModule",
    "GeodesicTrajectory",
    "KroneckerMetric",
    "NotConvergedError",
    "OutputMetric",
    "PullbackMetric",
    "SoftmaxFisher",
    "SolveResult",
    "WeightSpace",
    "as_batches",
    "conjugate_gradient",
    "expmap_approximation",
    "flat_parameter",
    "get_output_metric",
    "integrate_geodesic",
    "write_point",
]
