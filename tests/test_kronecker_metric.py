"""The Kronecker-factored anchor metric (manifolds.kronecker_metric): exact where KFAC is
exact, equal to curvlinops' KFACLinearOperator (an independent implementation) where the
conventions meet, and its solve inverts its matvec."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from manifolds import Euclidean, KroneckerMetric, PullbackMetric
from manifolds.layer_jacobian import factored_layers, layer_jacobian, module_jacobian

DT = torch.float64


def data(*shape, seed=0):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 2, padding=1, dilation=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).to(DT)


def kfac_and_exact(net, x, output_metric):
    """The KFAC matrix (by matvec on the identity) and the exact J^T J."""
    metric = PullbackMetric.from_module(net, x, output_metric=output_metric)
    w = metric.module.flatten()
    kfac = KroneckerMetric.from_pullback(metric, w)
    jac = metric.jacobian(w)
    return kfac, kfac.matvec(torch.eye(w.numel(), dtype=DT)), jac.T @ jac


def layer_slices(net):
    """Flat ranges of each layer's parameters (weight and bias are adjacent here)."""
    out, start = [], 0
    for mod in net.modules():
        size = sum(p.numel() for p in mod.parameters(recurse=False))
        if size:
            out.append(slice(start, start + size))
            start += size
    return out


def test_exact_for_the_last_linear_layer_under_euclidean_outputs():
    """With Euclidean outputs the last layer's output gradients do not depend on the sample,
    so A (x) G is its exact block of J^T J, for any number of samples."""
    net = mlp()
    _, kfac, exact = kfac_and_exact(net, data(7, 4), "euclidean")
    last = layer_slices(net)[-1]
    torch.testing.assert_close(kfac[last, last], exact[last, last], rtol=1e-12, atol=1e-14)
    first = layer_slices(net)[0]
    assert not torch.allclose(kfac[first, first], exact[first, first], rtol=1e-3)


def test_parameter_group_factors_in_closed_form():
    """A group holding the last layer's bias and the first layer's weight (no bias), in that
    order, of Linear-Tanh-Linear under Euclidean outputs: the bias block is exact; the weight
    block is kron(G, A) with A = sum_b x_b x_b^T / N and
    G = sum_b D_b W2^T W2 D_b / N, D_b = diag(1 - tanh^2(z_b)); nothing couples them."""
    net, x = mlp(), data(7, 4)
    names = ["2.bias", "0.weight"]
    params = dict(net.named_parameters())
    sizes = [params[n].numel() for n in names]

    def outputs(w):
        parts = {n: c.view(params[n].shape) for n, c in zip(names, w.split(sizes), strict=True)}
        return functional_call(net, parts, (x,), strict=False)

    w = torch.cat([params[n].detach().reshape(-1) for n in names])
    wp = w.clone().requires_grad_(True)
    jac = layer_jacobian(factored_layers(net, names), lambda: [outputs(wp)], Euclidean(), 23)
    kfac = KroneckerMetric.from_jacobian(jac).matvec(torch.eye(23, dtype=DT))
    dense = PullbackMetric(outputs).jacobian(w)
    torch.testing.assert_close(kfac[:3, :3], (dense.T @ dense)[:3, :3], rtol=1e-12, atol=1e-14)
    assert kfac[:3, 3:].abs().max() == 0
    with torch.no_grad():
        slopes = 1 - torch.tanh(net[0](x)) ** 2  # (N, 5)
        w2 = net[2].weight
        g = torch.einsum("bi,ci,cj,bj->ij", slopes, w2, w2, slopes) / 7
        a = x.T @ x / 7
    # contiguous: without opt_einsum installed, einsum hands back a strided view kron rejects
    torch.testing.assert_close(kfac[3:, 3:], torch.kron(g.contiguous(), a), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("output_metric", ["euclidean", "fisher"])
def test_exact_blocks_for_one_sample_and_zero_between_layers(output_metric):
    """One sample of an MLP: every layer's Kronecker block is its exact block; the
    approximation is block-diagonal."""
    net = mlp()
    _, kfac, exact = kfac_and_exact(net, data(1, 4), output_metric)
    mask = torch.zeros_like(exact, dtype=torch.bool)
    for s in layer_slices(net):
        torch.testing.assert_close(kfac[s, s], exact[s, s], rtol=1e-12, atol=1e-14)
        mask[s, s] = True
    assert kfac[~mask].abs().max() == 0
    assert exact[~mask].abs().max() > 1e-3


def test_grouped_convolution_blocks_are_exact_with_one_position_and_sample():
    """A grouped convolution whose kernel covers its input (one output position), on one
    sample: each channel group's Kronecker block is the exact block of its weights and bias;
    the blocks between groups are dropped."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3))
    net = net.to(DT)
    _, kfac, exact = kfac_and_exact(net, data(1, 4, 3, 3), "fisher")
    weights = 6 * 2 * 9
    for g in range(2):
        rows = list(range(g * 3 * 18, (g + 1) * 3 * 18)) + [weights + 3 * g + i for i in range(3)]
        block = torch.tensor(rows)
        torch.testing.assert_close(
            kfac[block][:, block], exact[block][:, block], rtol=1e-12, atol=1e-14
        )
    first, second = torch.arange(0, 54), torch.arange(54, 108)
    assert kfac[first][:, second].abs().max() == 0
    assert exact[first][:, second].abs().max() > 1e-3


def test_normalization_layer_block_is_exact():
    """BatchNorm (eval) and LayerNorm parameters get their exact block of J^T J."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4), nn.LayerNorm(4)
    )
    net = net.to(DT).eval()
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    _, kfac, exact = kfac_and_exact(net, data(6, 4), "euclidean")
    slices = layer_slices(net)
    for s in (slices[1], slices[3]):
        torch.testing.assert_close(kfac[s, s], exact[s, s], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("net", [mlp, cnn], ids=["mlp", "cnn"])
def test_equals_curvlinops_kfac(net):
    """curvlinops' type-2 KFAC (expand, weight and bias jointly) is this approximation: for
    the softmax Fisher it is CrossEntropyLoss(reduction="mean"), equal outright; for
    Euclidean outputs MSELoss(reduction="mean"), whose Hessian 2/(NC) makes it 2/C times ours.
    Both traces agree too."""
    curvlinops = pytest.importorskip("curvlinops")
    net = net()
    x = data(6, 4) if isinstance(net[0], nn.Linear) else data(6, 2, 7, 7)
    params = list(net.parameters())
    eye = torch.eye(sum(p.numel() for p in params), dtype=DT)
    cases = [
        ("fisher", nn.CrossEntropyLoss(reduction="mean"), torch.randint(0, 3, (6,)), 1.0),
        ("euclidean", nn.MSELoss(reduction="mean"), data(6, 3, seed=1), 2.0 / 3),
    ]
    for output_metric, loss, target, scale in cases:
        ours, kfac, _ = kfac_and_exact(net, x, output_metric)
        theirs = curvlinops.KFACLinearOperator(
            net,
            loss,
            params,
            [(x, target)],
            fisher_type="type-2",
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        torch.testing.assert_close(theirs @ eye, scale * kfac, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(float(theirs.trace), scale * ours.trace(), rtol=1e-11, atol=0)


@pytest.mark.parametrize("net", [mlp, cnn], ids=["mlp", "cnn"])
def test_solve_inverts_matvec_and_trace_is_the_matrix_trace(net):
    net = net()
    x = data(5, 4) if isinstance(net[0], nn.Linear) else data(5, 2, 7, 7)
    ours, kfac, _ = kfac_and_exact(net, x, "fisher")
    n = kfac.shape[0]
    lam = 0.05 * ours.trace() / n
    v = data(3, n, seed=2)
    torch.testing.assert_close(ours.solve(ours.matvec(v) + lam * v, lam), v, rtol=1e-9, atol=1e-11)
    dense = torch.linalg.solve(kfac + lam * torch.eye(n, dtype=DT), v.T).T
    torch.testing.assert_close(ours.solve(v, lam), dense, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours.project(v[0], lam), lam * dense[0], rtol=1e-9, atol=1e-11)
    assert ours.trace() == pytest.approx(float(kfac.trace()), rel=1e-12)
    assert ours.matvec(v[0]).shape == (n,)


def test_float32_solve_survives_rank_deficient_factors():
    """Four samples of sparse, small features (dead ReLUs) into a 256-wide layer: float32
    eigh of A fails to converge on such a factor; the solve still inverts the matvec."""
    torch.manual_seed(5)
    net = nn.Linear(256, 3)
    g = torch.Generator().manual_seed(0)
    x = 0.05 * torch.relu(torch.randn(4, 256, generator=g) - 2.0)
    metric = PullbackMetric.from_module(net, x, output_metric="fisher")
    kfac = KroneckerMetric.from_pullback(metric, metric.module.flatten())
    lam = 0.1 * kfac.trace() / kfac.dim
    v = torch.randn(kfac.dim, generator=g)
    back = kfac.solve(kfac.matvec(v) + lam * v, lam)
    assert float((back - v).norm() / v.norm()) < 1e-4


def test_from_jacobian_is_from_pullback():
    net, x = cnn(), data(4, 2, 7, 7)
    metric = PullbackMetric.from_module(net, x, output_metric="fisher")
    w = metric.module.flatten()
    jac = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
    v = data(w.numel(), seed=3)
    a = KroneckerMetric.from_jacobian(jac).matvec(v)
    torch.testing.assert_close(a, KroneckerMetric.from_pullback(metric, w).matvec(v))


def test_bad_arguments_are_named():
    net, x = mlp(), data(3, 4)
    metric = PullbackMetric.from_module(net, x)
    kfac = KroneckerMetric.from_pullback(metric, metric.module.flatten())
    with pytest.raises(ValueError, match=r"v must have shape \(43,\) or \(k, 43\)"):
        kfac.matvec(torch.zeros(42, dtype=DT))
    with pytest.raises(TypeError, match="b must be a floating tensor"):
        kfac.solve([0.0] * 43, 1.0)
    with pytest.raises(ValueError, match="v is torch.float32 on cpu, the metric torch.float64"):
        kfac.matvec(torch.zeros(43))
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        kfac.solve(torch.zeros(43, dtype=DT), 0.0)
    prelu = nn.Sequential(nn.Linear(4, 3), nn.PReLU()).to(DT)
    other = PullbackMetric.from_module(prelu, x)
    with pytest.raises(ValueError, match="Sequential has no factored Jacobian"):
        KroneckerMetric.from_pullback(other, other.module.flatten())
    with pytest.raises(ValueError, match="needs a PullbackMetric.from_module"):
        KroneckerMetric.from_pullback(PullbackMetric(torch.sin), torch.zeros(2, dtype=DT))
