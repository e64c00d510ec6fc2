"""Geodesic boundary-value solvers against closed forms and against each other.

Sphere: geodesics are great circles, the distance is the angle between the unit
vectors. Surface of revolution (r, phi) -> (r cos phi, r sin phi, h(r)): along a
geodesic the speed and Clairaut's r^2 phi' are conserved; shooting is checked
against the scipy collocation reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from manifolds import NotConvergedError, PullbackMetric, Status, WeightSpace
from riemfip.geodesic import GeodesicPath, collocation, relax, shoot

DT = torch.float64


def sphere(w):
    s, c = torch.sin(w), torch.cos(w)
    return torch.stack([s[0] * c[1], s[0] * s[1], c[0]])


def paraboloid(w):
    """Surface of revolution with h(r) = r^2 / 2 in polar coordinates (r, phi)."""
    r, c, s = w[0], torch.cos(w[1:]), torch.sin(w[1:])
    return torch.cat([r * c, r * s, 0.5 * r.reshape(1) ** 2])


def great_circle(a, b) -> float:
    return math.acos(max(-1.0, min(1.0, float(sphere(a) @ sphere(b)))))


@pytest.fixture(scope="module")
def sphere_metric():
    return PullbackMetric(sphere)


@pytest.fixture(scope="module")
def sphere_path(sphere_metric):
    w0 = torch.tensor([1.0, 0.2], dtype=DT)
    w1 = torch.tensor([2.0, 1.5], dtype=DT)
    return w0, w1, shoot(sphere_metric, w0, w1, steps=16)


def test_dense_acceleration_matches_closed_form_and_output_route(sphere_metric):
    w = torch.tensor([0.7, 0.3], dtype=DT)
    v = torch.tensor([0.4, -1.1], dtype=DT)
    a = sphere_metric.dense_acceleration(w, v)
    # closed form: theta'' = sin cos phi'^2, phi'' = -2 cot(theta) theta' phi'
    th = float(w[0])
    expected = torch.tensor(
        [math.sin(th) * math.cos(th) * 1.21, -2 / math.tan(th) * 0.4 * -1.1], dtype=DT
    )
    torch.testing.assert_close(a, expected, rtol=1e-12, atol=1e-12)
    for method in ("output", "cg"):
        torch.testing.assert_close(
            a, sphere_metric.acceleration(w, v, method=method), rtol=1e-10, atol=1e-12
        )


def test_shoot_sphere_great_circle(sphere_path):
    w0, w1, path = sphere_path
    assert path.converged, path.message
    assert path.status == Status.CONVERGED and path.residual <= path.tol
    d = great_circle(w0, w1)
    assert abs(path.length - d) / d < 1e-6
    assert abs(path.energy - 0.5 * d * d) / (0.5 * d * d) < 2e-6
    torch.testing.assert_close(path.start, w0, rtol=0, atol=0)
    assert float((path.end - w1).norm()) <= path.tol
    # every point lies on the great circle: the plane through 0, x0 and x1
    normal = torch.linalg.cross(sphere(w0), sphere(w1))
    off_plane = torch.stack([sphere(p) @ normal for p in path.points]).abs().max()
    assert float(off_plane) < 1e-6


def test_shoot_dense_and_krylov_agree(sphere_metric, sphere_path):
    w0, w1, dense = sphere_path
    # start near the answer: two Krylov-Newton steps suffice, the fixed point is what is compared
    krylov = shoot(sphere_metric, w0, w1, steps=16, jacobian="krylov", v0=dense.v0 + 0.01)
    assert krylov.converged, krylov.message
    assert krylov.metadata["jacobian"] == "krylov" and dense.metadata["jacobian"] == "dense"
    torch.testing.assert_close(krylov.v0, dense.v0, rtol=1e-8, atol=1e-8)


def test_multiple_shooting_from_relax_sphere(sphere_metric, sphere_path):
    w0, w1, single = sphere_path
    multi = shoot(sphere_metric, w0, w1, steps=16, segments=4, init="relax")
    assert multi.converged, multi.message
    assert multi.metadata["init"] == "relax" and multi.metadata["segments"] == 4
    torch.testing.assert_close(multi.v0, single.v0, rtol=1e-7, atol=1e-7)


def test_nearly_antipodal_converges_or_says_so(sphere_metric):
    w0 = torch.tensor([0.5 * math.pi, 0.0], dtype=DT)
    w1 = torch.tensor([0.5 * math.pi + 1e-3, math.pi - 1e-3], dtype=DT)
    path = shoot(sphere_metric, w0, w1, steps=8, maxiter=3)
    if path.converged:
        assert path.residual <= path.tol
        assert abs(path.length - great_circle(w0, w1)) < 1e-4
    else:
        assert path.residual > path.tol
        assert path.message and path.message != "converged"
        with pytest.raises(NotConvergedError):
            path.raise_if_failed()


def test_strict_raises_with_residual(sphere_metric):
    w0 = torch.tensor([1.0, 0.2], dtype=DT)
    w1 = torch.tensor([2.0, 1.5], dtype=DT)
    with pytest.raises(NotConvergedError) as info:
        shoot(sphere_metric, w0, w1, steps=4, maxiter=0, strict=True)
    assert info.value.residual > 0.1


def test_relax_converges_to_shooting_as_points_grow(sphere_metric, sphere_path):
    w0, w1, ref = sphere_path
    d = great_circle(w0, w1)
    errors = []
    for k in (5, 9, 17):
        r = relax(sphere_metric, w0, w1, k)
        assert r.method == "relax" and r.status == Status.CONVERGED and r.residual <= r.tol
        torch.testing.assert_close(r.start, w0, rtol=0, atol=0)
        torch.testing.assert_close(r.end, w1, rtol=0, atol=0)
        errors.append(max(abs(r.length - d) / d, float((r.v0 - ref.v0).norm())))
    # second order in 1/(K-1): halving the spacing cuts the error about 4x
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3
    assert errors[2] < 1e-2


@pytest.fixture(scope="module")
def paraboloid_case():
    metric = PullbackMetric(paraboloid)
    w0 = torch.tensor([0.6, 0.0], dtype=DT)
    w1 = torch.tensor([1.0, 1.2], dtype=DT)
    return metric, w0, w1, shoot(metric, w0, w1, steps=16)


def test_surface_of_revolution_matches_collocation(paraboloid_case):
    metric, w0, w1, path = paraboloid_case
    assert path.converged, path.message
    ref = collocation(metric, w0, w1)
    assert ref.converged, ref.message
    # both are O(h^4) / bvp_tol approximations of the same geodesic
    torch.testing.assert_close(path.v0, ref.v0, rtol=1e-5, atol=1e-5)
    assert abs(path.length - ref.length) < 1e-5


def test_surface_of_revolution_conservation_laws(paraboloid_case):
    _, _, _, path = paraboloid_case
    r, dr, dphi = path.points[:, 0], path.velocities[:, 0], path.velocities[:, 1]
    speed2 = (1 + r**2) * dr**2 + r**2 * dphi**2  # g = diag(1 + h'^2, r^2)
    clairaut = r**2 * dphi
    # exact invariants, conserved by RK4 (16 steps) up to its truncation error (~3e-6 here;
    # a wrong acceleration term breaks them at O(1))
    assert float((speed2 - speed2[0]).abs().max()) < 2e-5 * float(speed2[0])
    assert float((clairaut - clairaut[0]).abs().max()) < 2e-5 * abs(float(clairaut[0]))


def test_logmap_inverts_expmap_and_dist_symmetric():
    space = WeightSpace(PullbackMetric(paraboloid), expmap_steps=8)
    x = torch.tensor([0.8, 0.3], dtype=DT)
    u = torch.tensor([0.3, 0.9], dtype=DT)
    y = space.expmap(x, u)
    # the same discrete flow both ways: exact to the shooting tolerance
    torch.testing.assert_close(space.logmap(x, y), u, rtol=1e-8, atol=1e-8)
    # dist(x, y) is |logmap(x, y)|_g(x) = |u|_g(x); the reverse path is another discrete
    # solve: equal up to the O(h^4) flow error
    dxy, dyx = float(space.norm(x, u)), float(space.dist(y, x))
    assert abs(dxy - dyx) < 1e-4 * dxy


def test_path_interpolation_and_save_load(sphere_path, tmp_path):
    _, _, path = sphere_path
    # cubic Hermite between RK4 nodes stays on the sphere's great circle to O(h^4)
    mid = 0.5 * (path.t[3] + path.t[4])
    exact = path.at(float(path.t[3]))
    torch.testing.assert_close(exact, path.points[3], rtol=0, atol=1e-15)
    ts = torch.linspace(0, 1, 7, dtype=DT)
    assert path.at(ts).shape == (7, 2)
    # between nodes: matches a finer flow from the same start
    fine = WeightSpace(PullbackMetric(sphere)).geodesic(
        path.start, path.v0, t1=float(mid), steps=64
    )
    assert float((path.at(float(mid)) - fine.end).norm()) < 1e-6
    with pytest.raises(ValueError, match="t must lie"):
        path.at(1.5)
    file = tmp_path / "path.pt"
    path.save(file)
    back = GeodesicPath.load(file)
    for name in ("t", "points", "velocities", "v0"):
        torch.testing.assert_close(getattr(back, name), getattr(path, name), rtol=0, atol=0)
    assert (back.residual, back.converged, back.message, back.iterations, back.method) == (
        path.residual,
        path.converged,
        path.message,
        path.iterations,
        path.method,
    )
    assert back.metadata == path.metadata
    # the same state in memory (as a checkpoint holds it) round-trips too; another kind is refused
    again = GeodesicPath.from_state_dict(path.state_dict())
    torch.testing.assert_close(again.points, path.points, rtol=0, atol=0)
    assert again.status == path.status
    with pytest.raises(ValueError, match="the checkpoint does not hold a GeodesicPath"):
        GeodesicPath.from_state_dict({"points": path.points}, source="the checkpoint")


def test_bad_inputs(sphere_metric):
    w0 = torch.tensor([1.0, 0.2], dtype=DT)
    with pytest.raises(TypeError, match="PullbackMetric"):
        shoot(lambda w: w, w0, w0)
    with pytest.raises(ValueError, match="length 3"):
        shoot(sphere_metric, w0, torch.zeros(3, dtype=DT))
    with pytest.raises(TypeError, match="dtype"):
        relax(sphere_metric, w0, w0.float())
    with pytest.raises(ValueError, match="segments"):
        shoot(sphere_metric, w0, w0 + 0.1, steps=10, segments=3)
    with pytest.raises(ValueError, match="n_points"):
        relax(sphere_metric, w0, w0 + 0.1, 2)
    with pytest.raises(ValueError, match="small problems"):
        collocation(
            PullbackMetric(lambda w: w), torch.zeros(100, dtype=DT), torch.ones(100, dtype=DT)
        )
    with pytest.raises(ValueError, match="jacobian"):
        shoot(sphere_metric, w0, w0 + 0.1, jacobian="newton")


def test_weight_space_logmap_options_survive_pickle_and_are_checked():
    import pickle

    space = WeightSpace(PullbackMetric(sphere), expmap_steps=8, logmap_options={"segments": 2})
    back = pickle.loads(pickle.dumps(space))
    assert back.logmap_options == {"segments": 2} and back.expmap_steps == 8
    with pytest.raises(ValueError, match="strict"):
        WeightSpace(PullbackMetric(sphere), logmap_options={"strict": False})
    with pytest.raises(TypeError, match="dict"):
        WeightSpace(PullbackMetric(sphere), logmap_options=["segments"])


def test_shoot_checkpoint_and_resume(sphere_metric, sphere_path):
    w0, w1, ref = sphere_path
    seen = []
    first = shoot(
        sphere_metric,
        w0,
        w1,
        steps=16,
        maxiter=2,
        callback=lambda it, v, rn: seen.append((it, v, rn)),
    )
    assert not first.converged and "maximum number of Newton iterations" in first.message
    assert first.status == Status.MAX_ITERATIONS
    assert [it for it, _, _ in seen] == [1, 2]
    # the residual norms reported to the callback decrease (Newton from the line start)
    assert seen[1][2] < seen[0][2]
    assert abs(first.residual - seen[-1][2]) < 1e-6  # the path reports the same endpoint miss
    resumed = shoot(sphere_metric, w0, w1, steps=16, v0=seen[-1][1])
    assert resumed.converged and resumed.metadata["init"] == "v0"
    assert resumed.iterations < ref.iterations
    torch.testing.assert_close(resumed.v0, ref.v0, rtol=1e-9, atol=1e-9)


def _hemisphere(w):
    """The upper unit hemisphere as a graph: a chart that ends at the unit circle."""
    return torch.cat([w, torch.sqrt(1 - w.dot(w)).reshape(1)])


@pytest.mark.filterwarnings("ignore::manifolds.validation.ConvergenceWarning")
@pytest.mark.parametrize("v0", [[4.0, 0.0], [2.0, 0.3]])
def test_shoot_whose_flow_leaves_the_chart_says_so(v0):
    # From the pole, a geodesic of length > pi/2 crosses the equator, where the chart
    # (and the flow) breaks down: an answer with its failure, never an exception.
    metric = PullbackMetric(_hemisphere)
    w0, w1 = torch.zeros(2, dtype=DT), torch.tensor([0.5, 0.0], dtype=DT)
    v0 = torch.tensor(v0, dtype=DT)
    with pytest.raises(FloatingPointError, match="non-finite"):
        WeightSpace(metric, expmap_steps=16).expmap(w0, v0)
    for jacobian in ("dense", "krylov"):
        path = shoot(metric, w0, w1, v0=v0, steps=16, maxiter=3, jacobian=jacobian)
        assert not path.converged and path.residual == math.inf
        assert path.status == Status.NON_FINITE and "blew up" in path.message
        with pytest.raises(NotConvergedError):
            path.raise_if_failed()
    # From a start inside the chart the same problem converges.
    path = shoot(metric, w0, w1, steps=16)
    assert path.converged and abs(path.length - math.asin(0.5)) < 1e-6
