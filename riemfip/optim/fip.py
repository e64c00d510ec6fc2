r"""FIP: a Riemannian optimizer that walks a functionally invariant path.

The user's training loop computes a *secondary* objective :math:`L` (a new task, a sparsity
penalty, ...), calls ``backward()`` and then ``opt.step()``, exactly as with
:class:`geoopt.optim.RiemannianSGD`. Each step moves a parameter group's weights :math:`w`
on the weight-space manifold whose metric is the *anchor metric*, the pullback metric of
the network's outputs on stored inputs (:class:`~manifolds.PullbackMetric`),

.. math::

    g(w) = J^\top J + \lambda I, \qquad J = \partial F/\partial w, \quad
    F_b(w) = N^{-1/2}\phi(f(w; x_b)),

so as to descend :math:`L` while the outputs on the anchor stay where they were when the
optimizer was built (:math:`F(w_0)`). One step is

.. math::

    w \leftarrow w \;-\; \eta\,\alpha\,\underbrace{\lambda g^{-1}\nabla L}_{d}
      \;-\; \gamma\, g^{-1} J^\top \big(F(w) - F(w_0)\big),

* :math:`d = \lambda g^{-1}\nabla L = \nabla L - J^\top (JJ^\top + \lambda I)^{-1} J\nabla L` is
  the Riemannian (natural) gradient in units where the metric's null space has unit
  length: it passes the part of :math:`\nabla L` that leaves the anchor outputs alone and
  damps the part along an eigendirection of :math:`J^\top J` with eigenvalue :math:`\sigma`
  by :math:`\lambda/(\sigma + \lambda)`, so the learning rate :math:`\eta` means what it
  means for SGD. This is constrained steepest descent: among steps of a given length in
  :math:`g`, the one that most decreases :math:`L`;
* the second term is the damped Gauss–Newton (Levenberg–Marquardt) step toward the frozen
  outputs, undoing the drift that accumulates because each step's metric is only locally
  right (:math:`\gamma`: :class:`~riemfip.optim.policies.PullBack`); its length is capped at
  :math:`\eta\max(\|\nabla L\|, \|J^\top(F(w) - F(w_0))\|)`, a gradient step on the secondary
  loss or on the drift (a trust region: where the outputs saturate, e.g. softmax metrics,
  the first-order pull-back can be arbitrarily long);
* :math:`\alpha \in (0, 1]` is the largest of :math:`1, \tfrac12, \dots` whose step keeps
  the held-out drift within :math:`1.5\times` the last step's (a line search on the drift,
  :class:`~riemfip.optim.policies.DriftGuard`'s growth rule, FIP's default), or that a
  drift budget allows; the retraction is :math:`R_w(v) = w + v`.

Both solves use the Jacobian at the *current* weights, in the output space
(:class:`~manifolds.gram.OutputGram`: :math:`JJ^\top + \lambda I` factored by Cholesky), on the
step's anchors (:class:`~riemfip.optim.policies.AnchorSampling`). :math:`J` is held exactly in
factored form where the network's layers allow it (:meth:`~manifolds.PullbackMetric.jacobian_operator`).
A metric factored once and reused goes stale within a few steps; the current one does not.
:class:`~riemfip.optim.Exact` ``(refresh=2)`` keeps one for the next step too (its anchors,
Jacobian and Cholesky factor, with the residual :math:`F(w) - F(w_0)` re-measured at the
current weights), which is as long as it stays fresh enough on the benchmarks.

Damping
-------
:math:`\lambda` is absolute, as in every metric. When FIP builds the anchor metric from a
model it sets :math:`\lambda = \text{damping}\cdot\operatorname{tr}(JJ^\top)/m` at the
starting weights (``damping`` relative to the mean eigenvalue of the metric's nonzero
part, invariant to the scale of the outputs and to the number of anchors; the mean is
taken over at most 64 evenly spread fit anchors) and keeps it for the whole run: one
metric per run. On a :class:`~manifolds.WeightSpace` parameter the
manifold's metric, with its own :math:`\lambda`, is the anchor metric.

Relation to other methods
-------------------------
With :math:`\lambda \to 0` the direction is the projection of :math:`\nabla L` off the row
space of :math:`J` (orthogonal gradient descent, OGD, on the anchor outputs; GPM projects
off a stored basis of layer inputs instead); with larger :math:`\lambda` it is a damped
natural gradient. The authors' own formulation, a penalty on the outputs' distance, is
:class:`~riemfip.optim.FIPPenalty`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.profiler import record_function

from manifolds import WeightSpace
from manifolds.gram import OutputGram
from manifolds.output_metrics import OutputMetric

from .anchored import PathOptimizer
from .kronecker_direction import Kronecker, anchors_needed, kronecker_step
from .policies import AnchorSampling, DriftGuard, Exact, PullBack, check_number

__all__ = ["FIP"]


class FIP(PathOptimizer):
    r"""Functionally invariant path optimizer (Raghavan & Thomson, NMI 2024), natural form.

    Parameters
    ----------
    params : iterable
        Parameters of ``model`` or dicts defining parameter groups (each group is moved
        jointly under its own metric, the other parameters held at their current
        values); or, without ``model``, flat :class:`geoopt.ManifoldParameter` points on
        :class:`~manifolds.WeightSpace` manifolds whose metric is the anchor metric
        (built by :meth:`~manifolds.PullbackMetric.from_module`; its inputs are the anchor).
    lr : float
        :math:`\eta`; multiplies :math:`\lambda g^{-1}\nabla L`, which equals :math:`\nabla L`
        on directions that leave the anchor alone, so an SGD learning rate carries over.
    model : torch.nn.Module, optional
        The network whose outputs on the anchor are kept (evaluated in eval mode).
    anchor_inputs : tensor or iterable of batches, optional
        Inputs on which the outputs must stay put (e.g. stored old-task inputs;
        ``(inputs, targets)`` batches are accepted, targets ignored). The outputs on them
        are frozen at construction.
    holdout_inputs : tensor or iterable, optional
        Inputs on which drift is measured; default: ``anchors.holdout_fraction`` of
        ``anchor_inputs``, which the metric then does not use (with manifold parameters:
        the metric's own inputs).
    output_metric : {"euclidean", "fisher", "bhattacharyya"} or OutputMetric, optional
        How anchor outputs are compared (metric, pull-back and drift); default
        ``"euclidean"`` (logits), or the manifold metric's.
    damping : float
        Relative :math:`\lambda` (see the module notes) when FIP builds the metric from a
        model. Smaller protects the anchor more strictly.
    momentum : float
        Heavy-ball momentum on the gradient before it is filtered.
    anchors : AnchorSampling, optional
        Which anchors each step protects (all fit anchors by default).
    pullback : PullBack, optional
        Strength of the pull-back toward the frozen outputs (full by default).
    guard : DriftGuard, optional
        What the held-out drift may do (default ``DriftGuard(growth=1.5)``: a step that would
        multiply it by more than 1.5 is halved, the first step held to 5e-5 of the anchor
        outputs' spread; no budget). Drift is measured every step regardless.
    curvature : Exact or Kronecker, optional
        The anchor metric of the direction: ``None`` (default) the exact one of each step's
        anchors; :class:`~riemfip.optim.Exact` ``(refresh=k)`` the exact one of a step's
        anchors, kept for ``k`` steps; :class:`~riemfip.optim.Kronecker` its
        Kronecker-factored approximation, refreshed every few steps
        (:mod:`riemfip.optim.kronecker_direction`; not with manifold parameters or a
        process group).
    process_group : torch.distributed.ProcessGroup, optional
        Data parallelism: every rank runs the same loop on its own batch of the new task
        and :meth:`step` averages the gradients over the ranks (as
        :class:`~torch.nn.parallel.DistributedDataParallel` does); the anchors, weights and
        options must be the same on every rank, which then all take the same step.

    Attributes
    ----------
    anchor : Anchor
        Anchor inputs and frozen outputs (of the first group).
    last_info : list of PathStepInfo
        Diagnostics of the last step, one per parameter group.

    Raises
    ------
    TypeError, ValueError
        Bad options; a group holding a tensor that is not one of the model's parameters;
        anchor inputs that the model cannot take or on which it does not return ``(N, C)``
        outputs; an anchor metric that is zero. :meth:`step` raises when no parameter of
        a group has a gradient, or a gradient or the closure's loss is NaN/Inf, and writes
        nothing then.

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
        lr: float = 0.4,
        *,
        model: nn.Module | None = None,
        anchor_inputs=None,
        holdout_inputs=None,
        output_metric: str | OutputMetric | None = None,
        damping: float = 1e-2,
        momentum: float = 0.0,
        anchors: AnchorSampling | None = None,
        pullback: PullBack | None = None,
        guard: DriftGuard | None = None,
        curvature: Exact | Kronecker | None = None,
        process_group=None,
    ):
        if curvature is not None and not isinstance(curvature, (Exact, Kronecker)):
            raise TypeError(
                f"curvature must be an Exact, a Kronecker or None, got {type(curvature).__name__}"
            )
        kronecker = isinstance(curvature, Kronecker)
        if kronecker and (model is None or process_group is not None):
            raise ValueError("curvature=Kronecker needs model and anchor_inputs, one process")
        self.curvature = Exact() if curvature is None else curvature
        defaults = dict(
            lr=check_number("lr", lr, low=0, low_open=True),
            damping=check_number("damping", damping, low=0, low_open=True),
            momentum=check_number("momentum", momentum, low=0, high=0.999),
        )
        guard = DriftGuard(growth=1.5) if guard is None else guard
        self.pullback = PullBack() if pullback is None else pullback
        if not isinstance(self.pullback, PullBack):
            raise TypeError(f"pullback must be a PullBack, got {type(self.pullback).__name__}")
        super().__init__(
            params,
            defaults,
            model=model,
            anchor_inputs=anchor_inputs,
            holdout_inputs=holdout_inputs,
            output_metric=output_metric,
            anchors=anchors,
            guard=guard,
            process_group=process_group,
        )

    def _init_group(self, gi, group) -> None:
        state = self.state[group.key]
        if "damping" in state:
            return
        if group.param is not None:
            lam = group.param.manifold.metric.damping
            if not lam > 0:
                raise ValueError("FIP needs an anchor metric with damping > 0")
        else:
            fit = group.anchor.fit_inputs
            spread = torch.linspace(0, len(fit) - 1, min(len(fit), 64), device=fit.device)
            sample = fit[spread.long().unique()]
            jac = self.step_metric(gi, sample, 0.0).jacobian_operator(group.read())
            lam = self.param_groups[gi]["damping"] * jac.trace() / jac.embedded.numel()
            if not lam > 0:
                raise ValueError(
                    "the anchor metric is zero: the outputs on the anchor do not depend on "
                    f"the weights of parameter group {gi}"
                )
        state["damping"] = float(lam)

    def damping_of(self, group: int = 0) -> float:
        """The absolute :math:`\\lambda` of group ``group``'s anchor metric."""
        return self.state[self._groups[group].key]["damping"]

    def manifold(self, group: int = 0) -> WeightSpace:
        """The weight-space manifold group ``group`` moves on: the anchor metric on all fit
        anchors (e.g. ``opt.manifold().metric.spectrum(w, k)``)."""
        g = self._groups[group]
        if g.param is not None:
            return g.param.manifold
        return WeightSpace(self.step_metric(group, g.anchor.fit_inputs, self.damping_of(group)))

    def natural_direction(
        self, w: torch.Tensor, grad: torch.Tensor, group: int = 0
    ) -> torch.Tensor:
        r""":math:`d = \lambda g(w)^{-1}\nabla L` with the metric on all fit anchors of ``group``."""
        gram = self.manifold(group).metric.output_gram(w)
        return gram.damped_projection(grad)

    def _step_anchors(self, group):
        state = self.state[group.key]
        if isinstance(self.curvature, Kronecker):
            if not anchors_needed(self.curvature, state, self.pullback):
                return None, None  # a Kronecker step between refreshes without a pull-back
        elif not self.curvature.due(state):
            return state["exact"]["x"], state["exact"]["y0"]  # the refresh step's anchors
        return super()._step_anchors(group)

    def _direction(self, gi, param_group, state, w, grad, x, y0):
        lr = param_group["lr"]
        if param_group["momentum"] > 0:
            buf = state.get("momentum_buffer")
            buf = grad.clone() if buf is None else buf.mul(param_group["momentum"]).add_(grad)
            state["momentum_buffer"] = buf
            grad = buf
        if isinstance(self.curvature, Kronecker):
            return kronecker_step(self, gi, param_group, state, w, grad, x, y0)
        seen, gram, embedded = self._exact_metric(gi, state, w, x, y0)
        jac = gram.jacobian
        residual = embedded - seen.embed_samples(y0)
        # one solve with two right-hand sides: (K + l I)^{-1} [J grad, r]
        z = gram.solve(torch.stack([jac.jvp(grad[None])[0], residual]))
        pulled = jac.vjp(z)  # J^T z1, J^T z2
        direction = grad - pulled[0]
        secondary = -lr * direction
        drift_gradient = float(torch.dot(residual, gram.matrix @ residual).clamp_min(0).sqrt())
        cap = lr * max(float(grad.norm()), drift_gradient)  # |J^T r| = sqrt(r^T K r)
        correction = self.pullback.correction(pulled[1], cap)
        correction = self._with_all_anchor_pullback(gi, state, w, secondary, correction)
        grad_norm = float(grad.norm())
        return (
            secondary,
            correction,
            {
                "kept_fraction": float(direction.norm()) / grad_norm if grad_norm > 0 else 0.0,
                "protected_share": _protected_share(gram, z[0], direction),
                "fit_residual": float(residual.norm()),
            },
        )

    def _exact_metric(self, gi, state, w, x, y0):
        """``(output metric, output Gram, F(w))`` of this step's anchors: the Gram factored at
        ``w`` on a refresh step (every step by default), else the refresh step's, with the
        embedded outputs ``F(w)`` re-measured by one forward pass (:class:`Exact`)."""
        policy: Exact = self.curvature
        if not policy.due(state):
            kept = state["exact"]
            metric = self.step_metric(gi, x, state["damping"], kept["seen"])
            return kept["seen"], kept["gram"], metric.embed(w).reshape(-1)
        with record_function("riemfip.step_jacobian"):
            seen = self.step_output_metric(x, y0)
            gram = self.step_metric(gi, x, state["damping"], seen).output_gram(w)
        if policy.refresh > 1:
            state["exact"] = {"step": state["step"], "x": x, "y0": y0, "seen": seen, "gram": gram}
        return seen, gram, gram.jacobian.embedded

    def _with_all_anchor_pullback(self, gi, state, w, secondary, correction) -> torch.Tensor:
        """``correction``, plus on the steps it is due (:meth:`PullBack.all_anchors_due`) the
        pull-back on all fit anchors from the point this step's move reaches (not from ``w``,
        where it would undo the same drift as the step's own pull-back); both routes'."""
        pullback = self.pullback
        if not pullback.all_anchors_due(state["step"], self.sampling.batch):
            return correction
        with record_function("riemfip.all_anchor_pullback"):
            cauchy = self._cauchy_pullback(gi, w + secondary + correction)
        return correction - pullback.strength * cauchy

    def _cauchy_pullback(self, gi: int, w: torch.Tensor) -> torch.Tensor:
        r"""Gauss–Newton Cauchy step toward the frozen outputs on *all* fit anchors:
        :math:`\alpha J^\top r` with :math:`r = F(w) - F(w_0)` and
        :math:`\alpha = \|J^\top r\|^2 / \|J J^\top r\|^2`, the minimiser of
        :math:`\tfrac12\|r - \alpha JJ^\top r\|^2` (one forward and backward pass over the
        fit anchors for :math:`J^\top r`, one forward-mode pass for :math:`JJ^\top r`)."""
        anchor = self._groups[gi].anchor
        metric = self.step_metric(gi, anchor.fit_inputs, 0.0)
        jac = metric.autograd_jacobian(w)
        r = jac.embedded - self.output_metric.embed_samples(anchor.fit_outputs)
        g = jac.vjp(r[None])
        jg = jac.jvp(g)
        denom = float(jg.pow(2).sum())
        return g[0] * (float(g.pow(2).sum()) / denom) if denom > 0 else torch.zeros_like(w)


def _protected_share(gram: OutputGram, z: torch.Tensor, direction: torch.Tensor) -> float:
    r""":math:`\|P_\lambda d\| / \|d\|` for the natural direction :math:`d = (I - P_\lambda)\nabla L`,
    :math:`P_\lambda = J^\top (K + \lambda I)^{-1} J`, from :math:`z = (K + \lambda I)^{-1} J\nabla L`.

    :math:`P_\lambda d = P_\lambda\nabla L - P_\lambda^2\nabla L = \lambda J^\top y` with
    :math:`y = (K + \lambda I)^{-1} z` (because :math:`K z = J\nabla L - \lambda z`), and
    :math:`\|J^\top y\|^2 = y^\top K y = y^\top (z - \lambda y)`: one more output-space solve,
    no pass through the network.
    """
    dnorm = float(direction.norm())
    if dnorm == 0.0:
        return 0.0
    lam = gram.damping
    y = gram.solve(z)
    return lam * float(torch.dot(y, z - lam * y).clamp_min(0).sqrt()) / dnorm
