r"""FIP's plan for groups of layer parameters (``nn.Linear``, ``nn.Conv2d``, normalisation
layers): the exact, factored output Jacobian (:mod:`manifolds.layer_jacobian`) at the
current weights, from which each step builds
:math:`K = JJ^\top`, :math:`J\nabla` and :math:`J^\top z` without further passes
through the network.
"""

from __future__ import annotations

import torch
from torch import nn

from manifolds.layer_jacobian import FactoredJacobian, LayerPlan, factored_layers, layer_jacobian
from manifolds.output_metrics import OutputMetric

from .anchor import GroupFunction

__all__ = ["FactoredJacobian", "LinearGram", "linear_gram_plan"]


class LinearGram:
    r"""Builds the factored :math:`J` (:class:`~manifolds.layer_jacobian.FactoredJacobian`) of a
    group of layer parameters at given weights.

    Use :func:`linear_gram_plan` to get one (``None`` when the group has other parameters).
    """

    def __init__(self, fn: GroupFunction, layers: LayerPlan):
        self.fn = fn
        self.layers = layers  # the group's layers with the flat offsets of their parameters

    def _params(self) -> list[torch.Tensor]:
        params = dict(self.fn.model.named_parameters())
        return [params[name] for name in self.fn.names]

    def jacobian(self, metric: OutputMetric, w: torch.Tensor | None, x: torch.Tensor):
        r""":math:`J` at ``w`` on inputs ``x`` (embedded outputs scaled by
        :math:`N^{-1/2}`), or ``None`` if the forward pass breaks an assumption of
        :mod:`manifolds.layer_jacobian` (e.g. a layer applied twice). ``w=None``: at the model's current weights, by a
        plain forward pass of the model (cheaper than a functional call)."""
        if w is None and not all(p.requires_grad for p in self._params()):
            w = torch.cat([p.detach().reshape(-1) for p in self._params()])
        wp = None if w is None else w.detach().requires_grad_(True)
        return layer_jacobian(self.layers, lambda: [self.fn(wp, x)], metric, self.fn.dim)


def linear_gram_plan(model: nn.Module, fn: GroupFunction) -> LinearGram | None:
    """A :class:`LinearGram` when every parameter of the group is the weight or bias of a
    layer with a factored Jacobian (:func:`manifolds.layer_jacobian.factored_layers`);
    else ``None`` (use the generic solver)."""
    layers = factored_layers(model, fn.names)
    return None if layers is None else LinearGram(fn, layers)
