r"""Checks and tolerances shared by the boundary-value solvers.

The boundary-value problem: find a geodesic :math:`w(t)`, :math:`t \in [0, 1]`, with
:math:`w(0) = w_0` and :math:`w(1) = w_1`.
"""

from __future__ import annotations

import torch

from manifolds import PullbackMetric

__all__ = ["check_endpoints", "default_tol"]


def check_endpoints(metric, w0, w1) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the metric and both endpoints; return them detached.

    Raises
    ------
    TypeError
        ``metric`` is not a :class:`~manifolds.PullbackMetric`; an endpoint is not a
        floating tensor; dtypes differ.
    ValueError
        Shapes, lengths or devices differ; NaN/Inf.
    """
    if not isinstance(metric, PullbackMetric):
        raise TypeError(f"metric must be a manifolds.PullbackMetric, got {type(metric).__name__}")
    w0 = metric.check_point(w0)
    w1 = metric.check_tangent("w1", w1, w0)
    return w0, w1


def default_tol(w0: torch.Tensor, w1: torch.Tensor) -> float:
    r"""Default endpoint tolerance: :math:`\tau \max(1, \|w_1 - w_0\|)` with
    :math:`\tau = 10^{-9}` in float64 and :math:`10^{-5}` otherwise."""
    scale = max(1.0, float(torch.linalg.vector_norm(w1 - w0)))
    return (1e-9 if w0.dtype == torch.float64 else 1e-5) * scale
