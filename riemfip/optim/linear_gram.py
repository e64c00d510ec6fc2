r"""The exact output Gram matrix :math:`K = JJ^\top` of networks built from ``nn.Linear`` layers.

When every weight being moved belongs to an :class:`torch.nn.Linear` layer that is
applied once, to inputs of shape ``(N, d_in)``, the Jacobian of embedded output
:math:`F_{bc}` with respect to layer :math:`l`'s weights is the outer product
:math:`\delta^l_{bc} \otimes a^l_b` (the gradient of :math:`F_{bc}` with respect to
the layer's output, times the layer's input on sample :math:`b`), so

.. math::

    K_{(b,c),(b',c')} = \sum_l \big(\delta^l_{bc}\cdot\delta^l_{b'c'}\big)
        \big(\underbrace{a^l_b \cdot a^l_{b'}}_{\text{weight}} + \underbrace{1}_{\text{bias}}\big).

This costs one forward pass and :math:`C` backward passes over the anchor batch plus
products of :math:`m \times d_{\text{out}}` matrices, instead of :math:`m` Jacobian-vector
products over the batch (:func:`~riemfip.optim.output_solve.anchor_spectrum`): cheap
enough to rebuild :math:`K` at every step, so each FIP step can solve with the exact
current metric by a Cholesky factorization.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from manifolds.output_metrics import OutputMetric

from .anchor import GroupFunction

__all__ = ["LinearGram", "linear_gram_plan"]


class LinearGram:
    r"""Builds :math:`K = JJ^\top` at given weights for a group of ``nn.Linear`` parameters.

    Use :func:`linear_gram_plan` to get one (``None`` when the group has other parameters).
    """

    def __init__(self, fn: GroupFunction, layers: list[tuple[nn.Linear, bool, bool]]):
        self.fn = fn
        self.layers = layers  # (module, weight in group, bias in group)

    def __call__(self, metric: OutputMetric, w: torch.Tensor, x: torch.Tensor):
        r""":math:`K` (``(m, m)``) and :math:`F(w)` (flat), or ``None`` if the forward pass does
        not apply each layer exactly once to 2-D inputs."""
        captured: dict[nn.Module, list] = {mod: [] for mod, _, _ in self.layers}

        def hook(mod, inputs, output):
            captured[mod].append((inputs[0].detach(), output))

        handles = [mod.register_forward_hook(hook) for mod, _, _ in self.layers]
        try:
            with torch.enable_grad():
                wp = w.detach().requires_grad_(True)
                y = self.fn(wp, x)
                n = y.shape[0]
                emb = metric.embed(y) * (1.0 / math.sqrt(n))
        finally:
            for h in handles:
                h.remove()
        if any(len(v) != 1 or v[0][0].ndim != 2 for v in captured.values()):
            return None
        width = emb.shape[-1]
        outs = [captured[mod][0][1] for mod, _, _ in self.layers]
        deltas = [torch.zeros(width, *z.shape, dtype=z.dtype, device=z.device) for z in outs]
        for c in range(width):
            with torch.enable_grad():
                total = emb[:, c].sum()
            grads = torch.autograd.grad(total, outs, retain_graph=c < width - 1, allow_unused=True)
            for d, g in zip(deltas, grads, strict=True):
                if g is not None:
                    d[c] = g
        m = n * width
        gram = torch.zeros(n, width, n, width, dtype=w.dtype, device=w.device)
        for (mod, has_w, has_b), d in zip(self.layers, deltas, strict=True):
            rows = d.permute(1, 0, 2).reshape(m, -1)  # (b, c) row order
            dd = (rows @ rows.T).view(n, width, n, width)
            if has_w:
                a = captured[mod][0][0]
                factor = a @ a.T + 1.0 if has_b else a @ a.T
                gram += dd * factor[:, None, :, None]
            else:
                gram += dd
        gram = gram.view(m, m)
        return 0.5 * (gram + gram.T), emb.detach().reshape(-1)


def linear_gram_plan(model: nn.Module, fn: GroupFunction) -> LinearGram | None:
    """A :class:`LinearGram` when every parameter of the group is the weight or bias of an
    ``nn.Linear`` of ``model``; else ``None`` (use the generic solver)."""
    owner = {}
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            for kind, p in (("weight", mod.weight), ("bias", mod.bias)):
                if p is not None:
                    owner[id(p)] = (mod, kind)
    params = dict(model.named_parameters())
    layers: dict[nn.Module, list[bool]] = {}
    for name in fn.names:
        hit = owner.get(id(params[name]))
        if hit is None:
            return None
        flags = layers.setdefault(hit[0], [False, False])
        flags[0 if hit[1] == "weight" else 1] = True
    return LinearGram(fn, [(mod, fw, fb) for mod, (fw, fb) in layers.items()])
