"""A network seen as a pure function of one flat weight vector.

The flat order is that of :func:`torch.nn.utils.parameters_to_vector` applied to
``module.parameters()`` (shared parameters appear once). Calls go through
:func:`torch.func.functional_call`, so the module's own parameters are never
read or changed by a call; buffers (BatchNorm running statistics) are the
module's own, as they are at call time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from .validation import check_vector

__all__ = ["FlatModule", "training_mode"]


@contextlib.contextmanager
def training_mode(module: nn.Module, train: bool) -> Iterator[None]:
    """Put every submodule in train (or eval) mode for the duration, then restore each flag."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.train(train)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class FlatModule:
    """Evaluate ``module`` at a flat weight vector ``w``.

    Parameters
    ----------
    module : torch.nn.Module
        The network. Only its structure and buffers are used by calls.

    Attributes
    ----------
    names : list of str
        Parameter names in flat order.
    shapes : list of torch.Size
        Their shapes.
    dim : int
        Total number of weights :math:`n`.

    Examples
    --------
    >>> net = nn.Linear(3, 2)
    >>> fm = FlatModule(net)
    >>> w = fm.flatten()
    >>> fm(w, torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        named = list(module.named_parameters())
        if not named:
            raise ValueError(f"{type(module).__name__} has no parameters")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.dim = sum(self.numels)

    def flatten(self) -> torch.Tensor:
        """The module's current weights as one detached flat vector."""
        return nn.utils.parameters_to_vector(self.module.parameters()).detach().clone()

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``w`` shaped like each parameter, keyed by name."""
        if w.ndim != 1 or w.numel() != self.dim:
            raise ValueError(
                f"expected a flat weight vector of length {self.dim} for "
                f"{type(self.module).__name__}, got shape {tuple(w.shape)}"
            )
        return {
            name: chunk.view(shape)
            for name, chunk, shape in zip(
                self.names, torch.split(w, self.numels), self.shapes, strict=True
            )
        }

    def __call__(self, w: torch.Tensor, *args, train: bool | None = None, **kwargs):
        """``module(*args, **kwargs)`` with weights ``w``.

        Parameters
        ----------
        w : torch.Tensor
            Flat weights.
        train : bool, optional
            ``False`` evaluates in eval mode (BatchNorm running statistics,
            Dropout off) and restores the flags afterwards; ``True`` in train
            mode; ``None`` (default) in the module's current mode.
        """
        params = self.unflatten(w)
        if train is None:
            return functional_call(self.module, params, args, kwargs)
        with training_mode(self.module, train):
            return functional_call(self.module, params, args, kwargs)

    @torch.no_grad()
    def write(self, w: torch.Tensor) -> None:
        """Copy the flat point ``w`` into the module's parameters."""
        check_vector("w", w, dim=self.dim)
        for p, chunk in zip(self.module.parameters(), torch.split(w, self.numels), strict=True):
            p.copy_(chunk.view_as(p))

    def check_same_architecture(self, other: FlatModule) -> None:
        """Raise ``ValueError`` naming the first parameter whose name or shape differs."""
        for i, (na, sa, nb, sb) in enumerate(
            zip(self.names, self.shapes, other.names, other.shapes, strict=False)
        ):
            if na != nb or sa != sb:
                raise ValueError(
                    f"architectures differ at parameter {i}: {na} {tuple(sa)} vs {nb} {tuple(sb)}"
                )
        if len(self.names) != len(other.names):
            raise ValueError(
                f"architectures differ: {len(self.names)} vs {len(other.names)} parameter tensors"
            )
