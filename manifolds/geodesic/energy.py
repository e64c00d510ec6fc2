r"""Lengths and energies of a discrete path :math:`w_0, \dots, w_{K-1}` at times :math:`t_0 < \dots < t_{K-1}`.

With :math:`F` the metric's embedding (:meth:`~manifolds.PullbackMetric.embed`, so that
:math:`g = J_F^\top J_F + \lambda I`), the energy
:math:`\tfrac12\int \dot w^\top g(w)\,\dot w\,dt` of the path is discretised chord by chord:

.. math::

    E = \frac12 \sum_{k=0}^{K-2}
        \frac{\|F(w_{k+1}) - F(w_k)\|^2 + \lambda \|w_{k+1} - w_k\|^2}{t_{k+1} - t_k}.

For uniform times on :math:`[0, 1]` this is the objective that
:func:`~manifolds.geodesic.relax` minimises; with the path's own times it compares any two
paths with the same endpoints (a geodesic minimises it). A chord of the curved image
:math:`F(w(t))` is shorter than its arc, so :math:`E` slightly under-estimates the
continuous energy, by :math:`O(K^{-2})`.

The midpoint rule measures each segment with the metric itself instead:
:math:`s_k = \|w_{k+1} - w_k\|_{g(\bar w_k)}` at :math:`\bar w_k = \tfrac12(w_k + w_{k+1})`,
length :math:`\sum_k s_k` and energy :math:`\tfrac12\sum_k s_k^2/(t_{k+1} - t_k)`, the same
chord formula with :math:`s_k` in place of the embedded chords and no damping term.

Data parallelism: for a metric whose task data is split over a process group
(:mod:`manifolds.data_parallel`), each rank's :math:`F_r` holds its own samples and
:math:`\|\Delta F_k\|^2 = \sum_r \|\Delta F_{r,k}\|^2`, so the squared embedded chords are
all-reduced (once per evaluation, differentiably: every rank gets the energy, and the
gradient in the points, of the union of the shards); the damping term, on replicated
weights, is counted once. :meth:`~manifolds.PullbackMetric.norm` all-reduces by itself.
"""

from __future__ import annotations

import torch

__all__ = [
    "chord_energy",
    "chord_lengths",
    "discrete_energy",
    "feature_chord_lengths",
    "midpoint_speeds",
]


def chord_lengths(points: torch.Tensor) -> torch.Tensor:
    r""":math:`\|p_{k+1} - p_k\|` for the rows of ``points`` (shape ``(K, m)``), shape ``(K-1,)``."""
    return torch.linalg.vector_norm(points.diff(dim=0), dim=1)


def chord_energy(
    feature_lengths: torch.Tensor,
    weight_lengths: torch.Tensor | float,
    t: torch.Tensor,
    damping: float,
    *,
    squared: bool = False,
) -> torch.Tensor:
    r""":math:`\tfrac12 \sum_k (\|\Delta F_k\|^2 + \lambda \|\Delta w_k\|^2) / \Delta t_k`
    from the chord lengths (tensors of shape ``(K-1,)``) and the times ``t`` (shape ``(K,)``).
    Differentiable in the lengths; with ``squared=True`` the lengths are given squared,
    :math:`\|\Delta F_k\|^2` and :math:`\|\Delta w_k\|^2` (differentiable at zero chords too)."""
    total = feature_lengths if squared else feature_lengths.square()
    if damping:
        total = total + damping * (weight_lengths if squared else weight_lengths.square())
    return 0.5 * (total / t.diff()).sum()


def discrete_energy(metric, points: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    r"""The chord energy :math:`E` of the rows of ``points`` (shape ``(K, n)``) at times ``t``
    (default uniform on :math:`[0, 1]`), differentiable in ``points``."""
    if points.ndim != 2 or points.shape[0] < 2:
        raise ValueError(f"points must have shape (K, n) with K >= 2, got {tuple(points.shape)}")
    if t is None:
        t = torch.linspace(0.0, 1.0, points.shape[0], dtype=points.dtype, device=points.device)
    dp = getattr(metric, "data_parallel", None)
    if dp is None:
        features = torch.stack([metric.embed(p) for p in points])
        return chord_energy(chord_lengths(features), chord_lengths(points), t, metric.damping)
    # the points' gradient summed over ranks (DataParallel.shared)
    features = torch.stack([metric.embed(p) for p in dp.shared(points)])
    steps = points.diff(dim=0).square().sum(1)
    return chord_energy(_summed_squares(dp, features), steps, t, metric.damping, squared=True)


def feature_chord_lengths(metric, features: torch.Tensor) -> torch.Tensor:
    r""":math:`\|F(w_{k+1}) - F(w_k)\|` over all the metric's samples, from the rows of
    ``features`` (shape ``(K, m)``, :meth:`~manifolds.PullbackMetric.embed` at each point),
    shape ``(K-1,)``: :func:`chord_lengths`, or for a data-parallel metric (rows of this rank's
    samples) :math:`(\sum_r \|\Delta F_{r,k}\|^2)^{1/2}`, the same on every rank."""
    dp = getattr(metric, "data_parallel", None)
    if dp is None:
        return chord_lengths(features)
    return _summed_squares(dp, features).sqrt()


def _summed_squares(dp, features: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_r \|F_r(w_{k+1}) - F_r(w_k)\|^2` from this rank's rows of ``features``: the
    squared embedded chords of the union of the shards, on every rank (differentiably)."""
    return dp.sum(features.diff(dim=0).square().sum(1))


def midpoint_speeds(metric, points: torch.Tensor) -> torch.Tensor:
    r""":math:`s_k = \|w_{k+1} - w_k\|_{g(\bar w_k)}` at the segment midpoints, shape ``(K-1,)``."""
    with torch.no_grad():
        segments = points.diff(dim=0)
        mids = 0.5 * (points[1:] + points[:-1])
        return torch.stack([metric.norm(m, d) for m, d in zip(mids, segments, strict=True)])
