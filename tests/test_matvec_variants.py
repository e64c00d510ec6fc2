r"""``PullbackMetric._matvec`` against dense references, and the constant-operand rules.

:meth:`PullbackMetric._matvec` computes :math:`g v = J^\top G J v / N + \lambda v` by
one dual-number forward pass and one backward pass. Inside the forward pass,
``ConstantOperands`` replaces PyTorch's forward-mode rule for products and
quotients with one constant operand, :math:`\dot y = B(\dot a, b) + B(a, \dot b)`
with :math:`\dot a = 0`, by :math:`\dot y = B(a, \dot b)` (and
:math:`\dot y = \dot a / b` for a constant divisor). These tests check:

* the product against :math:`g` built densely from :func:`torch.func.jacrev` of the
  raw outputs and :math:`G` written out (no ``manifolds`` code), in float64, for
  an MLP (constant first-layer input), a CNN with BatchNorm in eval mode
  (constant first-conv input) and a plain callable exercising every rule;
* that it runs under :func:`torch.no_grad`, for weights that require grad, and
  returns a tensor that is neither attached to a graph nor aliasing its inputs;
* that each rule returns the same dual number (primal, tangent and reverse-mode
  gradient of the primal) as PyTorch's own forward mode, and that calls outside
  the rules (constant divided by dual, floor division, both operands dual) are
  left to PyTorch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from manifolds import PullbackMetric
from manifolds.forward_ad import ConstantOperands

DTYPE = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DTYPE)


def _output_metric_matrix(name: str, logits: torch.Tensor) -> torch.Tensor:
    """:math:`G(y)` per sample, written out: ``(N, C, C)``."""
    n, c = logits.shape
    if name == "euclidean":
        return torch.eye(c, dtype=DTYPE).expand(n, c, c)
    p = torch.softmax(logits, dim=-1)
    fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return (
        fisher if name == "fisher" else fisher / 4.0
    )  # Bhattacharyya Hessian = Fisher / 4 (D_B ≈ dzᵀ F dz / 8)


def _dense_metric(fn, w: torch.Tensor, output_metric: str, damping: float) -> torch.Tensor:
    r""":math:`g = N^{-1}\sum_b J_b^\top G(y_b) J_b + \lambda I` from the Jacobian of ``fn``."""
    y = fn(w)
    y = y.reshape(1, -1) if y.ndim <= 1 else y
    n, c = y.shape
    jac = jacrev(lambda u: fn(u).reshape(n, c))(w)  # (N, C, n_w)
    gmat = _output_metric_matrix(output_metric, y)
    g = torch.einsum("bci,bcd,bdj->ij", jac, gmat, jac) / n
    return g + damping * torch.eye(w.numel(), dtype=DTYPE)


def _module_fn(module: nn.Module, x: torch.Tensor):
    """``w -> module(x)`` in eval mode, unpacking ``w`` by hand in ``parameters()`` order."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    sizes = [math.prod(s) for s in shapes]

    def fn(w):
        chunks = torch.split(w, sizes)
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return functional_call(module, params, (x,))

    return fn


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    # In-place ReLU on the dual number the first layer returns; Dropout is off in eval mode.
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Dropout(0.5))
    net.extend([nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)])
    return net.to(DTYPE).eval(), _randn(7, 2, 3, seed=1)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.conv1d = nn.Conv1d(3, 2, 2, stride=3)
        self.head = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))  # (B, 3, 3, 3)
        h = self.conv1d(h.flatten(2))  # (B, 2, 3)
        return self.head(h.flatten(1))


def _convnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = _ConvNet().to(DTYPE)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.5, 0.5)
    return net.eval(), _randn(5, 2, 5, 5, seed=2)


_A = _randn(7, 4, seed=3)
_C = _randn(3, 5, seed=4)
_X = _randn(2, 7, 3, seed=5)
_D = torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)


def _every_rule(w: torch.Tensor) -> torch.Tensor:
    """A map exercising each intercepted call with a constant on either side, and
    calls that must be left to PyTorch (15 weights; 5 samples of 9 outputs)."""
    W = w[:12].view(4, 3)
    b = w[12:15]
    h = torch.tanh(_A @ W)  # constant @ dual: (7, 3)
    h = torch.mm(h, W.T)  # dual @ dual, PyTorch's rule: (7, 4)
    h = F.linear(h, W.T, bias=b)  # all dual, bias as keyword: (7, 3)
    h = h + F.linear(_A, W.T, 0.5 * b)  # constant input; number * dual bias
    h = torch.matmul(h, W[:3])  # dual @ dual
    h = torch.matmul(h, _C) @ _C.T  # dual @ constant, twice: (7, 3)
    h = 2 * h + torch.div(h, 1.7) / _D  # number * dual, dual / number, dual / constant
    h = torch.mul(h, _D) + torch.true_divide(h, 3) + h.div(2.0, rounding_mode=None)
    h = 0.3 / (h.square() + 2.0)  # number / dual: PyTorch's rule
    h2 = torch.bmm(_X, w[:9].view(3, 3).expand(2, 3, 3))  # constant bmm dual: (2, 7, 3)
    return torch.cat([h.sum(0), h2.flatten()]).reshape(5, 9)


CASES = {
    "mlp": _mlp,
    "convnet-bn-eval": _convnet,
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("output_metric", ["euclidean", "fisher", "bhattacharyya"])
@pytest.mark.parametrize("damping", [0.0, 0.25])
def test_module_matvec_matches_dense(case, output_metric, damping):
    net, x = CASES[case]()
    metric = PullbackMetric.from_module(net, x, output_metric=output_metric, damping=damping)
    w = metric.module.flatten()
    v = _randn(w.numel(), seed=6)
    expected = _dense_metric(_module_fn(net, x), w, output_metric, damping) @ v
    got = metric.matvec(w, v)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_plain_callable_every_rule_matches_dense(damping):
    metric = PullbackMetric(_every_rule, damping=damping)
    w = _randn(15, seed=7)
    v = _randn(15, seed=8)
    expected = _dense_metric(_every_rule, w, "euclidean", damping) @ v
    torch.testing.assert_close(metric.matvec(w, v), expected, rtol=1e-10, atol=1e-12)


def test_no_grad_requires_grad_and_fresh_result():
    net, x = _convnet()
    metric = PullbackMetric.from_module(net, x, output_metric="fisher", damping=0.1)
    w = metric.module.flatten()
    v = _randn(w.numel(), seed=9)
    w0, v0 = w.clone(), v.clone()
    plain = metric.matvec(w, v)
    with torch.no_grad():
        under_no_grad = metric.matvec(w, v)
    w_param = w.clone().requires_grad_(True)
    with_grad = metric.matvec(w_param, v)
    for out in (plain, under_no_grad, with_grad):
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
        assert not out.requires_grad and out.grad_fn is None
        assert out.data_ptr() not in (w.data_ptr(), v.data_ptr())
    torch.testing.assert_close(w, w0, rtol=0, atol=0)
    torch.testing.assert_close(v, v0, rtol=0, atol=0)
    assert w_param.grad is None


def test_damping_with_broadcast_gradient():
    """The gradient of a sum comes back from autograd as a broadcast view; +lambda v
    must not be written into it in place."""
    metric = PullbackMetric(lambda w: (2.0 * w.sum()).reshape(1), damping=0.5)
    w = _randn(4, seed=10)
    v = _randn(4, seed=11)
    expected = 4.0 * v.sum() * torch.ones(4, dtype=DTYPE) + 0.5 * v
    torch.testing.assert_close(metric.matvec(w, v), expected, rtol=1e-12, atol=1e-12)


def _dual_call(f, *operands, mode: bool):
    """``f`` on dual operands (``(primal, tangent)`` pairs, or constants), with or
    without the mode: the primal, its tangent, and the reverse-mode gradient of
    ``sum(primal * weights)`` with respect to each dual operand's primal."""
    leaves = []
    with fwAD.dual_level():
        args = []
        for op in operands:
            if isinstance(op, tuple):
                p = op[0].clone().requires_grad_(True)
                leaves.append(p)
                args.append(fwAD.make_dual(p, op[1]))
            else:
                args.append(op)
        if mode:
            with ConstantOperands():
                out = f(*args)
        else:
            out = f(*args)
        primal, tangent = fwAD.unpack_dual(out)
    weights = _randn(*primal.shape, seed=12)
    grads = torch.autograd.grad((primal * weights).sum(), leaves)
    return primal.detach(), tangent.detach(), grads


def _dual(*shape: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _randn(*shape, seed=seed), _randn(*shape, seed=seed + 100)


RULES = {
    "linear(const, W, b)": (
        F.linear,
        lambda: (_randn(5, 4, seed=1), _dual(3, 4, seed=2), _dual(3, seed=3)),
    ),
    "linear(const, W)": (F.linear, lambda: (_randn(5, 4, seed=1), _dual(3, 4, seed=2))),
    "linear(x, const W, b)": (
        F.linear,
        lambda: (_dual(5, 4, seed=1), _randn(3, 4, seed=2), _dual(3, seed=3)),
    ),
    "linear(const, W, const b)": (
        F.linear,
        lambda: (_randn(5, 4, seed=1), _dual(3, 4, seed=2), _randn(3, seed=3)),
    ),
    "linear(const, W, bias=b)": (
        lambda x, W, b: F.linear(x, W, bias=b),
        lambda: (_randn(5, 4, seed=1), _dual(3, 4, seed=2), _dual(3, seed=3)),
    ),
    "conv2d(const, W, b, stride, padding)": (
        lambda x, W, b: F.conv2d(x, W, b, 2, 1),
        lambda: (_randn(2, 3, 6, 6, seed=1), _dual(4, 3, 3, 3, seed=2), _dual(4, seed=3)),
    ),
    "conv1d(const, W, groups)": (
        lambda x, W: F.conv1d(x, W, groups=2),
        lambda: (_randn(2, 4, 7, seed=1), _dual(6, 2, 3, seed=2)),
    ),
    "conv3d(const, W)": (
        F.conv3d,
        lambda: (_randn(1, 2, 4, 4, 4, seed=1), _dual(3, 2, 2, 2, 2, seed=2)),
    ),
    "const @ W": (lambda a, b: a @ b, lambda: (_randn(5, 4, seed=1), _dual(4, 3, seed=2))),
    "x @ const": (lambda a, b: a @ b, lambda: (_dual(5, 4, seed=1), _randn(4, 3, seed=2))),
    "matmul broadcast": (torch.matmul, lambda: (_randn(2, 5, 4, seed=1), _dual(4, 3, seed=2))),
    "mm": (torch.mm, lambda: (_randn(5, 4, seed=1), _dual(4, 3, seed=2))),
    "Tensor.mm": (lambda a, b: a.mm(b), lambda: (_dual(5, 4, seed=1), _randn(4, 3, seed=2))),
    "bmm": (torch.bmm, lambda: (_randn(2, 5, 4, seed=1), _dual(2, 4, 3, seed=2))),
    "x * number": (lambda a: a * 0.3, lambda: (_dual(5, 4, seed=1),)),
    "number * x": (lambda a: 3 * a, lambda: (_dual(5, 4, seed=1),)),
    "x * const broadcast": (
        lambda a, c: a * c,
        lambda: (_dual(5, 1, seed=1), _randn(1, 4, seed=2)),
    ),
    "torch.mul(const, x)": (torch.mul, lambda: (_randn(5, 4, seed=2), _dual(5, 4, seed=1))),
    "x / number": (lambda a: a / 1.5, lambda: (_dual(5, 4, seed=1),)),
    "x / const": (lambda a, c: a / c, lambda: (_dual(5, 4, seed=1), _randn(4, seed=2).exp())),
    "div(x, number)": (lambda a: torch.div(a, 7), lambda: (_dual(5, 4, seed=1),)),
    "true_divide": (lambda a: torch.true_divide(a, 2.0), lambda: (_dual(5, 4, seed=1),)),
    # left to PyTorch
    "number / x": (lambda a: 2.0 / a, lambda: (_dual(5, 4, seed=1),)),
    "const / x": (lambda c, a: c / a, lambda: (_randn(5, 4, seed=2), _dual(5, 4, seed=1))),
    "x * x": (lambda a, b: a * b, lambda: (_dual(5, 4, seed=1), _dual(5, 4, seed=2))),
    "linear all dual": (
        F.linear,
        lambda: (_dual(5, 4, seed=1), _dual(3, 4, seed=2), _dual(3, seed=3)),
    ),
    "linear(const, const W, b)": (
        F.linear,
        lambda: (_randn(5, 4, seed=1), _randn(3, 4, seed=2), _dual(3, seed=3)),
    ),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_constant_operand_rule_matches_pytorch(rule):
    f, operands = RULES[rule]
    expected = _dual_call(f, *operands(), mode=False)
    got = _dual_call(f, *operands(), mode=True)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-13, atol=1e-13)
    assert len(got[2]) == len(expected[2])
    for a, b in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_floor_division_is_left_to_pytorch():
    """Floor division is not linear: the mode must not apply its rule to it."""
    x, t = _dual(5, 4, seed=1)
    with fwAD.dual_level(), ConstantOperands():
        out = torch.div(fwAD.make_dual(x, t), 0.7, rounding_mode="floor")
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is None or torch.count_nonzero(tangent) == 0


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Count the ATen operators that actually run (below autograd and forward AD)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _count(f, *operands, mode: bool) -> dict[str, int]:
    with fwAD.dual_level():
        args = [fwAD.make_dual(*op) if isinstance(op, tuple) else op for op in operands]
        counter = _CountOps()
        if mode:
            with ConstantOperands(), counter:
                f(*args)
        else:
            with counter:
                f(*args)
    return counter.counts


def test_constant_input_layer_costs_two_products():
    """Structure, not time: with a constant input, y and its tangent are one product
    each; PyTorch's own rule also multiplies a materialised zero tangent."""
    x = _randn(5, 4, seed=1)
    weight, bias = _dual(3, 4, seed=2), _dual(3, seed=3)

    def products(counts):
        return sum(counts.get(k, 0) for k in ("mm", "addmm", "matmul", "bmm"))

    assert products(_count(F.linear, x, weight, bias, mode=True)) == 2
    assert products(_count(F.linear, x, weight, bias, mode=False)) == 3


def test_scaling_by_a_number_is_one_multiplication_each():
    """``x * 0.3`` on a dual ``x``: one multiplication for y and one for its tangent,
    where PyTorch's rule multiplies a zero tangent of the number too, and converts
    tensors to the meta device to work out that product's shape."""
    mode = _count(lambda a: a * 0.3, _dual(5, 4, seed=1), mode=True)
    stock = _count(lambda a: a * 0.3, _dual(5, 4, seed=1), mode=False)
    assert mode.get("mul") == 2 and "_to_copy" not in mode
    assert stock.get("mul", 0) + stock.get("_to_copy", 0) > 2
