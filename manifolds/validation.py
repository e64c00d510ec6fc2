"""Input checks shared by the metric and the manifold, and the convergence signals.

Every public entry point checks its tensors here so that a wrong shape, an
integer dtype, a NaN or a tensor on the wrong device fails with a message that
names the argument and the problem, instead of a deep autograd traceback or a
silently wrong answer.
"""

from __future__ import annotations

import torch

__all__ = ["ConvergenceWarning", "NotConvergedError", "check_vector", "check_finite"]


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


class NotConvergedError(RuntimeError):
    """An iterative solver stopped before reaching its tolerance (``on_failure="raise"``).

    Attributes
    ----------
    residual : float
        The relative residual reached.
    iterations : int
        Iterations spent.
    """

    def __init__(self, message: str, residual: float, iterations: int):
        super().__init__(message)
        self.residual = residual
        self.iterations = iterations


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` if a floating tensor holds NaN or Inf, naming the first bad index."""
    if t.is_floating_point() or t.is_complex():
        # Fast path: a sum is finite only if every term is (an overflowing sum of finite
        # terms just falls through to the exact elementwise check below).
        if bool(torch.isfinite(t.sum())):
            return
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
            kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ValueError(
                f"{name} contains {int(bad.sum())} non-finite value(s) ({kind}); "
                f"first at index {idx if len(idx) > 1 else idx[0]}"
            )


def check_vector(
    name: str,
    t: object,
    *,
    dim: int | None = None,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a finite, floating, 1-D tensor of length ``dim``.

    Parameters
    ----------
    name : str
        Argument name used in error messages.
    t : object
        The value to check.
    dim : int, optional
        Required length.
    like : torch.Tensor, optional
        A tensor whose device and dtype ``t`` must share.

    Returns
    -------
    torch.Tensor
        ``t`` itself.

    Raises
    ------
    TypeError
        Not a tensor, not floating point, or a dtype different from ``like``.
    ValueError
        Not 1-D, wrong length, NaN/Inf, or on another device than ``like``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype, got {t.dtype}; "
            "convert with .float() or .double()"
        )
    if t.ndim != 1:
        raise ValueError(
            f"{name} must be a flat 1-D weight-space vector, got shape {tuple(t.shape)}; "
            "flatten parameters with torch.nn.utils.parameters_to_vector"
        )
    if dim is not None and t.numel() != dim:
        raise ValueError(f"{name} has length {t.numel()}, expected {dim} (the number of weights)")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the point is on {like.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the point has dtype {like.dtype}")
    check_finite(name, t)
    return t
