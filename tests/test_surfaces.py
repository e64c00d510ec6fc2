r"""Closed forms on surfaces in :math:`\mathbb{R}^3`, seen as pullback metrics of their embeddings.

* Unit sphere, :math:`(\theta, \varphi) \mapsto (\sin\theta\cos\varphi, \sin\theta\sin\varphi, \cos\theta)`:
  :math:`g = \operatorname{diag}(1, \sin^2\theta)`, :math:`\Gamma^\theta_{\varphi\varphi} = -\sin\theta\cos\theta`,
  :math:`\Gamma^\varphi_{\theta\varphi} = \cot\theta`, geodesics are great circles.
* Surfaces of revolution :math:`(r, \varphi) \mapsto (\rho(r)\cos\varphi, \rho(r)\sin\varphi, h(r))`:
  :math:`g = \operatorname{diag}(\rho'^2 + h'^2, \rho^2)`; along a geodesic the speed and
  Clairaut's :math:`\rho^2\dot\varphi` are conserved.
"""

from __future__ import annotations

import math

import pytest
import torch
from dense_reference import DTYPE
from torch.func import jacfwd

from manifolds import PullbackMetric, WeightSpace

METHODS = ("dense", "output", "cg")


def sphere(w):
    th, ph = w
    return torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()])


def sphere_points(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    th = 0.3 + (math.pi - 0.6) * torch.rand(n, generator=gen, dtype=DTYPE)
    ph = 2 * math.pi * torch.rand(n, generator=gen, dtype=DTYPE) - math.pi
    return torch.stack([th, ph], dim=1)


def test_sphere_metric_is_diag_one_sin_squared():
    metric = PullbackMetric(sphere)
    for w in sphere_points(6, seed=0):
        expected = torch.diag(torch.stack([torch.ones((), dtype=DTYPE), w[0].sin() ** 2]))
        torch.testing.assert_close(metric.dense(w), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_sphere_acceleration_matches_christoffel_symbols(method):
    # theta'' = -Gamma^th_phph phi'^2 = sin cos phi'^2 ; phi'' = -2 Gamma^ph_thph th' phi' = -2 cot th' phi'
    metric = PullbackMetric(sphere, solver=method)
    gen = torch.Generator().manual_seed(1)
    for w in sphere_points(5, seed=2):
        v = torch.randn(2, generator=gen, dtype=DTYPE)
        th, dth, dph = w[0], v[0], v[1]
        expected = torch.stack([th.sin() * th.cos() * dph**2, -2 * dth * dph / th.tan()])
        res = metric.acceleration_result(w, v)
        assert res.method == method
        assert res.converged
        torch.testing.assert_close(res.x, expected, rtol=1e-10, atol=1e-12)


def great_circle(w: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points ``p cos(t|u|) + u/|u| sin(t|u|)`` in R^3, ``p = sphere(w)``, ``u = J v``."""
    p, u = sphere(w), jacfwd(sphere)(w) @ v
    s = u.norm()
    return p * torch.cos(t * s)[:, None] + (u / s) * torch.sin(t * s)[:, None]


def sphere_cases(n: int, seed: int):
    """Points with theta in [0.3, pi-0.3] and velocities with |v|_g <= 1 (half of them = 1)
    whose great circle on t in [0, 1] stays at least 0.15 from both poles: the chart is
    singular there (cot theta blows up), so no fixed-step integrator in it is uniformly
    accurate near them."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, 201, dtype=DTYPE)
    cases = []
    for w in sphere_points(4 * n, seed=seed + 1):
        v = torch.randn(2, generator=gen, dtype=DTYPE)
        v = v / torch.sqrt(v[0] ** 2 + (w[0].sin() * v[1]) ** 2)  # |v|_g = 1
        if len(cases) % 2:
            v = v * torch.rand((), generator=gen, dtype=DTYPE)
        if great_circle(w, v, t)[:, 2].abs().max() < math.cos(0.15):
            cases.append((w, v))
        if len(cases) == n:
            return cases
    raise AssertionError("not enough sphere test cases")


def test_sphere_expmap_follows_great_circles_at_default_settings():
    space = WeightSpace(PullbackMetric(sphere))
    one = torch.ones(1, dtype=DTYPE)
    for w, v in sphere_cases(4, seed=3):
        end = space.expmap(w, v)
        err = (sphere(end) - great_circle(w, v, one)[0]).norm()
        assert err < 1e-6, (w, v, err)
        # the chart too, not only the embedded point: theta is unique in (0, pi)
        assert abs(float(end[0]) - math.acos(float(great_circle(w, v, one)[0, 2]))) < 1e-6


@pytest.mark.parametrize("steps", [None, 64])  # adaptive (the default), fixed RK4
def test_sphere_geodesic_conserves_speed(steps):
    space = WeightSpace(PullbackMetric(sphere), expmap_steps=steps)
    for w, v in sphere_cases(2, seed=4):
        traj = space.geodesic(w, v, speeds=True, record=True)
        assert traj.converged and float(traj.t[-1]) == 1.0
        assert traj.speeds.shape == traj.t.shape == (traj.points.shape[0],)
        if steps is not None:
            assert traj.speeds.shape == (steps + 1,)
        # closed-form speed sqrt(th'^2 + sin^2 th ph'^2) agrees with the recorded one
        closed = torch.sqrt(
            traj.velocities[:, 0] ** 2 + (traj.points[:, 0].sin() * traj.velocities[:, 1]) ** 2
        )
        torch.testing.assert_close(traj.speeds, closed, rtol=1e-12, atol=0)
        assert traj.speed_drift < 1e-6
        assert float((closed - closed[0]).abs().max() / closed[0]) < 1e-6


# ---------------------------------------------------------------- surfaces of revolution


def paraboloid(w):  # h(r) = r^2 / 2
    r, ph = w
    return torch.stack([r * ph.cos(), r * ph.sin(), 0.5 * r * r])


def paraboloid_metric(w):  # diag(1 + h'^2, r^2)
    return torch.stack([1 + w[0] ** 2, w[0] ** 2])


def torus(w):  # tube radius 1 around a circle of radius 2; rho(u) = 2 + cos u
    u, ph = w
    rho = 2 + u.cos()
    return torch.stack([rho * ph.cos(), rho * ph.sin(), u.sin()])


def torus_metric(w):
    return torch.stack([torch.ones_like(w[0]), (2 + w[0].cos()) ** 2])


SURFACES = {
    # name: (embedding, diagonal of g, rho^2 for Clairaut)
    "paraboloid": (paraboloid, paraboloid_metric, lambda w: w[0] ** 2),
    "torus": (torus, torus_metric, lambda w: (2 + w[0].cos()) ** 2),
}


@pytest.mark.parametrize("name", SURFACES)
def test_revolution_metric_and_acceleration(name):
    fn, diag, _ = SURFACES[name]
    metric = PullbackMetric(fn)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        w = torch.tensor([0.5, 0.0], dtype=DTYPE) + torch.rand(2, generator=gen, dtype=DTYPE)
        v = torch.randn(2, generator=gen, dtype=DTYPE)
        torch.testing.assert_close(metric.dense(w), torch.diag(diag(w)), rtol=1e-13, atol=1e-14)
        # geodesic equation of diag(a(r), b(r)):
        #   r'' = -(a' r'^2 - b' ph'^2) / (2a),  ph'' = -b' r' ph' / b
        a, b = diag(w)
        da, db = jacfwd(diag)(w)[:, 0]
        expected = torch.stack(
            [-(da * v[0] ** 2 - db * v[1] ** 2) / (2 * a), -db * v[0] * v[1] / b]
        )
        torch.testing.assert_close(metric.acceleration(w, v), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SURFACES)
def test_revolution_geodesic_conserves_speed_and_clairaut(name):
    fn, diag, rho2 = SURFACES[name]
    space = WeightSpace(PullbackMetric(fn))
    w0 = torch.tensor([1.0, 0.3], dtype=DTYPE)
    v0 = torch.tensor([0.4, 0.9], dtype=DTYPE)
    drifts = []
    for steps in (40, 80):
        traj = space.geodesic(w0, v0, t1=3.0, steps=steps, record=True)
        pts, vel = traj.points, traj.velocities
        speed = (diag(pts.T) * vel.T**2).sum(0).sqrt()
        clairaut = rho2(pts.T) * vel[:, 1]
        drift_speed = float((speed - speed[0]).abs().max() / speed[0])
        drift_clairaut = float((clairaut - clairaut[0]).abs().max() / clairaut[0].abs())
        drifts.append((drift_speed, drift_clairaut))
    # the path really moves in r (else Clairaut would be trivially conserved)
    assert float((pts[:, 0] - pts[0, 0]).abs().max()) > 0.3
    assert max(drifts[1]) < 1e-7, drifts
    # fourth order: halving the step divides the drift by about 16
    for coarse, fine in zip(drifts[0], drifts[1], strict=True):
        assert 8 < coarse / fine < 32, drifts
