r"""Forward-mode products for the pullback metric: :math:`J^\top J v` by one dual-number
forward pass and one backward pass, with cheap tangents for products by constants.

:func:`gram_vector_product` is the metric-vector product's kernel,
:math:`v \mapsto J^\top (J v)` for the Jacobian :math:`J` of a map :math:`F`: one forward
pass at the dual number :math:`w + \varepsilon v` (:mod:`torch.autograd.forward_ad`)
gives :math:`F(w)` with its reverse-mode graph and the tangent :math:`Jv`; one backward
pass of :math:`F(w)` with cotangent :math:`Jv` gives :math:`J^\top J v`.
:class:`ConstantOperands` makes the tangents of products with a constant operand cost
one operation instead of PyTorch's two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["ConstantOperands", "gram_vector_product", "jacobian_vector_product"]


def _dual_pass(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, v: torch.Tensor):
    r"""``(F(w), Jv)``: one forward pass of ``fn`` at the dual number :math:`w + \varepsilon v`
    under :class:`ConstantOperands` (the tangent is ``None`` where ``F`` does not depend on
    ``w``)."""
    with fwAD.dual_level(), ConstantOperands():
        out = fn(fwAD.make_dual(w, v))
        return fwAD.unpack_dual(out)


def jacobian_vector_product(
    fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    r""":math:`Jv` for :math:`J = \partial F/\partial w` of ``fn`` at ``w``: one dual-number forward
    pass, with the first layer's tangent as one product (:class:`ConstantOperands`), where
    :func:`torch.func.jvp` pays for two. No reverse-mode graph is kept."""
    with torch.no_grad():
        primal, tangent = _dual_pass(fn, w.detach(), v)
    return torch.zeros_like(primal) if tangent is None else tangent


def gram_vector_product(
    fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    r""":math:`J^\top J v` for :math:`J = \partial F/\partial w` of ``fn`` at ``w``.

    Products in which one operand does not depend on :math:`w` (the input batch of a
    first layer) get their tangent as one product, :math:`B(x, \dot W)`, instead of
    PyTorch's :math:`B(\dot x, W) + B(x, \dot W)` with a materialised zero :math:`\dot x`,
    and elementwise ``*``, ``/`` by constants skip PyTorch's slow zero-tangent path (see
    :class:`ConstantOperands`). Works under :func:`torch.no_grad` and for weights that
    require grad (both are detached here); the result is a fresh tensor.
    """
    with torch.enable_grad():
        wp = w.detach().requires_grad_(True)
        primal, tangent = _dual_pass(fn, wp, v)
        if tangent is None or not primal.requires_grad:
            return torch.zeros_like(v)  # outputs do not depend on w
        (gv,) = torch.autograd.grad(primal, wp, tangent.detach(), allow_unused=True)
    return torch.zeros_like(v) if gv is None else gv


#: Operations :math:`B(a, b)` linear in each of their first two arguments.
_PRODUCTS = frozenset(
    {
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.Tensor.mm,
        torch.bmm,
        torch.Tensor.bmm,
        torch.mul,
        torch.Tensor.mul,
        torch.Tensor.__mul__,
        torch.Tensor.__rmul__,
    }
)
#: Those that also add a bias :math:`c` (third argument): :math:`B(a, b) + c`.
_WITH_BIAS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d})
#: :math:`a / b`, linear in :math:`a` (true division only).
_DIVISIONS = frozenset(
    {
        torch.div,
        torch.Tensor.div,
        torch.Tensor.__truediv__,
        torch.true_divide,
        torch.Tensor.true_divide,
    }
)
#: Those of the above that accept a Python number as either operand.
_NUMBER_OPERANDS = frozenset(
    {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__} | _DIVISIONS
)


class ConstantOperands(TorchFunctionMode):
    r"""Dual-number products and quotients with a constant operand, at the cost of one op.

    PyTorch's forward-mode rule for a product :math:`B(a, b)` (linear,
    convolution, matmul, elementwise ``*``) is
    :math:`\dot y = B(\dot a, b) + B(a, \dot b)`. When :math:`a` carries no
    tangent, :math:`\dot a` is an "efficient zero tensor", and torch (2.x, CPU)
    pays for it in full: a product by zero is materialised (the data entering a
    first layer: two full products instead of one), and an elementwise
    ``*`` or ``/`` by a constant goes through a meta-tensor shape computation in
    Python (about 0.2 ms a call, whatever the tensor's size). Inside this mode
    such calls compute

    .. math::

        y = B(a, b_p) + c_p \ \text{(recorded for reverse mode)}, \qquad
        \dot y = B(a, \dot b) + \dot c \ \text{(not recorded)},

    likewise :math:`\dot y = \dot a / b` for :math:`y = a / b` with constant
    :math:`b`, and return the dual number :math:`(y, \dot y)`. Every other call,
    and every call whose operands all carry tangents, goes to PyTorch unchanged.
    Exact: the tangent is the same operation applied to the same numbers, minus
    the terms that are zero. The tangent is not recorded in the reverse-mode
    graph, which :func:`gram_vector_product` never differentiates.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        if func in _PRODUCTS or func in _DIVISIONS:
            split = _split_constant_operand(func, args, kwargs)
            if split is not None:
                primal_args, tangent_args, options = split
                primal = func(*primal_args, **options)
                with torch.no_grad():
                    tangent = func(*tangent_args, **options)
                return fwAD.make_dual(primal, tangent)
        return func(*args, **kwargs)


def _unpack(x):
    """``(primal, tangent)`` at the current dual level; a Python number is a constant."""
    return fwAD.unpack_dual(x) if isinstance(x, torch.Tensor) else (x, None)


def _split_constant_operand(func, args, kwargs):
    """Arguments for :math:`y` and :math:`\\dot y` of a call whose first two
    operands are one carrying a tangent and one constant: ``(primal_args,
    tangent_args, options)``, ``options`` being the keyword arguments less
    ``bias``; ``None`` for any other call."""
    if len(args) < 2 or "out" in kwargs or kwargs.get("rounding_mode") is not None:
        return None
    a, b = args[0], args[1]
    numbers = func in _NUMBER_OPERANDS
    for x in (a, b):
        if not (isinstance(x, torch.Tensor) or (numbers and type(x) in (int, float))):
            return None
    a_p, a_t = _unpack(a)
    b_p, b_t = _unpack(b)
    if (a_t is None) == (b_t is None) or (func in _DIVISIONS and a_t is None):
        return None
    primal, tangent = ((a, b_p), (a, b_t)) if a_t is None else ((a_p, b), (a_t, b))
    rest, options = args[2:], dict(kwargs)
    if func not in _WITH_BIAS:
        return (*primal, *rest), (*tangent, *rest), options
    bias = rest[0] if rest else options.pop("bias", None)
    rest = rest[1:]
    if bias is None:
        return (*primal, None, *rest), (*tangent, None, *rest), options
    if not isinstance(bias, torch.Tensor):
        return None
    c_p, c_t = fwAD.unpack_dual(bias)
    return (*primal, c_p, *rest), (*tangent, c_t, *rest), options
