"""The factored output Jacobian of nn.Linear networks (manifolds.linear_jacobian) against the
dense Jacobian, through PullbackMetric's output-space route."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from manifolds import PullbackMetric
from manifolds.linear_jacobian import linear_layers


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("name", ["euclidean", "fisher"])
def test_output_gram_of_linear_network_is_exact_over_batches(name):
    """K = JJ^T from layer inputs and output gradients, over two input batches, equals the
    dense Jacobian's, and its vjp is J^T."""
    net = mlp().double()
    batches = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)]
    metric = PullbackMetric.from_module(net, batches, output_metric=name, damping=0.1)
    assert linear_layers(net, metric.module.names) is not None
    w = metric.module.flatten()
    gram = metric.output_gram(w)
    evals, evecs = gram.eigenpairs()
    jac = metric.jacobian(w)  # (m, n), m = 7 samples x 3 outputs
    assert evecs.shape == (21, 21)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, jac @ jac.T)
    u = torch.randn(21, dtype=torch.float64)
    torch.testing.assert_close(gram.jacobian.vjp(u[None])[0], jac.T @ u)


def test_output_gram_falls_back_for_other_layers():
    """A network with a parameter outside nn.Linear takes the generic route, same K."""
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    metric = PullbackMetric.from_module(net, x, damping=0.1)
    assert linear_layers(net, metric.module.names) is None
    w = metric.module.flatten()
    evals, evecs = metric.output_gram(w).eigenpairs()
    jac = metric.jacobian(w)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, jac @ jac.T)
