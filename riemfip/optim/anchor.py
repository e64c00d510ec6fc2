r"""The anchor of a functionally invariant path: stored inputs and the frozen outputs on them.

A FIP run keeps a network's outputs on *anchor* inputs :math:`x_1, \dots, x_N` (stored
old-task data) close to the outputs :math:`y^0_b = f(w_0; x_b)` the network had when the
run started. :class:`Anchor` holds

* the anchor inputs, split into a *fit* part (which defines the metric) and a *held-out*
  part (on which drift is measured, so that the drift reported is not the quantity the
  metric was fitted to);
* the frozen outputs :math:`y^0` on both parts, and the frozen network that scores new
  inputs (transformed anchors) at :math:`w_0`.

The network is always evaluated in eval mode (BatchNorm running statistics, Dropout off)
and through :class:`~manifolds.flat.FlatModule`, so outputs are a deterministic function
of the weights and measuring them never writes into the live model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from manifolds import as_batches
from manifolds.flat import FlatModule
from manifolds.output_metrics import OutputMetric

__all__ = ["Anchor", "AnchorDrift", "holdout_mask"]


@dataclass(frozen=True)
class AnchorDrift:
    """How far the outputs on held-out anchor inputs are from the frozen ones.

    Attributes
    ----------
    divergence : float
        Mean output-metric divergence :math:`D(f(w; x'), y^0)` over held-out anchors.
    agreement : float
        Fraction of held-out anchors whose arg-max output is unchanged.
    """

    divergence: float
    agreement: float


def holdout_mask(n: int, fraction: float, device: torch.device | str = "cpu") -> torch.Tensor:
    r"""Boolean mask of the held-out samples among ``n``: an evenly spread ``fraction``.

    Sample :math:`i` is held out when :math:`\lfloor (i+1) f\rfloor > \lfloor i f\rfloor`,
    so class-ordered inputs lose the same share of every class and no random
    state is involved. The mask is made on ``device``.
    """
    idx = torch.arange(n, dtype=torch.float64, device=device)
    return torch.floor((idx + 1) * fraction) > torch.floor(idx * fraction)


def concat_inputs(name: str, data, like: torch.Tensor) -> torch.Tensor:
    """Batches of inputs (see :func:`manifolds.as_batches`) as one tensor in ``like``'s device
    and floating dtype, checked to hold samples of one shape."""
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
    r"""Anchor inputs, split into fit and held-out parts, and the frozen outputs on both.

    Parameters
    ----------
    network : FlatModule
        The network as a function of flat weights.
    frozen_weights : torch.Tensor
        :math:`w_0` for ``network``: the outputs on the anchor are frozen there, and
        :meth:`frozen_outputs` scores new inputs there.
    inputs : tensor or iterable of batches
        Anchor inputs (``(inputs, targets)`` batches are accepted; targets are
        ignored: FIP never needs labels for the old task).
    holdout_inputs : tensor or iterable of batches, optional
        Inputs on which drift is measured. Without them, ``holdout_fraction`` of
        ``inputs`` (evenly spread, see :func:`holdout_mask`) is held out.
    holdout_fraction : float
        In ``[0, 1)``; 0 measures drift on the fit anchors themselves.

    Raises
    ------
    TypeError, ValueError
        Inputs that are not tensors, that differ in sample shape, that the
        model cannot take, or on which it does not return ``(N, C)`` outputs.
    """

    def __init__(
        self,
        network: FlatModule,
        frozen_weights: torch.Tensor,
        inputs: torch.Tensor | Iterable,
        *,
        holdout_inputs: torch.Tensor | Iterable | None = None,
        holdout_fraction: float = 0.2,
    ):
        holdout_fraction = float(holdout_fraction)
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        self.network = network
        self.frozen_weights = frozen_weights.detach().clone()
        like = self.frozen_weights
        x = concat_inputs("anchor_inputs", inputs, like)
        if holdout_inputs is not None:
            self.fit_inputs = x
            self.holdout_inputs = concat_inputs("holdout_inputs", holdout_inputs, like)
            if self.holdout_inputs.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"holdout_inputs have samples of shape {tuple(self.holdout_inputs.shape[1:])}, "
                    f"anchor_inputs {tuple(x.shape[1:])}"
                )
        elif holdout_fraction > 0:
            mask = holdout_mask(len(x), holdout_fraction, x.device)
            if bool(mask.all()) or not bool(mask.any()):
                raise ValueError(
                    f"holdout_fraction={holdout_fraction} of {len(x)} anchor samples leaves "
                    "an empty fit or held-out part; pass more anchors or holdout_inputs"
                )
            self.fit_inputs, self.holdout_inputs = x[~mask], x[mask]
        else:
            self.fit_inputs = self.holdout_inputs = x
        self.holdout_is_fit = self.holdout_inputs is self.fit_inputs
        self.fit_outputs = self.frozen_outputs(self.fit_inputs, "anchor_inputs")
        self.holdout_outputs = (
            self.fit_outputs
            if self.holdout_is_fit
            else self.frozen_outputs(self.holdout_inputs, "holdout_inputs")
        )
        if self.holdout_outputs.shape[1:] != self.fit_outputs.shape[1:]:
            raise ValueError(
                "the model returns outputs of different widths on the two anchor parts"
            )

    def frozen_outputs(self, x: torch.Tensor, name: str = "inputs") -> torch.Tensor:
        """The frozen network's outputs (eval mode) on ``x``, checked to be finite ``(N, C)``."""
        model = type(self.network.module).__name__
        try:
            with torch.no_grad():
                y = self.network(self.frozen_weights, x, train=False)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} cannot be fed to {model}: {err}"
            ) from err
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"{model} returned a {type(y).__name__} on {name}; FIP needs a tensor of outputs "
                "(logits)"
            )
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"on {name} of shape {tuple(x.shape)} the model returned outputs of shape "
                f"{tuple(y.shape)}; expected (batch, outputs) = ({x.shape[0]}, C)"
            )
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"the model's outputs on {name} contain NaN or Inf")
        return y.detach().clone()

    def drift(self, outputs: torch.Tensor, metric: OutputMetric) -> AnchorDrift:
        """:class:`AnchorDrift` of held-out ``outputs`` against the frozen ones."""
        y0 = self.holdout_outputs
        div = float(metric.divergence(outputs, y0).mean())
        agree = float((outputs.argmax(-1) == y0.argmax(-1)).to(torch.float64).mean())
        return AnchorDrift(div, agree)

    def state_dict(self) -> dict:
        """The frozen weights and outputs (the inputs are not stored)."""
        return {
            "frozen_weights": self.frozen_weights.clone(),
            "fit_outputs": self.fit_outputs.clone(),
            "holdout_outputs": self.holdout_outputs.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; shapes must match this anchor's."""
        for key in ("frozen_weights", "fit_outputs", "holdout_outputs"):
            new, old = state[key], getattr(self, key)
            if new.shape != old.shape:
                raise ValueError(
                    f"saved anchor {key} have shape {tuple(new.shape)}, this optimizer's "
                    f"{tuple(old.shape)}: build it with the same model and anchor_inputs"
                )
            setattr(self, key, new.to(device=old.device, dtype=old.dtype).clone())
        if self.holdout_is_fit:
            self.holdout_outputs = self.fit_outputs
