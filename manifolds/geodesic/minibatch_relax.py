r"""Discrete geodesics on data too large for one metric: stochastic descent on minibatch energies.

The metric of a data set of :math:`N` samples split into batches :math:`S_1, \dots, S_M`
(:math:`N_i` samples each) is the sample-weighted average of the batches' metrics,
:math:`g = \sum_i \frac{N_i}{N}\, g_i` (:math:`g_i` the metric of batch :math:`i` alone, its
embedding :math:`F_i` scaled by :math:`N_i^{-1/2}`). The discrete path energy of
:mod:`manifolds.geodesic.energy` is therefore the same average,

.. math::

    E(p) = \sum_i \frac{N_i}{N} E_i(p), \qquad
    E_i(p) = \frac{K-1}{2} \sum_{k=0}^{K-2}
        \Bigl( \|F_i(p_{k+1}) - F_i(p_k)\|^2 + \lambda \|p_{k+1} - p_k\|^2 \Bigr),

so the energy of a minibatch drawn uniformly is an unbiased estimate of :math:`E` and its
gradient in the interior points an unbiased estimate of :math:`\nabla E`.
:func:`relax_minibatches` minimises :math:`E` by Adam on these estimates, one batch at a
time, never holding more than one batch's metric; :func:`manifolds.geodesic.relax` is the
exact (full-batch L-BFGS) route for data that fits in one metric.

Stopping rule (the held-out rule): every ``check_every`` steps the energy :math:`E_{\rm ho}`
of the path on a fixed evaluation set is measured. A plateau is ``patience`` checks whose best
:math:`E_{\rm ho}` is not below :math:`(1 - \text{rtol})` times the best before them
(``residual`` is that relative improvement, ``tol`` is ``rtol``). At a plateau the step size
is cut to a tenth; a plateau at the last step size (``final_lr``) ends the run as converged
(as ``BREAKDOWN`` if no check ever beat the starting path: the step size is too large), and
``epochs`` passes without one end it with ``MAX_ITERATIONS``. The points
returned are those of the best :math:`E_{\rm ho}` (early stopping): with an evaluation set
disjoint from the training batches, the path that generalises best, not the one that fits
the training batches closest. A final pass over all the batches evaluates :math:`E` and the
midpoint-rule length and energy exactly (the weighted sums above), as
:func:`~manifolds.geodesic.relax` reports them.

Data parallelism: with metrics built on a process group (:mod:`manifolds.data_parallel`),
every minibatch energy is already the energy of the union of the ranks' batches, with the
same value and gradient on every rank, so the Adam steps, the stopping decisions and the
returned path are identical on every rank. Every rank must then see the same number of
batches per epoch: before each batch the ranks agree that all of them have one (one
all-reduce of one number), so ranks whose data runs out at different steps raise
``ValueError`` together instead of waiting on each other's collectives.

Checkpoints: ``on_epoch`` receives, after every epoch the run goes on from, everything that
decides the rest of the run (the interior points, Adam's state and step size, the shuffling
generator, the stopping rule's history); ``resume=`` that dictionary continues the run
exactly where it was, so that an interrupted run resumed from its last epoch ends with the
same points as one never stopped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..status import Status
from .endpoints import check_endpoints
from .energy import chord_energy, discrete_energy
from .path import GeodesicPath
from .relax import _differences, _starting_points

__all__ = ["Minibatch", "full_data_energy", "relax_minibatches"]


@dataclass(frozen=True)
class Minibatch:
    r"""How :func:`relax_minibatches` descends: Adam on minibatch energies, stopped by the
    held-out rule (see :mod:`manifolds.geodesic.minibatch_relax`).

    Attributes
    ----------
    epochs : int
        At most this many passes over the batches.
    lr : float
        Adam's step size relative to the endpoints' separation: the step per coordinate is
        about ``lr`` :math:`\cdot \operatorname{rms}(w_1 - w_0)`. Cut to a tenth at each
        plateau of the held-out energy, down to ``final_lr`` times its start, so that the
        run settles instead of hovering at the noise level of the minibatch gradients.
    patience : int
        Checks without a relative improvement of ``rtol`` of the held-out energy that make
        a plateau.
    rtol : float
        Relative improvement that counts as progress.
    check_every : int
        Adam steps between two measurements of the held-out energy (the rule counts steps,
        not epochs, so that it means the same for 256 inputs as for 60,000).
    final_lr : float
        The last step-size factor: a plateau at it ends the run as converged.
    batch_size : int
        Batch size when the data is one tensor (shuffled into batches each epoch);
        an iterable of batches keeps its own.
    transform : callable, optional
        ``(x, generator) -> x'`` applied afresh to each training batch's inputs (an input
        neighbourhood, e.g. :class:`riemfip.optim.ScaledNoise`); never to the evaluation set
        or the final pass.
    seed : int
        Seeds the shuffling and ``transform``.
    """

    epochs: int = 20
    lr: float = 0.05
    patience: int = 3
    rtol: float = 1e-3
    check_every: int = 25
    final_lr: float = 0.01
    batch_size: int = 128
    transform: Callable | None = None
    seed: int = 0

    def __post_init__(self):
        counts = ("epochs", "patience", "check_every", "batch_size")
        if any(int(getattr(self, name)) < 1 for name in counts):
            raise ValueError(
                "epochs, patience, check_every and batch_size must be >= 1, got "
                + ", ".join(f"{name}={getattr(self, name)}" for name in counts)
            )
        if not (self.lr > 0 and math.isfinite(self.lr)) or not self.rtol >= 0:
            raise ValueError(f"lr must be > 0 and rtol >= 0, got lr={self.lr}, rtol={self.rtol}")
        if not 0 < self.final_lr <= 1:
            raise ValueError(f"final_lr must be in (0, 1], got {self.final_lr}")
        if self.transform is not None and not callable(self.transform):
            raise TypeError(f"transform must be callable, got {type(self.transform).__name__}")


def _inputs(item, i: int) -> torch.Tensor:
    """The input tensor of one batch: a tensor, or the first item of a tuple or list."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batch {i} is a {type(x).__name__}, expected a tensor")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"batch {i} has shape {tuple(x.shape)}: expected (batch, ...)")
    return x


def _lockstep(batches: Iterable, data_parallel, device: torch.device):
    """``batches`` as they come; with a process group, each one only once every rank has
    one (:meth:`~manifolds.data_parallel.DataParallel.in_step`), so that the ranks end a pass
    together or all raise."""
    if data_parallel is None:
        yield from batches
        return
    it = iter(batches)
    while True:
        x = next(it, None)
        if not data_parallel.in_step(x is not None, device):
            return
        yield x


def _epoch(batches, batch_size: int, generator: torch.Generator | None):
    """One pass: slices of a tensor (shuffled by ``generator`` unless it is ``None``), or
    the iterable's own batches."""
    if isinstance(batches, torch.Tensor):
        n = len(batches)
        if generator is None:
            order = torch.arange(n, device=batches.device)
        else:
            order = torch.randperm(n, generator=generator, device=generator.device)
            order = order.to(batches.device)
        for lo in range(0, n, int(batch_size)):
            yield batches[order[lo : lo + int(batch_size)]]
    else:
        for i, item in enumerate(batches):
            yield _inputs(item, i)


def _samples(metric, x: torch.Tensor) -> int:
    """:math:`N_i`: the batch's samples (of all ranks for a data-parallel metric)."""
    dp = getattr(metric, "data_parallel", None)
    return len(x) if dp is None else dp.samples


def _feature_squares(metric, points: torch.Tensor) -> torch.Tensor:
    r""":math:`\|F_i(p_{k+1}) - F_i(p_k)\|^2` (summed over ranks), shape ``(K-1,)``."""
    features = torch.stack([metric.embed(p) for p in points])
    squares = features.diff(dim=0).square().sum(1)
    dp = getattr(metric, "data_parallel", None)
    return squares if dp is None else dp.all_reduce_sum(squares)


def full_data_energy(
    metric_of: Callable[[torch.Tensor], object],
    batches: torch.Tensor | Iterable,
    points: torch.Tensor,
    *,
    midpoint: bool = False,
    batch_size: int = 1024,
    data_parallel=None,
) -> tuple[float, torch.Tensor | None]:
    r"""The discrete energy :math:`E = \sum_i \frac{N_i}{N} E_i` of ``points`` (uniform times
    on [0, 1]) over all ``batches``, one batch's metric at a time.

    Parameters
    ----------
    metric_of : callable
        ``x -> PullbackMetric`` on the inputs ``x`` of one batch.
    batches : tensor or iterable of batches
        All the data (a tensor is sliced into batches of ``batch_size``, in order).
    points : torch.Tensor
        Shape ``(K, n)``.
    midpoint : bool
        Also return the midpoint-rule speeds
        :math:`s_k = (\sum_i \frac{N_i}{N}\|p_{k+1} - p_k\|^2_{g_i(\bar p_k)})^{1/2}
        = \|p_{k+1} - p_k\|_{g(\bar p_k)}`.
    batch_size : int
        Slice size for a tensor ``batches``.
    data_parallel : DataParallel, optional
        With metrics on a process group, its :class:`~manifolds.data_parallel.DataParallel`:
        the ranks then step through their batches in lock step and raise ``ValueError``
        together when their numbers of batches differ.

    Returns
    -------
    (float, tensor or None)
        :math:`E` (equal, up to rounding, to :func:`~manifolds.geodesic.discrete_energy` with
        one metric on all the data), and the speeds (shape ``(K-1,)``) or ``None``.
    """
    points = points.detach()
    K = points.shape[0]
    t = torch.linspace(0.0, 1.0, K, dtype=points.dtype, device=points.device)
    feature = torch.zeros(K - 1, dtype=torch.float64, device=points.device)
    speeds2 = torch.zeros(K - 1, dtype=torch.float64, device=points.device)
    total, damping = 0, None
    segments, mids = points.diff(dim=0), 0.5 * (points[1:] + points[:-1])
    with torch.no_grad():
        for x in _lockstep(_epoch(batches, batch_size, None), data_parallel, points.device):
            metric = metric_of(x)
            damping = metric.damping
            n_i = _samples(metric, x)
            total += n_i
            feature += n_i * _feature_squares(metric, points).double()
            if midpoint:
                inner = torch.stack(
                    [metric.inner(m, d) for m, d in zip(mids, segments, strict=True)]
                )
                speeds2 += n_i * inner.double()
    if total == 0:
        raise ValueError("batches hold no batches")
    steps = segments.square().sum(1).double()
    energy = chord_energy(feature / total, steps, t.double(), damping, squared=True)
    speeds = (speeds2 / total).clamp_min(0).sqrt().to(points.dtype) if midpoint else None
    return float(energy), speeds


def relax_minibatches(
    metric_of: Callable[[torch.Tensor], object],
    w0: torch.Tensor,
    w1: torch.Tensor,
    batches: torch.Tensor | Iterable,
    n_points: int = 17,
    *,
    policy: Minibatch | None = None,
    held_out=None,
    init: torch.Tensor | GeodesicPath | None = None,
    resume: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    strict: bool = False,
    verbose: bool = False,
) -> GeodesicPath:
    r"""A discrete geodesic from ``w0`` to ``w1`` by Adam on minibatch path energies.

    Parameters
    ----------
    metric_of : callable
        ``x -> PullbackMetric`` on one batch's inputs ``x``, the same :math:`\lambda` for
        every batch (for a network: :meth:`~manifolds.PullbackMetric.from_module` on ``x``,
        with the ``process_group`` when the data is split over processes).
    w0, w1 : torch.Tensor
        Endpoints (flat, same dtype and device).
    batches : tensor or re-iterable of batches
        The training data: a tensor (shuffled into ``policy.batch_size`` batches each
        epoch), or an iterable that can be iterated once per epoch (a
        :class:`~torch.utils.data.DataLoader`), each batch a tensor or an
        ``(inputs, targets, ...)`` tuple (targets ignored).
    n_points : int
        :math:`K \ge 3`, points including both ends.
    policy : Minibatch, optional
        Epochs, step size, stopping rule, transform (default ``Minibatch()``).
    held_out : PullbackMetric, optional
        The metric of the fixed evaluation set of the stopping rule. Default: the metric of
        the first training batch (untransformed), which judges convergence but cannot
        detect over-fitting.
    init : tensor of shape (K, n) or GeodesicPath, optional
        Starting points (as for :func:`~manifolds.geodesic.relax`); default the line.
    resume : dict, optional
        A state that ``on_epoch`` was given by a run with the same arguments: this run
        continues it (``init`` is then ignored), with the same result as the run never
        stopped. Its tensors may be on the CPU (as :func:`torch.load` maps them).
    on_epoch : callable, optional
        ``on_epoch(state)`` after each epoch the run goes on from (not after the epoch in
        which the stopping rule ends it): ``state`` is a dictionary of tensors, numbers and
        lists (what ``torch.load(weights_only=True)`` reads back), ``state["epoch"]`` the
        epochs done. Save it there to checkpoint a long run; it is the same on every rank
        of a data-parallel run.
    strict : bool
        Raise :class:`~manifolds.validation.NotConvergedError` when not converged.
    verbose : bool
        Print the held-out energy at every check.

    Returns
    -------
    GeodesicPath
        ``method="minibatch"``; ``points`` the path of the best held-out energy, ends exactly
        ``w0`` and ``w1``; ``length`` and ``energy`` by the midpoint rule over all the data
        (as for ``relax``); ``iterations`` the Adam steps; ``residual`` the held-out rule's
        relative improvement, ``tol`` its ``rtol``. ``metadata`` holds ``objective`` (the
        discrete energy over all the data, the quantity ``relax`` minimises), its value on
        the line, the held-out energies by epoch, the epochs and the timing.

    Raises
    ------
    ValueError
        No batches; bad ``n_points``; ``init`` of the wrong shape or ends; a ``resume``
        state of another problem (its interior points are of another shape).
    TypeError
        A batch is not a tensor; ``metric_of`` does not return a metric
        (:class:`~manifolds.PullbackMetric`).
    """
    start = time.perf_counter()
    policy = Minibatch() if policy is None else policy
    if not isinstance(policy, Minibatch):
        raise TypeError(f"policy must be a Minibatch, got {type(policy).__name__}")
    K = int(n_points)
    if K < 3:
        raise ValueError(f"n_points must be >= 3 (two ends and an interior point), got {K}")
    generator = torch.Generator().manual_seed(int(policy.seed))
    first = next(iter(_epoch(batches, policy.batch_size, None)), None)
    if first is None:
        raise ValueError("batches hold no batches: an empty data set or DataLoader")
    if held_out is None:
        held_out = metric_of(first)
    w0, w1 = check_endpoints(held_out, w0, w1)
    data_parallel = getattr(held_out, "data_parallel", None)
    t = torch.linspace(0.0, 1.0, K, dtype=w0.dtype, device=w0.device)
    line = w0 + t[:, None] * (w1 - w0)
    x0 = line if init is None else _starting_points(init, w0, w1, t)
    a, b = w0.unsqueeze(0), w1.unsqueeze(0)
    interior = x0[1:-1].clone().requires_grad_(True)
    base_lr = float(policy.lr) * float((w1 - w0).square().mean().sqrt())
    opt = torch.optim.Adam([interior], lr=base_lr)

    def held_out_energy() -> float:
        with torch.no_grad():
            return float(discrete_energy(held_out, torch.cat([a, interior, b])))

    if resume is None:
        rule = _HeldOutRule(policy, held_out_energy(), interior, opt, base_lr)
        steps = epochs = 0
    else:
        rule = _HeldOutRule(policy, math.nan, interior, opt, base_lr)
        steps, epochs = _restore(resume, interior, opt, generator, rule)
    for epoch in range(epochs, int(policy.epochs)):
        n = 0
        for x in _lockstep(_epoch(batches, policy.batch_size, generator), data_parallel, w0.device):
            if policy.transform is not None:
                x = policy.transform(x, generator)
            with torch.enable_grad():
                e = discrete_energy(metric_of(x), torch.cat([a, interior, b]))
                opt.zero_grad()
                e.backward()
            opt.step()
            n, steps = n + 1, steps + 1
            if steps % int(policy.check_every) == 0 and rule.check(held_out_energy(), interior):
                break
            if verbose and steps % int(policy.check_every) == 0:
                print(f"minibatch relax step {steps}: held-out energy {rule.history[-1]:.8e}")
        if n == 0:
            raise ValueError("batches hold no batches in this epoch (a one-shot iterator?)")
        epochs = epoch + 1
        if rule.status != Status.MAX_ITERATIONS:
            break
        if on_epoch is not None:
            on_epoch(_state(epochs, steps, interior, opt, generator, rule))
    if rule.status == Status.MAX_ITERATIONS and steps % int(policy.check_every) != 0:
        rule.check(held_out_energy(), interior)  # the last steps count too (a short run)
    status, message, residual = rule.status, rule.message, rule.residual
    best_points, history = rule.best_points, rule.history

    with torch.no_grad():
        points = torch.cat([a, best_points, b])
        objective, speeds = full_data_energy(
            metric_of,
            batches,
            points,
            midpoint=True,
            batch_size=policy.batch_size,
            data_parallel=data_parallel,
        )
        line_energy, _ = full_data_energy(
            metric_of, batches, line, batch_size=policy.batch_size, data_parallel=data_parallel
        )
        length = float(speeds.sum())
        spread = float((speeds.max() - speeds.min()) / speeds.mean()) if length > 0 else 0.0
    path = GeodesicPath(
        t=t,
        points=points,
        velocities=_differences(points, 1.0 / (K - 1)),
        length=length,
        energy=float(chord_energy(speeds, 0.0, t, 0.0)),
        residual=residual,
        tol=float(policy.rtol),
        status=status,
        message=message,
        iterations=steps,
        method="minibatch",
        metadata={
            "length_rule": "sum of |p_{k+1} - p_k|_g at segment midpoints, over all batches",
            "objective": objective,
            "objective_line": line_energy,
            "held_out_energies": history,
            "epochs": epochs,
            "speed_spread": spread,
            "n_points": K,
            "seconds": time.perf_counter() - start,
        },
    )
    return path.raise_if_failed() if strict else path


def _state(epochs: int, steps: int, interior, opt, generator, rule) -> dict:
    """What ``on_epoch`` receives: everything the rest of the run depends on."""
    return {
        "epoch": epochs,
        "steps": steps,
        "interior": interior.detach().clone(),
        "adam": copy.deepcopy(opt.state_dict()),  # Adam updates its own in place
        "generator": generator.get_state(),
        "rule": rule.state_dict(),
    }


def _restore(state: dict, interior, opt, generator, rule) -> tuple[int, int]:
    """Load a state of :func:`_state` into the run; ``(steps, epochs)`` done."""
    try:
        saved, saved_rule = state["interior"], state["rule"]
        steps, epochs = int(state["steps"]), int(state["epoch"])
        adam, generator_state = state["adam"], state["generator"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"resume is not a state that on_epoch was given (missing {err})") from None
    if tuple(saved.shape) != tuple(interior.shape):
        raise ValueError(
            f"resume holds interior points of shape {tuple(saved.shape)}, this run has "
            f"{tuple(interior.shape)}: a state of another problem"
        )
    with torch.no_grad():
        interior.copy_(saved)
    opt.load_state_dict(adam)
    for per_param in opt.state.values():  # Adam keeps its step counts on the CPU
        if isinstance(per_param.get("step"), torch.Tensor):
            per_param["step"] = per_param["step"].cpu()
    generator.set_state(generator_state.cpu())
    rule.load_state_dict(saved_rule)
    return steps, epochs


class _HeldOutRule:
    """The stopping rule of :func:`relax_minibatches`, judged on the held-out energy every
    ``check_every`` steps: keep the best points; at a plateau (``patience`` checks whose best
    improves on what came before by at most ``rtol``, relatively) cut the step to a tenth,
    and at a plateau at ``final_lr`` stop, converged if the path ever beat its start."""

    def __init__(self, policy: Minibatch, start: float, interior, opt, base_lr: float):
        self.policy, self.opt, self.base_lr = policy, opt, base_lr
        self.history = [start]
        self.best, self.best_points = start, interior.detach().clone()
        self.status, self.message, self.residual = Status.MAX_ITERATIONS, _MAXITER_MESSAGE, math.nan
        self.since = 0  # checks since the last step-size cut

    def state_dict(self) -> dict:
        """What the rule has seen: held-out energies, the best points, checks since a cut."""
        return {
            "history": list(self.history),
            "best": self.best,
            "best_points": self.best_points.clone(),
            "since": self.since,
            "residual": self.residual,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (its points moved to the run's device)."""
        self.history = [float(e) for e in state["history"]]
        self.best = float(state["best"])
        self.best_points = state["best_points"].to(self.best_points)
        self.since, self.residual = int(state["since"]), float(state["residual"])

    def check(self, energy: float, interior: torch.Tensor) -> bool:
        """Record a held-out energy; ``True`` when the run should stop."""
        policy, patience = self.policy, int(self.policy.patience)
        self.history.append(energy)
        self.since += 1
        if not math.isfinite(energy):
            self.status, self.message = Status.NON_FINITE, _NON_FINITE_MESSAGE
            return True
        if energy < self.best:
            self.best, self.best_points = energy, interior.detach().clone()
        if self.since < patience:
            return False
        before = min(self.history[:-patience])
        self.residual = max(0.0, 1.0 - min(self.history[-patience:]) / before)
        if self.residual > policy.rtol:
            return False
        group = self.opt.param_groups[0]
        if group["lr"] > 1.5 * self.base_lr * policy.final_lr:
            group["lr"] *= 0.1  # plateau: a tenth of the step, and go on
            self.since = 0
            return False
        if self.best < self.history[0]:
            self.status = Status.CONVERGED
            self.message = (
                f"converged: at the final step size the held-out energy improved by less "
                f"than rtol={policy.rtol:g} (relatively) over the last {policy.patience} checks"
            )
        else:  # the starting points are still the best: the descent never helped
            self.status, self.message = Status.BREAKDOWN, _NO_PROGRESS_MESSAGE
        return True


_MAXITER_MESSAGE = (
    "maximum number of epochs reached while the held-out energy was still improving; raise "
    "epochs (or resume with init=path)"
)
_NO_PROGRESS_MESSAGE = (
    "no step lowered the held-out energy below the starting path's (the starting points are "
    "returned); lower lr"
)
_NON_FINITE_MESSAGE = "the energy became non-finite; lower lr"
