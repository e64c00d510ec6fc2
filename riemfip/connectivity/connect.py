r"""The geodesic between two trained networks of the same architecture.

Weight space carries the pullback metric of the networks' outputs on task data
(:class:`~manifolds.PullbackMetric`),

.. math::

    g(w) = \frac1N \sum_{b=1}^N J_b^\top G(y_b) J_b + \lambda I,

and :func:`connect` returns the minimum-energy path from :math:`w_a` to :math:`w_b`, found by
:func:`manifolds.geodesic.relax` (discrete path energy, L-BFGS; the default) or
:func:`manifolds.geodesic.shoot` (Newton shooting on the geodesic equation). With the softmax
Fisher output metric (the default) the energy of a path is, to second order, the summed KL
divergence between the predictions at consecutive points, so a geodesic is the path along
which the classifier's predictions on the anchor inputs change least, per unit of
:math:`\lambda`-weighted weight movement. Evaluate it with
:func:`~riemfip.connectivity.compare_paths` (Raghavan & Thomson, arXiv 2106.02793).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from manifolds import FlatModule, PullbackMetric, as_batches
from manifolds.geodesic import relax, shoot

__all__ = ["connect", "connection_metric"]

_METHODS = ("relax", "shoot")


def connection_metric(
    model: nn.Module,
    data: torch.Tensor | Iterable,
    *,
    output_metric: str = "fisher",
    damping: float = 1e-4,
    **metric_options,
) -> PullbackMetric:
    r"""The metric :func:`connect` uses: :meth:`PullbackMetric.from_module` on ``model`` with
    the inputs of ``data`` cast to the model's floating dtype.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture (and the BatchNorm running statistics, in eval mode, the metric
        evaluates with).
    data : tensor or iterable of batches
        Anchor inputs: a tensor, or batches that are tensors or ``(inputs, targets)`` pairs
        (targets are ignored).
    output_metric, damping, **metric_options
        As for :class:`~manifolds.PullbackMetric`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters")
    dtype = params[0].dtype
    batches = [x.to(dtype) if x.is_floating_point() else x for x in as_batches(data)]
    return PullbackMetric.from_module(
        model, batches, output_metric=output_metric, damping=damping, **metric_options
    )


def connect(
    model_a: nn.Module,
    model_b: nn.Module,
    data: torch.Tensor | Iterable,
    *,
    output_metric: str = "fisher",
    damping: float = 1e-4,
    n_points: int = 17,
    method: str = "relax",
    metric_options: dict | None = None,
    **solver_options,
):
    r"""The geodesic from ``model_a``'s weights to ``model_b``'s in the task-induced metric.

    Parameters
    ----------
    model_a, model_b : torch.nn.Module
        Two trained networks of the same architecture (same parameter names and
        shapes, in the same order), weights of one dtype on one device. Neither is
        modified.
    data : tensor or iterable of batches
        Anchor inputs defining the metric: an input tensor, or an iterable of batches,
        each inputs or an ``(inputs, targets)`` pair (a ``DataLoader`` works; targets are
        ignored). A few hundred inputs are typically enough; cost grows linearly.
    output_metric : {"fisher", "bhattacharyya", "euclidean"} or OutputMetric
        :math:`G` on each sample's outputs; ``"fisher"`` (softmax Fisher on logits) suits
        classifiers.
    damping : float
        :math:`\lambda > 0`, the weight-space term. Small values let the path move far in
        weights to keep the predictions still; large values pull it toward the line.
    n_points : int
        Points on the returned path, both ends included (``relax``); for ``shoot`` the
        RK4 steps default to ``n_points - 1``.
    method : {"relax", "shoot"}
        The boundary-value solver (:func:`manifolds.geodesic.relax` or
        :func:`manifolds.geodesic.shoot`).
    metric_options : dict, optional
        Extra keyword arguments for :class:`~manifolds.PullbackMetric` (``solver``, ``tol``,
        ``maxiter``, ``on_failure``).
    **solver_options
        Passed to the solver (``maxiter``, ``tol``, ``init``, ``strict``, ``verbose``, ...).

    Returns
    -------
    manifolds.geodesic.GeodesicPath
        ``points[0]`` and ``points[-1]`` are the two networks' flat weights (exactly for
        ``relax``; within ``residual`` for ``shoot``), in the order of
        ``model_a.parameters()``. ``metadata["connect"]`` records the output metric,
        damping, number of anchor inputs and the architecture. Check ``converged`` and
        ``message``: an unconverged solve is returned, not hidden.

    Raises
    ------
    TypeError
        A model is not an ``nn.Module``; the weights' dtypes differ.
    ValueError
        The architectures differ (the message names the first parameter whose name or
        shape differs); the weights are on different devices; bad ``method`` or
        ``n_points``; no anchor inputs.

    Notes
    -----
    The metric evaluates ``model_a``'s structure in eval mode: Dropout off, BatchNorm with
    ``model_a``'s running statistics at every point of the path (a fixed normalisation;
    :func:`~riemfip.connectivity.evaluate_path` recomputes the statistics per point for
    evaluation).
    """
    for name, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if int(n_points) < 3:
        raise ValueError(f"n_points must be at least 3, got {n_points}")
    flat_a, flat_b = FlatModule(model_a), FlatModule(model_b)
    flat_a.check_same_architecture(flat_b)
    w_a, w_b = flat_a.flatten(), flat_b.flatten()
    if w_a.dtype != w_b.dtype:
        raise TypeError(f"model_a has {w_a.dtype} weights, model_b {w_b.dtype}; convert one")
    if w_a.device != w_b.device:
        raise ValueError(f"model_a is on {w_a.device}, model_b on {w_b.device}")

    metric = connection_metric(
        model_a, data, output_metric=output_metric, damping=damping, **(metric_options or {})
    )
    if method == "relax":
        path = relax(metric, w_a, w_b, int(n_points), **solver_options)
    else:
        solver_options.setdefault("steps", int(n_points) - 1)
        path = shoot(metric, w_a, w_b, **solver_options)
    path.metadata["connect"] = {
        "output_metric": metric.output_metric.name,
        "damping": metric.damping,
        "anchor_inputs": sum(len(x) for x in metric.inputs),
        "architecture": type(model_a).__name__,
        "parameters": [[n, list(s)] for n, s in zip(flat_a.names, flat_a.shapes, strict=True)],
    }
    return path
