r"""FIP: an optimizer that walks a functionally invariant path.

The user's training loop computes a *secondary* objective :math:`L` (a new task,
a sparsity penalty, ...), calls ``backward()`` and then ``opt.step()``, exactly as
with :class:`geoopt.optim.RiemannianSGD`. Each step moves a parameter group's
weights :math:`w` (all its parameters jointly: the metric couples them) so as to
descend :math:`L` while changing the network's outputs on the *anchor* inputs as
little as possible, measured from the outputs :math:`y^0` frozen when the
optimizer was built.

Natural mode (default)
----------------------
With embedded anchor outputs :math:`F(w)` (:math:`F_b = N^{-1/2}\phi(f(w;x_b))`),
:math:`J = \partial F/\partial w` and the pullback metric
:math:`g = J^\top J + \lambda I`, one step is

.. math::

    w \leftarrow w \;-\; \eta\,\alpha\,\underbrace{\lambda g^{-1}\nabla L}_{d}
      \;-\; \gamma\, J^\top (JJ^\top + \lambda I)^{-1}\,\big(F(w) - F(w_0)\big),

* :math:`d = \lambda g^{-1}\nabla L` is the Riemannian (natural) gradient, in
  units where the metric's null space has unit length: it passes the part of
  :math:`\nabla L` that leaves the anchor outputs alone and damps the part that
  moves them by :math:`\lambda/(\sigma + \lambda)` (:math:`\sigma` the metric's
  eigenvalues), so the learning rate :math:`\eta` means what it means for SGD;
* the second term is a Levenberg–Marquardt step that pulls the outputs back
  toward the frozen :math:`F(w_0)`, undoing the drift that accumulates because
  each step's metric is only locally right (:math:`\gamma` = ``correction``);
* the pull-back's length is capped at
  :math:`\eta\max(\|\nabla L\|, \|J^\top(F(w) - F(w_0))\|)`, a gradient step on the
  secondary loss or on the drift (a trust region: where the outputs saturate,
  e.g. softmax metrics, the first-order pull-back can be arbitrarily long);
* :math:`\alpha \in (0, 1]` is 1 unless the drift budget shrinks the step;
* the retraction is :math:`R_w(v) = w + v`.

Both solves use the *current* Jacobian, in the :math:`m`-dimensional output
space (:math:`m` = anchors x outputs). A metric factored once and reused goes
stale within a few steps: on 2-task MNIST (MLP 784-100-100-10, 250 anchors) a
basis factored at :math:`w_0` let the held-out drift
:math:`\tfrac12\|\Delta y\|^2` grow from 0.001 to 156 in nine steps of length
~0.1-0.8, while the current metric kept it at 0.1 over twelve such steps. For groups made of ``nn.Linear``
parameters, :math:`J` is held exactly at every step as layer inputs and output
gradients (one forward and one batched backward pass over the anchors,
:mod:`manifolds.linear_jacobian`), from which :math:`JJ^\top`, :math:`J\nabla` and
:math:`J^\top z` are small matrix products, and :math:`JJ^\top + \lambda I` is
factored by Cholesky; otherwise conjugate gradients run on :math:`JJ^\top + \lambda I`,
preconditioned with a stored spectrum that is refactored when the solves slow down
(:mod:`riemfip.optim.output_solve`).

Cost
----
Building and factoring :math:`JJ^\top` costs :math:`O(m^2)` and :math:`O(m^3)` in
:math:`m` = anchors x outputs. With ``anchor_batch`` each step uses a rotating subset
of the fit anchors (every anchor once per pass), and ``correct_all`` then pulls the
outputs on *all* fit anchors back by a Gauss–Newton Cauchy step. Measured on 2-task
MNIST (``benchmarks/fip_two_task.py``: MLP 784-100-100-10, 200 fit anchors x 10 logits,
batch 64, CPU time, 1 thread): a step over all anchors cost 99-145 ms, 110-170x a
fine-tuning SGD step (0.7-0.9 ms); with 32 anchors per step and the all-anchor
pull-back 9-10 ms (10-14x), of which the pull-back is ~4 ms; without it 6 ms, and with
16 anchors 8 ms. The subset steps there also learned the new task faster at equal
retention, so the cheap step was not a trade-off; without ``correct_all``, 8 anchors
per step diverged on two seeds of three and 32 at ``lr=1`` on both seeds tried.

Anchor neighbourhoods
---------------------
The metric sees only the anchor points; other inputs of the old task can still
move (on MNIST, bare anchors kept 100% of their own arg-max while old-task test
accuracy fell from 96% to 75%). With ``anchor_transform`` (e.g.
:class:`~riemfip.optim.anchor.GaussianNoise`) every step uses a fresh
perturbation of the fit anchors, scored by the frozen weights :math:`w_0`: the
path then keeps the outputs on a neighbourhood of each anchor. No labels needed. On
MNIST digits, shifts by up to one pixel (:class:`~riemfip.optim.anchor.RandomShift`)
protected the old task best: 93.9% old and 91.9% new over five seeds with 32 rotating
anchors per step (``lr=0.5``, 1200 steps), against 89.2% / 87.4% for Gaussian noise
0.1 on all anchors (``lr=1``, seed 0); the anchors' nearest-neighbour directions
(:class:`~riemfip.optim.anchor.NeighbourNoise`) and mixup of anchor pairs did no
better than the noise.

Penalty mode (the authors' formulation)
---------------------------------------
Raghavan & Thomson's code descends
:math:`L + \beta \sum_b D(f(w;x_b), y^0_b)` (a *sum* over anchors of the
Bhattacharyya distance to a frozen copy of the network) with normalised steps:
:math:`u = \nabla L + \beta \nabla \sum_b D`, :math:`w \leftarrow w - \eta\, u/\|u\|`.

Drift budget
------------
After every candidate step the mean divergence
:math:`\frac1{N'}\sum_b D(f(w; x'_b), y^0_b)` on *held-out* anchor inputs is
measured (the output metric's divergence: :math:`\tfrac12\|\Delta y\|^2`, KL, or
Bhattacharyya). With a ``drift_budget``, a step that exceeds it is halved up to
``max_backtracks`` times; if it still exceeds it, only the pull-back toward
:math:`y^0` is taken (when that lowers the drift), else the weights stay put.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import geoopt
import torch
from geoopt.optim.mixin import OptimMixin
from torch import nn
from torch.nn.utils import vector_to_parameters

from manifolds.flat import training_mode
from manifolds.output_metrics import OutputMetric, get_output_metric

from .anchor import Anchor, GroupFunction
from .linear_gram import LinearGram, linear_gram_plan
from .output_solve import AnchorSpectrum, anchor_spectrum, embedded_outputs, solve_output_system

__all__ = ["FIP", "FIPStepInfo", "AnchorDrift"]

_MODES = ("natural", "penalty")
_DEFAULT_METRIC = {"natural": "euclidean", "penalty": "bhattacharyya"}


@dataclass(frozen=True)
class AnchorDrift:
    """How far the outputs on held-out anchor inputs are from the frozen ones.

    Attributes
    ----------
    divergence : float
        Mean output-metric divergence :math:`D(f(w; x'), y^0)` over held-out anchors.
    agreement : float
        Fraction of held-out anchors whose arg-max output is unchanged.
    """

    divergence: float
    agreement: float


@dataclass(frozen=True)
class FIPStepInfo:
    """Diagnostics of one FIP step of one parameter group.

    Attributes
    ----------
    step : int
        Steps taken by this group, this one included.
    mode : str
        ``"natural"`` or ``"penalty"``.
    drift : AnchorDrift
        Held-out drift after the step.
    accepted : bool
        Whether any of the secondary step was taken.
    shrunk : bool
        Whether the drift budget shrank or refused the secondary step.
    scale : float
        :math:`\\alpha`, the share of the secondary step taken (1, 1/2, ..., or 0).
    step_norm : float
        Euclidean length of the weight change.
    grad_norm : float
        :math:`\\|\\nabla L\\|`.
    kept_fraction : float
        :math:`\\|d\\| / \\|\\nabla L\\|` in natural mode (how much of the gradient
        leaves the anchor alone); :math:`\\|\\nabla L\\|/\\|u\\|` in penalty mode.
    fit_residual : float
        :math:`\\|F(w) - F(w_0)\\|` on the fit anchors before the step (natural mode
        with a correction; else NaN).
    rank : int
        Rank :math:`k` of the stored spectrum (the preconditioner; 0 in penalty mode).
    solve_iterations : int
        Preconditioned CG iterations of this step's output-space solve.
    correction_norm : float
        Euclidean length of the pull-back toward the frozen outputs (natural mode).
    """

    step: int
    mode: str
    drift: AnchorDrift
    accepted: bool
    shrunk: bool
    scale: float
    step_norm: float
    grad_norm: float
    kept_fraction: float
    fit_residual: float
    rank: int
    solve_iterations: int
    correction_norm: float


def _check_number(name, value, *, low=None, high=None, low_open=False, allow_none=False):
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    ok = math.isfinite(v)
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and v <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"{name} must be a finite number {lo} {hi}".rstrip() + f", got {value}")
    return v


class FIP(OptimMixin, torch.optim.Optimizer):
    r"""Functionally invariant path optimizer (Raghavan & Thomson, NMI 2024).

    Parameters
    ----------
    params : iterable
        Parameters of ``model`` or dicts defining parameter groups (each group is
        moved jointly under its own metric; other groups' parameters are held at
        their current values when it is measured).
    model : torch.nn.Module
        The network whose outputs on the anchor are kept (evaluated in eval mode).
    anchor_inputs : tensor or iterable of batches
        Inputs on which the outputs must stay put (e.g. stored old-task images;
        ``(inputs, targets)`` batches are accepted, targets ignored). The outputs
        on them are frozen at construction.
    lr : float
        :math:`\eta`. Natural mode: multiplies :math:`\lambda g^{-1}\nabla L`, which
        equals :math:`\nabla L` on directions that leave the anchor alone, so an
        SGD learning rate carries over. Penalty mode: the Euclidean step length.
    mode : {"natural", "penalty"}
        See the module docstring.
    output_metric : {"euclidean", "fisher", "bhattacharyya"} or OutputMetric, optional
        How anchor outputs are compared (metric, correction and drift). Default
        ``"euclidean"`` (logits) in natural mode, ``"bhattacharyya"`` in penalty mode.
    damping : float
        :math:`\lambda` as a multiple of the anchor metric's mean eigenvalue
        :math:`\operatorname{tr}(JJ^\top)/m`. Smaller protects the anchor more
        strictly.
    momentum : float
        Heavy-ball momentum on the natural direction (natural mode).
    correction : float
        :math:`\gamma \in [0, 1]`, the share of the Levenberg–Marquardt pull-back
        toward the frozen anchor outputs taken each step (natural mode).
    correct_all : bool
        With ``anchor_batch``: after each step, also pull back toward the frozen outputs
        on *all* fit anchors, by a Gauss–Newton Cauchy step (steepest descent on
        :math:`\tfrac12\|F(w) - F(w_0)\|^2` with exact line search in the linear model;
        one forward+backward and one forward-mode pass over the fit anchors), scaled by
        :math:`\gamma`. No effect without ``anchor_batch``. On 2-task MNIST (32 of 200
        anchors per step, shifted anchors, ``lr=1``) two of two seeds diverged without it.
    beta : float
        :math:`\beta`, the weight of the summed divergence (penalty mode). On 2-task
        MNIST with 200 anchors and ``lr=0.3``, :math:`\beta = 10` kept the old task
        and never learnt the new one (0.2%); :math:`\beta = 1` gave 93.0% / 79.4%.
    drift_budget : float, optional
        Largest held-out drift (mean divergence) a step may leave; ``None``: no limit
        (drift is still measured and reported).
    max_backtracks : int
        Halvings of a step that exceeds the budget before it is refused.
    holdout_inputs : tensor or iterable, optional
        Inputs on which drift is measured; default: ``holdout_fraction`` of
        ``anchor_inputs``, which the metric then does not use.
    holdout_fraction : float
        Share of ``anchor_inputs`` held out when ``holdout_inputs`` is not given
        (0: measure drift on the fit anchors).
    anchor_transform : callable, optional
        ``(x, generator) -> x'`` of the same shape (noise, small shifts): at every
        step the metric, the pull-back and the penalty use a fresh transform of the
        fit anchors, scored by a frozen copy of the weights, so the path keeps the
        outputs on a neighbourhood of each anchor rather than on the points alone.
        Needs no labels. Drift is still measured on the untransformed held-out anchors.
    anchor_batch : int, optional
        Fit anchors used per step (``None``: all). The fit anchors are visited in
        rotating random order, ``anchor_batch`` at a time, so each step solves with an
        :math:`m = ` ``anchor_batch`` :math:`\times C` system instead of the whole anchor's;
        every anchor is visited once per ``N / anchor_batch`` steps. (Taking instead the
        anchors whose outputs moved most, an active set, diverged on 2-task MNIST with 32
        anchors at ``lr=1``: the pull-back on the worst anchors overshoots on the others.)
    seed : int
        Seed of the generator of the transform and of the anchor order (saved in
        ``state_dict``).
    solver : {"auto", "exact", "pcg"}
        How each step solves with the current metric: ``"exact"`` builds
        :math:`JJ^\top` from layer inputs and output gradients
        (:mod:`riemfip.optim.linear_gram`; every parameter of the group must belong to
        an ``nn.Linear``) and factors it by Cholesky; ``"pcg"`` runs preconditioned CG
        (any network); ``"auto"`` takes ``"exact"`` where it applies.
    solve_tol, solve_maxiter : float, int
        Relative residual and iteration cap of each step's output-space solve
        (:func:`~riemfip.optim.output_solve.solve_output_system`).
    refresh_iterations : int
        A solve that needs this many iterations marks the stored spectrum stale:
        it is refactored at the current weights on the next step.
    refresh_every : int, optional
        Also refactor every this many steps (``None``: only when stale).
    rank_rtol, max_rank
        Eigenpairs with :math:`\sigma \ge` ``rank_rtol`` :math:`\lambda` are kept in
        the spectrum, at most ``max_rank``
        (see :func:`~riemfip.optim.output_solve.anchor_spectrum`).
    stabilize : int, optional
        geoopt's convention: project :class:`geoopt.ManifoldParameter` points back
        onto their manifold every this many steps.

    Attributes
    ----------
    anchor : Anchor
        Anchor inputs and frozen outputs.
    last_info : list of FIPStepInfo
        Diagnostics of the last step, one per parameter group.

    Raises
    ------
    TypeError, ValueError
        Bad options; a group holding a tensor that is not one of the model's
        parameters; anchor inputs that the model cannot take or on which it does
        not return ``(N, C)`` outputs. :meth:`step` raises when no parameter of a
        group has a gradient, or a gradient or the closure's loss is NaN/Inf.

    Examples
    --------
    >>> opt = FIP(net.parameters(), model=net, anchor_inputs=x_old[:250])  # doctest: +SKIP
    >>> for x, y in new_task:                                              # doctest: +SKIP
    ...     opt.zero_grad()
    ...     torch.nn.functional.cross_entropy(net(x), y).backward()
    ...     opt.step()
    ...     print(opt.last_info[0].drift)
    """

    def __init__(
        self,
        params,
        *,
        model: nn.Module,
        anchor_inputs: torch.Tensor | Iterable,
        lr: float = 0.5,
        mode: str = "natural",
        output_metric: str | OutputMetric | None = None,
        damping: float = 1e-3,
        momentum: float = 0.0,
        correction: float = 1.0,
        correct_all: bool = True,
        beta: float = 1.0,
        drift_budget: float | None = None,
        max_backtracks: int = 5,
        holdout_inputs: torch.Tensor | Iterable | None = None,
        holdout_fraction: float = 0.2,
        anchor_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        anchor_batch: int | None = None,
        seed: int = 0,
        solver: str = "auto",
        solve_tol: float = 1e-3,
        solve_maxiter: int = 50,
        refresh_iterations: int = 20,
        refresh_every: int | None = None,
        rank_rtol: float = 1.0,
        max_rank: int | None = None,
        stabilize: int | None = None,
    ):
        if solver not in ("auto", "exact", "pcg"):
            raise ValueError(f"solver must be 'auto', 'exact' or 'pcg', got {solver!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        defaults = dict(
            lr=_check_number("lr", lr, low=0, low_open=True),
            damping=_check_number("damping", damping, low=0, low_open=True),
            momentum=_check_number("momentum", momentum, low=0, high=0.999),
            correction=_check_number("correction", correction, low=0, high=1),
            correct_all=bool(correct_all),
            beta=_check_number("beta", beta, low=0),
            drift_budget=_check_number(
                "drift_budget", drift_budget, low=0, low_open=True, allow_none=True
            ),
            max_backtracks=int(_check_number("max_backtracks", max_backtracks, low=0)),
            refresh_every=None
            if refresh_every is None
            else int(_check_number("refresh_every", refresh_every, low=1)),
            solver=solver,
            solve_tol=_check_number("solve_tol", solve_tol, low=0, low_open=True),
            solve_maxiter=int(_check_number("solve_maxiter", solve_maxiter, low=1)),
            refresh_iterations=int(_check_number("refresh_iterations", refresh_iterations, low=1)),
            rank_rtol=_check_number("rank_rtol", rank_rtol, low=0),
            max_rank=None if max_rank is None else int(_check_number("max_rank", max_rank, low=1)),
        )
        self.mode = mode
        self.model = model
        self.output_metric = get_output_metric(
            _DEFAULT_METRIC[mode] if output_metric is None else output_metric
        )
        self._functions: list[GroupFunction] = []
        self._plans: list[LinearGram | None] = []
        self._spectra: dict[int, AnchorSpectrum] = {}
        self.last_info: list[FIPStepInfo] = []
        super().__init__(params, defaults, stabilize=stabilize)
        self.anchor = Anchor(
            model,
            anchor_inputs,
            holdout_inputs=holdout_inputs,
            holdout_fraction=holdout_fraction,
        )
        self._fit_target = embedded_outputs(self.output_metric, self.anchor.fit_outputs)
        if anchor_transform is not None and not callable(anchor_transform):
            raise TypeError(
                f"anchor_transform must be callable, got {type(anchor_transform).__name__}"
            )
        self.anchor_transform = anchor_transform
        # A frozen copy of the network scores transformed anchors (as in the authors' code).
        self._frozen_model = copy.deepcopy(model).requires_grad_(False)
        self._frozen_weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        self._generator = torch.Generator(device=self.anchor.fit_inputs.device)
        self._generator.manual_seed(int(seed))
        self.anchor_batch = (
            None
            if anchor_batch is None
            else int(_check_number("anchor_batch", anchor_batch, low=1))
        )
        self._order = torch.zeros(0, dtype=torch.long)

    def _fit_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit anchor inputs for this step and their frozen outputs ``(x, y0)``: the stored
        ones (or the next ``anchor_batch`` of them), or a fresh ``anchor_transform`` of them
        scored by the frozen network."""
        x, y0 = self.anchor.fit_inputs, self.anchor.fit_outputs
        if self.anchor_batch is not None and self.anchor_batch < len(x):
            if len(self._order) < self.anchor_batch:  # start a new pass over the anchors
                perm = torch.randperm(len(x), generator=self._generator, device=x.device)
                self._order = torch.cat([self._order, perm.cpu()])
            idx = self._order[: self.anchor_batch].to(x.device)
            self._order = self._order[self.anchor_batch :]
            x, y0 = x[idx], y0[idx]
        if self.anchor_transform is None:
            return x, y0
        xt = self.anchor_transform(x, self._generator)
        if not isinstance(xt, torch.Tensor) or xt.shape != x.shape:
            raise ValueError(
                f"anchor_transform must return a tensor of the anchors' shape {tuple(x.shape)}, "
                f"got {getattr(xt, 'shape', type(xt).__name__)}"
            )
        with training_mode(self._frozen_model, False):
            return xt, self._frozen_model(xt).detach()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        """Add a group (checked to hold parameters of the model, floating, on one device)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        params = group["params"]
        if not params:
            raise ValueError(f"parameter group {len(self.param_groups) - 1} holds no parameters")
        for i, p in enumerate(params):
            if not p.is_floating_point():
                raise TypeError(f"parameter {i} has dtype {p.dtype}; FIP needs floating weights")
            if p.device != params[0].device or p.dtype != params[0].dtype:
                raise ValueError(
                    f"parameter {i} is {p.dtype} on {p.device}, parameter 0 {params[0].dtype} "
                    f"on {params[0].device}; a group moves as one vector"
                )
        fn = GroupFunction(self.model, params)
        self._functions.append(fn)
        self._plans.append(linear_gram_plan(self.model, fn))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """geoopt/torch optimizer state plus the frozen anchor outputs (``"anchor"``)."""
        out = super().state_dict()
        out["anchor"] = {
            "fit_outputs": self.anchor.fit_outputs.clone(),
            "holdout_outputs": self.anchor.holdout_outputs.clone(),
            "frozen_weights": self._frozen_weights.clone(),
            "generator": self._generator.get_state(),
            "order": self._order.clone(),
        }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore steps, momentum, metric factorization and the frozen anchor outputs.

        The anchor inputs are not stored: build the optimizer with the same
        ``model`` and ``anchor_inputs`` and then load.
        """
        state_dict = dict(state_dict)
        anchor = state_dict.pop("anchor", None)
        if anchor is not None:
            for key in ("fit_outputs", "holdout_outputs"):
                new = anchor[key]
                old = getattr(self.anchor, key)
                if new.shape != old.shape:
                    raise ValueError(
                        f"saved anchor {key} have shape {tuple(new.shape)}, this optimizer's "
                        f"anchor {tuple(old.shape)}: build it with the same anchor_inputs"
                    )
                setattr(self.anchor, key, new.to(device=old.device, dtype=old.dtype).clone())
            self._fit_target = embedded_outputs(self.output_metric, self.anchor.fit_outputs)
            if "frozen_weights" in anchor:
                fw = anchor["frozen_weights"]
                self._frozen_weights = fw.to(self._frozen_weights).clone()
                vector_to_parameters(self._frozen_weights, self._frozen_model.parameters())
                self._generator.set_state(anchor["generator"].cpu())
                self._order = anchor.get("order", torch.zeros(0, dtype=torch.long)).clone()
        super().load_state_dict(state_dict)
        self._spectra.clear()

    # ------------------------------------------------------------------ drift
    @torch.no_grad()
    def anchor_drift(self, group: int = 0, w: torch.Tensor | None = None) -> AnchorDrift:
        """Held-out drift at the current weights (or at flat weights ``w`` of ``group``)."""
        y = self._functions[group](w, self.anchor.holdout_inputs)
        y0 = self.anchor.holdout_outputs
        div = float(self.output_metric.divergence(y, y0).mean())
        agree = float((y.argmax(-1) == y0.argmax(-1)).to(torch.float64).mean())
        return AnchorDrift(div, agree)

    # ------------------------------------------------------------------ step
    @staticmethod
    def _flat_weights(params) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in params])

    def _flat_grad(self, gi: int, params) -> torch.Tensor:
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            raise RuntimeError(
                f"no parameter of group {gi} has a gradient: compute the secondary loss and "
                "call loss.backward() before opt.step()"
            )
        names = self._functions[gi].names
        flat = []
        for p, g, name in zip(params, grads, names, strict=True):
            if g is None:
                flat.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
                continue
            if g.is_sparse:
                raise RuntimeError(f"FIP does not support sparse gradients ({name})")
            flat.append(g.reshape(-1))
        flat = torch.cat(flat)
        # A finite sum means finite terms (one reduction instead of a check per parameter).
        if not bool(torch.isfinite(flat.sum())):
            for g, name in zip(grads, names, strict=True):
                if g is not None and not bool(torch.isfinite(g).all()):
                    raise ValueError(
                        f"the gradient of {name} contains NaN or Inf (a NaN or infinite loss?); "
                        "FIP refuses to step"
                    )
        return flat

    def _spectrum(self, gi: int, group: dict, w: torch.Tensor, state: dict) -> AnchorSpectrum:
        every = group["refresh_every"]
        stale = state.get("stale", False) or (
            every is not None and state["step"] - state.get("spectrum_step", 0) >= every
        )
        if "eigenvectors" in state and not stale:
            if gi not in self._spectra:
                self._spectra[gi] = AnchorSpectrum.from_state(state)
            return self._spectra[gi]
        # A refresh keeps the damping of the first factorization: one metric per run.
        first = "damping" not in state
        spectrum = anchor_spectrum(
            self._functions[gi],
            self.output_metric,
            w,
            self.anchor.fit_inputs,
            damping=group["damping"] if first else state["damping"],
            relative_damping=first,
            rank_rtol=group["rank_rtol"],
            max_rank=group["max_rank"],
        )
        state.update(spectrum.state())
        state["spectrum_step"] = state["step"]
        state["stale"] = False
        state["refreshes"] = state.get("refreshes", -1) + 1
        self._spectra[gi] = spectrum
        return spectrum

    def _output_solve(self, gi: int, group: dict, w: torch.Tensor, grad: torch.Tensor, state):
        r"""Solve :math:`(JJ^\top + \lambda I) z = (J\nabla, F(w) - F(w_0))` with :math:`J` at ``w``.

        Returns :math:`(J^\top z_1, J^\top z_2, J^\top r)` stacked (the last is the gradient
        of the drift :math:`\tfrac12\|r\|^2`), the residual :math:`r = F(w) - F(w_0)`,
        the rank of the stored spectrum (0 on the exact path) and the CG iterations.
        """
        fn = self._functions[gi]
        x, y0 = self._fit_batch()
        target = (
            self._fit_target
            if x is self.anchor.fit_inputs
            else embedded_outputs(self.output_metric, y0)
        )

        def embed(v):
            return embedded_outputs(self.output_metric, fn(v, x))

        plan = self._plans[gi] if group["solver"] != "pcg" else None
        # w is the model's current weights: the plan runs the model itself
        built = plan.jacobian(self.output_metric, None, x) if plan is not None else None
        if built is None:
            if group["solver"] == "exact":
                raise ValueError(
                    "solver='exact' needs every parameter of the group to belong to an nn.Linear "
                    "applied once to (N, features) inputs; use solver='pcg'"
                )
            spectrum = self._spectrum(gi, group, w, state)
            residual = embed(w) - target
            _, jvp_grad = torch.func.jvp(embed, (w,), (grad,))
            solve = solve_output_system(
                embed,
                w,
                torch.stack([jvp_grad, residual]),
                spectrum,
                tol=group["solve_tol"],
                maxiter=group["solve_maxiter"],
            )
            if solve.iterations >= group["refresh_iterations"]:
                state["stale"] = True  # the preconditioner no longer fits J: refactor next step
            _, vjp_fn = torch.func.vjp(embed, w)
            pulled_back = torch.cat([solve.pulled_back, vjp_fn(residual)[0][None]])
            return pulled_back, residual, spectrum.rank, solve.iterations
        gram, emb = built.gram(), built.embedded
        m = gram.shape[0]
        if "damping" not in state:  # fixed at the first step: one metric per run
            state["damping"] = group["damping"] * float(gram.diagonal().sum()) / m
        residual = emb - target
        jvp_grad = built.jvp(grad[None])[0]
        shifted = gram + state["damping"] * torch.eye(m, dtype=gram.dtype, device=gram.device)
        chol, info = torch.linalg.cholesky_ex(shifted)
        rhs = torch.stack([jvp_grad, residual], dim=1)
        if int(info) == 0:
            z = torch.cholesky_solve(rhs, chol).T
        else:  # lost definiteness to rounding: fall back to a least-squares solve
            z = torch.linalg.lstsq(shifted, rhs).solution.T
        pulled_back = built.vjp(torch.cat([z, residual[None]]))
        return pulled_back, residual, 0, 0

    def _cauchy_pullback(self, gi: int) -> torch.Tensor:
        r"""Gauss–Newton Cauchy step toward the frozen outputs on *all* fit anchors:
        :math:`\alpha J^\top r` with :math:`r = F(w) - F(w_0)` and
        :math:`\alpha = \|J^\top r\|^2 / \|J J^\top r\|^2`, the minimiser of
        :math:`\tfrac12\|r - \alpha JJ^\top r\|^2` (one forward and backward pass over the
        fit anchors for :math:`J^\top r`, one forward-mode pass for :math:`JJ^\top r`)."""
        fn, x = self._functions[gi], self.anchor.fit_inputs
        with torch.enable_grad():
            params = self.param_groups[gi]["params"]
            residual = embedded_outputs(self.output_metric, fn(None, x)) - self._fit_target
            grads = torch.autograd.grad(0.5 * residual.pow(2).sum(), params, allow_unused=True)
        g = torch.cat(
            [
                torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                if d is None
                else d.reshape(-1)
                for p, d in zip(params, grads, strict=True)
            ]
        )
        w = self._flat_weights(params)
        _, jg = torch.func.jvp(lambda v: embedded_outputs(self.output_metric, fn(v, x)), (w,), (g,))
        denom = float(jg.pow(2).sum())
        return g * (float(g.pow(2).sum()) / denom) if denom > 0 else torch.zeros_like(g)

    def _penalty_gradient(self, gi: int, w: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            wp = w.detach().requires_grad_(True)
            x, y0 = self._fit_batch()
            y = self._functions[gi](wp, x)
            pen = self.output_metric.divergence(y, y0).sum()
            (gp,) = torch.autograd.grad(pen, wp)
        return gp

    def step(self, closure=None):
        """One FIP step for every parameter group; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
                raise ValueError(f"the closure's loss is {float(loss)}; FIP refuses to step")
        with torch.no_grad():
            self.last_info = [
                self._step_group(gi, group) for gi, group in enumerate(self.param_groups)
            ]
            for group in self.param_groups:
                st = self.state[group["params"][0]]
                if group["stabilize"] is not None and st["step"] % group["stabilize"] == 0:
                    self.stabilize_group(group)
        return loss

    def _step_group(self, gi: int, group: dict) -> FIPStepInfo:
        params = group["params"]
        grad = self._flat_grad(gi, params)
        w = self._flat_weights(params)
        state = self.state[params[0]]
        state.setdefault("step", 0)
        lr = group["lr"]
        grad_norm = float(grad.norm())
        fit_residual = math.nan
        rank = iterations = 0
        correction = torch.zeros_like(w)
        if self.mode == "natural":
            if group["momentum"] > 0:
                buf = state.get("momentum_buffer")
                buf = grad.clone() if buf is None else buf.mul_(group["momentum"]).add_(grad)
                state["momentum_buffer"] = buf
                grad = buf
            pulled_back, residual, rank, iterations = self._output_solve(gi, group, w, grad, state)
            fit_residual = float(residual.norm())
            direction = grad - pulled_back[0]
            kept = float(direction.norm()) / grad_norm if grad_norm > 0 else 0.0
            secondary = -lr * direction
            correction = -group["correction"] * pulled_back[1]
            # Trust region: where the outputs saturate (softmax metrics) the first-order
            # pull-back can be arbitrarily long; never make it longer than a gradient step
            # (rate lr) on the secondary loss or on the drift 1/2 |F(w) - F(w0)|^2.
            cap = lr * max(grad_norm, float(pulled_back[2].norm()))
            cnorm = float(correction.norm())
            if cnorm > cap > 0:
                correction = correction * (cap / cnorm)
            if group["correct_all"] and self.anchor_batch is not None:
                # after this step's move, pull back on all fit anchors (not added to the batch's
                # pull-back at w: both would undo the same drift)
                self._write(params, w + secondary + correction)
                correction = correction - group["correction"] * self._cauchy_pullback(gi)
        else:
            u = grad + group["beta"] * self._penalty_gradient(gi, w)
            unorm = float(u.norm())
            kept = grad_norm / unorm if unorm > 0 else 0.0
            secondary = -lr * u / unorm if unorm > 0 else torch.zeros_like(u)

        def drift_at(v):  # written into the model, which is then called directly
            self._write(params, v)
            return self.anchor_drift(gi)

        scale, shrunk = 1.0, False
        new_w = w + secondary + correction
        drift = drift_at(new_w)
        budget = group["drift_budget"]
        if budget is not None and drift.divergence > budget:
            shrunk = True
            for _ in range(group["max_backtracks"]):
                scale *= 0.5
                new_w = w + scale * secondary + correction
                drift = drift_at(new_w)
                if drift.divergence <= budget:
                    break
            if drift.divergence > budget:
                scale = 0.0
                now = drift_at(w)
                new_w = w + correction
                drift = drift_at(new_w)
                if drift.divergence >= now.divergence:
                    new_w, drift = w, now
        self._write(params, new_w)
        state["step"] += 1
        return FIPStepInfo(
            step=state["step"],
            mode=self.mode,
            drift=drift,
            accepted=scale > 0,
            shrunk=shrunk,
            scale=scale,
            step_norm=float((new_w - w).norm()),
            grad_norm=grad_norm,
            kept_fraction=kept,
            fit_residual=fit_residual,
            rank=rank,
            solve_iterations=iterations,
            correction_norm=float(correction.norm()),
        )

    @staticmethod
    def _write(params, w: torch.Tensor) -> None:
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(w[offset : offset + n].view_as(p))
            offset += n

    @torch.no_grad()
    def stabilize_group(self, group: dict) -> None:
        """Project :class:`geoopt.ManifoldParameter` points back onto their manifolds."""
        for p in group["params"]:
            if isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor)):
                p.copy_(p.manifold.projx(p))
