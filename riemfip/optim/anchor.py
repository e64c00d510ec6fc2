r"""The anchor of a functionally invariant path: frozen inputs, frozen outputs, and the
map from one parameter group's flat weights to the network's outputs on them.

A FIP run keeps a network's outputs on *anchor* inputs :math:`x_1, \dots, x_N`
(stored old-task data) close to the outputs :math:`y^0_b = f(w_0; x_b)` the
network had when the run started. :class:`Anchor` holds

* the anchor inputs, split into a *fit* part (which defines the metric) and a
  *held-out* part (on which drift is measured, so that the drift reported is not
  the quantity the metric was fitted to);
* the frozen outputs :math:`y^0` on both parts;
* :class:`GroupFunction`, ``w -> f(w; x)`` for the flat weights of one parameter
  group, the other parameters of the network held at their current values.

The network is always evaluated in eval mode (BatchNorm running statistics,
Dropout off), so outputs are a deterministic function of the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from manifolds.flat import training_mode
from manifolds.pullback import as_batches

__all__ = [
    "Anchor",
    "GroupFunction",
    "GaussianNoise",
    "NeighbourNoise",
    "RandomShift",
    "holdout_mask",
]


def holdout_mask(n: int, fraction: float) -> torch.Tensor:
    r"""Boolean mask of the held-out samples among ``n``: an evenly spread ``fraction``.

    Sample :math:`i` is held out when :math:`\lfloor (i+1) f\rfloor > \lfloor i f\rfloor`,
    so class-ordered inputs lose the same share of every class and no random
    state is involved.
    """
    idx = torch.arange(n, dtype=torch.float64)
    return torch.floor((idx + 1) * fraction) > torch.floor(idx * fraction)


class GaussianNoise:
    r"""Anchor transform :math:`x \mapsto x + s\,\xi`, :math:`\xi \sim \mathcal N(0, I)`.

    For :class:`~riemfip.optim.FIP`'s ``anchor_transform``: the metric is then pulled
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
        The stored inputs neighbours are drawn from, ``(N, ...)``; default: the batch being
        transformed (all fit anchors, unless FIP's ``anchor_batch`` is set).
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

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
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


class GroupFunction:
    """``w -> model(x)`` for the flat weights ``w`` of some of ``model``'s parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    params : sequence of torch.nn.Parameter
        Parameters of ``model`` that the flat vector holds, in this order; the
        other parameters and buffers are read from the model at call time.

    Raises
    ------
    ValueError
        A parameter that is not one of ``model``'s, or a repeated one.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]):
        names = {id(p): name for name, p in model.named_parameters()}
        self.model = model
        self.names = []
        seen = set()
        for i, p in enumerate(params):
            if id(p) not in names:
                raise ValueError(
                    f"parameter {i} of the group (shape {tuple(p.shape)}) is not a parameter of "
                    f"the model {type(model).__name__}; FIP measures the model's outputs, so "
                    "every parameter it moves must be one of the model's"
                )
            if id(p) in seen:
                raise ValueError(f"parameter {i} of the group appears twice")
            seen.add(id(p))
            self.names.append(names[id(p)])
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.dim = sum(self.numels)

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the flat ``w`` keyed by parameter name."""
        return {
            n: c.view(s)
            for n, c, s in zip(self.names, torch.split(w, self.numels), self.shapes, strict=True)
        }

    def __call__(self, w: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the model (eval mode) on ``x`` with the group's weights ``w``; ``None``:
        the model's current weights, called directly (no reparametrization, so autograd
        records the model's own parameters)."""
        with training_mode(self.model, False):
            if w is None:
                return self.model(x)
            return functional_call(self.model, self.unflatten(w), (x,), strict=False)


def _concat_inputs(name: str, data, like: torch.Tensor) -> torch.Tensor:
    batches = as_batches(data)
    shape = batches[0].shape[1:]
    for i, x in enumerate(batches):
        if x.shape[1:] != shape:
            raise ValueError(
                f"{name}: batch {i} has samples of shape {tuple(x.shape[1:])}, batch 0 has "
                f"{tuple(shape)}; every anchor sample must have the same shape"
            )
    x = torch.cat(batches) if len(batches) > 1 else batches[0]
    dtype = like.dtype if x.is_floating_point() else None
    return x.to(device=like.device, dtype=dtype)


class Anchor:
    r"""Anchor inputs and the network's frozen outputs on them.

    Parameters
    ----------
    model : torch.nn.Module
        The network; its outputs on the anchor are frozen now, at construction.
    inputs : tensor or iterable of batches
        Anchor inputs (``(inputs, targets)`` batches are accepted; targets are
        ignored: FIP never needs labels for the old task).
    holdout_inputs : tensor or iterable of batches, optional
        Inputs on which drift is measured. Without them, ``holdout_fraction`` of
        ``inputs`` (evenly spread, see :func:`holdout_mask`) is held out.
    holdout_fraction : float
        Share of ``inputs`` held out when ``holdout_inputs`` is not given, in
        ``[0, 1)``. With 0, drift is measured on the fit inputs themselves.

    Attributes
    ----------
    fit_inputs, holdout_inputs : torch.Tensor
        Concatenated inputs, on the parameters' device (floating inputs in their dtype).
    fit_outputs, holdout_outputs : torch.Tensor
        The frozen outputs :math:`y^0`, shape ``(N, C)``.
    holdout_is_fit : bool
        Whether drift is measured on the fit inputs (no held-out data).

    Raises
    ------
    TypeError, ValueError
        Inputs that are not tensors, that differ in sample shape, that the
        model cannot take, or on which it does not return ``(N, C)`` outputs.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | Iterable,
        *,
        holdout_inputs: torch.Tensor | Iterable | None = None,
        holdout_fraction: float = 0.2,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        like = next(model.parameters(), None)
        if like is None:
            raise ValueError(f"{type(model).__name__} has no parameters")
        holdout_fraction = float(holdout_fraction)
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        self.model = model
        x = _concat_inputs("anchor_inputs", inputs, like)
        if holdout_inputs is not None:
            self.fit_inputs = x
            self.holdout_inputs = _concat_inputs("holdout_inputs", holdout_inputs, like)
            if self.holdout_inputs.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"holdout_inputs have samples of shape {tuple(self.holdout_inputs.shape[1:])}, "
                    f"anchor_inputs {tuple(x.shape[1:])}"
                )
        elif holdout_fraction > 0:
            mask = holdout_mask(len(x), holdout_fraction).to(x.device)
            if bool(mask.all()) or not bool(mask.any()):
                raise ValueError(
                    f"holdout_fraction={holdout_fraction} of {len(x)} anchor samples leaves "
                    "an empty fit or held-out part; pass more anchors or holdout_inputs"
                )
            self.fit_inputs, self.holdout_inputs = x[~mask], x[mask]
        else:
            self.fit_inputs = self.holdout_inputs = x
        self.holdout_is_fit = self.holdout_inputs is self.fit_inputs
        with torch.no_grad():
            self.fit_outputs = self.outputs_at(self.fit_inputs, "anchor_inputs")
            self.holdout_outputs = (
                self.fit_outputs
                if self.holdout_is_fit
                else self.outputs_at(self.holdout_inputs, "holdout_inputs")
            )
        if self.holdout_outputs.shape[1:] != self.fit_outputs.shape[1:]:
            raise ValueError(
                "the model returns outputs of different widths on the two anchor parts"
            )

    def outputs_at(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The model's current outputs (eval mode) on ``x``, checked to be ``(N, C)``."""
        try:
            with training_mode(self.model, False):
                y = self.model(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} cannot be fed to {type(self.model).__name__}: "
                f"{err}"
            ) from err
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"{type(self.model).__name__} returned a {type(y).__name__} on {name}; FIP needs "
                "a tensor of outputs (logits)"
            )
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"on {name} of shape {tuple(x.shape)} the model returned outputs of shape "
                f"{tuple(y.shape)}; expected (batch, outputs) = ({x.shape[0]}, C)"
            )
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"the model's outputs on {name} contain NaN or Inf")
        return y.detach().clone()
