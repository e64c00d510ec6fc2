"""The factored output Jacobian of layers (manifolds.layer_jacobian: nn.Linear, nn.Conv2d,
normalisation layers) against the dense Jacobian, for whole networks and parameter groups,
and through PullbackMetric's output-space route."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from manifolds import PullbackMetric
from manifolds import affine_factors as affine
from manifolds.flat import training_mode
from manifolds.layer_jacobian import factored_layers, layer_jacobian, module_jacobian
from manifolds.output_metrics import get_output_metric

DT = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn():
    """Stride, padding, dilation, groups, a conv without bias, an in-place ReLU after a conv."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.Tanh(),
        nn.Conv2d(6, 4, (2, 3), stride=(2, 1), padding=(0, 1)),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding="same"),
        nn.Flatten(),
        nn.Linear(4 * 2 * 4, 3),
    )


def batch_norm_cnn():
    """BatchNorm2d and BatchNorm1d in eval mode, with running statistics away from 0 and 1."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
        nn.BatchNorm1d(5),
        nn.Tanh(),
        nn.Linear(5, 3),
    )
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net.eval()


def norms():
    """LayerNorm over (T, d) sequences, GroupNorm and RMSNorm; a Linear on (N, T, d) inputs."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(3, 4),
        nn.LayerNorm(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.GroupNorm(3, 6),
        nn.Tanh(),
        nn.RMSNorm(6),
        nn.Linear(6, 3),
    )


NETWORKS = {
    "mlp": (mlp, (5, 3)),
    "cnn": (cnn, (4, 2, 7, 7)),
    "batch_norm_cnn": (batch_norm_cnn, (4, 2, 6, 6)),
    "norms": (norms, (4, 2, 3)),
}


def network(name):
    make, shape = NETWORKS[name]
    net = make().to(DT)
    x = torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(7))
    return net, x


def unflatten(net, names, w):
    """The flat ``w`` as ``net``'s parameters ``names``, keyed by name."""
    params = dict(net.named_parameters())
    chunks = w.split([params[n].numel() for n in names])
    return {n: c.view(params[n].shape) for n, c in zip(names, chunks, strict=True)}


def group_outputs(net, names, x, w):
    """Outputs of ``net`` (eval mode) on ``x`` with the group's parameters from ``w``."""
    with training_mode(net, False):
        return functional_call(net, unflatten(net, names, w), (x,), strict=False)


def group_embedding(net, names, x, output_metric):
    """w -> F(w) for the flat weights of parameters ``names``, the rest fixed; and w now."""
    metric = get_output_metric(output_metric)

    def embed(w):
        return metric.embed(group_outputs(net, names, x, w)).reshape(-1) / len(x) ** 0.5

    params = dict(net.named_parameters())
    return embed, torch.cat([params[n].detach().reshape(-1) for n in names])


def factored(net, names, x, output_metric, w):
    plan = factored_layers(net, names)
    assert plan is not None
    wp = w.detach().requires_grad_(True)
    forward = lambda: [group_outputs(net, names, x, wp)]  # noqa: E731
    return layer_jacobian(plan, forward, get_output_metric(output_metric), w.numel())


def assert_matches_dense(jac, dense, embedded):
    gen = torch.Generator().manual_seed(3)
    assert jac is not None
    torch.testing.assert_close(jac.embedded, embedded, rtol=0, atol=1e-14)
    torch.testing.assert_close(jac.gram(), dense @ dense.T, rtol=1e-12, atol=1e-12)
    v = torch.randn(3, dense.shape[1], dtype=DT, generator=gen)
    z = torch.randn(2, dense.shape[0], dtype=DT, generator=gen)
    torch.testing.assert_close(jac.jvp(v), v @ dense.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac.vjp(z), z @ dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["euclidean", "fisher"])
def test_output_gram_of_linear_network_is_exact_over_batches(name):
    """K = JJ^T from layer inputs and output gradients, over two input batches, equals the
    dense Jacobian's, and its vjp is J^T."""
    net = mlp().double()
    batches = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)]
    metric = PullbackMetric.from_module(net, batches, output_metric=name, damping=0.1)
    assert factored_layers(net, metric.module.names) is not None
    w = metric.module.flatten()
    gram = metric.output_gram(w)
    evals, evecs = gram.eigenpairs()
    jac = metric.jacobian(w)  # (m, n), m = 7 samples x 3 outputs
    assert evecs.shape == (21, 21)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, jac @ jac.T)
    u = torch.randn(21, dtype=torch.float64)
    torch.testing.assert_close(gram.jacobian.vjp(u[None])[0], jac.T @ u)


def test_output_gram_falls_back_for_other_layers():
    """A network with a parameter outside the supported layers (PReLU) takes the generic
    route, same K."""
    net = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    metric = PullbackMetric.from_module(net, x, damping=0.1)
    assert factored_layers(net, metric.module.names) is None
    w = metric.module.flatten()
    evals, evecs = metric.output_gram(w).eigenpairs()
    jac = metric.jacobian(w)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, jac @ jac.T)


@pytest.mark.parametrize("output_metric", ["euclidean", "fisher"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_factored_jacobian_of_whole_network_equals_dense(name, output_metric):
    """gram, jvp and vjp of the factored J equal the dense Jacobian's, for every parameter."""
    net, x = network(name)
    metric = PullbackMetric.from_module(net, x, output_metric=output_metric)
    w = metric.module.flatten()
    jac = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
    assert_matches_dense(jac, metric.jacobian(w), metric.embed(w))


GROUPS = {
    "mlp": ["2.bias", "0.weight", "4.weight"],
    "cnn": ["2.weight", "0.bias", "8.bias", "4.weight", "6.bias"],
    "batch_norm_cnn": ["1.weight", "6.bias", "0.weight", "8.bias"],
    "norms": ["7.weight", "1.bias", "5.weight", "0.weight"],
}


@pytest.mark.parametrize("output_metric", ["euclidean", "fisher"])
@pytest.mark.parametrize("name", list(GROUPS))
def test_factored_jacobian_of_parameter_group_equals_dense(name, output_metric):
    """For a group holding some weights and biases only, in a shuffled order, the factored J
    of the group's flat weights equals torch.func.jacrev's."""
    net, x = network(name)
    names = GROUPS[name]
    embed, w = group_embedding(net, names, x, output_metric)
    jac = factored(net, names, x, output_metric, w)
    assert_matches_dense(jac, jacrev(embed)(w), embed(w))


@pytest.mark.parametrize("route", ["rows", "pairs"])
def test_both_gram_routes_agree_in_small_chunks(monkeypatch, route):
    """Either way of building a Linear/Conv2d layer's K, over chunks of a few samples and
    output channels, gives the dense JJ^T."""
    monkeypatch.setattr(affine, "CHUNK_ELEMENTS", 600)
    net, x = network("cnn")
    metric = PullbackMetric.from_module(net, x, output_metric="fisher")
    w = metric.module.flatten()
    jac = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
    dense = metric.jacobian(w)
    n, c = jac.samples, jac.width
    gram = torch.zeros(n, c, n, c, dtype=DT)
    for factor in jac.factors:
        factor.gram(gram, route)
    torch.testing.assert_close(gram.view(n * c, -1), dense @ dense.T, rtol=1e-12, atol=1e-12)
    assert_matches_dense(jac, dense, metric.embed(w))


def test_output_gram_takes_factored_route_for_cnn_with_batch_norm():
    """PullbackMetric's output-space solve on a CNN with BatchNorm (eval) uses the factored K
    and matches the dense solve."""
    net, x = network("batch_norm_cnn")
    metric = PullbackMetric.from_module(net, x, output_metric="fisher", damping=0.3)
    w = metric.module.flatten()
    assert module_jacobian(metric.module, metric.inputs, w, metric.output_metric) is not None
    b = torch.randn(w.numel(), dtype=DT)
    torch.testing.assert_close(
        metric.solve(w, b, method="output"), torch.linalg.solve(metric.dense(w), b)
    )


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def unfactorable():
    """Networks that break an assumption of the factored route, each with its reason."""
    torch.manual_seed(4)
    train_bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batch_stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    reflect = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten())
    return {
        "batch norm in train mode": (train_bn, (5, 3), True),
        "batch statistics in eval mode": (batch_stats, (5, 3), False),
        "layer applied twice": (Twice(), (5, 3), False),
        "weights tied between layers": (tied, (5, 3), False),
        "reflect padding": (reflect, (5, 1, 4, 4), False),
    }


@pytest.mark.parametrize("case", list(unfactorable()))
def test_no_factored_route_where_an_assumption_fails(case):
    """Samples that interact, a layer called twice, shared weights, a padding unfold cannot
    reproduce: no factored Jacobian, and PullbackMetric's K is still exact (generic route)."""
    net, shape, train = unfactorable()[case]
    net = net.double()
    x = torch.randn(*shape, dtype=DT)
    metric = PullbackMetric.from_module(net, x)
    w = metric.module.flatten()
    plan = factored_layers(net, metric.module.names)
    if train:  # BatchNorm on batch statistics; in eval mode (the metric's) it factors
        wp = w.detach().requires_grad_(True)
        jac = layer_jacobian(
            plan, lambda: [metric.module(wp, x, train=True)], metric.output_metric, w.numel()
        )
        assert jac is None
    else:
        assert module_jacobian(metric.module, metric.inputs, w, metric.output_metric) is None
    evals, evecs = metric.output_gram(w).eigenpairs()
    dense = metric.jacobian(w)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, dense @ dense.T)


def test_bad_arguments_are_named():
    net, x = network("mlp")
    metric = PullbackMetric.from_module(net, x)
    w = metric.module.flatten()
    jac = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
    with pytest.raises(ValueError, match=r"v must have shape \(k, 59\)"):
        jac.jvp(torch.zeros(59, dtype=DT))
    with pytest.raises(ValueError, match=r"z must have shape \(k, 15\)"):
        jac.vjp(torch.zeros(1, 16, dtype=DT))
    with pytest.raises(TypeError, match="z must be a floating tensor"):
        jac.vjp(torch.zeros(1, 15, dtype=torch.int64))
    with pytest.raises(ValueError, match="float32"):
        jac.jvp(torch.zeros(1, 59))
    with pytest.raises(ValueError, match="'5.weight' is not a parameter of Sequential"):
        factored_layers(net, ["0.weight", "5.weight"])
