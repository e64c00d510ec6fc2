"""A network seen as a pure function of one flat weight vector: all of its parameters, or a
group of them with the others held at the module's current values.

The flat order is the order of the parameters given (by default that of
:func:`torch.nn.utils.parameters_to_vector` applied to ``module.parameters()``; shared
parameters appear once). Calls go through :func:`torch.func.functional_call`, so the
module's own parameters are never read (for those in the flat vector) or changed by a
call; buffers (BatchNorm running statistics) are the module's own, as they are at call
time. This is the one wrapper of its kind: the pullback metric, the geodesic solvers and
the optimizers all evaluate networks through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

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
    """Evaluate ``module`` at a flat vector ``w`` of (some of) its weights.

    Parameters
    ----------
    module : torch.nn.Module
        The network. Only its structure, buffers and the parameters outside the flat
        vector are used by calls.
    params : iterable of torch.nn.Parameter, optional
        The parameters the flat vector holds, in this order (a parameter group); each
        must be one of ``module``'s, once. Default: all of them.

    Attributes
    ----------
    names : list of str
        Parameter names in flat order.
    shapes : list of torch.Size
        Their shapes.
    dim : int
        Total number of weights :math:`n`.

    Raises
    ------
    TypeError, ValueError
        Not a module, no parameters, or ``params`` holding a tensor that is not one of
        the module's parameters (or one twice).

    Examples
    --------
    >>> net = nn.Linear(3, 2)
    >>> fm = FlatModule(net)
    >>> w = fm.flatten()
    >>> fm(w, torch.zeros(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(self, module: nn.Module, params: Iterable[torch.Tensor] | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        named = list(module.named_parameters())
        if not named:
            raise ValueError(f"{type(module).__name__} has no parameters")
        self.module = module
        if params is None:
            self.names = [n for n, _ in named]
        else:
            self.names = _parameter_names(module, named, params)
        by_name = dict(named)
        self._params = [by_name[n] for n in self.names]
        self.shapes = [by_name[n].shape for n in self.names]
        self.numels = [by_name[n].numel() for n in self.names]
        self.dim = sum(self.numels)
        self.whole = len(self.names) == len(named)

    def parameters(self) -> list[nn.Parameter]:
        """The module's parameters the flat vector holds, in flat order (as they were when
        this wrapper was made)."""
        return list(self._params)

    def flatten(self) -> torch.Tensor:
        """The module's current weights (those held) as one detached flat vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def gradient(self) -> torch.Tensor | None:
        """The held parameters' ``.grad`` as one flat vector (zeros where a parameter has no
        gradient); ``None`` when none has one. Raises on sparse gradients."""
        params = self.parameters()
        if all(p.grad is None for p in params):
            return None
        parts = []
        for p, name in zip(params, self.names, strict=True):
            if p.grad is None:
                parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            elif p.grad.is_sparse:
                raise RuntimeError(f"sparse gradients are not supported ({name})")
            else:
                parts.append(p.grad.reshape(-1))
        return torch.cat(parts)

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``w`` shaped like each held parameter, keyed by name."""
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

    def __call__(self, w: torch.Tensor | None, *args, train: bool | None = None, **kwargs):
        """``module(*args, **kwargs)`` with the held weights ``w``.

        Parameters
        ----------
        w : torch.Tensor or None
            Flat weights; ``None`` calls the module with its own current parameters
            (autograd then records them, not a flat vector).
        train : bool, optional
            ``False`` evaluates in eval mode (BatchNorm running statistics,
            Dropout off) and restores the flags afterwards; ``True`` in train
            mode; ``None`` (default) in the module's current mode.
        """
        context = contextlib.nullcontext() if train is None else training_mode(self.module, train)
        with context:
            if w is None:
                return self.module(*args, **kwargs)
            return functional_call(self.module, self.unflatten(w), args, kwargs, strict=False)

    @torch.no_grad()
    def write(self, w: torch.Tensor) -> None:
        """Copy the flat point ``w`` into the module's (held) parameters."""
        check_vector("w", w, dim=self.dim)
        for p, chunk in zip(self.parameters(), torch.split(w, self.numels), strict=True):
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


def _parameter_names(module: nn.Module, named, params: Iterable[torch.Tensor]) -> list[str]:
    """Names of ``params`` in ``module``, checked to be its parameters, each once."""
    names_of = {id(p): name for name, p in named}
    names, seen = [], set()
    for i, p in enumerate(params):
        if id(p) not in names_of:
            raise ValueError(
                f"parameter {i} of the group (shape {tuple(p.shape)}) is not a parameter of "
                f"the model {type(module).__name__}; the metric measures the model's outputs, "
                "so every parameter it moves must be one of the model's"
            )
        if id(p) in seen:
            raise ValueError(f"parameter {i} of the group appears twice")
        seen.add(id(p))
        names.append(names_of[id(p)])
    if not names:
        raise ValueError("the parameter group holds no parameters")
    return names
