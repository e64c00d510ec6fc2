"""Mixed precision (:mod:`manifolds.precision`): network passes in a low precision, the
output-space solves in float64, every answer in the weights' dtype.

References are the same metric in float64 throughout, on a small CNN with BatchNorm (both
the forward-mode product route and the factored Jacobian are exercised).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from manifolds import MixedPrecision, PullbackMetric


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.Tanh(), nn.Flatten(), nn.Linear(216, 10)
    ).eval()
    x = torch.randn(40, 1, 8, 8)
    v = torch.randn(sum(p.numel() for p in net.parameters()))
    return net, x, v


def _metrics(cnn, precision, damping=1e-2, **options):
    net, x, v = cnn
    reference = PullbackMetric.from_module(
        copy.deepcopy(net).double(), x.double(), output_metric="fisher", damping=damping
    )
    metric = PullbackMetric.from_module(
        net, x, output_metric="fisher", damping=damping, precision=precision, **options
    )
    w = metric.module.flatten()
    return metric, reference, w, reference.module.flatten(), v


@pytest.mark.parametrize("products", [torch.bfloat16, torch.float16])
def test_low_precision_products_agree_with_float64_to_their_roundoff(cnn, products):
    metric, reference, w, w64, v = _metrics(cnn, MixedPrecision(products=products))
    unit = torch.finfo(products).eps
    exact = reference.matvec(w64, v.double())
    mv = metric.matvec(w, v)
    assert mv.dtype == torch.float32
    assert 1e-2 * unit < _rel(mv, exact) < 4 * unit  # really computed in `products`
    gram = metric.output_gram(w).matrix
    assert gram.dtype == torch.float32
    assert 1e-2 * unit < _rel(gram, reference.output_gram(w64).matrix) < 4 * unit
    x = metric.solve(w, v, method="output")
    assert x.dtype == torch.float32
    assert _rel(x, reference.solve(w64, v.double(), method="output")) < 4 * unit


def test_solves_run_in_float64_for_float32_weights(cnn):
    # lambda tiny against K, where a float32 factorization loses digits: the solve must be
    # the float64 solve of the (float32) K it assembled, not a float32 one
    metric, _, w, _, v = _metrics(cnn, MixedPrecision(products=None), damping=1e-7)
    assert metric.tol is None  # no low-precision products: the usual tolerance rule
    gram = metric.output_gram(w)
    b = gram.jacobian.jvp(v[None])[0]
    k = gram.matrix.double() + 1e-7 * torch.eye(gram.size, dtype=torch.float64)
    exact = torch.linalg.solve(k, b.double())
    x = gram.solve(b)
    assert x.dtype == torch.float32
    assert _rel(x, exact) < 1e-6
    plain = _metrics(cnn, None, damping=1e-7)[0].output_gram(w).solve(b)
    assert _rel(plain, exact) > 1e-4  # a float32 factorization would fail the line above


def test_bad_precision_is_refused_by_name(cnn):
    net, x, _ = cnn
    with pytest.raises(ValueError, match="products"):
        MixedPrecision(products=torch.int8)
    with pytest.raises(ValueError, match="solves"):
        MixedPrecision(solves=torch.bfloat16)
    with pytest.raises(TypeError, match="MixedPrecision"):
        PullbackMetric.from_module(net, x, precision="bf16")
    with pytest.raises(TypeError, match="float32 or float64"):
        PullbackMetric.from_module(
            copy.deepcopy(net).bfloat16(), x.bfloat16(), precision=MixedPrecision()
        )
