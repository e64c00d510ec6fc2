"""No tensor is made on the default device behind the caller's back.

Every routine must put what it creates on the device of its inputs (or, for values bound
for NumPy, SciPy or a record, on the CPU by name). The check: run it once normally and
once with PyTorch's default device set to ``meta`` (``with torch.device("meta")``) while
every input stays on the CPU. A factory call without ``device=`` then makes a meta tensor
(no data), so the routine either fails (mixing it with real data, or reading it) or
returns a meta tensor; a device-clean routine returns the same values bit for bit. On a
GPU the same omission would put a tensor on the CPU next to CUDA data.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from manifolds import KroneckerMetric, PullbackMetric, WeightSpace
from manifolds.geodesic import relax, relax_minibatches, shoot
from riemfip.applications.continual import run_continual
from riemfip.connectivity import connect, evaluate_path, fit_bezier
from riemfip.data import Dataset, split_tasks
from riemfip.optim import FIP, AnchorSampling, FIPPenalty, Kronecker

DTYPE = torch.float64


def tensors(result) -> list[torch.Tensor]:
    """The tensors a routine returned (paths by their points)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in tensors(item)]
    for name in ("points", "values", "solution"):
        if hasattr(result, name):
            return tensors(getattr(result, name))
    return []


def same_on_a_meta_default(fn) -> None:
    """``fn()`` returns the same CPU tensors with the default device set to ``meta``."""
    reference = tensors(fn())
    assert reference, "the routine returned no tensor to compare"
    with torch.device("meta"):
        again = tensors(fn())
    assert [t.device.type for t in again] == ["cpu"] * len(reference)
    for a, b in zip(reference, again, strict=True):
        assert torch.equal(a, b)


def test_the_check_catches_a_tensor_made_on_the_default_device():
    x = torch.ones(3)

    def careless():
        return x + torch.zeros(3)  # no device=: made on the default device

    def careful():
        return x + torch.zeros(3, device=x.device)

    same_on_a_meta_default(careful)
    with pytest.raises((AssertionError, RuntimeError, NotImplementedError)):
        same_on_a_meta_default(careless)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)
    ).to(DTYPE)
    net.eval()
    x = torch.randn(12, 1, 6, 6, dtype=DTYPE)
    metric = PullbackMetric.from_module(net, x, output_metric="fisher", damping=1e-2)
    w = metric.module.flatten()
    v = torch.randn(w.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    return net, x, metric, w, v


@pytest.mark.parametrize(
    "name",
    ["matvec", "solve", "spectrum", "acceleration", "expmap", "kronecker", "relax", "shoot"],
)
def test_metric_and_geodesics(problem, name):
    net, x, metric, w, v = problem
    calls = {
        "matvec": lambda: metric.matvec(w, v),
        "solve": lambda: metric.solve(w, v),
        "spectrum": lambda: metric.spectrum(w, 3).eigenvalues,
        "acceleration": lambda: metric.acceleration(w, v),
        "expmap": lambda: WeightSpace(metric).expmap(w, 1e-3 * v),
        "kronecker": lambda: KroneckerMetric.from_jacobian(metric.jacobian_operator(w)).solve(
            v, 0.1
        ),
        "relax": lambda: relax(metric, w, w + 0.05 * v, 5, maxiter=3),
        "shoot": lambda: shoot(metric, w, w + 1e-3 * v, jacobian="krylov", maxiter=2, steps=4),
    }
    same_on_a_meta_default(calls[name])


def test_minibatch_relax(problem):
    net, x, metric, w, v = problem

    def metric_of(xb):
        return PullbackMetric.from_module(net, xb, output_metric="fisher", damping=1e-2)

    same_on_a_meta_default(lambda: relax_minibatches(metric_of, w, w + 0.01 * v, x, 5))


@pytest.mark.parametrize(
    "make",
    [
        lambda n, x: FIP(n.parameters(), model=n, anchor_inputs=x),
        lambda n, x: FIP(
            n.parameters(), model=n, anchor_inputs=x, anchors=AnchorSampling(batch=4, outputs=2)
        ),
        lambda n, x: FIP(n.parameters(), model=n, anchor_inputs=x, curvature=Kronecker(refresh=3)),
        lambda n, x: FIPPenalty(n.parameters(), model=n, anchor_inputs=x),
    ],
    ids=["fip", "fip-sketched", "fip-kronecker", "penalty"],
)
def test_path_optimizers(problem, make):
    net, x, *_ = problem

    def run():
        model = copy.deepcopy(net)
        opt = make(model, x)
        for _ in range(11):  # past the all-anchor pull-back of step 10
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        return list(model.parameters())

    same_on_a_meta_default(run)


def test_connect_bezier_and_evaluation(problem):
    net, x, *_ = problem
    y = torch.arange(12) % 4
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, dtype=DTYPE, generator=torch.Generator()))
    path = connect(net, other, x, n_points=5, maxiter=3)
    same_on_a_meta_default(lambda: connect(net, other, x, n_points=5, maxiter=3))
    same_on_a_meta_default(lambda: fit_bezier(net, other, (x, y), epochs=1, batch_size=6).control)
    same_on_a_meta_default(
        lambda: evaluate_path(net, path, (x, y), bn_inputs=x, batch_size=5).accuracy
    )


@pytest.mark.parametrize("method", ["replay", "ewc", "fip", "gpm"])
def test_continual_methods(method):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(160, 8, generator=gen)
    y = torch.arange(160) % 4
    data = Dataset(x[:120], y[:120], x[120:], y[120:], num_classes=4, name="toy")
    tasks = split_tasks(data, [[0, 1], [2, 3]], relabel=False)

    def model_fn():
        with torch.device("cpu"):  # the user's model, made on the CPU where the data is
            return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def run():
        result = run_continual(
            tasks, method, model_fn, scenario="class", epochs=1, memory_per_class=10,
            progress=False,
        )  # fmt: skip
        return torch.tensor(result.accuracy, device="cpu")

    same_on_a_meta_default(run)
