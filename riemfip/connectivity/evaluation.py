r"""Loss, accuracy and length along a discretised path in weight space.

A path is a ``(K, n)`` tensor of flat weights :math:`w_0, \dots, w_{K-1}` at times
:math:`t_0 < \dots < t_{K-1}` (uniform on :math:`[0, 1]` unless given), or any object
with ``points`` and ``t`` attributes (a :class:`~riemfip.geodesic.GeodesicPath`).
At each point the network is evaluated on labelled data; when it has BatchNorm
layers their running statistics are first recomputed at that point from
training inputs, as Garipov et al. (2018) do, because statistics collected at
one end of the path are wrong elsewhere on it.

Quantities
----------
With :math:`s_k = (t_k - t_0)/(t_{K-1} - t_0)`, per-point loss :math:`L_k` and accuracy :math:`A_k`:

* **barrier** :math:`\max_k \big(L_k - (1 - s_k) L_0 - s_k L_{K-1}\big)`, the largest
  excess of the loss over the linear mix of the endpoint losses (never negative, since it is 0
  at the ends; 0 means the loss never rises above the mix);
* **max error** :math:`1 - \min_k A_k`;
* **length in weights** :math:`\sum_k \|w_{k+1} - w_k\|`;
* **length in function space** :math:`\sum_k \|F(w_{k+1}) - F(w_k)\|`, with :math:`F`
  the metric's embedded outputs (:meth:`~manifolds.PullbackMetric.embed`,
  :math:`g = J_F^\top J_F + \lambda I`). For the Fisher metric :math:`F` is
  :math:`2\sqrt{p}/\sqrt{N}` over the anchor inputs, so each chord is a lower bound of the
  Fisher–Rao length of that segment;
* **energy** :math:`\tfrac12 \sum_k \big(\|F(w_{k+1}) - F(w_k)\|^2 + \lambda \|w_{k+1} - w_k\|^2\big)/(t_{k+1} - t_k)`,
  the chord discretisation of :math:`\tfrac12\int \dot w^\top g(w)\,\dot w\,dt`. It is the
  quantity a geodesic minimises among paths with the same endpoints and times, so it is
  what compares a geodesic with the straight line.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from manifolds import FlatModule, PullbackMetric, as_batches
from manifolds.geodesic import chord_energy, chord_lengths, feature_chord_lengths

from ..labelled import labelled_pair
from ..records import JsonRecord

__all__ = [
    "ConnectivityReport",
    "PathEvaluation",
    "as_path",
    "compare_paths",
    "evaluate_path",
    "path_energy",
    "straight_line",
]


# ---------------------------------------------------------------------- paths
def straight_line(w_a: torch.Tensor, w_b: torch.Tensor, n_points: int) -> torch.Tensor:
    r"""The segment :math:`w(t) = (1 - t) w_a + t w_b` at ``n_points`` uniform times, ``(K, n)``."""
    if not isinstance(w_a, torch.Tensor) or not isinstance(w_b, torch.Tensor):
        raise TypeError("w_a and w_b must be torch tensors")
    if w_a.shape != w_b.shape or w_a.ndim != 1:
        raise ValueError(
            f"w_a and w_b must be flat vectors of one length, got {tuple(w_a.shape)} and "
            f"{tuple(w_b.shape)}"
        )
    if int(n_points) < 2:
        raise ValueError(f"n_points must be at least 2, got {n_points}")
    t = torch.linspace(0, 1, int(n_points), dtype=w_a.dtype, device=w_a.device)
    return torch.lerp(w_a.detach(), w_b.detach(), t[:, None])


def as_path(path: object, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, points)`` of a ``(K, n)`` tensor (uniform ``t`` on [0, 1]) or of an object with
    ``points`` and ``t`` attributes; checks shape, dtype, finiteness and increasing times."""
    if isinstance(path, torch.Tensor):
        points, t = path, None
    elif hasattr(path, "points") and hasattr(path, "t"):
        points, t = path.points, path.t
    else:
        raise TypeError(
            f"a path must be a (K, n) tensor or have 'points' and 't' attributes, got "
            f"{type(path).__name__}"
        )
    if not isinstance(points, torch.Tensor) or not points.is_floating_point():
        raise TypeError("path points must be a floating-point tensor")
    if points.ndim != 2 or points.shape[0] < 2:
        raise ValueError(f"path points must have shape (K >= 2, n), got {tuple(points.shape)}")
    if dim is not None and points.shape[1] != dim:
        raise ValueError(f"path points have {points.shape[1]} weights, the network has {dim}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("path points contain NaN or Inf")
    if t is None:
        t = torch.linspace(0, 1, points.shape[0], dtype=torch.float64, device="cpu")
    t = (
        t.detach()
        if isinstance(t, torch.Tensor)
        else torch.tensor(t, dtype=torch.float64, device="cpu")
    )
    t = t.to("cpu", torch.float64).reshape(-1)
    if t.numel() != points.shape[0]:
        raise ValueError(f"path has {points.shape[0]} points but {t.numel()} times")
    if not bool((t.diff() > 0).all()):
        raise ValueError("path times must be strictly increasing")
    return t, points.detach()


# ---------------------------------------------------------------------- BatchNorm
def _batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


@contextlib.contextmanager
def _restored_batchnorm(module: nn.Module) -> Iterator[list[_BatchNorm]]:
    """Yield the BatchNorm layers with running statistics; restore their buffers and momenta."""
    layers = _batchnorm_layers(module)
    saved = [
        (m, m.momentum, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in layers
    ]
    try:
        yield layers
    finally:
        with torch.no_grad():
            for m, momentum, buffers in saved:
                m.momentum = momentum
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


def _bn_batches(bn_inputs, like: torch.Tensor) -> list[torch.Tensor]:
    return [
        b.to(like.device, like.dtype) if b.is_floating_point() else b.to(like.device)
        for b in as_batches(bn_inputs)
    ]


@torch.no_grad()
def _recompute_batchnorm(
    flat: FlatModule, layers: list[_BatchNorm], w: torch.Tensor, batches: list[torch.Tensor]
) -> None:
    """Running statistics at ``w``: the exact average over ``batches`` (momentum ``None``)."""
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    for x in batches:
        flat(w, x, train=True)


# ---------------------------------------------------------------------- results
@dataclass
class PathEvaluation(JsonRecord):
    r"""Loss and accuracy at each point of a path, and the path's lengths.

    Attributes
    ----------
    name : str
    t : torch.Tensor
        Times, ``(K,)``, float64.
    loss : torch.Tensor
        Mean cross-entropy on the evaluation data at each point, ``(K,)``.
    accuracy : torch.Tensor
        Fraction classified correctly at each point, ``(K,)``.
    weight_length : float
        :math:`\sum_k \|w_{k+1} - w_k\|`.
    function_length, energy : float or None
        :math:`\sum_k \|\Delta F_k\|` and the chord energy (see the module notes); ``None``
        without a metric.
    """

    name: str
    t: torch.Tensor
    loss: torch.Tensor
    accuracy: torch.Tensor
    weight_length: float
    function_length: float | None = None
    energy: float | None = None

    @property
    def s(self) -> torch.Tensor:
        """Times rescaled to [0, 1]."""
        return (self.t - self.t[0]) / (self.t[-1] - self.t[0])

    @property
    def excess_loss(self) -> torch.Tensor:
        r""":math:`L_k - (1 - s_k) L_0 - s_k L_{K-1}` at each point."""
        s = self.s
        return self.loss - ((1 - s) * self.loss[0] + s * self.loss[-1])

    @property
    def barrier(self) -> float:
        """Largest excess of the loss over the linear mix of the endpoint losses."""
        return float(self.excess_loss.max())

    @property
    def max_error(self) -> float:
        """Largest error rate (1 - accuracy) along the path."""
        return float(1 - self.accuracy.min())

    @property
    def endpoint_error(self) -> float:
        """The larger of the two endpoints' error rates."""
        return float(1 - torch.minimum(self.accuracy[0], self.accuracy[-1]))

    def summary(self) -> dict:
        """Scalars only: barrier, errors, lengths, energy, where the worst point lies, and the
        accuracy at the point nearest the middle (:math:`s = 1/2`)."""
        k = int(self.accuracy.argmin())
        return {
            "barrier": self.barrier,
            "max_error": self.max_error,
            "endpoint_error": self.endpoint_error,
            "t_max_error": float(self.t[k]),
            "midpoint_accuracy": float(self.accuracy[int((self.s - 0.5).abs().argmin())]),
            "weight_length": self.weight_length,
            "function_length": self.function_length,
            "energy": self.energy,
            "n_points": len(self.t),
        }

    def to_dict(self) -> dict:
        """The fields as JSON values, then :meth:`summary` (not read back)."""
        return {**super().to_dict(), **self.summary()}


@dataclass
class ConnectivityReport(JsonRecord):
    """Several paths between the same two networks, evaluated on the same data.

    Attributes
    ----------
    paths : dict of str to PathEvaluation
    metadata : dict
        Free-form, JSON-serialisable context (data sizes, metric, timings).

    Notes
    -----
    The JSON record (:meth:`to_json`) is tagged ``"application": "connectivity"``; each
    path's entry also holds its :meth:`PathEvaluation.summary`.
    """

    application = "connectivity"

    paths: dict[str, PathEvaluation]
    metadata: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> PathEvaluation:
        return self.paths[name]

    def summary(self) -> dict[str, dict]:
        """``{path name: PathEvaluation.summary()}``."""
        return {name: ev.summary() for name, ev in self.paths.items()}

    def table(self) -> str:
        """A plain-text table, one row per path."""
        width = max(10, *(len(name) for name in self.paths))
        head = (
            f"{'path':<{width}} {'barrier':>8} {'max err %':>9} {'end err %':>9} {'mid acc %':>9} "
            f"{'|dw| len':>9} {'|dF| len':>9} {'energy':>10}"
        )
        rows = [head]
        for name, ev in self.paths.items():
            s = ev.summary()
            fl = "-" if s["function_length"] is None else f"{s['function_length']:.4f}"
            en = "-" if s["energy"] is None else f"{s['energy']:.5f}"
            rows.append(
                f"{name:<{width}} {s['barrier']:8.4f} {100 * s['max_error']:9.2f} "
                f"{100 * s['endpoint_error']:9.2f} {100 * s['midpoint_accuracy']:9.2f} "
                f"{s['weight_length']:9.3f} {fl:>9} {en:>10}"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def plot(self, file: str | Path, *, title: str | None = None) -> Path:
        """Loss and accuracy against :math:`t` for every path, as a PNG (see :mod:`.plot`)."""
        from .plot import plot_report

        return plot_report(self, file, title=title)


# ---------------------------------------------------------------------- evaluation
def _embedded(metric: PullbackMetric, w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return metric.embed(w)


def _chord_energy(df: torch.Tensor, dw: torch.Tensor, t: torch.Tensor, damping: float) -> float:
    """:func:`manifolds.geodesic.chord_energy` as a float."""
    return float(chord_energy(df, dw, t, damping))


def _lengths(points: torch.Tensor) -> torch.Tensor:
    """:func:`manifolds.geodesic.chord_lengths`, float64 on the CPU."""
    return chord_lengths(points).double().cpu()


def path_energy(
    metric: PullbackMetric, path: object, *, bn_inputs: torch.Tensor | Iterable | None = None
) -> float:
    r"""Chord energy :math:`\tfrac12 \sum_k (\|\Delta F_k\|^2 + \lambda\|\Delta w_k\|^2)/\Delta t_k`
    (:func:`manifolds.geodesic.chord_energy`; with uniform times the objective of ``relax``).

    Parameters
    ----------
    metric : PullbackMetric
        Supplies :math:`F` (:meth:`~manifolds.PullbackMetric.embed`) and :math:`\lambda`.
    path : (K, n) tensor or object with ``points`` and ``t``
    bn_inputs : optional
        Inputs to recompute BatchNorm statistics at each point (only for a metric built
        with :meth:`~manifolds.PullbackMetric.from_module` on a network with BatchNorm).
    """
    if not isinstance(metric, PullbackMetric):
        raise TypeError(f"metric must be a PullbackMetric, got {type(metric).__name__}")
    t, points = as_path(path, metric.dim)
    flat = metric.module
    batches = None if bn_inputs is None else _bn_batches(bn_inputs, points)
    embedded = []
    ctx = _restored_batchnorm(flat.module) if flat is not None else contextlib.nullcontext([])
    with ctx as layers:
        for w in points:
            if layers and batches is not None:
                _recompute_batchnorm(flat, layers, w, batches)
            embedded.append(_embedded(metric, w))
    df = feature_chord_lengths(metric, torch.stack(embedded)).double().cpu()
    return _chord_energy(df, _lengths(points), t, metric.damping)


def evaluate_path(
    model: nn.Module,
    path: object,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    metric: PullbackMetric | None = None,
    bn_inputs: torch.Tensor | Iterable | None = None,
    batch_size: int = 1000,
    name: str = "path",
) -> PathEvaluation:
    r"""Cross-entropy and accuracy on ``data`` at every point of ``path``.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture (a classifier returning logits). Its parameters are never
        touched; its BatchNorm buffers are recomputed per point and restored afterwards.
    path : (K, n) tensor or object with ``points`` and ``t``
        Flat weights in the order of ``model.parameters()``.
    data : (inputs, labels)
        Evaluation data, cast to the path's dtype and device.
    metric : PullbackMetric, optional
        For the function-space length and the energy. Build it on ``model`` (with
        :meth:`~manifolds.PullbackMetric.from_module`) so that it sees the recomputed
        BatchNorm statistics.
    bn_inputs : tensor or iterable of batches, optional
        Training inputs for the BatchNorm statistics at each point; required when
        ``model`` has BatchNorm layers with running statistics.
    batch_size : int
        Evaluation batch size.
    name : str
        Label of the path in reports and plots.

    Returns
    -------
    PathEvaluation
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if metric is not None and not isinstance(metric, PullbackMetric):
        raise TypeError(f"metric must be a PullbackMetric, got {type(metric).__name__}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    flat = FlatModule(model)
    t, points = as_path(path, flat.dim)
    x, y = labelled_pair(data, integer_inputs=True)
    x = x.to(points.device, points.dtype) if x.is_floating_point() else x.to(points.device)
    y = y.to(points.device)
    with _restored_batchnorm(model) as layers:
        batches = None
        if layers:
            if bn_inputs is None:
                raise ValueError(
                    f"{type(model).__name__} has {len(layers)} BatchNorm layer(s): pass bn_inputs "
                    "(training inputs) so that their statistics are recomputed at each point"
                )
            batches = _bn_batches(bn_inputs, points)
        losses, accs, embedded = [], [], []
        with torch.no_grad():
            for k in range(len(t)):
                w = points[k]
                if layers:
                    _recompute_batchnorm(flat, layers, w, batches)
                loss_sum, correct = 0.0, 0
                for i in range(0, len(x), int(batch_size)):
                    out = flat(w, x[i : i + int(batch_size)], train=False)
                    yb = y[i : i + int(batch_size)]
                    loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
                    correct += int((out.argmax(-1) == yb).sum())
                losses.append(loss_sum / len(x))
                accs.append(correct / len(x))
                if metric is not None:
                    embedded.append(_embedded(metric, w))
    dw = _lengths(points)
    function_length = energy = None
    if metric is not None:
        df = feature_chord_lengths(metric, torch.stack(embedded)).double().cpu()
        function_length = float(df.sum())
        energy = _chord_energy(df, dw, t, metric.damping)
    return PathEvaluation(
        name=str(name),
        t=t,
        loss=torch.tensor(losses, dtype=torch.float64, device="cpu"),
        accuracy=torch.tensor(accs, dtype=torch.float64, device="cpu"),
        weight_length=float(dw.sum()),
        function_length=function_length,
        energy=energy,
    )


def compare_paths(
    model: nn.Module,
    paths: Mapping[str, object],
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    metric: PullbackMetric | None = None,
    bn_inputs: torch.Tensor | Iterable | None = None,
    batch_size: int = 1000,
    metadata: dict | None = None,
    endpoint_tol: float = 1e-4,
) -> ConnectivityReport:
    r"""Evaluate several paths (e.g. geodesic, Bézier, straight line) with :func:`evaluate_path`.

    Parameters
    ----------
    model, data, metric, bn_inputs, batch_size
        As for :func:`evaluate_path`.
    paths : mapping of str to path
        Each a ``(K, n)`` tensor or an object with ``points`` and ``t``; they need not
        have the same number of points.
    metadata : dict, optional
        Stored in the report.
    endpoint_tol : float
        Largest relative gap :math:`\|e - e_{\text{first}}\| / \|e_{\text{first}}\|`
        allowed between the endpoint pairs of the paths.

    Raises
    ------
    ValueError
        No paths, or paths whose endpoints differ by more than ``endpoint_tol``.
    """
    if not isinstance(paths, Mapping) or not paths:
        raise ValueError("paths must be a non-empty mapping of name -> path")
    ends = {name: as_path(p)[1][[0, -1]] for name, p in paths.items()}
    first_name, first = next(iter(ends.items()))
    for name, e in ends.items():
        if e.shape != first.shape:
            raise ValueError(
                f"path {name!r} has {e.shape[1]} weights, path {first_name!r} {first.shape[1]}"
            )
        e = e.to(first.device, first.dtype)
        gap = float(torch.linalg.vector_norm(e - first)) / max(
            float(torch.linalg.vector_norm(first)), 1e-12
        )
        if not math.isfinite(gap) or gap > endpoint_tol:
            raise ValueError(
                f"path {name!r} does not share its endpoints with path {first_name!r} "
                f"(relative gap {gap:.2e})"
            )
    evaluations = {
        name: evaluate_path(
            model,
            p,
            data,
            metric=metric,
            bn_inputs=bn_inputs,
            batch_size=batch_size,
            name=name,
        )
        for name, p in paths.items()
    }
    return ConnectivityReport(evaluations, dict(metadata or {}))
