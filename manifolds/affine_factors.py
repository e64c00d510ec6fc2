r"""The factored Jacobian of a layer that applies one weight matrix to patches of its input:
``nn.Linear`` (patches: the input vectors, one per leading position) and ``nn.Conv2d``
(patches: the receptive fields, :func:`torch.nn.functional.unfold`, one per output pixel).

Such a layer computes :math:`z_{bt} = W a_{bt} + b` at positions :math:`t = 1..T` of sample
:math:`b`. With :math:`\delta_{bct} = \partial F_{bc} / \partial z_{bt}` (``d_out``) the
gradient of embedded output :math:`(b, c)` with respect to the layer's output, and the
augmented patch :math:`\tilde a_{bt} = (a_{bt}, 1)` (the 1 for the bias), the Jacobian row of
:math:`F_{bc}` with respect to :math:`V = [W \mid b]` is

.. math::

    J_{bc} = \sum_t \delta_{bct}\, \tilde a_{bt}^\top \in \mathbb{R}^{d_\text{out} \times
    (d_\text{in} + 1)},

and everything :class:`AffineFactor` returns is a contraction of :math:`\delta` and
:math:`\tilde a` that never forms :math:`J`:

.. math::

    (JV)_{bc} &= \sum_t \delta_{bct} \cdot V \tilde a_{bt}, \qquad
    J^\top z = \sum_{b,t} \Big(\sum_c z_{bc} \delta_{bct}\Big) \tilde a_{bt}^\top, \\
    K_{(b,c),(b',c')} &= \sum_{t,t'} (\tilde a_{bt} \cdot \tilde a_{b't'})
        (\delta_{bct} \cdot \delta_{b'c't'}).

:math:`K` is built by whichever of two routes costs fewer multiply-adds (``m = NC``,
:math:`e = d_\text{in} + 1`, :math:`d = d_\text{out}`):

* *rows*: form the Jacobian rows block by block of output channels and add
  :math:`R R^\top` (:math:`m\,d e\,(T + m)`; cheap when :math:`T` is large and the layer
  small, as in a first convolution);
* *pairs*: contract over positions for each pair of samples,
  :math:`N^2 (T^2 e + T^2 C d + C^2 T d)` (cheap when the layer is large and :math:`T`
  small, as in a late convolution or a Linear layer, :math:`T = 1`).

Every route works on chunks of samples (and of output channels) whose intermediates hold
at most :data:`CHUNK_ELEMENTS` numbers. A grouped convolution is one factor per group (its
weight rows of group :math:`g` see only input channels of group :math:`g`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .curvature_blocks import KroneckerBlock
from .parameter_slots import AffineSlots

__all__ = ["AffineFactor", "ConvPatches", "LayerInputs", "conv2d_factors", "linear_factors"]

#: Most numbers one chunk's intermediate tensors may hold (64 MiB in float64).
CHUNK_ELEMENTS = 1 << 23


def _sample_chunks(samples: int, per_sample: int) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` ranges of samples, each holding at most :data:`CHUNK_ELEMENTS` numbers
    when one sample costs ``per_sample``."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    for lo in range(0, samples, step):
        yield lo, min(samples, lo + step)


class _AugmentedPatches:
    r"""Augmented patches :math:`\tilde a = (a, 1)` of a layer, restricted to what the flat
    vector holds (``weight``: the patches; ``bias``: the column of ones), read by sample
    ranges as one contiguous ``(n, T, cols)`` tensor. Built once and kept whole when they fit
    in :data:`CHUNK_ELEMENTS` (on first read), else built per range: the factor's products
    then read contiguous memory, with no copy per product."""

    def __init__(
        self, like: torch.Tensor, samples: int, positions: int, width: int, *, weight, bias
    ):
        self.like, self.weight, self.bias = like, weight, bias
        self.samples, self.positions, self.width = samples, positions, width
        self.cols = width * weight + bias
        self._fits = samples * positions * self.cols <= CHUNK_ELEMENTS
        self._whole: torch.Tensor | None = None

    def _patches(self, lo: int, hi: int) -> torch.Tensor:
        """The plain patches :math:`a` of samples ``lo:hi``, ``(hi - lo, T, width)``."""
        raise NotImplementedError

    def _build(self, lo: int, hi: int) -> torch.Tensor:
        out = self.like.new_empty(hi - lo, self.positions, self.cols)
        if self.weight:
            out[..., : self.width] = self._patches(lo, hi)
        if self.bias:
            out[..., -1] = 1
        return out

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        if not self._fits:
            return self._build(lo, hi)
        if self._whole is None:
            self._whole = self._build(0, self.samples)
        return self._whole[lo:hi]


class LayerInputs(_AugmentedPatches):
    """A Linear layer's augmented inputs as patches: ``(N, T, cols)``, ``T`` the product of
    the leading dimensions between the sample axis and the features (1 for ``(N, d_in)``
    inputs)."""

    def __init__(self, inputs: torch.Tensor, *, weight: bool = True, bias: bool = True):
        self.inputs = inputs
        super().__init__(inputs, *inputs.shape, weight=weight, bias=bias)

    def _patches(self, lo: int, hi: int) -> torch.Tensor:
        return self.inputs[lo:hi]


class ConvPatches(_AugmentedPatches):
    """A Conv2d layer's augmented receptive fields, ``(N, T, cols)`` with ``T`` output pixels,
    unfolded from the stored input ``(N, C_in, H, W)``; feature order ``(channel, kernel row,
    kernel column)``, that of the flattened weight, then the bias's column of ones."""

    def __init__(self, inputs, kernel_size, dilation, padding, stride, *, weight=True, bias=True):
        self.inputs = inputs
        self.options = {
            "kernel_size": kernel_size,
            "dilation": dilation,
            "padding": padding,
            "stride": stride,
        }
        sizes = [
            (length + 2 * p - d * (k - 1) - 1) // s + 1
            for length, k, d, p, s in zip(
                inputs.shape[2:], kernel_size, dilation, padding, stride, strict=True
            )
        ]
        width = inputs.shape[1] * kernel_size[0] * kernel_size[1]
        super().__init__(
            inputs, inputs.shape[0], sizes[0] * sizes[1], width, weight=weight, bias=bias
        )

    def _patches(self, lo: int, hi: int) -> torch.Tensor:
        return F.unfold(self.inputs[lo:hi], **self.options).transpose(1, 2)


class AffineFactor:
    r"""One affine layer's part of the factored Jacobian: patches :math:`a` and output
    gradients :math:`\delta` (see the module docstring for the formulas).

    Parameters
    ----------
    patches : LayerInputs or ConvPatches
        :math:`a_{bt}`, read by sample ranges.
    deltas : torch.Tensor
        :math:`\delta`, ``(N, C, T, d_out)``.
    slots : AffineSlots
        Where the layer's weight and bias sit in flat vectors.
    """

    def __init__(self, patches, deltas: torch.Tensor, slots: AffineSlots):
        self.patches, self.deltas, self.slots = patches, deltas, slots

    def _inputs(self, lo: int, hi: int) -> torch.Tensor:
        r"""Augmented patches :math:`\tilde a` of samples ``lo:hi``, restricted to what is held."""
        return self.patches(lo, min(hi, self.deltas.shape[0]))

    def gram_route(self) -> str:
        """``"rows"`` or ``"pairs"``, whichever builds :math:`K` in fewer multiply-adds."""
        n, c, t, d = self.deltas.shape
        e = self.slots.cols
        rows = n * c * d * e * (t + n * c)
        pairs = n * n * (t * t * e + t * t * c * d + c * c * t * d)
        return "rows" if rows <= pairs else "pairs"

    def gram(self, out: torch.Tensor, route: str | None = None) -> None:
        """Add this layer's :math:`J_l J_l^\\top` into ``out`` ``(N, C, N, C)`` (contiguous),
        by ``route`` (default :meth:`gram_route`)."""
        if (route or self.gram_route()) == "rows":
            self._gram_by_rows(out)
        else:
            self._gram_by_pairs(out)

    def _gram_by_rows(self, out: torch.Tensor) -> None:
        n, c, t, d = self.deltas.shape
        e, m = self.slots.cols, n * c
        block = max(1, min(d, CHUNK_ELEMENTS // (m * e)))
        for o in range(0, d, block):
            width = min(block, d - o)
            rows = self.deltas.new_empty(n, c, width, e)
            for lo, hi in _sample_chunks(n, t * e + c * t * width + c * width * e):
                deltas = self.deltas[lo:hi, :, :, o : o + width]
                rows[lo:hi] = torch.einsum("nctd,nte->ncde", deltas, self._inputs(lo, hi))
            rows = rows.reshape(m, -1)
            out.view(m, m).addmm_(rows, rows.T)

    def _gram_by_pairs(self, out: torch.Tensor) -> None:
        n, c, t, d = self.deltas.shape
        step = max(1, math.isqrt(CHUNK_ELEMENTS // (t * max(t, c * d))))
        for i in range(0, n, step):
            a_i, d_i = self._inputs(i, i + step), self.deltas[i : i + step]
            for j in range(i, n, step):
                a_j, d_j = (
                    (a_i, d_i) if j == i else (self._inputs(j, j + step), self.deltas[j : j + step])
                )
                pairs = torch.einsum("ite,jse->itjs", a_i, a_j)
                pulled = torch.einsum("itjs,jcsd->itjcd", pairs, d_j)
                block = torch.einsum("ictd,itjed->icje", d_i, pulled)
                out[i : i + step, :, j : j + step] += block
                if j != i:
                    out[j : j + step, :, i : i + step] += block.permute(2, 3, 0, 1)

    def jvp(self, v: torch.Tensor, out: torch.Tensor) -> None:
        r"""Add :math:`J_l v_l` for flat ``v`` ``(k, n)`` into ``out`` ``(k, N, C)``."""
        mat = self.slots.matrix(v)
        k, (n, _, t, d) = v.shape[0], self.deltas.shape
        for lo, hi in _sample_chunks(n, k * t * (d + self.slots.cols)):
            moved = torch.einsum("nte,kde->kntd", self._inputs(lo, hi), mat)
            out[:, lo:hi] += torch.einsum("nctd,kntd->knc", self.deltas[lo:hi], moved)

    def vjp(self, z: torch.Tensor, out: torch.Tensor) -> None:
        r"""Add :math:`J_l^\top z` for ``z`` ``(k, N, C)`` into the layer's slots of ``out`` ``(k, n)``."""
        k, (n, _, t, d) = z.shape[0], self.deltas.shape
        grad = z.new_zeros(k, d, self.slots.cols)
        for lo, hi in _sample_chunks(n, k * t * (d + self.slots.cols)):
            back = torch.einsum("knc,nctd->kntd", z[:, lo:hi], self.deltas[lo:hi])
            grad += torch.einsum("kntd,nte->kde", back, self._inputs(lo, hi))
        self.slots.add_to(grad, out)

    def curvature_block(self) -> KroneckerBlock:
        r"""The KFC approximation :math:`A \otimes G` of this layer's block of :math:`J^\top J`.

        .. math::

            A = \frac1N \sum_{b,t} \tilde a_{bt} \tilde a_{bt}^\top, \qquad
            G = \frac1T \sum_{b,c,t} \delta_{bct} \delta_{bct}^\top

        (Grosse & Martens 2016: :math:`\Omega` sums over positions, :math:`\Gamma` averages;
        :math:`\delta` carries the :math:`N^{-1/2}` of :math:`F`, so :math:`G` is a mean over
        samples too). For :math:`T = 1` this is KFAC (Martens & Grosse 2015).
        """
        n, _, t, d = self.deltas.shape
        e = self.slots.cols
        flat = self.deltas.reshape(-1, d)
        g = (flat.T @ flat) / t
        a = flat.new_zeros(e, e)
        for lo, hi in _sample_chunks(n, t * e):
            patches = self._inputs(lo, hi).reshape(-1, e)
            a += patches.T @ patches
        return KroneckerBlock(self.slots, a / n, g)


def _offsets(offsets: dict[str, int], group: int, d_out: int, width: int):
    """Weight and bias offsets of rows ``group * d_out ...`` of a layer's weight and bias."""
    weight_at, bias_at = offsets.get("weight"), offsets.get("bias")
    if weight_at is not None:
        weight_at += group * d_out * width
    if bias_at is not None:
        bias_at += group * d_out
    return weight_at, bias_at


def _held(slots: AffineSlots) -> dict[str, bool]:
    r"""Which columns of :math:`[W \mid b]` the flat vector holds, as patch options."""
    return {"weight": slots.weight_at is not None, "bias": slots.bias_at is not None}


def linear_factors(
    layer: nn.Linear, offsets: dict[str, int], inputs: torch.Tensor, deltas: torch.Tensor
) -> list[AffineFactor] | None:
    """Factor of an ``nn.Linear`` from its inputs ``(N, ..., d_in)`` and output gradients
    ``(N, C, ..., d_out)``; ``None`` for inputs without a sample axis."""
    if inputs.ndim < 2:
        return None
    n, c = deltas.shape[:2]
    slots = AffineSlots(
        layer.out_features, layer.in_features, offsets.get("weight"), offsets.get("bias")
    )
    patches = LayerInputs(inputs.reshape(n, -1, layer.in_features), **_held(slots))
    deltas = deltas.reshape(n, c, -1, layer.out_features).contiguous()
    return [AffineFactor(patches, deltas, slots)]


def _symmetric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as two integers; ``None`` where ``padding="same"`` pads unevenly."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    return None if any(p % 2 for p in total) else tuple(p // 2 for p in total)


def conv2d_factors(
    conv: nn.Conv2d, offsets: dict[str, int], inputs: torch.Tensor, deltas: torch.Tensor
) -> list[AffineFactor] | None:
    """Factors of an ``nn.Conv2d`` (one per channel group) from its inputs ``(N, C_in, H, W)``
    and output gradients ``(N, C, C_out, H', W')``; ``None`` for unbatched inputs, a padding
    mode other than zeros, or uneven ``"same"`` padding."""
    padding = _symmetric_padding(conv)
    if inputs.ndim != 4 or conv.padding_mode != "zeros" or padding is None:
        return None
    n, c = deltas.shape[:2]
    groups = conv.groups
    d_out, c_in = conv.out_channels // groups, conv.in_channels // groups
    grouped = deltas.reshape(n, c, groups, d_out, -1)
    factors = []
    width = c_in * conv.kernel_size[0] * conv.kernel_size[1]
    for g in range(groups):
        slots = AffineSlots(d_out, width, *_offsets(offsets, g, d_out, width))
        patches = ConvPatches(
            inputs[:, g * c_in : (g + 1) * c_in],
            conv.kernel_size,
            conv.dilation,
            padding,
            conv.stride,
            **_held(slots),
        )
        if patches.positions != grouped.shape[-1]:
            return None
        factors.append(AffineFactor(patches, grouped[:, :, g].transpose(2, 3).contiguous(), slots))
    return factors
