r"""Hypothesis property tests of the metric and the exponential map on a tiny MLP.

* ``inner`` is symmetric, bilinear and positive (definite when damped), and agrees with
  the dense reference :math:`u^\top g v`;
* ``solve(matvec(v)) == v`` for every solver when damped;
* the retraction and the second-order Taylor map approximate ``expmap`` to
  :math:`O(\varepsilon^2)` and :math:`O(\varepsilon^3)`: halving :math:`\varepsilon`
  divides their errors by about 4 and 8.
"""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from dense_reference import (
    OUTPUT_METRICS,
    dense_metric_ref,
    flat_weights,
    logits_fn,
    make_mlp,
    randn,
)
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from manifolds import PullbackMetric, WeightSpace

N_WEIGHTS = 26
SETTINGS = settings(max_examples=25, deadline=None)


@functools.cache
def problem(name: str, damping: float):
    """(metric, point, dense reference g) for the 3-4-2 tanh MLP on 5 inputs."""
    net = make_mlp((3, 4, 2), seed=1, scale=1.5)
    x = randn(5, 3, seed=2)
    metric = PullbackMetric.from_module(net, x, output_metric=name, damping=damping)
    w = flat_weights(net)
    return metric, w, dense_metric_ref(logits_fn(net, x), name, damping)(w)


def vectors(bound: float = 1e3):
    """Weight-space vectors with entries 0 or of magnitude in [1e-6, bound] (no underflow)."""
    entry = st.one_of(st.just(0.0), st.floats(1e-6, bound), st.floats(-bound, -1e-6))
    return hnp.arrays(np.float64, N_WEIGHTS, elements=entry).map(torch.from_numpy)


names = st.sampled_from(OUTPUT_METRICS)
dampings = st.sampled_from([0.0, 0.1])


@SETTINGS
@given(name=names, damping=dampings, u=vectors(), v=vectors(), a=st.floats(-10, 10))
def test_inner_is_symmetric_bilinear_and_matches_reference(name, damping, u, v, a):
    metric, w, g = problem(name, damping)
    g_norm = float(torch.linalg.matrix_norm(g, 2))

    def bound(x_norm: float, y_norm: float) -> float:
        # rounding of <x, y>_g is a few thousand eps * |x| |y| |g| at most
        return 1e-12 * x_norm * y_norm * g_norm + 1e-300

    nu, nv = float(u.norm()), float(v.norm())
    uv, vu = metric.inner(w, u, v), metric.inner(w, v, u)
    assert abs(float(uv - vu)) <= bound(nu, nv)
    assert abs(float(uv - u @ g @ v)) <= bound(nu, nv)
    lhs = metric.inner(w, a * u + v, v)
    rhs = a * uv + metric.inner(w, v)
    assert abs(float(lhs - rhs)) <= 10 * bound(abs(a) * nu + nv, nv)


@SETTINGS
@given(name=names, damping=dampings, v=vectors())
def test_inner_is_positive(name, damping, v):
    metric, w, g = problem(name, damping)
    vv = float(metric.inner(w, v))
    assert vv >= damping * float(v @ v) * (1 - 1e-12)
    assert vv >= 0.0
    if damping and bool(v.abs().max() > 0):
        assert vv > 0.0
    assert float(metric.norm(w, v)) == pytest.approx(np.sqrt(max(vv, 0.0)), rel=1e-14, abs=0)


@SETTINGS
@given(name=names, method=st.sampled_from(["dense", "output", "cg"]), v=vectors(10.0))
def test_solve_inverts_matvec_when_damped(name, method, v):
    metric, w, _ = problem(name, 0.1)
    back = metric.solve(w, metric.matvec(w, v), method=method)
    assert float((back - v).abs().max()) <= 1e-7 * (1 + float(v.abs().max()))


@functools.cache
def space(name: str) -> WeightSpace:
    # few RK4 steps: for the small velocities below the integrator's error
    # (about (eps/8)^4 eps) is far below the Taylor errors measured
    return WeightSpace(problem(name, 0.05)[0], expmap_steps=8)


@settings(max_examples=8, deadline=None)
@given(name=names, seed=st.integers(0, 2**31 - 1), shift=st.floats(-0.5, 0.5))
@example(name="bhattacharyya", seed=643846, shift=0.0)  # 3.49 at eps 0.04 / 0.02
def test_retraction_and_taylor_map_orders(name, seed, shift):
    sp = space(name)
    metric, w0, _ = problem(name, 0.05)
    w = w0 + shift * randn(N_WEIGHTS, seed=seed + 1) / N_WEIGHTS**0.5
    v = randn(N_WEIGHTS, seed=seed)
    v = v / metric.norm(w, v)  # unit speed
    # a direction of nonzero geodesic curvature (else the retraction is exact to higher order)
    assume(float(metric.acceleration(w, v).norm()) > 1e-2)
    err_retr, err_taylor = [], []
    for eps in (0.02, 0.01):  # small enough that O(eps) corrections to the ratios stay < 1/8
        exact = sp.expmap(w, eps * v)
        err_retr.append(float((exact - sp.retr(w, eps * v)).norm()))
        err_taylor.append(float((exact - sp.expmap_approx(w, eps * v, order=2)).norm()))
    assert 3.5 < err_retr[0] / err_retr[1] < 4.5, err_retr
    assert 7.0 < err_taylor[0] / err_taylor[1] < 9.0, err_taylor
    # and order=1 is the retraction
    torch.testing.assert_close(sp.expmap_approx(w, 0.04 * v, order=1), sp.retr(w, 0.04 * v))
