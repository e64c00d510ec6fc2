r"""``WeightSpace`` with unmodified geoopt optimizers, ``flat_parameter``/``write_point``,
and what pickling and copying a flat ``ManifoldParameter`` carry.

The natural-gradient reference is :math:`w - \eta\, g(w)^{-1}\nabla L(w)` with the dense
reference metric of ``conftest.py`` and :math:`\nabla L` from ``torch.func.grad`` of a
hand-written loss.
"""

from __future__ import annotations

import copy
import io
import pickle

import geoopt
import pytest
import torch
import torch.nn.functional as F
from dense_reference import dense_metric_ref, flat_weights, logits_fn, make_mlp, randn

from manifolds import PullbackMetric, WeightSpace, flat_parameter, write_point

DAMPING = 0.05
LR = 0.3


def task_b(seed=20):
    return randn(7, 3, seed=seed), torch.arange(7) % 2


def setup_space(tiny_mlp, name="fisher"):
    net, x = tiny_mlp
    metric = PullbackMetric.from_module(net, x, output_metric=name, damping=DAMPING)
    return net, x, metric, WeightSpace(metric)


def loss_at(net, xb, yb):
    """``w -> cross-entropy of net(xb)`` with hand-unpacked weights (reference)."""
    return lambda w: F.cross_entropy(logits_fn(net, xb)(w), yb)


def geoopt_loss(param, metric, xb, yb):
    return F.cross_entropy(metric.module(param, xb), yb)


def test_rsgd_step_is_natural_gradient_step(tiny_mlp):
    net, x, metric, space = setup_space(tiny_mlp)
    xb, yb = task_b()
    w0 = flat_weights(net)
    param = flat_parameter(net, space)
    assert isinstance(param, geoopt.ManifoldParameter) and param.manifold is space
    torch.testing.assert_close(param.detach(), w0, rtol=0, atol=0)

    opt = geoopt.optim.RiemannianSGD([param], lr=LR)
    opt.zero_grad()
    geoopt_loss(param, metric, xb, yb).backward()
    opt.step()

    egrad = torch.func.grad(loss_at(net, xb, yb))(w0)
    g = dense_metric_ref(logits_fn(net, x), "fisher", DAMPING)(w0)
    expected = w0 - LR * torch.linalg.solve(g, egrad)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)
    # a natural-gradient step, not a Euclidean one
    assert float((expected - (w0 - LR * egrad)).abs().max()) > 1e-3


def test_rsgd_momentum_first_step_follows_geoopt_code(tiny_mlp):
    # geoopt 0.5.1 RiemannianSGD initialises the momentum buffer with the *Euclidean*
    # gradient, then buffer = mu * buffer + rgrad, so step 1 is w - lr (mu egrad + g^-1 egrad).
    # If geoopt changes this (e.g. to start from rgrad), this test says so.
    net, x, metric, space = setup_space(tiny_mlp)
    xb, yb = task_b()
    w0 = flat_weights(net)
    mu = 0.9
    param = flat_parameter(net, space)
    opt = geoopt.optim.RiemannianSGD([param], lr=LR, momentum=mu)
    geoopt_loss(param, metric, xb, yb).backward()
    opt.step()

    egrad = torch.func.grad(loss_at(net, xb, yb))(w0)
    rgrad = torch.linalg.solve(dense_metric_ref(logits_fn(net, x), "fisher", DAMPING)(w0), egrad)
    expected = w0 - LR * (mu * egrad + rgrad)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12)
    # distinguishable from the "Riemannian buffer" alternative w - lr (1 + mu) rgrad
    assert float((expected - (w0 - LR * (1 + mu) * rgrad)).abs().max()) > 1e-3
    # the identity transport leaves the buffer as it was
    torch.testing.assert_close(
        opt.state[param]["momentum_buffer"], mu * egrad + rgrad, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizers_decrease_the_loss(tiny_mlp, optimizer):
    net, x, metric, space = setup_space(tiny_mlp)
    xb, yb = task_b()
    param = flat_parameter(net, space)
    if optimizer == "sgd":
        opt = geoopt.optim.RiemannianSGD([param], lr=0.1)
    else:
        opt = geoopt.optim.RiemannianAdam([param], lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = geoopt_loss(param, metric, xb, yb)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    losses.append(float(geoopt_loss(param, metric, xb, yb).detach()))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.9 * losses[0]
    assert torch.isfinite(param).all()


def test_write_point_puts_weights_back(tiny_mlp):
    net, x, metric, space = setup_space(tiny_mlp)
    w = flat_weights(net) + 0.3 * randn(26, seed=21)
    other = make_mlp((3, 4, 2), seed=99)
    assert not torch.allclose(other(x), metric.module(w, x))
    write_point(other, w)
    torch.testing.assert_close(flat_weights(other), w, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(other(x), metric.module(w, x), rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(other(x), logits_fn(net, x)(w), rtol=1e-14, atol=1e-14)
    # a geoopt parameter works as the point too
    param = flat_parameter(net, space)
    write_point(other, param)
    torch.testing.assert_close(flat_weights(other), flat_weights(net), rtol=0, atol=0)


def test_flat_parameter_rejects_other_architectures(tiny_mlp):
    net, x, metric, space = setup_space(tiny_mlp)
    with pytest.raises(ValueError, match=r"0\.weight.*\(4, 3\).*\(5, 3\)"):
        flat_parameter(make_mlp((3, 5, 2)), space)
    with pytest.raises(ValueError, match=r"2\.weight"):
        flat_parameter(make_mlp((3, 4, 3)), space)
    with pytest.raises(ValueError, match="parameter tensors"):
        flat_parameter(make_mlp((3, 4, 2, 2)), space)
    # a metric from a plain function checks the number of weights
    fn_space = WeightSpace(PullbackMetric(lambda w: w.sin(), dim=25))
    with pytest.raises(ValueError, match="26 weights.*expects 25"):
        flat_parameter(net, fn_space)


def big_data_param(tiny_mlp):
    net, _ = tiny_mlp
    x = randn(4000, 3, seed=22)  # 96 kB of task data
    metric = PullbackMetric.from_module(net, x, output_metric="fisher", damping=DAMPING)
    space = WeightSpace(metric, expmap_steps=17)
    return net, x, space, flat_parameter(net, space)


def check_unbound(loaded, param, space):
    assert isinstance(loaded, geoopt.ManifoldParameter)
    torch.testing.assert_close(loaded.detach(), param.detach(), rtol=0, atol=0)
    assert isinstance(loaded.manifold, WeightSpace) and loaded.manifold is not space
    assert loaded.manifold.expmap_steps == 17
    v = torch.ones_like(param.detach())
    for call in (
        lambda: loaded.manifold.inner(loaded.detach(), v),
        lambda: loaded.manifold.egrad2rgrad(loaded.detach(), v),
        lambda: loaded.manifold.expmap(loaded.detach(), v),
    ):
        with pytest.raises(RuntimeError, match="restored from a pickle without its metric"):
            call()
    # it can be rebound
    loaded.manifold = space
    torch.testing.assert_close(
        loaded.manifold.inner(loaded.detach(), v), space.inner(param.detach(), v)
    )


def test_pickle_leaves_network_and_data_behind(tiny_mlp):
    net, x, space, param = big_data_param(tiny_mlp)
    blob = pickle.dumps(param)
    assert len(blob) < 0.05 * x.numel() * x.element_size(), len(blob)
    check_unbound(pickle.loads(blob), param, space)


def test_torch_save_leaves_network_and_data_behind(tiny_mlp):
    net, x, space, param = big_data_param(tiny_mlp)
    buf = io.BytesIO()
    torch.save(param, buf)
    assert buf.tell() < 0.05 * x.numel() * x.element_size(), buf.tell()
    buf.seek(0)
    check_unbound(torch.load(buf, weights_only=False), param, space)


def test_deepcopy_shares_the_manifold(tiny_mlp):
    net, x, space, param = big_data_param(tiny_mlp)
    clone = copy.deepcopy(param)
    assert clone.manifold is space
    assert clone.manifold.metric.module.module is net
    assert clone.manifold.metric.inputs[0] is space.metric.inputs[0]
    torch.testing.assert_close(clone.detach(), param.detach(), rtol=0, atol=0)
    assert clone.data_ptr() != param.data_ptr()  # the point itself is copied
    # and so is a container holding it
    holder = torch.nn.ParameterList([param])
    assert copy.deepcopy(holder)[0].manifold is space
