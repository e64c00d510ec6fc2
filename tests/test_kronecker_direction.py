"""FIP's Kronecker route (riemfip.optim.kronecker_direction): where KFAC is exact it takes the
exact FIP step; its thin factors are the full ones; the factors are rebuilt on schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from dense_reference import flat_weights
from torch import nn

from manifolds import PullbackMetric
from manifolds.kronecker_eigenbasis import eigenbasis_metric
from manifolds.kronecker_metric import KroneckerMetric
from manifolds.layer_jacobian import module_jacobian
from riemfip.optim import FIP, AnchorSampling, Kronecker, PullBack

EXACT = AnchorSampling(batch=None, transform=None, outputs=None, holdout_fraction=0.0)


def linear_task(d_in: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Linear(d_in, 3).double()
    anchors = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    xb = torch.randn(40, d_in, generator=gen, dtype=torch.float64)
    yb = torch.randint(3, (40,), generator=gen)
    return net, anchors, xb, yb


def step_on(net, opt, xb, yb):
    opt.zero_grad()
    nn.functional.cross_entropy(net(xb), yb).backward()
    opt.step()


@pytest.mark.parametrize("corrected", [True, False], ids=["ekfac", "kfac"])
@pytest.mark.parametrize("d_in, n", [(4, 30), (20, 6)], ids=["full-factor", "thin-factor"])
def test_on_one_linear_layer_the_kronecker_direction_is_the_exact_natural_direction(
    d_in, n, corrected
):
    """One affine layer, Euclidean outputs: dF_bc/dz_b = N^{-1/2} e_c does not depend on the
    sample, so A (x) G = J^T J and lam (A (x) G + lam I)^{-1} grad = FIP.natural_direction."""
    net, anchors, xb, yb = linear_task(d_in, n)
    opt = FIP(
        net.parameters(),
        lr=0.3,
        model=net,
        anchor_inputs=anchors,
        anchors=EXACT,
        pullback=PullBack(strength=0.0),
        curvature=Kronecker(refresh=1, corrected=corrected),
    )
    with torch.no_grad():  # away from the weights where the damping was set
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for _ in range(3):
        w = flat_weights(net)
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        expected = opt.natural_direction(w, grad)
        opt.step()
        assert torch.allclose(flat_weights(net) - w, -0.3 * expected, rtol=1e-9, atol=1e-12)
        assert abs(opt.last_info[0].kept_fraction - float(expected.norm() / grad.norm())) < 1e-9
    (block,) = opt.state[net.weight]["kronecker"].blocks
    assert block.u_a.shape == (d_in + 1, min(n, d_in + 1))  # thin: from the anchors' Gram


@pytest.mark.parametrize("batch", [None, 4], ids=["all-anchors", "batch"])
def test_on_one_linear_layer_the_kronecker_route_takes_the_exact_fip_step_with_pull_back(batch):
    """With the pull-back on, -(A (x) G + lam I)^{-1} J^T r = -J^T (JJ^T + lam I)^{-1} r (push
    through), so the whole step, capped the same way, is the exact route's, step after step;
    both take the all-anchor pull-back on the same steps: every second step with an anchor
    batch, never without one (it changes the path only in the first case)."""
    net, anchors, xb, yb = linear_task(5, 24, seed=1)
    start = copy.deepcopy(net)
    sampling = AnchorSampling(batch=batch, transform=None, outputs=None, holdout_fraction=0.0)

    def run(pullback, curvature=None):
        model = copy.deepcopy(start)
        opt = FIP(
            model.parameters(),
            lr=0.5,
            model=model,
            anchor_inputs=anchors,
            anchors=sampling,
            momentum=0.5,
            pullback=pullback,
            curvature=curvature,
        )
        path = []
        for _ in range(6):
            step_on(model, opt, xb, yb)
            path.append(flat_weights(model))
        return path, opt.last_info[0]

    kfac, kfac_info = run(PullBack(every=2), Kronecker(1))
    exact, exact_info = run(PullBack(every=2))
    for a, b in zip(kfac, exact, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert kfac_info.correction_norm > 0
    assert kfac_info.drift.divergence == pytest.approx(exact_info.drift.divergence, rel=1e-8)
    without, _ = run(PullBack(all_anchors=False), Kronecker(1))
    moved_by_all_anchors = float((without[-1] - kfac[-1]).norm())
    if batch is None:
        assert moved_by_all_anchors == 0.0
    else:
        assert moved_by_all_anchors > 1e-6


def test_thin_factors_are_the_full_factors():
    """Factors seen through fewer rows than their side (few anchor patches for a wide layer,
    few output gradients for a wide output, a BatchNorm's few Jacobian rows), eigendecomposed
    through the rows' Gram matrix, give the same products and damped solves as the full
    factors of KroneckerMetric.from_jacobian."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 20),
        nn.Tanh(),
        nn.Linear(20, 2),
    ).double()
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    metric = PullbackMetric.from_module(net, x)
    w = metric.module.flatten()
    jac = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
    eig, full = eigenbasis_metric(jac), KroneckerMetric.from_jacobian(jac)
    conv, bn, lin1, lin2 = eig.blocks
    assert conv.u_a.shape[0] == 28 and conv.u_g.shape[0] == 8  # 48 patches, 96 rows: full
    assert bn.u.shape[1] <= 6  # 3 samples x 2 outputs rows, 16 parameters
    assert lin1.u_a.shape[1] <= 3 and lin1.u_g.shape[1] <= 6  # 3 inputs of 129, 6 rows of 20
    assert lin2.u_a.shape[1] <= 3 and lin2.u_g.shape == (2, 2)
    v = torch.randn(2, eig.dim, dtype=torch.float64)
    lam = 0.01 * full.trace() / full.dim
    assert eig.trace() == pytest.approx(full.trace(), rel=1e-10)
    assert torch.allclose(eig.matvec(v), full.matvec(v), rtol=1e-9, atol=1e-12)
    assert torch.allclose(eig.solve(v, lam), full.solve(v, lam), rtol=1e-8, atol=1e-10)


def test_corrected_eigenvalues_are_the_exact_curvature_of_each_basis_direction():
    """EKFAC: for each direction V = u^G_i u^A_j^T of a layer's Kronecker eigenbasis (a
    convolution with T > 1 positions and Linear layers), S_ij = |J V|^2, the exact metric's
    quadratic form; KFAC's s^G_i s^A_j differs from it on a multi-layer network."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 6),
        nn.Tanh(), nn.Linear(6, 3),
    ).double()  # fmt: skip
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    metric = PullbackMetric.from_module(net, x)
    w = metric.module.flatten()
    jac = module_jacobian(metric.module, metric.inputs, w, metric.output_metric)
    corrected, plain = eigenbasis_metric(jac, corrected=True), eigenbasis_metric(jac)
    differs = 0.0
    for block, kfac_block in zip(corrected.blocks, plain.blocks, strict=True):
        q, r = block.eigenvalues.shape
        for i, j in [(0, 0), (q - 1, r - 1), (q // 2, r // 3)]:
            v = torch.zeros(1, corrected.dim, dtype=torch.float64)
            block.slots.add_to((block.u_g[:, i : i + 1] @ block.u_a[:, j : j + 1].T)[None], v)
            exact = float(jac.jvp(v).pow(2).sum())
            assert block.eigenvalues[i, j] == pytest.approx(exact, rel=1e-9, abs=1e-12)
            differs = max(differs, abs(float(kfac_block.eigenvalues[i, j]) - exact))
    assert differs > 1e-3


def test_the_factors_are_rebuilt_every_refresh_steps_and_kept_in_between(monkeypatch):
    """refresh=3: the factored Jacobian is computed on steps 1, 4, 7 only, and the same
    metric object serves the steps in between."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    anchors = torch.randn(40, 6, dtype=torch.float64)
    xb, yb = torch.randn(32, 6, dtype=torch.float64), torch.randint(4, (32,))
    calls = []
    real = PullbackMetric.jacobian_operator
    monkeypatch.setattr(PullbackMetric, "jacobian_operator", lambda *a: calls.append(1) or real(*a))
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=anchors,
        anchors=AnchorSampling(batch=8),
        curvature=Kronecker(refresh=3),
    )
    state = opt.state[net[0].weight]
    built, metrics = [], []
    for step in range(1, 8):
        before = len(calls)
        step_on(net, opt, xb, yb)
        if len(calls) > before:
            built.append(step)
        metrics.append(state["kronecker"])
        assert state["kronecker_step"] == 1 + 3 * ((step - 1) // 3)
    assert built == [1, 4, 7]
    assert metrics[0] is metrics[1] is metrics[2] is not metrics[3]
    assert metrics[3] is metrics[5] is not metrics[6]


@pytest.mark.parametrize(
    "pull_every, drawn", [(1, [1, 2, 3, 4, 5, 6, 7]), (2, [1, 3, 4, 6, 7]), (None, [1, 4, 7])]
)
def test_anchors_are_drawn_only_on_refresh_and_pull_back_steps(monkeypatch, pull_every, drawn):
    """refresh=3: the step's anchors are drawn (and their neighbourhoods scored by the frozen
    network) on refresh steps and every pull_every-th step after one; the other steps take
    the Kronecker direction and nothing else from the anchors."""
    from riemfip.optim.anchored import PathOptimizer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    anchors = torch.randn(40, 6, dtype=torch.float64)
    xb, yb = torch.randn(32, 6, dtype=torch.float64), torch.randint(4, (32,))
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=anchors,
        anchors=AnchorSampling(batch=8),
        curvature=Kronecker(refresh=3, pull_every=pull_every),
    )
    steps = []
    real = PathOptimizer._step_anchors
    monkeypatch.setattr(
        PathOptimizer,
        "_step_anchors",
        lambda self, g: steps.append(self.state[g.key]["step"]) or real(self, g),
    )
    for _ in range(7):
        step_on(net, opt, xb, yb)
    assert steps == drawn


def test_kronecker_route_keeps_old_outputs_better_than_sgd():
    """A few Kronecker-route steps on a new task move held-out anchor outputs far less than
    SGD steps of the same learning rate."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    anchors = torch.randn(60, 6, dtype=torch.float64)
    held = anchors + 0.1 * torch.randn_like(anchors)
    xb = torch.randn(64, 6, dtype=torch.float64) + 2.0
    yb = torch.randint(4, (64,))
    base = copy.deepcopy(net)
    sgd_net = copy.deepcopy(net)
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=0.2)
    opt = FIP(net.parameters(), lr=0.2, model=net, anchor_inputs=anchors, curvature=Kronecker())
    for _ in range(15):
        step_on(net, opt, xb, yb)
        step_on(sgd_net, sgd, xb, yb)
    with torch.no_grad():
        moved = float((net(held) - base(held)).pow(2).mean())
        moved_sgd = float((sgd_net(held) - base(held)).pow(2).mean())
    assert moved < 0.2 * moved_sgd


def test_bad_curvature_options_are_rejected():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="refresh"):
        Kronecker(refresh=0)
    with pytest.raises(ValueError, match="pull_every"):
        Kronecker(pull_every=0)
    with pytest.raises(TypeError, match="curvature"):
        FIP(net.parameters(), model=net, anchor_inputs=torch.randn(10, 3), curvature="kfac")


def test_state_dict_round_trip_reproduces_the_next_steps():
    """A run resumed from state_dict (mid-way between refreshes) takes the same steps: the
    factors, the step of their last refresh, the anchor order and the generator are saved."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    anchors = torch.randn(40, 6, dtype=torch.float64)
    xb, yb = torch.randn(32, 6, dtype=torch.float64), torch.randint(4, (32,))

    def make(model):
        return FIP(
            model.parameters(),
            model=model,
            anchor_inputs=anchors,
            anchors=AnchorSampling(batch=8),
            curvature=Kronecker(refresh=3),
        )

    opt = make(net)
    for _ in range(4):
        step_on(net, opt, xb, yb)
    saved = copy.deepcopy(opt.state_dict())
    resumed_net = copy.deepcopy(net)
    resumed = make(resumed_net)
    resumed.load_state_dict(saved)
    for _ in range(4):
        step_on(net, opt, xb, yb)
        step_on(resumed_net, resumed, xb, yb)
        assert torch.equal(flat_weights(net), flat_weights(resumed_net))
