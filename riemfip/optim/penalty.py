r"""The authors' formulation of a functionally invariant path: a penalty on the outputs' distance.

Raghavan & Thomson's code descends

.. math::

    L(w) + \beta \sum_b D\big(f(w; x_b), y^0_b\big)

(a *sum* over anchors of the Bhattacharyya distance to the outputs of a frozen copy of the
network) with normalised steps, :math:`u = \nabla L + \beta \nabla \sum_b D`,
:math:`w \leftarrow w - \eta\, u/\|u\|`. No linear solve: one more forward and backward
pass over the step's anchors. :class:`FIPPenalty` does this with the same anchors, drift
certificate and state as :class:`~riemfip.optim.FIP`.
"""

from __future__ import annotations

import torch
from torch import nn

from manifolds.output_metrics import OutputMetric

from .anchored import PathOptimizer
from .policies import AnchorSampling, DriftGuard, check_number

__all__ = ["FIPPenalty"]


class FIPPenalty(PathOptimizer):
    r"""Functionally invariant path by a penalty on the anchor outputs (the authors' form).

    Parameters
    ----------
    params, model, anchor_inputs, holdout_inputs, anchors, guard, process_group
        As for :class:`~riemfip.optim.FIP`.
    lr : float
        :math:`\eta`, the Euclidean length of each step.
    beta : float
        :math:`\beta`, the weight of the summed divergence. On 2-task MNIST a large
        :math:`\beta` keeps the old task and does not learn the new one; see
        ``benchmarks/README.md`` for measured settings.
    output_metric : {"euclidean", "fisher", "bhattacharyya"} or OutputMetric, optional
        Whose divergence :math:`D` is summed; default ``"bhattacharyya"``.
    """

    default_output_metric = "bhattacharyya"

    def __init__(
        self,
        params,
        lr: float = 0.3,
        *,
        model: nn.Module | None = None,
        anchor_inputs=None,
        holdout_inputs=None,
        beta: float = 1.0,
        output_metric: str | OutputMetric | None = None,
        anchors: AnchorSampling | None = None,
        guard: DriftGuard | None = None,
        process_group=None,
    ):
        defaults = dict(
            lr=check_number("lr", lr, low=0, low_open=True),
            beta=check_number("beta", beta, low=0),
        )
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

    def penalty_gradient(self, gi: int, w: torch.Tensor, x: torch.Tensor, y0: torch.Tensor):
        r""":math:`\nabla_w \sum_b D(f(w; x_b), y^0_b)` for group ``gi`` at flat weights ``w``."""
        with torch.enable_grad():
            wp = w.detach().requires_grad_(True)
            penalty = self.output_metric.divergence(self._groups[gi].outputs(wp, x), y0).sum()
            (grad,) = torch.autograd.grad(penalty, wp)
        return grad

    def _direction(self, gi, param_group, state, w, grad, x, y0):
        u = grad + param_group["beta"] * self.penalty_gradient(gi, w, x, y0)
        unorm = float(u.norm())
        secondary = -param_group["lr"] * u / unorm if unorm > 0 else torch.zeros_like(u)
        kept = float(grad.norm()) / unorm if unorm > 0 else 0.0
        return secondary, torch.zeros_like(w), {"kept_fraction": kept}
