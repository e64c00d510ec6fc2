r"""``PullbackMetric`` on tiny tanh MLPs against independent dense references.

The reference metric is :math:`g = \frac1N\sum_b J_b^\top G(y_b) J_b + \lambda I` with
:math:`J_b` from :func:`torch.func.jacrev` of the raw logits and :math:`G` written out
(see ``conftest.py``); the reference geodesic acceleration is
:math:`-\Gamma^k_{ij} v^i v^j` with Christoffel symbols from ``jacfwd`` of that
dense metric.
"""

from __future__ import annotations

import copy

import pytest
import torch
from dense_reference import (
    DTYPE,
    OUTPUT_METRICS,
    christoffel_ref,
    dense_metric_ref,
    flat_weights,
    logits_fn,
    make_mlp,
    output_metric_ref,
    randn,
)
from torch import nn

from manifolds import PullbackMetric, get_output_metric

METHODS = ("dense", "output", "cg")
DAMPINGS = (0.0, 0.1)
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def setup(tiny_mlp, name, damping, **options):
    net, x = tiny_mlp
    metric = PullbackMetric.from_module(net, x, output_metric=name, damping=damping, **options)
    w = flat_weights(net)
    g_ref = dense_metric_ref(logits_fn(net, x), name, damping)(w)
    return metric, w, g_ref


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("name", OUTPUT_METRICS)
def test_dense_jacobian_embed_match_reference(tiny_mlp, name, damping):
    metric, w, g_ref = setup(tiny_mlp, name, damping)
    net, x = tiny_mlp
    n, (batch, c) = w.numel(), net(x).shape
    assert metric.dim == n == 26
    torch.testing.assert_close(metric.dense(w), g_ref, **TIGHT)
    # g = J_F^T J_F + damping I with F the embedded outputs, length m = N * C
    jac = metric.jacobian(w)
    assert jac.shape == (batch * c, n) and metric.output_dim(w) == batch * c
    torch.testing.assert_close(jac.T @ jac + damping * torch.eye(n, dtype=DTYPE), g_ref, **TIGHT)
    phi = get_output_metric(name).embed(net(x).detach())
    torch.testing.assert_close(metric.embed(w), phi.reshape(-1) / batch**0.5, **TIGHT)
    # the undamped metric of 5 samples has rank N * rank(G) < n
    rank_g = c if name == "euclidean" else c - 1
    eig = torch.linalg.eigvalsh(g_ref)
    assert int((eig > 1e-10).sum()) == (n if damping else batch * rank_g)


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("name", OUTPUT_METRICS)
def test_matvec_inner_norm_match_reference(tiny_mlp, name, damping):
    metric, w, g_ref = setup(tiny_mlp, name, damping)
    u, v = randn(26, seed=3), randn(26, seed=4)
    torch.testing.assert_close(metric.matvec(w, v), g_ref @ v, **TIGHT)
    torch.testing.assert_close(metric.inner(w, u, v), u @ g_ref @ v, **TIGHT)
    torch.testing.assert_close(metric.inner(w, v), v @ g_ref @ v, **TIGHT)
    torch.testing.assert_close(metric.norm(w, v), (v @ g_ref @ v).sqrt(), **TIGHT)
    assert metric.inner(w, u, v).shape == ()
    # products do not record autograd history on the caller's tensors
    assert not metric.matvec(w, v).requires_grad


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("name", OUTPUT_METRICS)
def test_solve_matches_reference(tiny_mlp, name, damping, method):
    metric, w, g_ref = setup(tiny_mlp, name, damping)
    if damping:
        b = randn(26, seed=5)
        expected = torch.linalg.solve(g_ref, b)
    else:
        # singular (rank 5 or 10 of 26): a right-hand side in the range has the
        # minimum-norm solution pinv(g) b, which every method must return
        b = g_ref @ randn(26, seed=5)
        expected = torch.linalg.pinv(g_ref, hermitian=True, rtol=1e-10) @ b
    res = metric.solve_result(w, b, method=method)
    assert res.method == method
    assert res.converged, res
    assert res.residual < 1e-9
    torch.testing.assert_close(res.x, expected, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(g_ref @ res.x, b, rtol=1e-8, atol=1e-10)
    # the default solver agrees, and the metric's own solver setting is honoured
    solver_metric, _, _ = setup(tiny_mlp, name, damping, solver=method)
    assert solver_metric.solve_result(w, b).method == method


def test_auto_solver_choice(tiny_mlp):
    metric, w, g_ref = setup(tiny_mlp, "fisher", 0.1)
    b = randn(26, seed=6)
    assert metric.solve_result(w, b).method == "dense"  # n = 26 <= 256
    metric.dense_max = 20
    assert metric.solve_result(w, b).method == "output"  # m = 10 <= 256
    metric.output_max = 5
    res = metric.solve_result(w, b)
    assert res.method == "cg"
    torch.testing.assert_close(res.x, torch.linalg.solve(g_ref, b), rtol=1e-8, atol=1e-10)


def acceleration_ref(fn, name, damping, w, v):
    gamma = christoffel_ref(dense_metric_ref(fn, name, damping), w)
    return -torch.einsum("kij,i,j->k", gamma, v, v)


@pytest.mark.parametrize("name", OUTPUT_METRICS)
def test_acceleration_matches_christoffel_symbols_damped(tiny_mlp, name):
    # n = 26 > m = 10: the damping makes g invertible
    net, x = tiny_mlp
    damping = 0.05
    w, v = flat_weights(net), randn(26, seed=7)
    expected = acceleration_ref(logits_fn(net, x), name, damping, w, v)
    assert float(expected.norm()) > 1e-3
    for method in METHODS:
        metric = PullbackMetric.from_module(net, x, output_metric=name, damping=damping)
        res = metric.acceleration_result(w, v, method=method)
        assert res.method == method and res.converged
        torch.testing.assert_close(res.x, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", OUTPUT_METRICS)
def test_acceleration_matches_christoffel_symbols_undamped_tall(name):
    # n = 12 weights < m = 48 outputs (16 samples x 3), no damping. The softmax metrics
    # ignore a common shift of the logits, which a linear last layer can make along
    # W2 += 1 a^T (and its bias): a final tanh keeps every metric nondegenerate.
    net = make_mlp((2, 2, 3), seed=8, last_bias=False)
    net.append(nn.Tanh())
    x = 2 * randn(16, 2, seed=9)
    w, v = flat_weights(net), randn(12, seed=10)
    fn = logits_fn(net, x)
    g_ref = dense_metric_ref(fn, name, 0.0)(w)
    assert float(torch.linalg.eigvalsh(g_ref).min()) > 1e-6  # invertible
    expected = acceleration_ref(fn, name, 0.0, w, v)
    for method in METHODS:
        metric = PullbackMetric.from_module(net, x, output_metric=name)
        res = metric.acceleration_result(w, v, method=method)
        assert res.method == method and res.converged, res
        torch.testing.assert_close(res.x, expected, rtol=1e-7, atol=1e-8)


def test_from_module_averages_over_all_samples_of_all_batches(tiny_mlp):
    net, x = tiny_mlp
    y = torch.arange(5)
    whole = PullbackMetric.from_module(net, x, output_metric="fisher", damping=0.01)
    w = flat_weights(net)
    g = whole.dense(w)
    # unequal batches (2 + 3): a mean of per-batch means would weigh samples differently
    for batches in ([x[:2], x[2:]], [(x[:2], y[:2]), (x[2:], y[2:])], iter([x[:2], x[2:]])):
        split = PullbackMetric.from_module(net, batches, output_metric="fisher", damping=0.01)
        torch.testing.assert_close(split.dense(w), g, rtol=1e-12, atol=1e-14)
    per_batch = [
        PullbackMetric.from_module(net, xb, output_metric="fisher").dense(w)
        for xb in (x[:2], x[2:])
    ]
    torch.testing.assert_close(
        (2 * per_batch[0] + 3 * per_batch[1]) / 5 + 0.01 * torch.eye(26, dtype=DTYPE),
        g,
        rtol=1e-12,
        atol=1e-14,
    )
    # a torch DataLoader works too
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    split = PullbackMetric.from_module(net, loader, output_metric="fisher", damping=0.01)
    torch.testing.assert_close(split.dense(w), g, rtol=1e-12, atol=1e-14)


def bn_dropout_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)
    ).to(DTYPE)
    with torch.no_grad():
        net[1].running_mean.copy_(randn(4, seed=11))
        net[1].running_var.copy_(0.5 + randn(4, seed=12).abs())
        net[1].weight.copy_(1 + 0.3 * randn(4, seed=13))
        net[1].bias.copy_(0.3 * randn(4, seed=14))
    return net


def test_module_with_batchnorm_and_dropout_is_evaluated_in_eval_mode():
    net = bn_dropout_net()
    x = randn(6, 3, seed=15)
    net.train()
    net[3].eval()  # mixed flags: each must come back as it was
    flags = [m.training for m in net.modules()]
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    params = flat_weights(net)

    metric = PullbackMetric.from_module(net, x, output_metric="euclidean", damping=0.0)
    w = params + 0.1 * randn(params.numel(), seed=16)
    g1 = metric.dense(w)
    gv = metric.matvec(w, randn(w.numel(), seed=17))
    g2 = metric.dense(w)

    # eval-mode reference: running statistics, no dropout, hence deterministic
    ref_net = copy.deepcopy(net).eval()
    g_ref = dense_metric_ref(logits_fn(ref_net, x), "euclidean", 0.0)(w)
    torch.testing.assert_close(g1, g_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(g2, g1, rtol=1e-13, atol=1e-15)  # dropout would move it O(1)
    torch.testing.assert_close(gv, g_ref @ randn(w.numel(), seed=17), rtol=1e-10, atol=1e-12)
    # train mode would differ (batch statistics instead of running ones): the check has teeth
    train_net = copy.deepcopy(net).train()
    train_net[3].p = 0.0
    with torch.no_grad():
        out_train = logits_fn(train_net, x)(w)
    assert float((out_train - logits_fn(ref_net, x)(w)).abs().max()) > 1e-2

    assert [m.training for m in net.modules()] == flags
    for k, b in net.named_buffers():
        torch.testing.assert_close(b, buffers[k], rtol=0, atol=0)
    torch.testing.assert_close(flat_weights(net), params, rtol=0, atol=0)


def test_module_outputs_metric_matches_explicit_g(tiny_mlp):
    """A direct check of the formula on one sample: J^T G(y) J with G from the output metric."""
    net, x = tiny_mlp
    w = flat_weights(net)
    x1 = x[:1]
    fn = logits_fn(net, x1)
    jac = torch.func.jacrev(fn)(w)[0]  # (C, n)
    for name in OUTPUT_METRICS:
        metric = PullbackMetric.from_module(net, x1, output_metric=name)
        g_out = output_metric_ref(name, fn(w)[0])
        torch.testing.assert_close(metric.dense(w), jac.T @ g_out @ jac, **TIGHT)
