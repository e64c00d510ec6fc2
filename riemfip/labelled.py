"""What labelled data must be, checked at every boundary that takes it.

Labelled data is a pair of tensors ``(x, y)``: inputs ``(N, ...)`` and integer class
labels ``(N,)``. :func:`check_labelled` checks, in this order, and raises with the
name of the data and the problem:

* both are tensors (``TypeError``);
* the labels are 1-D, one per input, and there is at least one (``ValueError``);
* the labels are integers (``TypeError``), the inputs floating point (``TypeError``;
  integer inputs, e.g. token ids, only where a caller allows them);
* both are on one device (``ValueError``);
* the inputs are finite (``ValueError``, naming the first sample with NaN or Inf).

:func:`labelled_pair` unpacks an ``(inputs, labels)`` tuple first;
:func:`check_dataset` checks both splits of a :class:`riemfip.data.Dataset`.
"""

from __future__ import annotations

import torch

from .data import Dataset

__all__ = ["check_dataset", "check_labelled", "labelled_pair"]


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_labelled(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    name: str = "labelled data",
    integer_inputs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check inputs ``x`` and labels ``y``; return them unchanged.

    Parameters
    ----------
    x : torch.Tensor
        Inputs ``(N, ...)``, floating point.
    y : torch.Tensor
        Integer class labels ``(N,)``.
    name : str
        What the data is, for the messages (e.g. ``"task 2 training set"``).
    integer_inputs : bool
        Also accept integer inputs (token ids for an embedding layer).

    Returns
    -------
    (x, y)

    Raises
    ------
    TypeError
        Not tensors, labels not integer, or inputs not floating point.
    ValueError
        No samples, labels not one per input, two devices, or non-finite inputs.

    Examples
    --------
    >>> check_labelled(torch.zeros(3, 2), torch.tensor([0, 1, 1]))[1]
    tensor([0, 1, 1])
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"{name}: inputs and labels must be tensors, got {type(x).__name__} and "
            f"{type(y).__name__}"
        )
    if x.ndim == 0 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"{name}: expected inputs (N, ...) and labels (N,), one label per input; got "
            f"inputs {tuple(x.shape)} and labels {tuple(y.shape)}"
        )
    if len(y) == 0:
        raise ValueError(f"{name}: no samples (inputs {tuple(x.shape)})")
    if not _is_integer(y):
        raise TypeError(f"{name}: labels must be integer class indices, got {y.dtype}")
    if not x.is_floating_point() and not (integer_inputs and _is_integer(x)):
        allowed = "floating point or integer (token ids)" if integer_inputs else "floating point"
        raise TypeError(f"{name}: inputs must be {allowed}, got {x.dtype}")
    if x.device != y.device:
        raise ValueError(f"{name}: inputs are on {x.device}, labels on {y.device}")
    if x.is_floating_point():
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
        if bool(bad.any()):
            raise ValueError(
                f"{name}: inputs contain NaN or Inf ({int(bad.sum())} samples, the first "
                f"is sample {int(bad.nonzero()[0])})"
            )
    return x, y


def labelled_pair(
    data: object, *, name: str = "data", integer_inputs: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from an ``(inputs, labels)`` tuple or list, checked by :func:`check_labelled`.

    Raises
    ------
    TypeError
        ``data`` is not a pair, or as :func:`check_labelled`.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(
            f"{name} must be an (inputs, integer labels) pair of tensors, got {type(data).__name__}"
        )
    return check_labelled(data[0], data[1], name=name, integer_inputs=integer_inputs)


def check_dataset(data: object, *, name: str = "data") -> Dataset:
    """``data`` if it is a :class:`~riemfip.data.Dataset` whose training and test splits
    pass :func:`check_labelled`.

    Raises
    ------
    TypeError
        Not a ``Dataset``, or as :func:`check_labelled`.
    ValueError
        As :func:`check_labelled`, naming the split.
    """
    if not isinstance(data, Dataset):
        raise TypeError(f"{name} must be a riemfip.data.Dataset, got {type(data).__name__}")
    check_labelled(data.x_train, data.y_train, name=f"{name} ({data.name}) training set")
    check_labelled(data.x_test, data.y_test, name=f"{name} ({data.name}) test set")
    return data
