r"""Anchor neighbourhoods: random transforms of the stored inputs whose outputs a path keeps.

The pullback metric sees only the anchor points; other inputs of the old task can
still move. A transform ``(x, generator) -> x'`` of the same shape, applied afresh at
every step and scored by the frozen network, makes the path keep the outputs on a
neighbourhood of each anchor instead. None needs labels.

:class:`ScaledNoise`
    Isotropic noise in units of the inputs' own spread: any input type, any scale.
:class:`GaussianNoise`
    Isotropic noise, in input units: any input type.
:class:`NeighbourNoise`
    Noise along the directions to each anchor's nearest stored neighbours: any input type.
:class:`RandomShift`
    Small translations plus noise: images only.

Each is a class (not a closure) so that it pickles and prints its settings. A transform that
draws on the stored anchors themselves defines ``bind(fit_inputs)``, which a path optimizer
calls once per parameter group when it is built (:func:`bound_transform`): the transform then
sees every fit anchor, not only the step's batch, and never the held-out ones.
"""

from __future__ import annotations

import torch

__all__ = ["GaussianNoise", "NeighbourNoise", "RandomShift", "ScaledNoise", "bound_transform"]


class GaussianNoise:
    r"""Anchor transform :math:`x \mapsto x + s\,\xi`, :math:`\xi \sim \mathcal N(0, I)`.

    For :class:`~riemfip.optim.AnchorSampling`'s ``transform``: the metric is then pulled
    back from the outputs on a Gaussian neighbourhood of each anchor (radius ``std``
    in input units) instead of on the anchor points alone. A class (not a closure)
    so that it pickles.
    """

    def __init__(self, std: float):
        std = float(std)
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.std = std

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return x + self.std * noise

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std})"


class ScaledNoise:
    r"""Anchor transform :math:`x \mapsto x + s\,\sigma\,\xi`, :math:`\xi \sim \mathcal N(0, I)`,
    :math:`\sigma` the root-mean-square deviation of the batch's entries from their mean.

    Isotropic noise like :class:`GaussianNoise`, but in units of the data's own spread,
    so one ``scale`` suits pixels in [0, 1], pixels in [0, 16], standardised tabular
    features or embeddings alike. Assumes nothing about the inputs' structure; inputs
    that are not floating point (token ids) are returned unchanged.

    Parameters
    ----------
    scale : float
        :math:`s \ge 0`.
    """

    def __init__(self, scale: float):
        scale = float(scale)
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        self.scale = scale

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not x.is_floating_point():  # token ids, class indices: no neighbourhood to take
            return x
        sigma = float((x - x.mean()).pow(2).mean().sqrt())
        return GaussianNoise(self.scale * sigma)(x, generator)

    def __repr__(self) -> str:
        return f"ScaledNoise(scale={self.scale})"


class NeighbourNoise:
    r"""Anchor transform along the data's local directions, estimated from the anchors'
    nearest neighbours.

    .. math::

        x \mapsto x + \frac{s}{\sqrt k} \sum_{j \in \mathcal N_k(x)} \xi_j\,(x_j - x)
              + \sigma\,\zeta, \qquad \xi \sim \mathcal N(0, I_k),\;
              \zeta \sim \mathcal N(0, I),

    :math:`\mathcal N_k(x)` the :math:`k` stored inputs nearest to :math:`x` (Euclidean,
    :math:`x` itself excluded). The first term is a Gaussian whose covariance is
    :math:`s^2` times the local second moment of the neighbours about :math:`x`: it
    spreads each anchor along the directions in which nearby stored inputs differ
    from it (for images of one digit, its writing variations), so that the metric
    pulled back from these points protects the old task's data manifold around the
    anchor rather than an isotropic ball (:class:`GaussianNoise`, the second term,
    :math:`\sigma` = ``std``), most of whose directions no old input takes. Needs no
    labels.

    Parameters
    ----------
    k : int
        Neighbours per anchor, ``k >= 1`` (and fewer than the inputs they are drawn from).
    scale : float
        :math:`s \ge 0`.
    std : float
        :math:`\sigma \ge 0`, isotropic noise added after.
    inputs : torch.Tensor, optional
        The stored inputs neighbours are drawn from, ``(N, ...)``. Default: as a path
        optimizer's anchor transform, its fit anchors (:meth:`bind`; the held-out ones are
        never used); called on its own, the batch being transformed.

    Inputs that are not floating point (token ids) are returned unchanged.
    """

    def __init__(
        self, k: int = 5, scale: float = 0.5, std: float = 0.0, inputs: torch.Tensor | None = None
    ):
        k, scale, std = int(k), float(scale), float(std)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not (scale >= 0 and std >= 0):
            raise ValueError(f"scale and std must be >= 0, got {scale} and {std}")
        if inputs is not None:
            if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2:
                raise TypeError("inputs must be a tensor of shape (N, ...)")
            if k >= len(inputs):
                raise ValueError(f"k must be below the {len(inputs)} inputs, got {k}")
            inputs = inputs.detach().reshape(len(inputs), -1)
        self.inputs = inputs
        self.k, self.scale, self.std = k, scale, std

    def bind(self, fit_inputs: torch.Tensor) -> NeighbourNoise:
        """This transform with neighbours drawn from ``fit_inputs``, unless it has its own
        ``inputs``; ``ValueError`` if there are not more than ``k`` of them."""
        if self.inputs is not None:
            return self
        return NeighbourNoise(self.k, self.scale, self.std, inputs=fit_inputs)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not x.is_floating_point():  # token ids, class indices: no neighbourhood to take
            return x
        flat = x.reshape(len(x), -1)
        stored = flat if self.inputs is None else self.inputs.to(device=x.device, dtype=x.dtype)
        if self.k >= len(stored):
            raise ValueError(f"k={self.k} neighbours, but only {len(stored)} inputs to draw from")
        dist = torch.cdist(flat, stored)
        # k + 1 nearest, the nearest (x itself when x is stored) dropped
        near = dist.topk(self.k + 1, dim=1, largest=False).indices[:, 1:]
        xi = torch.randn(len(x), self.k, generator=generator, dtype=x.dtype, device=x.device)
        step = torch.einsum("bk,bkd->bd", xi, stored[near] - flat[:, None])
        out = flat + (self.scale / self.k**0.5) * step
        if self.std > 0:
            out = GaussianNoise(self.std)(out, generator)
        return out.reshape(x.shape)

    def __repr__(self) -> str:
        return f"NeighbourNoise(k={self.k}, scale={self.scale}, std={self.std})"


class RandomShift:
    r"""Anchor transform for images: a random translation by up to ``max_shift`` pixels,
    then isotropic noise.

    .. math::

        x \mapsto T_{(\delta_1, \delta_2)}\, x + \sigma\,\zeta, \qquad
        \delta_i \sim \mathcal U\{-s, \dots, s\},\; \zeta \sim \mathcal N(0, I),

    :math:`T_\delta` the shift of the image grid by :math:`\delta` pixels, vacated pixels
    set to 0. Small translations are the commonest difference between two images of one
    handwritten digit, so the metric pulled back from shifted anchors protects the old
    task where its test inputs lie. Needs no labels.

    Parameters
    ----------
    max_shift : int
        :math:`s \ge 0`.
    shape : tuple of int
        The image's trailing ``(height, width)``; each sample holds ``channels * h * w``
        values (flat or not).
    std : float
        :math:`\sigma \ge 0`.
    """

    def __init__(self, max_shift: int = 1, shape: tuple[int, int] = (28, 28), std: float = 0.0):
        max_shift, std = int(max_shift), float(std)
        if max_shift < 0 or not std >= 0:
            raise ValueError(f"max_shift and std must be >= 0, got {max_shift} and {std}")
        self.max_shift, self.shape, self.std = max_shift, tuple(int(n) for n in shape), std

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w = self.shape
        s = self.max_shift
        img = x.reshape(len(x), -1, h, w)
        padded = torch.nn.functional.pad(img, (s, s, s, s))
        out = torch.empty_like(img)
        dy = torch.randint(-s, s + 1, (len(x),), generator=generator, device=x.device)
        dx = torch.randint(-s, s + 1, (len(x),), generator=generator, device=x.device)
        for sy in range(-s, s + 1):
            for sx in range(-s, s + 1):
                sel = (dy == sy) & (dx == sx)
                out[sel] = padded[sel, :, s - sy : s - sy + h, s - sx : s - sx + w]
        out = out.reshape(x.shape)
        return GaussianNoise(self.std)(out, generator) if self.std > 0 else out

    def __repr__(self) -> str:
        return f"RandomShift(max_shift={self.max_shift}, shape={self.shape}, std={self.std})"


def bound_transform(transform, fit_inputs: torch.Tensor):
    """The anchor transform a parameter group uses: ``transform.bind(fit_inputs)`` for a
    transform that draws on the stored anchors (it defines ``bind``), else ``transform``."""
    bind = getattr(transform, "bind", None)
    return transform if bind is None else bind(fit_inputs)
