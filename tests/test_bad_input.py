"""Bad input fails early with a message that names the problem; CG that misses its
tolerance says so (warning, error or ``solve_result``) with its residual."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from dense_reference import DTYPE, dense_metric_ref, flat_weights, logits_fn, make_mlp, randn
from torch import nn

from manifolds import (
    ConvergenceWarning,
    NotConvergedError,
    PullbackMetric,
    WeightSpace,
    as_batches,
    integrate_geodesic,
)


@pytest.fixture
def metric_w(tiny_mlp):
    net, x = tiny_mlp
    return PullbackMetric.from_module(net, x, output_metric="fisher", damping=0.1), flat_weights(
        net
    )


def vector_calls(metric, w, space):
    """Every public entry point that takes a tangent vector ``v`` at ``w``."""
    return {
        "matvec": lambda v: metric.matvec(w, v),
        "inner": lambda v: metric.inner(w, v),
        "inner_v": lambda v: metric.inner(w, torch.zeros_like(w), v),
        "norm": lambda v: metric.norm(w, v),
        "solve": lambda v: metric.solve(w, v),
        "acceleration": lambda v: metric.acceleration(w, v),
        "space.inner": lambda v: space.inner(w, v),
        "space.egrad2rgrad": lambda v: space.egrad2rgrad(w, v),
        "space.expmap": lambda v: space.expmap(w, v),
        "space.expmap_approx": lambda v: space.expmap_approx(w, v),
    }


@pytest.mark.parametrize(
    "make_v, error, pattern",
    [
        (lambda w: torch.zeros(27, dtype=DTYPE), ValueError, "length 27, expected 26"),
        (lambda w: torch.zeros(25, dtype=DTYPE), ValueError, "length 25, expected 26"),
        (lambda w: torch.zeros(2, 13, dtype=DTYPE), ValueError, r"1-D.*shape \(2, 13\)"),
        (lambda w: torch.zeros((), dtype=DTYPE), ValueError, r"1-D.*shape \(\)"),
        (lambda w: torch.zeros(26, dtype=torch.int64), TypeError, "floating-point.*int64"),
        (lambda w: torch.zeros(26, dtype=torch.float32), TypeError, "float32.*point.*float64"),
        (lambda w: w.clone().index_fill_(0, torch.tensor([3]), math.nan), ValueError, r"NaN.*3"),
        (lambda w: w.clone().index_fill_(0, torch.tensor([5]), math.inf), ValueError, r"Inf.*5"),
        (lambda w: w.tolist(), TypeError, "must be a torch.Tensor, got list"),
    ],
)
def test_bad_vectors(metric_w, make_v, error, pattern):
    metric, w = metric_w
    space = WeightSpace(metric)
    for name, call in vector_calls(metric, w, space).items():
        with pytest.raises(error, match=pattern):
            call(make_v(w))
            pytest.fail(f"{name} accepted a bad vector")


@pytest.mark.parametrize(
    "make_w, error, pattern",
    [
        (lambda w: w[:-1], ValueError, r"w has length 25, expected 26"),
        (lambda w: w.reshape(2, 13), ValueError, r"w must be a flat 1-D.*\(2, 13\)"),
        (lambda w: w.clone().index_fill_(0, torch.tensor([0]), math.nan), ValueError, "w contains"),
        (lambda w: w.clone().index_fill_(0, torch.tensor([7]), -math.inf), ValueError, r"Inf.*7"),
        (lambda w: w.round().long(), TypeError, "w must have a floating-point dtype"),
        # the task inputs are float64: float32 weights do not silently mix with them
        (lambda w: w.float(), TypeError, "weights have dtype torch.float32.*inputs.*float64"),
    ],
)
def test_bad_points(metric_w, make_w, error, pattern):
    metric, w = metric_w
    space = WeightSpace(metric)
    bad = make_w(w)
    calls = {
        "matvec": lambda: metric.matvec(bad, torch.zeros(26, dtype=bad.dtype)),
        "dense": lambda: metric.dense(bad),
        "jacobian": lambda: metric.jacobian(bad),
        "solve": lambda: metric.solve(bad, torch.ones(26, dtype=bad.dtype)),
        "acceleration": lambda: metric.acceleration(bad, torch.ones(26, dtype=bad.dtype)),
        "space.expmap": lambda: space.expmap(bad, torch.ones(26, dtype=bad.dtype)),
        "space.geodesic": lambda: space.geodesic(bad, torch.ones(26, dtype=bad.dtype)),
    }
    for name, call in calls.items():
        with pytest.raises(error, match=pattern):
            call()
            pytest.fail(f"{name} accepted a bad point")


def test_dtype_mismatch_between_weights_and_inputs():
    net = make_mlp((3, 4, 2))  # float64 weights
    x32 = torch.zeros(5, 3)  # float32 inputs
    pattern = "weights have dtype torch.float64.*inputs have dtype torch.float32"
    with pytest.raises(TypeError, match=pattern):  # caught where the metric is made
        PullbackMetric.from_module(net, x32)
    metric = PullbackMetric.from_module(net, x32.double())
    with pytest.raises(TypeError, match="weights have dtype torch.float32.*inputs have dtype"):
        metric.matvec(flat_weights(net).float(), torch.zeros(26))


def test_inputs_the_network_cannot_take_fail_where_the_metric_is_made():
    net = make_mlp((3, 4, 2))
    with pytest.raises(ValueError, match=r"inputs of shape \(5, 4\).*cannot be fed to Sequential"):
        PullbackMetric.from_module(net, torch.zeros(5, 4, dtype=DTYPE))
    with torch.no_grad():
        net[0].weight.fill_(math.nan)
    with pytest.raises(ValueError, match="outputs on the task inputs contain NaN or Inf"):
        PullbackMetric.from_module(net, torch.ones(5, 3, dtype=DTYPE))


@pytest.mark.parametrize(
    "inputs, error, pattern",
    [
        (torch.tensor([[0.0, math.nan, 1.0]], dtype=DTYPE), ValueError, r"inputs \(batch 0\).*NaN"),
        (
            [torch.zeros(2, 3, dtype=DTYPE), torch.full((2, 3), math.inf, dtype=DTYPE)],
            ValueError,
            r"inputs \(batch 1\).*Inf",
        ),
        ([], ValueError, "no batches"),
        (torch.zeros(0, 3, dtype=DTYPE), ValueError, r"batch 0 has shape \(0, 3\)"),
        (torch.tensor(1.0, dtype=DTYPE), ValueError, r"batch 0 has shape \(\)"),
        ([[1.0, 2.0, 3.0]], TypeError, "batch 0 is a float, expected a tensor"),
        (3, TypeError, "inputs must be a tensor or an iterable of batches, got int"),
    ],
)
def test_bad_inputs(inputs, error, pattern):
    with pytest.raises(error, match=pattern):
        as_batches(inputs)
    with pytest.raises(error, match=pattern):
        PullbackMetric.from_module(make_mlp((3, 4, 2)), inputs)


def test_integer_inputs_are_allowed_for_token_models():
    # integer *inputs* are not an error: token ids for an embedding layer are integers
    # (only floating inputs must share the weights' dtype)
    net = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    net = net.to(DTYPE)
    tokens = torch.tensor([0, 3, 1, 4, 4, 2])
    metric = PullbackMetric.from_module(net, tokens, damping=0.1)
    w = flat_weights(net)
    g_ref = dense_metric_ref(logits_fn(net, tokens), "euclidean", 0.1)(w)
    torch.testing.assert_close(metric.dense(w), g_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"output_metric": "kl"}, ValueError, r"unknown output metric 'kl'.*bhattacharyya"),
        ({"output_metric": 3}, ValueError, "unknown output metric 3"),
        ({"solver": "lu"}, ValueError, r"solver must be one of .*'lu'"),
        ({"damping": -1e-3}, ValueError, r"damping must be a finite number >= 0, got -0\.001"),
        ({"damping": math.nan}, ValueError, "damping must be a finite number"),
        ({"damping": math.inf}, ValueError, "damping must be a finite number"),
        ({"on_failure": "explode"}, ValueError, "on_failure must be"),
    ],
)
def test_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        PullbackMetric(lambda w: w, **kwargs)
    with pytest.raises(error, match=pattern):
        PullbackMetric.from_module(make_mlp((3, 4, 2)), randn(5, 3), **kwargs)


def test_bad_method_and_other_arguments(metric_w):
    metric, w = metric_w
    b = torch.ones(26, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"method must be one of .*'qr'"):
        metric.solve(w, b, method="qr")
    with pytest.raises(ValueError, match=r"method must be one of .*'qr'"):
        metric.acceleration(w, b, method="qr")
    with pytest.raises(ValueError, match="x0 has length 3"):
        metric.solve(w, b, x0=torch.zeros(3, dtype=DTYPE))
    with pytest.raises(TypeError, match="fn must be callable"):
        PullbackMetric(42)
    with pytest.raises(TypeError, match="fn must return a tensor, got list"):
        PullbackMetric(lambda w: [w]).dense(torch.zeros(2, dtype=DTYPE))
    with pytest.raises(TypeError, match="metric must be a PullbackMetric, got str"):
        WeightSpace("fisher")
    space = WeightSpace(metric)
    with pytest.raises(ValueError, match="order must be 1 or 2, got 3"):
        space.expmap_approx(w, b, order=3)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        integrate_geodesic(metric, w, b, steps=0)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        space.geodesic(w, b, steps=0)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got function"):
        PullbackMetric.from_module(lambda x: x, randn(5, 3))
    with pytest.raises(ValueError, match="has no parameters"):
        PullbackMetric.from_module(torch.nn.Tanh(), randn(5, 3))


# ----------------------------------------------------------------- CG that cannot converge


@pytest.fixture
def fifty_weights():
    net = make_mlp((5, 6, 2), seed=30)  # 5*6 + 6 + 6*2 + 2 = 50 weights
    x = randn(8, 5, seed=31)
    w = flat_weights(net)
    assert w.numel() == 50
    options = {"output_metric": "fisher", "damping": 1e-3, "solver": "cg", "tol": 1e-14}
    g_ref = dense_metric_ref(logits_fn(net, x), "fisher", 1e-3)(w)
    return net, x, w, options, g_ref


def true_residual(g_ref, x, b):
    return float(torch.linalg.vector_norm(b - g_ref @ x) / torch.linalg.vector_norm(b))


def test_cg_not_converged_warns_with_residual(fifty_weights):
    net, x, w, options, g_ref = fifty_weights
    metric = PullbackMetric.from_module(net, x, maxiter=2, **options)
    b = randn(50, seed=32)
    with pytest.warns(
        ConvergenceWarning, match=r"after 2 iterations with relative residual"
    ) as rec:
        sol = metric.solve(w, b)
    res = true_residual(g_ref, sol, b)
    assert res > 1e-3  # far from 1e-14
    (message,) = [str(r.message) for r in rec if issubclass(r.category, ConvergenceWarning)]
    assert f"{res:.3e}" in message
    assert "tol 1.0e-14" in message


def test_cg_not_converged_raises_when_asked(fifty_weights):
    net, x, w, options, g_ref = fifty_weights
    metric = PullbackMetric.from_module(net, x, maxiter=2, on_failure="raise", **options)
    b = randn(50, seed=32)
    with pytest.raises(NotConvergedError, match="relative residual") as info:
        metric.solve(w, b)
    assert info.value.iterations == 2
    assert info.value.residual > 1e-3
    # per-call maxiter overrides the metric's, and then it converges (to a reachable tol)
    res = metric.solve_result(w, b, maxiter=500, tol=1e-10)
    assert res.converged and res.residual <= 1e-10
    torch.testing.assert_close(res.x, torch.linalg.solve(g_ref, b), rtol=1e-6, atol=1e-8)


def test_cg_not_converged_solve_result(fifty_weights):
    net, x, w, options, g_ref = fifty_weights
    metric = PullbackMetric.from_module(net, x, maxiter=2, on_failure="ignore", **options)
    b = randn(50, seed=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # "ignore" means no warning
        res = metric.solve_result(w, b)
    assert res.converged is False
    assert res.iterations == 2 and res.method == "cg"
    assert res.residual == pytest.approx(true_residual(g_ref, res.x, b), rel=1e-6)
    assert res.residual > 1e-3
    # the default on_failure warns, and solve_result still reports the failure
    warn_metric = PullbackMetric.from_module(net, x, maxiter=2, **options)
    with pytest.warns(ConvergenceWarning):
        res2 = warn_metric.solve_result(w, b)
    assert res2.converged is False and res2.residual == pytest.approx(res.residual, rel=1e-12)


def test_singular_metric_step_is_refused_and_weights_untouched():
    """A README-style RiemannianSGD step on an undamped metric with more weights than outputs
    (CG on a singular g; the gradient has a part g cannot see) is refused with the solve's
    residual; the parameter keeps its value instead of taking a step of norm ~1e18."""
    import geoopt

    from manifolds import flat_parameter

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10)).double()
    x_a, x_b = torch.randn(40, 20, dtype=DTYPE), torch.randn(16, 20, dtype=DTYPE)
    y_b = torch.randint(0, 10, (16,))
    metric = PullbackMetric.from_module(
        net, x_a, output_metric="fisher", on_failure="ignore", maxiter=60
    )
    assert metric.damping == 0 and metric._method(flat_weights(net), None) == "cg"
    space = WeightSpace(metric)
    w = flat_parameter(net, space)
    before = w.detach().clone()
    opt = geoopt.optim.RiemannianSGD([w], lr=0.1)
    nn.functional.cross_entropy(metric.module(w, x_b), y_b).backward()
    with pytest.raises(NotConvergedError, match="no step is taken") as info:
        opt.step()
    assert info.value.residual > 1e-3
    assert torch.equal(w.detach(), before)
