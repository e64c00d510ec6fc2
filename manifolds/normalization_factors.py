r"""The factored Jacobian of normalisation layers with an affine part: ``nn.BatchNorm1d/2d/3d``
(eval mode, running statistics), ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.RMSNorm``.

Each computes :math:`y = \gamma \odot \hat x + \beta` with :math:`\hat x` its input normalised
(by running statistics, or per sample), :math:`\gamma, \beta` one number per parameter
coordinate :math:`p` shared over positions :math:`t` (pixels for a per-channel layer, leading
dimensions for a layer over trailing features). The Jacobian rows of embedded output
:math:`F_{bc}` with respect to them are

.. math::

    R^\gamma_{bc,p} = \sum_t \delta_{bctp}\, \hat x_{btp}, \qquad
    R^\beta_{bc,p} = \sum_t \delta_{bctp},

with :math:`\delta = \partial F_{bc}/\partial y_b`. The layer has few such parameters, so
:class:`NormalizationFactor` keeps the rows :math:`R` (``(NC, P)``) themselves: :math:`K`,
:math:`Jv`, :math:`J^\top z` and the exact metric block :math:`R^\top R` are single matrix
products.

BatchNorm is factored only where it uses its running statistics (eval mode with
``track_running_stats``); with batch statistics the samples interact and
:mod:`manifolds.layer_jacobian` takes no factored route at all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .curvature_blocks import ExactBlock
from .parameter_slots import VectorSlots

__all__ = [
    "NormalizationFactor",
    "batch_norm_factors",
    "group_norm_factors",
    "layer_norm_factors",
    "rms_norm_factors",
]


class NormalizationFactor:
    r"""A normalisation layer's Jacobian rows :math:`R` (``(N C, size)``) for its held
    :math:`\gamma` and/or :math:`\beta`, laid out as ``slots`` reads flat vectors."""

    def __init__(self, rows: torch.Tensor, slots: VectorSlots):
        self.rows, self.slots = rows, slots

    def gram(self, out: torch.Tensor) -> None:
        r"""Add :math:`R R^\top` into ``out`` ``(N, C, N, C)`` (contiguous)."""
        m = self.rows.shape[0]
        out.view(m, m).addmm_(self.rows, self.rows.T)

    def jvp(self, v: torch.Tensor, out: torch.Tensor) -> None:
        r"""Add :math:`R v_l` for flat ``v`` ``(k, n)`` into ``out`` ``(k, N, C)`` (contiguous)."""
        out.view(v.shape[0], -1).addmm_(self.slots.gather(v), self.rows.T)

    def vjp(self, z: torch.Tensor, out: torch.Tensor) -> None:
        r"""Add :math:`R^\top z` for ``z`` ``(k, N, C)`` into the layer's slots of ``out`` ``(k, n)``."""
        self.slots.add_to(z.reshape(z.shape[0], -1) @ self.rows, out)

    def curvature_block(self) -> ExactBlock:
        r"""The exact block :math:`R^\top R` of :math:`J^\top J` on this layer's parameters."""
        return ExactBlock(self.slots, self.rows.T @ self.rows)


def _factor(
    offsets: dict[str, int], normalized: torch.Tensor, deltas: torch.Tensor
) -> list[NormalizationFactor]:
    r"""From :math:`\hat x` ``(N, T, P)`` and :math:`\delta` ``(N, C, T, P)``."""
    n, c, _, p = deltas.shape
    parts, segments = [], []
    if "weight" in offsets:
        parts.append(torch.einsum("nctp,ntp->ncp", deltas, normalized))
        segments.append((offsets["weight"], p))
    if "bias" in offsets:
        parts.append(deltas.sum(2))
        segments.append((offsets["bias"], p))
    rows = torch.cat(parts, dim=2).reshape(n * c, -1)
    return [NormalizationFactor(rows, VectorSlots(segments))]


def _per_channel(offsets, normalized: torch.Tensor, deltas: torch.Tensor):
    """Layout of a layer with one parameter per channel (axis 1 of its input)."""
    n, c, channels = deltas.shape[0], deltas.shape[1], normalized.shape[1]
    normalized = normalized.reshape(n, channels, -1).transpose(1, 2)
    return _factor(offsets, normalized, deltas.reshape(n, c, channels, -1).transpose(2, 3))


def _trailing(offsets, normalized: torch.Tensor, deltas: torch.Tensor, shape):
    """Layout of a layer whose parameters span the trailing dimensions ``shape``."""
    n, c, size = deltas.shape[0], deltas.shape[1], math.prod(shape)
    return _factor(offsets, normalized.reshape(n, -1, size), deltas.reshape(n, c, -1, size))


def batch_norm_factors(
    bn: nn.modules.batchnorm._BatchNorm, offsets, inputs: torch.Tensor, deltas: torch.Tensor
):
    r""":math:`\hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}` from the running statistics;
    ``None`` for a layer without them or for unbatched inputs."""
    if bn.running_mean is None or bn.running_var is None or inputs.ndim < 2:
        return None
    shape = (1, -1) + (1,) * (inputs.ndim - 2)
    mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return _per_channel(offsets, (inputs - mean) / torch.sqrt(var + bn.eps), deltas)


def group_norm_factors(gn: nn.GroupNorm, offsets, inputs: torch.Tensor, deltas: torch.Tensor):
    r""":math:`\hat x` normalised per sample over each group of channels."""
    if inputs.ndim < 2:
        return None
    normalized = F.group_norm(inputs, gn.num_groups, eps=gn.eps)
    return _per_channel(offsets, normalized, deltas)


def layer_norm_factors(ln: nn.LayerNorm, offsets, inputs: torch.Tensor, deltas: torch.Tensor):
    r""":math:`\hat x` normalised per sample and position over the trailing ``normalized_shape``."""
    if inputs.ndim <= len(ln.normalized_shape):
        return None
    normalized = F.layer_norm(inputs, ln.normalized_shape, eps=ln.eps)
    return _trailing(offsets, normalized, deltas, ln.normalized_shape)


def rms_norm_factors(norm: nn.RMSNorm, offsets, inputs: torch.Tensor, deltas: torch.Tensor):
    r""":math:`\hat x = x / \mathrm{rms}(x)` over the trailing ``normalized_shape`` (no bias)."""
    if inputs.ndim <= len(norm.normalized_shape):
        return None
    normalized = F.rms_norm(inputs, norm.normalized_shape, eps=norm.eps)
    return _trailing(offsets, normalized, deltas, norm.normalized_shape)
