"""The output-space Gram K = JJ^T (manifolds.gram.OutputGram) against dense weight-space algebra,
for both Jacobian routes, damped and undamped, on a tiny float64 network."""

from __future__ import annotations

import pytest
import torch
from dense_reference import DTYPE, flat_weights, make_mlp, randn

from manifolds import AutogradJacobian, OutputGram, PullbackMetric
from manifolds.flat import FlatModule


@pytest.fixture(scope="module")
def problem():
    net = make_mlp((3, 5, 4), seed=2)
    x = randn(3, 3, seed=3)  # m = 12 embedded outputs, n = 44 weights
    metric = PullbackMetric.from_module(net, x, output_metric="fisher")
    w = flat_weights(net)
    return metric, w, metric.jacobian(w)


@pytest.mark.parametrize("route", ["factored", "autograd"])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_output_gram_operations_match_dense_algebra(problem, route, damping):
    metric, w, jac = problem
    op = metric.jacobian_operator(w) if route == "factored" else AutogradJacobian(metric.embed, w)
    gram = OutputGram(op, damping)
    m, n = jac.shape
    k = jac @ jac.T
    torch.testing.assert_close(gram.matrix, k, rtol=1e-10, atol=1e-12)
    assert gram.trace() == pytest.approx(float(jac.pow(2).sum()), rel=1e-12)
    g = jac.T @ jac + damping * torch.eye(n, dtype=DTYPE)
    b, r = randn(n, seed=4), randn(m, seed=5)
    g_inv = torch.linalg.pinv(g, hermitian=True)
    torch.testing.assert_close(gram.weight_solve(b), g_inv @ b, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(gram.least_squares_step(r), g_inv @ jac.T @ r, rtol=1e-8, atol=1e-9)
    rows = torch.stack([r, 2 * r])  # several right-hand sides at once
    torch.testing.assert_close(gram.solve(rows)[1], 2 * gram.solve(r), rtol=1e-10, atol=1e-12)
    if damping:
        torch.testing.assert_close(
            gram.damped_projection(b), damping * (g_inv @ b), rtol=1e-8, atol=1e-9
        )
    else:
        with pytest.raises(ValueError, match="damping > 0"):
            gram.damped_projection(b)


def test_output_gram_spectrum_is_the_top_of_g(problem):
    metric, w, jac = problem
    gram = OutputGram(metric.jacobian_operator(w), 0.1)
    evals, evecs = torch.linalg.eigh(jac.T @ jac + 0.1 * torch.eye(jac.shape[1], dtype=DTYPE))
    spec = gram.spectrum(5)
    torch.testing.assert_close(spec.eigenvalues, evals.flip(0)[:5], rtol=1e-9, atol=1e-12)
    overlap = (spec.eigenvectors.T @ evecs.flip(1)[:, :5]).abs().diagonal()
    torch.testing.assert_close(overlap, torch.ones(5, dtype=DTYPE))
    # rank(J) = 3 samples x (4 - 1) softmax directions: no more pairs than that
    assert gram.spectrum().rank == 9 and gram.spectrum(50).rank == 9


def test_flat_module_over_a_group_holds_the_others_fixed():
    net = make_mlp((3, 5, 4), seed=2)
    params = [net[2].weight, net[0].bias]
    flat = FlatModule(net, params)
    assert flat.names == ["2.weight", "0.bias"] and flat.dim == 20 + 5
    w = flat.flatten()
    x = randn(6, 3, seed=1)
    torch.testing.assert_close(flat(w, x), net(x))
    moved = w + 0.1
    out = flat(moved, x)
    with torch.no_grad():
        net[2].weight.add_(0.1)
        net[0].bias.add_(0.1)
    torch.testing.assert_close(out, net(x))
    with pytest.raises(ValueError, match="appears twice"):
        FlatModule(net, [net[0].bias, net[0].bias])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        FlatModule(net, [torch.nn.Parameter(torch.zeros(2, dtype=DTYPE))])


def test_sketched_metric_is_the_per_sample_projection_and_unbiased(problem):
    """Sketched(base, U): its Jacobian rows are U_b^T J_b (factored route, dense check), and
    J_S^T J_S averages to J^T J over draws (E[U U^T] = I)."""
    from manifolds.output_metrics import Sketched, get_output_metric

    metric, w, jac = problem
    net, x = metric.module.module, metric.inputs[0]
    base = get_output_metric("fisher")
    gen = torch.Generator().manual_seed(0)
    sk = Sketched.draw(base, 3, 4, 2, gen, w)
    sketched = PullbackMetric.from_module(net, x, output_metric=sk)
    op = sketched.jacobian_operator(w)
    assert type(op).__name__ == "FactoredJacobian"
    expected = torch.einsum("ncr,ncp->nrp", sk.directions, jac.reshape(3, 4, -1)).reshape(6, -1)
    torch.testing.assert_close(sketched.jacobian(w), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.gram(), expected @ expected.T, rtol=1e-10, atol=1e-12)
    g = jac.T @ jac
    mean = torch.zeros_like(g)
    draws = 4000
    for _ in range(draws):
        u = Sketched.draw(base, 3, 4, 2, gen, w).directions
        rows = torch.einsum("ncr,ncp->nrp", u, jac.reshape(3, 4, -1)).reshape(6, -1)
        mean += rows.T @ rows / draws
    assert float((mean - g).norm() / g.norm()) < 0.05


@pytest.mark.parametrize("dual", [True, False])
def test_autograd_jacobian_rows_one_at_a_time_and_batched_equal_the_dense_jacobian(problem, dual):
    """A single row skips vmap (a plain backward pass; a dual-number forward pass when
    ``dual``): the same J v and J^T u as the batched rows and the dense Jacobian."""
    metric, w, jac = problem
    op = AutogradJacobian(metric.embed, w, dual=dual)
    m, n = jac.shape
    v, u = randn(2, n, seed=6), randn(2, m, seed=7)
    torch.testing.assert_close(op.jvp(v[:1]), (jac @ v[0])[None], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(op.jvp(v), v @ jac.T, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(op.vjp(u[:1]), (jac.T @ u[0])[None], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(op.vjp(u), u @ jac, rtol=1e-12, atol=1e-13)


def test_autograd_jacobian_single_row_through_a_convolution_equals_the_dense_jacobian():
    """The dual-number pass handles a first convolution (a constant input) as one product."""
    torch.manual_seed(8)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    ).to(DTYPE)
    metric = PullbackMetric.from_module(net, randn(2, 1, 4, 4, seed=9), output_metric="fisher")
    w = flat_weights(net)
    jac = metric.jacobian(w)
    v = randn(jac.shape[1], seed=10)
    got = metric.autograd_jacobian(w).jvp(v[None])[0]
    torch.testing.assert_close(got, jac @ v, rtol=1e-12, atol=1e-13)
