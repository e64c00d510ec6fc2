r"""What every functionally invariant path optimizer shares: weights, anchors, drift, state.

A path optimizer moves each parameter group's weights :math:`w` (jointly: the anchor metric
couples them) to descend a secondary loss while the network's outputs on the anchor stay
where they were. :class:`PathOptimizer` holds everything but the direction of a step:

* the parameter groups, either parameters of a ``model`` (each group read, written and
  evaluated as one flat vector through :class:`~manifolds.flat.FlatModule`) or flat
  :class:`geoopt.ManifoldParameter` points on a :class:`~manifolds.WeightSpace` whose metric
  was built by :meth:`~manifolds.PullbackMetric.from_module` (its inputs are the anchor);
* the :class:`~riemfip.optim.anchor.Anchor` and the anchors each step protects
  (:class:`~riemfip.optim.policies.AnchorSampling`);
* the drift certificate (:class:`~riemfip.optim.policies.DriftGuard`): every candidate step's
  held-out drift is measured at the candidate weights through the flat network, without
  writing into the live model; only the accepted point is written;
* the normalisation policy: BatchNorm running statistics are the old task's. The metric is
  always taken in eval mode, and the buffers of every normalisation layer of ``model`` are
  restored after each step, so train-mode forward passes on the new task do not overwrite
  them (Dropout is the user's: it acts in their forward pass, never in the metric's);
* ``state_dict``/``load_state_dict``, with the frozen outputs, the generator and the anchor
  order, so that a resumed run takes the same steps;
* data parallelism (``process_group``): each rank computes the secondary loss on its own
  batch, and :meth:`PathOptimizer.step` averages the gradients over the ranks,
  :math:`\nabla L = R^{-1}\sum_r \nabla L_r`, as
  :class:`~torch.nn.parallel.DistributedDataParallel` does
  (:meth:`~manifolds.data_parallel.DataParallel.mean`). The anchors are replicated: every rank
  holds the same anchor inputs, weights and sampling seed, so every rank then takes the
  same step without further communication.

Each step runs its parts under :func:`torch.autograd.profiler.record_function` labels
(``riemfip.anchors``, ``riemfip.direction``, ``riemfip.drift_guard``; FIP adds
``riemfip.step_jacobian`` and ``riemfip.all_anchor_pullback`` inside the direction), so
:mod:`torch.profiler` shows where a step's time goes (``benchmarks/fip_step_anatomy.py``).

Subclasses give :meth:`PathOptimizer._direction`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import geoopt
import torch
from geoopt.optim.mixin import OptimMixin
from torch import nn
from torch.autograd.profiler import record_function
from torch.nn.modules.batchnorm import _NormBase

from manifolds import PullbackMetric, WeightSpace
from manifolds.data_parallel import DataParallel
from manifolds.flat import FlatModule
from manifolds.output_metrics import OutputMetric, Sketched, get_output_metric

from .anchor import Anchor, AnchorDrift
from .anchor_transforms import bound_transform
from .batchnorm import BatchNormWarning, batchnorm_in_train_mode
from .policies import AnchorSampling, DriftGuard

__all__ = ["PathOptimizer", "PathStepInfo"]


@dataclass(frozen=True)
class PathStepInfo:
    """Diagnostics and drift certificate of one step of one parameter group.

    Attributes
    ----------
    step : int
        Steps taken by this group, this one included.
    drift : AnchorDrift
        Held-out drift after the step.
    within_budget : bool or None
        Whether ``drift.divergence`` is within the :class:`DriftGuard` budget (``None``
        without a budget).
    accepted : bool
        Whether any of the secondary step was taken.
    shrunk : bool
        Whether a rule of the :class:`DriftGuard` (growth or budget) shrank or refused the
        secondary step.
    scale : float
        :math:`\\alpha`, the share of the secondary step taken (1, 1/2, ..., or 0).
    step_norm : float
        Euclidean length of the weight change.
    grad_norm : float
        :math:`\\|\\nabla L\\|`.
    kept_fraction : float
        :math:`\\|d\\| / \\|\\nabla L\\|` for the natural direction :math:`d` (how much of the
        gradient leaves the anchor alone); :math:`\\|\\nabla L\\|/\\|u\\|` in penalty form.
    protected_share : float
        Share of the secondary step in the subspace the anchor metric protects,
        :math:`\\|P_\\lambda s\\| / \\|s\\|` with :math:`P_\\lambda = J^\\top (JJ^\\top + \\lambda I)^{-1} J`
        (natural form; NaN in penalty form).
    fit_residual : float
        :math:`\\|F(w) - F(w_0)\\|` on the step's anchors before the step (NaN in penalty form).
    correction_norm : float
        Euclidean length of the pull-back toward the frozen outputs.
    """

    step: int
    drift: AnchorDrift
    within_budget: bool | None
    accepted: bool
    shrunk: bool
    scale: float
    step_norm: float
    grad_norm: float
    kept_fraction: float
    protected_share: float
    fit_residual: float
    correction_norm: float


class _Group:
    """One parameter group's flat weights: where they live, the network on them, the anchor."""

    def __init__(self, flat: FlatModule, anchor: Anchor, param: torch.Tensor | None = None):
        self.flat, self.anchor, self.param = flat, anchor, param
        self.transform = None  # the anchor transform, bound to this group's fit anchors
        self.spread: float | None = None  # of the frozen outputs, once needed
        self.key = param if param is not None else flat.parameters()[0]

    def read(self) -> torch.Tensor:
        return self.param.detach().clone() if self.param is not None else self.flat.flatten()

    def write(self, w: torch.Tensor) -> None:
        if self.param is not None:
            self.param.copy_(w)
        else:
            self.flat.write(w)

    def gradient(self) -> torch.Tensor | None:
        if self.param is not None:
            g = self.param.grad
            return None if g is None else g.reshape(-1)
        return self.flat.gradient()

    def outputs(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The network's outputs (eval mode) on ``x`` with this group's weights ``w``."""
        return self.flat(w, x, train=False)


class PathOptimizer(OptimMixin, torch.optim.Optimizer):
    """Base of :class:`~riemfip.optim.FIP` and :class:`~riemfip.optim.FIPPenalty` (see the
    module docstring). Not used directly."""

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        model: nn.Module | None,
        anchor_inputs,
        holdout_inputs,
        output_metric: str | OutputMetric | None,
        anchors: AnchorSampling | None,
        guard: DriftGuard | None,
        process_group=None,
    ):
        self._data_parallel = None if process_group is None else DataParallel.checked(process_group)
        anchors = AnchorSampling() if anchors is None else anchors
        guard = DriftGuard() if guard is None else guard
        if not isinstance(anchors, AnchorSampling):
            raise TypeError(f"anchors must be an AnchorSampling, got {type(anchors).__name__}")
        if not isinstance(guard, DriftGuard):
            raise TypeError(f"guard must be a DriftGuard, got {type(guard).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if (model is None) != (anchor_inputs is None):
            raise ValueError(
                "pass model and anchor_inputs together (FIP on the model's parameters), or "
                "neither (FIP on flat ManifoldParameters of a WeightSpace)"
            )
        self.model, self.sampling, self.guard = model, anchors, guard
        self._output_metric = None if output_metric is None else get_output_metric(output_metric)
        self._holdout_inputs = holdout_inputs
        self._groups: list[_Group] = []
        self._shared_anchor = None
        if model is not None:
            whole = FlatModule(model)
            self._shared_anchor = Anchor(
                whole,
                whole.flatten(),
                anchor_inputs,
                holdout_inputs=holdout_inputs,
                holdout_fraction=anchors.holdout_fraction,
            )
            self._buffers = _normalization_buffers(model)
        else:
            self._buffers = {}
        self._warned_batchnorm = False  # BatchNormWarning is said once
        self.anchor: Anchor | None = self._shared_anchor
        like = self._shared_anchor.fit_inputs if self._shared_anchor is not None else None
        self._generator = torch.Generator(device=like.device if like is not None else "cpu")
        self._generator.manual_seed(anchors.seed)
        self._order = torch.zeros(0, dtype=torch.long, device="cpu")
        self.last_info: list[PathStepInfo] = []
        super().__init__(params, defaults)
        if self.anchor is None:
            self.anchor = self._groups[0].anchor

    # ------------------------------------------------------------------ groups
    @property
    def output_metric(self) -> OutputMetric:
        """How anchor outputs are compared (metric, pull-back and drift)."""
        return self._output_metric

    def add_param_group(self, param_group: dict) -> None:
        """Add a group: parameters of ``model`` (floating, one device and dtype), or one flat
        ``ManifoldParameter`` on a :class:`~manifolds.WeightSpace` built from a module."""
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        gi = len(self.param_groups) - 1
        if not params:
            raise ValueError(f"parameter group {gi} holds no parameters")
        for i, p in enumerate(params):
            if not p.is_floating_point():
                raise TypeError(f"parameter {i} has dtype {p.dtype}; FIP needs floating weights")
            if p.device != params[0].device or p.dtype != params[0].dtype:
                raise ValueError(
                    f"parameter {i} is {p.dtype} on {p.device}, parameter 0 {params[0].dtype} "
                    f"on {params[0].device}; a group moves as one vector"
                )
        group = self._manifold_group(params) if self.model is None else self._model_group(params)
        group.transform = bound_transform(self.sampling.transform, group.anchor.fit_inputs)
        self._groups.append(group)
        self._init_group(gi, group)

    def _model_group(self, params) -> _Group:
        if self._output_metric is None:
            self._output_metric = get_output_metric(self.default_output_metric)
        return _Group(FlatModule(self.model, params), self._shared_anchor)

    def _manifold_group(self, params) -> _Group:
        (p,) = params if len(params) == 1 else (None,)
        manifold = getattr(p, "manifold", None)
        if not isinstance(p, geoopt.ManifoldParameter) or not isinstance(manifold, WeightSpace):
            raise TypeError(
                "without model and anchor_inputs, each parameter group must be one flat "
                "geoopt.ManifoldParameter on a manifolds.WeightSpace (see flat_parameter)"
            )
        metric = manifold.metric
        if metric.module is None:
            raise ValueError(
                "the WeightSpace's metric must be built by PullbackMetric.from_module: FIP "
                "needs the network and its anchor inputs"
            )
        if self._output_metric is None:
            self._output_metric = metric.output_metric
        anchor = Anchor(
            metric.module,
            p.detach(),
            metric.inputs,
            holdout_inputs=self._holdout_inputs,
            holdout_fraction=0.0,
        )
        return _Group(metric.module, anchor, param=p)

    default_output_metric = "euclidean"

    def _init_group(self, gi: int, group: _Group) -> None:
        """Hook: per-group set-up (e.g. the metric's damping) once the group exists."""

    # ------------------------------------------------------------------ anchors
    def _step_anchors(self, group: _Group) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit anchor inputs for this step and their frozen outputs ``(x, y0)``: all of them (or
        the next ``batch`` in rotation), transformed and scored by the frozen network if the
        sampling has a transform."""
        anchor = group.anchor
        x, y0 = anchor.fit_inputs, anchor.fit_outputs
        batch = self.sampling.batch
        if batch is not None and batch < len(x):
            if len(self._order) < batch:  # start a new pass over the anchors
                perm = torch.randperm(len(x), generator=self._generator, device=x.device)
                self._order = torch.cat([self._order, perm.cpu()])
            idx = self._order[:batch].to(x.device)
            self._order = self._order[batch:]
            x, y0 = x[idx], y0[idx]
        transform = group.transform
        if transform is None:
            return x, y0
        xt = transform(x, self._generator)
        if not isinstance(xt, torch.Tensor) or xt.shape != x.shape:
            raise ValueError(
                f"the anchor transform must return a tensor of the anchors' shape {tuple(x.shape)}, "
                f"got {getattr(xt, 'shape', type(xt).__name__)}"
            )
        return xt, anchor.frozen_outputs(xt, "transformed anchors")

    def step_metric(
        self, gi: int, x: torch.Tensor, damping: float, output_metric: OutputMetric | None = None
    ) -> PullbackMetric:
        """The anchor metric of group ``gi`` on anchor inputs ``x`` with damping ``damping``
        (and this optimizer's output metric unless another is given); on a manifold
        parameter, with its metric's :class:`~manifolds.MixedPrecision`, if any."""
        group = self._groups[gi]
        precision = None if group.param is None else group.param.manifold.metric.precision
        return PullbackMetric.from_module(
            group.flat,
            x,
            output_metric=self.output_metric if output_metric is None else output_metric,
            damping=damping,
            check_inputs=False,
            precision=precision,
        )

    def step_output_metric(self, x: torch.Tensor, y0: torch.Tensor) -> OutputMetric:
        """The output metric of this step: the optimizer's, or a fresh :class:`Sketched` view of
        it through ``anchors.outputs`` random directions per anchor."""
        rank = self.sampling.outputs
        width = self.output_metric.embed(y0[:1]).shape[-1]
        if rank is None or rank >= width:
            return self.output_metric
        return Sketched.draw(self.output_metric, len(x), width, rank, self._generator, y0)

    # ------------------------------------------------------------------ drift
    @torch.no_grad()
    def anchor_drift(self, group: int = 0, w: torch.Tensor | None = None) -> AnchorDrift:
        """Held-out drift at the current weights (or at flat weights ``w`` of ``group``)."""
        g = self._groups[group]
        w = g.read() if w is None else w
        return g.anchor.drift(g.outputs(w, g.anchor.holdout_inputs), self.output_metric)

    def _guarded_move(self, gi, w, secondary, correction):
        """The accepted point, its drift, the share ``scale`` of the secondary step taken, and
        whether a rule of the guard shrank it (see :class:`DriftGuard`); nothing is written."""
        guard, state = self.guard, self.state[self._groups[gi].key]
        budget, shrunk = guard.budget, False

        def move(scale: float):
            new_w = w + scale * secondary + correction
            return new_w, self.anchor_drift(gi, new_w)

        scale = 1.0
        new_w, drift = move(scale)
        if guard.growth is not None:
            before = state.get("drift")
            if before is None:  # the first step (or a state saved without it)
                before = self.anchor_drift(gi, w).divergence
            allowed = guard.growth * before + guard.floor * self._output_spread(gi)
            for _ in range(guard.max_backtracks):
                if drift.divergence <= allowed:
                    break
                scale, shrunk = 0.5 * scale, True
                new_w, drift = move(scale)
        if budget is not None and drift.divergence > budget:
            shrunk = True
            for _ in range(guard.max_backtracks):
                scale *= 0.5
                new_w, drift = move(scale)
                if drift.divergence <= budget:
                    break
            if drift.divergence > budget:
                scale, now = 0.0, self.anchor_drift(gi, w)
                new_w, drift = move(scale)  # the pull-back alone
                if drift.divergence >= now.divergence:
                    new_w, drift = w, now
        return new_w, drift, scale, shrunk

    def _output_spread(self, gi: int) -> float:
        r""":math:`S = \tfrac1{2N}\sum_b \|e(y^0_b) - \bar e\|^2`, the spread of group ``gi``'s
        embedded frozen outputs on the fit anchors (the unit of :attr:`DriftGuard.floor`)."""
        group = self._groups[gi]
        if group.spread is None:
            y0 = group.anchor.fit_outputs
            e = self.output_metric.embed(y0).reshape(len(y0), -1)
            group.spread = float(0.5 * (e - e.mean(0)).pow(2).sum(1).mean())
        return group.spread

    # ------------------------------------------------------------------ step
    def step(self, closure=None):
        """One step for every parameter group; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
                raise ValueError(f"the closure's loss is {float(loss)}; FIP refuses to step")
        self._warn_batch_statistics()
        with torch.no_grad():
            grads = [self._gradient(gi) for gi in range(len(self._groups))]
            self.last_info = [
                self._step_group(gi, group, grad)
                for gi, (group, grad) in enumerate(zip(self.param_groups, grads, strict=True))
            ]
            for buffer, saved in self._buffers.values():
                buffer.copy_(saved)
        return loss

    def _warn_batch_statistics(self) -> None:
        """:class:`BatchNormWarning`, once, if the model's BatchNorm layers are in train mode:
        the new task is then learned under batch statistics that the restored running
        statistics (the old task's) replace at evaluation (:mod:`riemfip.optim.batchnorm`)."""
        if not self._buffers or self._warned_batchnorm:  # no running statistics, or said
            return
        names = batchnorm_in_train_mode(self.model)
        if names:
            self._warned_batchnorm = True
            warnings.warn(
                f"BatchNorm layers {names[:3]}{' ...' if len(names) > 3 else ''} are in train "
                "mode: FIP keeps the old task's running statistics, so what is learned under "
                "batch statistics will not hold in eval mode (the new task can fall to chance). "
                "Call riemfip.optim.batchnorm_eval(model) after model.train() (and expect a "
                "lower lr to be needed)",
                BatchNormWarning,
                stacklevel=4,  # the caller of opt.step(), through torch's step wrapper
            )

    def _gradient(self, gi: int) -> torch.Tensor:
        grad = self._groups[gi].gradient()
        if grad is None:
            raise RuntimeError(
                f"no parameter of group {gi} has a gradient: compute the secondary loss and "
                "call loss.backward() before opt.step()"
            )
        if self._data_parallel is not None:  # before the check, so that every rank raises
            grad = self._data_parallel.mean(grad)
        if not bool(torch.isfinite(grad.sum())):
            raise ValueError(
                f"the gradient of group {gi} contains NaN or Inf (a NaN or infinite loss?); "
                "FIP refuses to step"
            )
        return grad

    def _step_group(self, gi: int, param_group: dict, grad: torch.Tensor) -> PathStepInfo:
        group = self._groups[gi]
        state = self.state[group.key]
        # what a refused step restores: the group's state (whose tensors are replaced, never
        # updated in place), the anchor order and the generator
        state.setdefault("step", 0)
        before = (dict(state), self._order, self._generator.get_state())

        def restore() -> None:
            state.clear()
            state.update(before[0])
            self._order = before[1]
            self._generator.set_state(before[2])

        state["step"] += 1
        w = group.read()
        try:
            with record_function("riemfip.anchors"):
                x, y0 = self._step_anchors(group)
            with record_function("riemfip.direction"):
                secondary, correction, diag = self._direction(
                    gi, param_group, state, w, grad, x, y0
                )
            with record_function("riemfip.drift_guard"):
                new_w, drift, scale, shrunk = self._guarded_move(gi, w, secondary, correction)
            state["drift"] = drift.divergence
        except Exception:  # a step that fails part-way leaves no trace either
            restore()
            raise
        if not bool(torch.isfinite(new_w.sum())):
            restore()
            raise FloatingPointError(
                f"step {state['step'] + 1} of group {gi} is not finite (|grad| = "
                f"{float(grad.norm()):.3g}); the weights and the optimizer's state are left as "
                "they were: lower lr (the step diverged)"
            )
        group.write(new_w)
        budget = self.guard.budget
        return PathStepInfo(
            step=state["step"],
            drift=drift,
            within_budget=None if budget is None else drift.divergence <= budget,
            accepted=scale > 0,
            shrunk=shrunk,
            scale=scale,
            step_norm=float((new_w - w).norm()),
            grad_norm=float(grad.norm()),
            correction_norm=float(correction.norm()),
            kept_fraction=diag.get("kept_fraction", math.nan),
            protected_share=diag.get("protected_share", math.nan),
            fit_residual=diag.get("fit_residual", math.nan),
        )

    def _direction(self, gi, param_group, state, w, grad, x, y0):
        """``(secondary, correction, diagnostics)`` of a step from ``w`` (subclasses)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """geoopt/torch optimizer state plus the frozen anchor outputs, the generator and the
        anchor order (``"anchor"``)."""
        out = super().state_dict()
        out["anchor"] = {
            "anchors": [g.anchor.state_dict() for g in self._groups],
            "generator": self._generator.get_state(),
            "order": self._order.clone(),
        }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore steps, momentum, damping, the frozen anchor outputs and the sampling state.

        The anchor inputs are not stored: build the optimizer with the same ``model`` and
        ``anchor_inputs`` (or manifold parameters) and then load.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop("anchor", None)
        if saved is not None:
            for g, anchor_state in zip(self._groups, saved["anchors"], strict=True):
                g.anchor.load_state_dict(anchor_state)
            self._generator.set_state(saved["generator"].cpu())
            self._order = saved["order"].clone()
        super().load_state_dict(state_dict)


def _normalization_buffers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every buffer of the model's normalisation layers, with a copy of its value now."""
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, _NormBase):
            for bname, buf in mod.named_buffers(recurse=False):
                if buf is not None:
                    out[f"{mname}.{bname}"] = (buf, buf.detach().clone())
    return out
