r"""Task data for a pullback metric: batches of inputs, and a network's outputs on all of them.

:func:`as_batches` turns what a user passes (a tensor, a list of tensors, a
:class:`~torch.utils.data.DataLoader` of ``(inputs, targets)``) into checked input batches;
:func:`check_module_takes` feeds one batch to the network so that inputs it cannot take
(wrong width, dtype or device) or outputs that are not finite fail here, with a message
that names the problem, rather than deep inside a later product; :class:`ModuleOutputs` is
:math:`w \mapsto f(w; x)` over all batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .flat import FlatModule
from .validation import check_finite

__all__ = ["ModuleOutputs", "as_batches", "check_module_takes"]


def as_batches(data: torch.Tensor | Iterable) -> list[torch.Tensor]:
    """Materialise input data as a list of input tensors.

    ``data`` is a tensor (one batch) or an iterable of batches, each a tensor or
    an ``(inputs, targets, ...)`` tuple/list whose first item is taken (a
    :class:`torch.utils.data.DataLoader` works).

    Raises
    ------
    TypeError, ValueError
        Nothing iterable, non-tensor batches, no batches, NaN/Inf, or batches on
        different devices.
    """
    if isinstance(data, torch.Tensor):
        batches = [data]
    else:
        try:
            items = list(data)
        except TypeError:
            raise TypeError(
                f"inputs must be a tensor or an iterable of batches, got {type(data).__name__}"
            ) from None
        batches = []
        for i, item in enumerate(items):
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"batch {i} is a {type(x).__name__}, expected a tensor")
            batches.append(x)
    if not batches:
        raise ValueError("inputs hold no batches")
    for i, x in enumerate(batches):
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"batch {i} has shape {tuple(x.shape)}: expected (batch, ...)")
        check_finite(f"inputs (batch {i})", x)
        if x.device != batches[0].device:
            raise ValueError(f"batch {i} is on {x.device}, batch 0 on {batches[0].device}")
    return batches


class ModuleOutputs:
    """``w -> module(x)`` over all batches, concatenated along the sample axis, in eval mode.

    A class rather than a closure so that a metric built from a module pickles
    (for multi-process use) whenever the module does.
    """

    def __init__(self, flat: FlatModule, batches: list[torch.Tensor], precision=None):
        self.flat = flat
        self.batches = batches
        #: A :class:`~manifolds.precision.MixedPrecision` whose ``products`` the passes run
        #: in (outputs cast back to the weights' dtype), or ``None``.
        self.precision = precision

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        outs = self.per_batch(w)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def per_batch(self, w: torch.Tensor) -> list[torch.Tensor]:
        """The outputs on each batch, in the weights' dtype (the passes in the precision's
        ``products`` dtype, if any)."""
        if self.precision is None:
            return [self.flat(w, x, train=False) for x in self.batches]
        with self.precision.autocast(w.device):
            outs = [self.flat(w, x, train=False) for x in self.batches]
        return [y.to(w.dtype) for y in outs]


def check_module_takes(flat: FlatModule, batches: list[torch.Tensor]) -> None:
    """Evaluate ``flat`` at the module's own weights on the first batch (eval mode, no
    gradients) and check the outputs.

    Raises
    ------
    TypeError
        Floating inputs of another dtype than the weights.
    ValueError, TypeError
        The network cannot take the inputs (shape, dtype or device: torch's message is
        quoted), returns something that is not a tensor, or returns NaN/Inf. Other batches
        must have the first one's sample shape.
    """
    model = type(flat.module).__name__
    x = batches[0]
    w = flat.parameters()[0]
    if x.is_floating_point() and x.dtype != w.dtype:
        raise TypeError(
            f"weights have dtype {w.dtype} but the task inputs have dtype {x.dtype}; "
            "convert one of them"
        )
    for i, b in enumerate(batches[1:], start=1):
        if b.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"batch {i} has samples of shape {tuple(b.shape[1:])}, batch 0 {tuple(x.shape[1:])}"
            )
    try:
        with torch.no_grad():
            y = flat(None, x, train=False)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(
            f"inputs of shape {tuple(x.shape)}, dtype {x.dtype}, on {x.device} cannot be fed "
            f"to {model}: {err}"
        ) from err
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{model} returned a {type(y).__name__}; the metric needs a tensor")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{model}'s outputs on the task inputs contain NaN or Inf")
