"""Mode connectivity: geodesics between trained networks and the baselines they are judged by.

``connect``
    The geodesic between two networks in the task-induced pullback metric.
``fit_bezier``
    Garipov et al.'s quadratic Bézier curve (the standard baseline); ``straight_line`` the other.
``compare_paths``
    Loss, accuracy, barrier, max error and lengths along several paths, as a
    ``ConnectivityReport`` with ``to_json`` and a PNG ``plot``.
"""

from .bezier import QuadraticBezier, fit_bezier, garipov_learning_rate
from .connect import connect, connection_metric
from .evaluation import (
    ConnectivityReport,
    PathEvaluation,
    as_path,
    compare_paths,
    evaluate_path,
    path_energy,
    straight_line,
)

__all__ = [
    "ConnectivityReport",
    "PathEvaluation",
    "QuadraticBezier",
    "as_path",
    "compare_paths",
    "connect",
    "connection_metric",
    "evaluate_path",
    "fit_bezier",
    "garipov_learning_rate",
    "path_energy",
    "straight_line",
]
