r"""Mode connectivity: connect, the Bézier baseline and the path evaluation.

The networks are small MLPs trained here on scikit-learn's 8x8 digits (fast, offline).
Quantities with a closed form are checked against it: for a linear model and the
Euclidean output metric, :math:`F` is linear, so the chord energy of the straight line is
exactly :math:`\tfrac12 \Delta w^\top g\, \Delta w`; a straight line's weight length is
:math:`\|w_b - w_a\|`; BatchNorm statistics recomputed at a point equal those of a fresh
copy of the network fed the same inputs.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from manifolds import FlatModule, PullbackMetric
from riemfip.applications.classifiers import trained_classifier
from riemfip.checkpoint import SettingsMismatchError, load_checkpoint
from riemfip.connectivity import (
    QuadraticBezier,
    compare_paths,
    connect,
    connection_metric,
    evaluate_path,
    fit_bezier,
    garipov_learning_rate,
    path_energy,
    straight_line,
)
from riemfip.connectivity import bezier as bezier_module


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _train(seed: int, data, *, hidden: int = 24, epochs: int = 30, batchnorm: bool = False):
    """64-hidden-10 ReLU MLP (BatchNorm after the first layer if asked), Adam from ``seed``."""

    def make():
        norm = [nn.BatchNorm1d(hidden)] if batchnorm else []
        return nn.Sequential(nn.Linear(64, hidden), *norm, nn.ReLU(), nn.Linear(hidden, 10))

    x, y = data
    steps = epochs * math.ceil(len(x) / 64)
    return trained_classifier(make, x, y, steps=steps, lr=3e-3, seed=seed)


@pytest.fixture(scope="module")
def pair(digits):
    train, _ = digits
    return _train(0, train), _train(1, train)


# ------------------------------------------------------------------ connect
def test_connect_joins_the_two_networks_with_less_energy_than_the_line(digits, pair):
    (x_train, y_train), (x_test, y_test) = digits
    a, b = pair
    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    anchor = x_train[:128]
    path = connect(a, b, anchor, n_points=9, maxiter=60)
    w_a, w_b = FlatModule(a).flatten(), FlatModule(b).flatten()

    assert path.points.shape == (9, w_a.numel())
    assert torch.equal(path.points[0], w_a) and torch.equal(path.points[-1], w_b)
    # The metric connect used, rebuilt independently of the solver: Fisher, default damping.
    metric = connection_metric(a, anchor)
    assert metric.output_metric.name == "fisher"
    assert path.metadata["connect"]["output_metric"] == "fisher"
    assert path.metadata["connect"]["anchor_inputs"] == 128
    e_geo = path_energy(metric, path)
    e_line = path_energy(metric, straight_line(w_a, w_b, 9))
    assert e_geo < 0.5 * e_line, (e_geo, e_line)
    # Neither network was touched.
    after = [p.detach() for p in (*a.parameters(), *b.parameters())]
    assert all(torch.equal(p, q) for p, q in zip(before, after, strict=True))


def test_connect_accepts_labelled_batches_like_a_dataloader(digits, pair):
    (x_train, y_train), _ = digits
    a, b = pair
    batches = [(x_train[:64], y_train[:64]), (x_train[64:128], y_train[64:128])]
    path = connect(a, b, batches, n_points=5, maxiter=5)
    assert path.metadata["connect"]["anchor_inputs"] == 128
    assert torch.equal(path.points[0], FlatModule(a).flatten())


def test_connect_by_shooting_agrees_with_relaxation():
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).double()

    a, b = net(0), net(1)
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shot = connect(a, b, x, method="shoot", damping=1e-2, n_points=3)
    relaxed = connect(a, b, x, damping=1e-2, n_points=3, maxiter=300)
    w_a, w_b = FlatModule(a).flatten(), FlatModule(b).flatten()
    assert shot.method == "shoot" and shot.converged and shot.points.shape == (3, 21)
    assert torch.equal(shot.points[0], w_a)
    assert float((shot.points[-1] - w_b).norm()) <= shot.residual + 1e-12
    # relax minimises the chord energy over 3 points; shooting's lie (up to RK4 error) on the
    # geodesic, no better in that energy than relax but better than the line.
    metric = connection_metric(a, x, damping=1e-2)
    e_relax, e_shot = path_energy(metric, relaxed), path_energy(metric, shot)
    e_line = path_energy(metric, straight_line(w_a, w_b, 3))
    assert e_relax <= e_shot * (1 + 1e-9) < e_line, (e_relax, e_shot, e_line)


def test_connect_names_the_parameter_that_differs():
    a = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    b = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3))
    with pytest.raises(ValueError, match=r"0\.weight \(8, 4\) vs 0\.weight \(9, 4\)"):
        connect(a, b, torch.randn(5, 4))
    c = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="4 vs 6 parameter tensors"):
        connect(a, c, torch.randn(5, 4))


def test_connect_rejects_bad_arguments():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    with pytest.raises(TypeError, match="model_b must be a torch.nn.Module"):
        connect(a, "b", torch.randn(5, 4))
    with pytest.raises(ValueError, match="method must be one of"):
        connect(a, b, torch.randn(5, 4), method="bisect")
    with pytest.raises(TypeError, match="float32 weights, model_b torch.float64"):
        connect(a, b.double(), torch.randn(5, 4))
    with pytest.raises(ValueError, match="no batches"):
        connect(a, nn.Linear(4, 3), [])


# ------------------------------------------------------------------ evaluation
def test_energy_and_lengths_of_a_line_match_the_closed_form():
    torch.manual_seed(0)
    net = nn.Linear(5, 3).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    lam = 0.3
    metric = PullbackMetric.from_module(net, x, output_metric="euclidean", damping=lam)
    w_a = torch.randn(18, dtype=torch.float64)
    w_b = torch.randn(18, dtype=torch.float64)
    dw = w_b - w_a
    # F is linear, so g is constant and chords are exact: E = 1/2 dw^T g dw for any K.
    exact = 0.5 * float(dw @ metric.dense(w_a) @ dw)
    for k in (2, 5, 11):
        line = straight_line(w_a, w_b, k)
        assert path_energy(metric, line) == pytest.approx(exact, rel=1e-12)
    y = torch.randint(0, 3, (40,))
    ev = evaluate_path(net, straight_line(w_a, w_b, 7), (x, y), metric=metric)
    assert ev.weight_length == pytest.approx(float(dw.norm()), rel=1e-12)
    jdw = metric.jacobian(w_a) @ dw
    assert ev.function_length == pytest.approx(float(jdw.norm()), rel=1e-12)
    assert ev.energy == pytest.approx(exact, rel=1e-12)


def test_energy_uses_the_times_of_the_path():
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    metric = PullbackMetric.from_module(net, torch.randn(10, 3, dtype=torch.float64), damping=0.1)
    w_a, w_b = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)

    class Timed:  # the same three points, reached at uneven times
        points = straight_line(w_a, w_b, 3)
        t = torch.tensor([0.0, 0.25, 1.0])

    # F is linear, so both halves have the same q = |dF|^2 + lam |dw|^2 and E = sum q / (2 dt).
    q = path_energy(metric, Timed.points) / 2  # uniform times: E = 2 q / (2 * 1/2)
    assert path_energy(metric, Timed) == pytest.approx(q / 0.5 + q / 1.5, rel=1e-12)


def test_evaluation_matches_direct_computation_and_a_constant_path_has_no_barrier(digits, pair):
    _, (x_test, y_test) = digits
    a, b = pair
    w_a, w_b = FlatModule(a).flatten(), FlatModule(b).flatten()
    ev = evaluate_path(a, straight_line(w_a, w_b, 5), (x_test, y_test), batch_size=100)
    mid = copy.deepcopy(a)
    FlatModule(mid).write(0.5 * (w_a + w_b))
    with torch.no_grad():
        out = mid(x_test)
    assert float(ev.loss[2]) == pytest.approx(float(nn.functional.cross_entropy(out, y_test)))
    assert float(ev.accuracy[2]) == float((out.argmax(1) == y_test).double().mean())
    lin = (ev.loss[0] + ev.loss[-1]) / 2
    assert ev.barrier >= float(ev.loss[2] - lin) - 1e-12
    assert ev.max_error == pytest.approx(1 - float(ev.accuracy.min()))

    flat = torch.stack([w_a] * 4)
    const = evaluate_path(a, flat, (x_test, y_test), metric=connection_metric(a, x_test[:32]))
    assert const.barrier == pytest.approx(0.0, abs=1e-6)
    assert const.weight_length == 0 and const.function_length == 0 and const.energy == 0


def test_batchnorm_statistics_are_recomputed_per_point_and_restored(digits):
    (x_train, y_train), (x_test, y_test) = digits
    a = _train(0, (x_train, y_train), epochs=3, batchnorm=True)
    b = _train(1, (x_train, y_train), epochs=3, batchnorm=True)
    w_a, w_b = FlatModule(a).flatten(), FlatModule(b).flatten()
    buffers = {k: v.clone() for k, v in a.state_dict().items() if "running" in k or "tracked" in k}
    line = straight_line(w_a, w_b, 3)
    with pytest.raises(ValueError, match="BatchNorm"):
        evaluate_path(a, line, (x_test, y_test))
    bn_batches = [x_train[:500], x_train[500:1000]]
    ev = evaluate_path(a, line, (x_test, y_test), bn_inputs=bn_batches)

    # Reference: a copy at the midpoint whose BatchNorm sees the same 1000 inputs at once.
    ref = copy.deepcopy(a)
    FlatModule(ref).write(line[1])
    bn = ref[1]
    h = ref[0](x_train[:1000]).detach()
    with torch.no_grad():
        bn.running_mean.copy_(h.mean(0))
        bn.running_var.copy_(h.var(0, unbiased=True))
        out = ref.eval()(x_test)
    assert float(ev.loss[1]) == pytest.approx(
        float(nn.functional.cross_entropy(out, y_test)), rel=1e-4
    )
    for k, v in a.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k
    assert a[1].momentum == 0.1 and not a.training


def test_compare_paths_report_json_plot_and_endpoint_check(tmp_path, digits, pair):
    _, test = digits
    a, b = pair
    w_a, w_b = FlatModule(a).flatten(), FlatModule(b).flatten()
    curve = QuadraticBezier(w_a, 0.5 * (w_a + w_b) + 0.01, w_b)
    report = compare_paths(
        a,
        {"bezier": curve.sample(5), "line": straight_line(w_a, w_b, 3)},
        test,
        metadata={"note": "test"},
    )
    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert set(data["paths"]) == {"bezier", "line"}
    assert data["paths"]["line"]["barrier"] == pytest.approx(report["line"].barrier)
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert "line" in report.table()
    png = report.plot(tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="does not share its endpoints"):
        compare_paths(
            a, {"line": straight_line(w_a, w_b, 3), "other": torch.stack([w_b, w_a])}, test
        )
    with pytest.raises(ValueError, match="n >= 2|shape"):
        evaluate_path(a, w_a, test)
    with pytest.raises(ValueError, match="the network has"):
        evaluate_path(a, torch.zeros(3, 7), test)


# ------------------------------------------------------------------ Bézier
def test_bezier_curve_passes_through_its_endpoints_with_the_right_midpoint():
    w_a, c, w_b = torch.randn(6), torch.randn(6), torch.randn(6)
    curve = QuadraticBezier(w_a, c, w_b)
    assert torch.allclose(curve.point(0.0), w_a) and torch.allclose(curve.point(1.0), w_b)
    assert torch.allclose(curve.point(0.5), (w_a + 2 * c + w_b) / 4)
    pts = curve.sample(4)
    assert pts.shape == (4, 6) and torch.allclose(pts[1], curve.point(1 / 3))


def test_garipov_schedule():
    assert garipov_learning_rate(1.0, 0.3) == 1.0
    assert garipov_learning_rate(1.0, 0.7) == pytest.approx(1 - 0.99 * 0.5)
    assert garipov_learning_rate(1.0, 0.95) == pytest.approx(0.01)


def test_fit_bezier_lowers_the_loss_along_the_curve_and_resumes_from_a_checkpoint(
    tmp_path, monkeypatch, digits, pair
):
    train, _ = digits
    a, b = pair
    w_a, w_b = FlatModule(a).flatten(), FlatModule(b).flatten()
    curve = fit_bezier(a, b, train, epochs=4, lr=0.05, seed=3)
    line = QuadraticBezier(w_a, 0.5 * (w_a + w_b), w_b)  # the untrained start: the segment
    trained = evaluate_path(a, curve.sample(9), train).loss.mean()
    straight = evaluate_path(a, line.sample(9), train).loss.mean()
    assert trained < 0.7 * straight, (float(trained), float(straight))
    assert torch.equal(curve.w_a, w_a) and torch.equal(curve.w_b, w_b)

    # Interrupt a run after its second checkpoint, then resume it.
    ckpt = tmp_path / "bezier.pt"
    save = bezier_module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        if kwargs["step"] == 2:  # the epoch count just written
            raise KeyboardInterrupt

    monkeypatch.setattr(bezier_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fit_bezier(a, b, train, epochs=4, lr=0.05, seed=3, checkpoint=ckpt)
    monkeypatch.setattr(bezier_module, "save_checkpoint", save)
    saved = load_checkpoint(ckpt)
    assert saved.step == 2 and len(saved.state["losses"]) == 2
    assert saved.state["losses"] == pytest.approx(curve.losses[:2], rel=1e-5)
    resumed = fit_bezier(a, b, train, epochs=4, lr=0.05, seed=3, checkpoint=ckpt)
    assert torch.allclose(resumed.control, curve.control, atol=1e-6)
    assert resumed.losses == pytest.approx(curve.losses, rel=1e-5)
    with pytest.raises(ValueError, match="other endpoints"):
        fit_bezier(b, a, train, epochs=4, lr=0.05, checkpoint=ckpt)
    with pytest.raises(ValueError, match="schedule would differ"):
        fit_bezier(a, b, train, epochs=8, lr=0.05, checkpoint=ckpt)
    with pytest.raises(SettingsMismatchError, match=r"its seed is 3, this call's is 4"):
        fit_bezier(a, b, train, epochs=4, lr=0.05, seed=4, checkpoint=ckpt)


def test_fit_bezier_rejects_different_architectures(digits):
    a = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    b = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 11))
    with pytest.raises(ValueError, match=r"2\.weight"):
        fit_bezier(a, b, digits[0], epochs=1)


def test_math_sanity_of_fixture(pair, digits):
    _, (x_test, y_test) = digits
    for net in pair:
        with torch.no_grad():
            acc = float((net(x_test).argmax(1) == y_test).double().mean())
        assert acc > 0.9 and math.isfinite(acc)
