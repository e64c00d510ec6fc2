r"""Where one layer's parameters sit in a flat weight vector, and how to read them out as the
small matrices that layer's factored Jacobian and curvature act on.

A flat vector holds an ordered subset of a network's parameters (a parameter group), so a
layer's weight and bias are two slices at arbitrary offsets, and either may be absent.
:class:`AffineSlots` gathers a weight matrix :math:`W \in \mathbb{R}^{d_\text{out} \times
d_\text{in}}` and bias :math:`b` as the augmented matrix :math:`[W \mid b]`;
:class:`VectorSlots` gathers a few per-channel vectors (a normalisation layer's
:math:`\gamma, \beta`) side by side.
"""

from __future__ import annotations

import torch

__all__ = ["AffineSlots", "VectorSlots"]


class AffineSlots:
    r"""Flat offsets of a weight matrix (row-major, ``(d_out, width)``) and a bias (``d_out``).

    Parameters
    ----------
    d_out, width : int
        Rows and columns of the weight matrix (for a convolution: output channels, and
        input channels per group times the kernel size).
    weight_at, bias_at : int or None
        Flat offsets of the weight and the bias; ``None`` for one the flat vector does not hold.

    Attributes
    ----------
    cols : int
        Columns of :math:`[W \mid b]` restricted to what is held: ``width`` for the weight,
        plus one for the bias.
    """

    def __init__(self, d_out: int, width: int, weight_at: int | None, bias_at: int | None):
        self.d_out, self.width = d_out, width
        self.weight_at, self.bias_at = weight_at, bias_at
        self.cols = (width if weight_at is not None else 0) + (bias_at is not None)

    def matrix(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`[W \mid b]` of each flat vector in ``v`` ``(k, n)``: shape ``(k, d_out, cols)``."""
        k, d = v.shape[0], self.d_out
        parts = []
        if self.weight_at is not None:
            at = self.weight_at
            parts.append(v[:, at : at + d * self.width].reshape(k, d, self.width))
        if self.bias_at is not None:
            parts.append(v[:, self.bias_at : self.bias_at + d].reshape(k, d, 1))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def add_to(self, mat: torch.Tensor, out: torch.Tensor) -> None:
        r"""Add :math:`[W \mid b]` matrices ``(k, d_out, cols)`` into their slots of ``out`` ``(k, n)``."""
        k, d = mat.shape[0], self.d_out
        if self.weight_at is not None:
            at = self.weight_at
            out[:, at : at + d * self.width] += mat[:, :, : self.width].reshape(k, -1)
        if self.bias_at is not None:
            out[:, self.bias_at : self.bias_at + d] += mat[:, :, -1]


class VectorSlots:
    """Flat offsets of a few parameter vectors, read side by side as one row per flat vector.

    Parameters
    ----------
    segments : list of (int, int)
        ``(offset, length)`` of each vector, in the order the columns are laid out.
    """

    def __init__(self, segments: list[tuple[int, int]]):
        self.segments = list(segments)
        self.size = sum(length for _, length in self.segments)

    def gather(self, v: torch.Tensor) -> torch.Tensor:
        """The vectors of each flat vector in ``v`` ``(k, n)``, concatenated: ``(k, size)``."""
        return torch.cat([v[:, at : at + length] for at, length in self.segments], dim=1)

    def add_to(self, mat: torch.Tensor, out: torch.Tensor) -> None:
        """Add rows ``(k, size)`` laid out as :meth:`gather`'s into their slots of ``out`` ``(k, n)``."""
        start = 0
        for at, length in self.segments:
            out[:, at : at + length] += mat[:, start : start + length]
            start += length
