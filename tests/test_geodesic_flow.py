r"""The geodesic flow: the Runge–Kutta kernel, adaptive ``expmap`` against closed forms, flows
that fail, and the one path type (status, interpolation, persistence).

Closed forms: the harmonic oscillator :math:`\ddot w = -w` (orders of the tableaus), great
circles on the unit sphere (adaptive ``expmap`` meets its tolerance), and the 1-D metric
pulled back by :math:`\arctan`, whose geodesics :math:`w(t) = \tan(\arctan w_0 + c t)` reach
infinity in finite time (a flow that blows up).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from test_surfaces import great_circle, sphere, sphere_cases
from torch.func import vmap

from manifolds import NotConvergedError, PullbackMetric, Status, WeightSpace
from manifolds.geodesic import (
    GeodesicPath,
    NonFiniteError,
    discrete_energy,
    fixed_step_flow,
    integrate_geodesic,
)
from manifolds.geodesic.runge_kutta import BOGACKI_SHAMPINE, DORMAND_PRINCE, RK4

DT = torch.float64
ONE = torch.ones(1, dtype=DT)


def oscillator(w, v):
    return -w


@pytest.mark.parametrize("method", [RK4, DORMAND_PRINCE, BOGACKI_SHAMPINE], ids=lambda m: m.name)
def test_one_kernel_has_the_order_of_its_tableau(method):
    # w'' = -w from (1, 0): w(t) = cos t. Halving the step divides the error by 2**order.
    w0, v0 = torch.ones(1, dtype=DT), torch.zeros(1, dtype=DT)
    errors = []
    for steps in (8, 16):
        w, v = fixed_step_flow(oscillator, w0, v0, 2.0, steps, method)
        errors.append(math.hypot(float(w) - math.cos(2.0), float(v) + math.sin(2.0)))
    assert 0.7 * 2**method.order < errors[0] / errors[1] < 1.5 * 2**method.order, errors


def test_fixed_step_flow_is_vmappable_with_the_dense_acceleration():
    metric = PullbackMetric(sphere)
    w = torch.tensor([[0.7, 0.3], [1.2, -0.4], [2.0, 1.0]], dtype=DT)
    v = torch.tensor([[0.4, -1.1], [0.2, 0.5], [-0.3, 0.1]], dtype=DT)
    batched = vmap(lambda a, b: fixed_step_flow(metric.dense_acceleration, a, b, 1.0, 8))(w, v)
    for k in range(3):
        one = integrate_geodesic(metric, w[k], v[k], steps=8)
        torch.testing.assert_close(batched[0][k], one.end, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched[1][k], one.velocities[-1], rtol=1e-12, atol=1e-12)


def test_adaptive_expmap_meets_its_tolerance_on_great_circles():
    cases = sphere_cases(4, seed=3)
    worst = []
    for tol in (1e-4, 1e-6, 1e-8):
        space = WeightSpace(PullbackMetric(sphere), expmap_tol=tol)
        errors = [
            float((sphere(space.expmap(w, v)) - great_circle(w, v, ONE)[0]).norm())
            for w, v in cases
        ]
        assert max(errors) <= 10 * tol, (tol, errors)
        worst.append(max(errors))
    assert worst[0] > worst[1] > worst[2], worst


def test_adaptive_flow_reports_its_steps_and_beats_fixed_rk4_at_default_accuracy():
    metric = PullbackMetric(sphere)
    for w, v in sphere_cases(2, seed=3):
        path = integrate_geodesic(metric, w, v, record=True)
        assert path.status == Status.CONVERGED and path.method == "flow"
        assert path.metadata["scheme"] == "dopri5" and path.tol == 1e-8
        assert 0 < path.residual <= path.tol  # the largest accepted local error estimate
        assert path.iterations == path.points.shape[0] - 1
        # first same as last: 6 accelerations per attempted step, 2 to start
        steps = path.iterations + path.metadata["rejected_steps"]
        assert path.solves == 6 * steps + 2
        assert path.solves < 4 * 64  # 64 RK4 steps reach the same accuracy (1e-6 here)
        assert path.metadata["speed_drift_end"] < 1e-7


def test_flow_that_blows_up_says_so():
    # g = 1/(1 + w^2)^2: w(t) = tan(arctan(0.5) + 3.75 t / 1.25) reaches infinity at t = 0.369.
    # float32, where the step size underflows (10 eps t1) within a few hundred accelerations.
    metric = PullbackMetric(torch.atan)
    w0, v0 = torch.full((1,), 0.5), torch.full((1,), 3.75)
    path = integrate_geodesic(metric, w0, v0, tol=1e-3)
    assert path.status in (Status.BREAKDOWN, Status.NON_FINITE) and not path.converged
    assert "step size" in path.message or "non-finite" in path.message
    blow_up = (math.pi / 2 - math.atan(0.5)) / 3
    assert path.metadata["t_reached"] == pytest.approx(blow_up, rel=1e-3)
    assert bool(torch.isnan(path.end).all())  # never a finite point at t = 1
    with pytest.raises(NotConvergedError):
        path.raise_if_failed()
    with pytest.raises(NotConvergedError, match="flow did not converge"):
        WeightSpace(metric, expmap_tol=1e-3).expmap(w0, v0)
    # within the interval of existence the same flow is accurate
    short = integrate_geodesic(metric, w0.double(), 0.1 * v0.double(), tol=1e-8)
    exact = math.tan(math.atan(0.5) + 0.3)
    assert short.converged and abs(float(short.end) - exact) < 1e-7


def test_flow_out_of_steps_and_non_finite_fixed_flow_say_so():
    metric = PullbackMetric(sphere)
    w, v = sphere_cases(1, seed=3)[0]
    path = integrate_geodesic(metric, w, v, tol=1e-10, max_steps=3)
    assert path.status == Status.MAX_ITERATIONS and "3 steps" in path.message
    assert bool(torch.isnan(path.end).all())
    hemisphere = PullbackMetric(lambda x: torch.cat([x, torch.sqrt(1 - x.dot(x)).reshape(1)]))
    with pytest.warns(Warning):  # the metric's solve warns about its NaN residual
        path = integrate_geodesic(
            hemisphere, torch.zeros(2, dtype=DT), torch.tensor([4.0, 0.0], dtype=DT), steps=16
        )
    assert path.status == Status.NON_FINITE
    with pytest.raises(NonFiniteError, match="non-finite") as info:
        path.raise_if_failed()
    assert isinstance(info.value, FloatingPointError)


def test_flow_arguments_are_checked():
    metric = PullbackMetric(sphere)
    w, v = torch.tensor([1.0, 0.2], dtype=DT), torch.tensor([0.1, 0.1], dtype=DT)
    with pytest.raises(ValueError, match="not both"):
        integrate_geodesic(metric, w, v, tol=1e-6, steps=4)
    with pytest.raises(ValueError, match="tol must be > 0"):
        integrate_geodesic(metric, w, v, tol=0.0)
    with pytest.raises(ValueError, match="t1 must be"):
        integrate_geodesic(metric, w, v, t1=-1.0)
    with pytest.raises(ValueError, match="scheme must be one of"):
        integrate_geodesic(metric, w, v, scheme="euler")
    with pytest.raises(ValueError, match="embedded pair"):
        integrate_geodesic(metric, w, v, scheme="rk4")
    with pytest.raises(ValueError, match="not both"):
        WeightSpace(metric, expmap_tol=1e-6, expmap_steps=4)


# ---------------------------------------------------------------- the path type


def _path(**kw) -> GeodesicPath:
    t = torch.linspace(0, 1, 5, dtype=DT)
    points = torch.stack([t, t**2], dim=1)
    velocities = torch.stack([torch.ones_like(t), 2 * t], dim=1)
    return GeodesicPath(t=t, points=points, velocities=velocities, **kw)


def test_status_decides_and_the_message_only_describes():
    ok = _path(message="anything at all")
    assert ok.converged and ok.status == Status.CONVERGED and ok.raise_if_failed() is ok
    failed = _path(status=Status.MAX_ITERATIONS, message="converged")
    assert not failed.converged
    with pytest.raises(NotConvergedError, match="MAX_ITERATIONS"):
        failed.raise_if_failed()
    assert _path(status=3).status is Status.NON_FINITE


def test_hermite_interpolant_and_its_derivative():
    path = _path()  # (t, t^2): cubic Hermite reproduces it exactly
    ts = torch.linspace(0, 1, 11, dtype=DT)
    torch.testing.assert_close(path.at(ts), torch.stack([ts, ts**2], dim=1), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        path.velocity_at(ts), torch.stack([torch.ones_like(ts), 2 * ts], dim=1), rtol=0, atol=1e-14
    )
    torch.testing.assert_close(path.velocity_at(path.t), path.velocities, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="t must lie"):
        path.velocity_at(-0.5)


def test_format_1_files_load_with_a_status_and_unknown_ones_are_refused(tmp_path):
    path = _path(residual=0.5, tol=0.1, method="shoot")
    old = path.state_dict()
    for key in ("status", "speeds", "solves", "max_solve_residual"):
        del old[key]
    for converged, residual, status in (
        (True, 1e-12, Status.CONVERGED),
        (False, 0.5, Status.MAX_ITERATIONS),
        (False, math.inf, Status.NON_FINITE),
    ):
        torch.save(
            old
            | {"format": "riemfip.GeodesicPath/1", "converged": converged, "residual": residual},
            tmp_path / "old.pt",
        )
        back = GeodesicPath.load(tmp_path / "old.pt")
        assert back.status == status and back.converged == converged
        assert back.metadata["loaded_from"] == "riemfip.GeodesicPath/1"
        torch.testing.assert_close(back.points, path.points, rtol=0, atol=0)
    torch.save(old | {"format": "riemfip.GeodesicPath/9"}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="format tag 'riemfip.GeodesicPath/9'"):
        GeodesicPath.load(tmp_path / "new.pt")


def test_flow_path_round_trips_with_speeds(tmp_path):
    metric = PullbackMetric(sphere)
    w, v = sphere_cases(1, seed=4)[0]
    path = integrate_geodesic(metric, w, v, record=True, speeds=True)
    path.save(tmp_path / "flow.pt")
    back = GeodesicPath.load(tmp_path / "flow.pt")
    for name in ("t", "points", "velocities", "v0", "speeds"):
        torch.testing.assert_close(getattr(back, name), getattr(path, name), rtol=0, atol=0)
    assert (back.status, back.solves, back.speed_drift) == (
        path.status,
        path.solves,
        path.speed_drift,
    )


def test_discrete_energy_is_the_chord_energy_with_the_paths_times():
    metric = PullbackMetric(sphere, damping=0.1)
    points = torch.tensor([[1.0, 0.2], [1.3, 0.6], [1.5, 0.9], [2.0, 1.5]], dtype=DT)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=DT)
    feats = torch.stack([sphere(p) for p in points])
    expected = 0.5 * sum(
        (
            float((feats[k + 1] - feats[k]).norm()) ** 2
            + 0.1 * float((points[k + 1] - points[k]).norm()) ** 2
        )
        / float(t[k + 1] - t[k])
        for k in range(3)
    )
    assert float(discrete_energy(metric, points, t)) == pytest.approx(expected, rel=1e-13)
    uniform = torch.linspace(0, 1, 4, dtype=DT)
    assert float(discrete_energy(metric, points)) == float(discrete_energy(metric, points, uniform))


def test_nothing_in_manifolds_imports_riemfip():
    root = Path(__file__).resolve().parents[1] / "manifolds"
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "riemfip" for n in names), (file, names)


def test_the_flows_old_path_type_name_still_resolves():
    import manifolds

    with pytest.warns(DeprecationWarning, match="GeodesicPath"):
        assert manifolds.GeodesicTrajectory is GeodesicPath
    with pytest.raises(AttributeError):
        manifolds.NoSuchThing  # noqa: B018
