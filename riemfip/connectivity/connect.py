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
from manifolds.geodesic import Minibatch, relax, relax_minibatches, shoot

__all__ = ["connect", "connection_metric"]

_METHODS = ("relax", "shoot", "minibatch")


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
    method: str | Minibatch = "relax",
    held_out: torch.Tensor | None = None,
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
        ignored). ``relax`` and ``shoot`` read it all into one metric (cost grows linearly);
        the minibatch route iterates it once per epoch (a ``DataLoader`` over a whole
        training set) or shuffles a tensor into batches.
    output_metric : {"fisher", "bhattacharyya", "euclidean"} or OutputMetric
        :math:`G` on each sample's outputs; ``"fisher"`` (softmax Fisher on logits) suits
        classifiers.
    damping : float
        :math:`\lambda > 0`, the weight-space term. Small values let the path move far in
        weights to keep the predictions still; large values pull it toward the line.
    n_points : int
        Points on the returned path, both ends included (``relax``); for ``shoot`` the
        RK4 steps default to ``n_points - 1``.
    method : {"relax", "shoot", "minibatch"} or Minibatch
        The boundary-value solver: :func:`manifolds.geodesic.relax` (L-BFGS on the energy
        of all of ``data`` at once), :func:`manifolds.geodesic.shoot`, or
        :func:`manifolds.geodesic.relax_minibatches` (Adam on one batch's energy at a time,
        a :class:`~manifolds.geodesic.Minibatch` policy; ``"minibatch"`` is
        ``Minibatch()``), for data that does not fit one metric, or to stop early on
        ``held_out`` inputs.
    held_out : tensor, optional
        Minibatch route only: inputs (not in ``data``) whose energy decides when to stop and
        which points to return (early stopping). Default: the first batch of ``data``.
    metric_options : dict, optional
        Extra keyword arguments for :class:`~manifolds.PullbackMetric` (``solver``, ``tol``,
        ``maxiter``, ``on_failure``).
    **solver_options
        Passed to the solver (``maxiter``, ``tol``, ``init``, ``strict``, ``verbose``, ...;
        for the minibatch route ``init``, ``resume``, ``on_epoch``, ``strict``, ``verbose``).

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
    if method == "minibatch":
        method = Minibatch()
    if not isinstance(method, Minibatch) and method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS} or a Minibatch, got {method!r}")
    if held_out is not None and not isinstance(method, Minibatch):
        raise ValueError("held_out is for the minibatch route (method='minibatch' or a Minibatch)")
    if int(n_points) < 3:
        raise ValueError(f"n_points must be at least 3, got {n_points}")
    flat_a, flat_b = FlatModule(model_a), FlatModule(model_b)
    flat_a.check_same_architecture(flat_b)
    w_a, w_b = flat_a.flatten(), flat_b.flatten()
    if w_a.dtype != w_b.dtype:
        raise TypeError(f"model_a has {w_a.dtype} weights, model_b {w_b.dtype}; convert one")
    if w_a.device != w_b.device:
        raise ValueError(f"model_a is on {w_a.device}, model_b on {w_b.device}")

    options = {"output_metric": output_metric, "damping": damping, **(metric_options or {})}
    if isinstance(method, Minibatch):
        path = _minibatch_geodesic(
            model_a, w_a, w_b, data, held_out, method, n_points, options, **solver_options
        )
        anchors = path.metadata.pop("samples")
        path.metadata["connect"] = _record(path, model_a, flat_a, options, anchors)
        path.metadata["connect"]["minibatch"] = {
            k: (repr(v) if k == "transform" else v) for k, v in method.__dict__.items()
        }
        return path
    metric = connection_metric(model_a, data, **options)
    if method == "relax":
        path = relax(metric, w_a, w_b, int(n_points), **solver_options)
    else:
        solver_options.setdefault("steps", int(n_points) - 1)
        path = shoot(metric, w_a, w_b, **solver_options)
    path.metadata["connect"] = _record(
        path, model_a, flat_a, options, sum(len(x) for x in metric.inputs)
    )
    return path


def _record(path, model_a, flat_a, options, anchors: int) -> dict:
    """``metadata["connect"]``: output metric, damping, anchor inputs, architecture."""
    metric = options["output_metric"]
    return {
        "output_metric": metric if isinstance(metric, str) else metric.name,
        "damping": float(options["damping"]),
        "anchor_inputs": anchors,
        "architecture": type(model_a).__name__,
        "parameters": [[n, list(s)] for n, s in zip(flat_a.names, flat_a.shapes, strict=True)],
    }


def _minibatch_geodesic(model, w_a, w_b, data, held_out, policy, n_points, options, **solver):
    """:func:`manifolds.geodesic.relax_minibatches` with :func:`connection_metric` on each
    batch (inputs checked on the first batch only); ``metadata["samples"]`` counts the
    samples of one pass."""
    checked = False

    def metric_of(x):
        nonlocal checked
        metric = connection_metric(model, x, check_inputs=not checked, **options)
        checked = True
        return metric

    ho = None if held_out is None else connection_metric(model, held_out, **options)
    path = relax_minibatches(
        metric_of, w_a, w_b, data, int(n_points), policy=policy, held_out=ho, **solver
    )
    path.metadata["samples"] = _count(data)
    return path


def _count(data) -> int | None:
    """Samples in one pass over ``data`` (a tensor, or a DataLoader over a sized data set)."""
    if isinstance(data, torch.Tensor):
        return len(data)
    dataset = getattr(data, "dataset", None)
    return len(dataset) if hasattr(dataset, "__len__") else None
