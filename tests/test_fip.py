"""Tests of the FIP optimizer on a tiny two-task problem (Gaussian blobs, shared 4-way head).

Task A: classes 0-1; task B: classes 2-3. The network is trained on A, the FIP
anchor is stored A inputs, and the secondary objective is cross-entropy on B.
Everything runs in float64 so that comparisons with dense references are tight.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from dense_reference import flat_weights
from torch import nn

from manifolds import MixedPrecision, PullbackMetric, WeightSpace, flat_parameter
from riemfip.optim import (
    FIP,
    AnchorSampling,
    BatchNormWarning,
    DriftGuard,
    Exact,
    FIPPenalty,
    GaussianNoise,
    NeighbourNoise,
    PullBack,
    RandomShift,
    batchnorm_eval,
)
from riemfip.optim.anchor import holdout_mask

DIM, CLASSES = 6, 4
#: The exact per-step FIP: every fit anchor, as a point, at every step.
EXACT = AnchorSampling(batch=None, transform=None, outputs=None)


def blobs(n_per_class: int, classes, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123)) * 2.5
    xs, ys = [], []
    for c in classes:
        xs.append(centers[c] + torch.randn(n_per_class, DIM, generator=gen))
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs).double(), torch.cat(ys)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, CLASSES)
    ).double()


@pytest.fixture(scope="module")
def task():
    """A network trained on task A, stored A anchors, held-out A inputs and task-B data."""
    xa, ya = blobs(100, (0, 1), seed=1)
    xb, yb = blobs(100, (2, 3), seed=2)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xa), ya).backward()
        opt.step()
    anchors = torch.cat([xa[:30], xa[100:130]])
    test_a, _ = blobs(200, (0, 1), seed=3)
    return {"net": net, "anchors": anchors, "xb": xb, "yb": yb, "test_a": test_a}


def new_task_backward(net, task):
    loss = nn.functional.cross_entropy(net(task["xb"]), task["yb"])
    loss.backward()
    return float(loss.detach())


def fip_on_new_task(net, opt, task, steps=40):
    """``steps`` steps of ``opt`` on the new task; the losses before each step."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(new_task_backward(net, task))
        opt.step()
    return losses


def sgd_on_new_task(base, task, lr=0.5, steps=40):
    """A copy of ``base`` after ``steps`` plain SGD steps on the new task: what FIP is
    compared with."""
    net = copy.deepcopy(base)
    sgd = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        sgd.zero_grad()
        new_task_backward(net, task)
        sgd.step()
    return net


def held_out_change(net, w0_net, x):
    """Mean squared change of the logits on ``x``."""
    with torch.no_grad():
        return float((net(x) - w0_net(x)).pow(2).sum(1).mean())


# --------------------------------------------------------------------- the math
def test_natural_direction_is_metric_solve_and_dense_natural_gradient(task):
    """The per-step direction is lambda g^{-1} grad for the anchor metric at the current
    weights: PullbackMetric.solve on the same anchors and the dense solve agree with it; the
    pull-back is J^T (JJ^T + lambda)^{-1} r."""
    x = task["anchors"]
    for metric_name in ("euclidean", "fisher"):
        net = copy.deepcopy(task["net"])
        opt = FIP(
            net.parameters(),
            model=net,
            anchor_inputs=x,
            output_metric=metric_name,
            anchors=AnchorSampling(holdout_fraction=0.0),
        )
        with torch.no_grad():  # move away from where the damping was set
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        w = flat_weights(net)
        metric = opt.manifold().metric
        lam = opt.damping_of()
        assert metric.damping == lam
        jac = metric.jacobian(w)
        g = jac.T @ jac + lam * torch.eye(w.numel(), dtype=w.dtype)
        grad = torch.randn(w.numel(), dtype=w.dtype)
        r = torch.randn(jac.shape[0], dtype=w.dtype)
        direction = opt.natural_direction(w, grad)
        expected = lam * torch.linalg.solve(g, grad)
        assert torch.allclose(direction, expected, rtol=1e-6, atol=1e-9 * float(grad.norm()))
        via_solve = lam * metric.solve(w, grad, method="dense")
        assert torch.allclose(direction, via_solve, rtol=1e-6, atol=1e-9 * float(grad.norm()))
        pull = jac.T @ torch.linalg.solve(jac @ jac.T + lam * torch.eye(len(r), dtype=w.dtype), r)
        step = metric.output_gram(w).least_squares_step(r)
        assert torch.allclose(step, pull, rtol=1e-6, atol=1e-9)


def test_relative_damping_is_set_from_the_mean_eigenvalue_at_the_start(task):
    net, x = copy.deepcopy(task["net"]), task["anchors"]
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=x,
        output_metric="fisher",
        anchors=AnchorSampling(holdout_fraction=0.0),
    )
    jac = PullbackMetric.from_module(net, x, output_metric="fisher").jacobian(flat_weights(net))
    dense = torch.linalg.eigvalsh(jac @ jac.T)
    assert math.isclose(opt.damping_of(), 1e-2 * float(dense.sum()) / jac.shape[0], rel_tol=1e-9)
    # with more than 64 fit anchors the mean is taken over 64 evenly spread ones
    many = torch.cat([x, x + 0.1])
    opt = FIP(net.parameters(), model=net, anchor_inputs=many, anchors=EXACT, damping=3e-2)
    fit = opt.anchor.fit_inputs
    assert len(fit) > 64
    sample = fit[torch.linspace(0, len(fit) - 1, 64).long()]
    jac = PullbackMetric.from_module(net, sample).jacobian(flat_weights(net))
    assert math.isclose(
        opt.damping_of(), 3e-2 * float(jac.pow(2).sum()) / jac.shape[0], rel_tol=1e-9
    )


def test_spectrum_matches_dense_eigenpairs(task):
    """PullbackMetric.spectrum: the top-k eigenpairs of g from the output-space Gram and by
    Lanczos equal the dense ones; fraction() is the share of a direction in their span."""
    net, x = task["net"], task["anchors"][:12]
    w = flat_weights(net)
    for damping in (0.0, 1e-2):
        metric = PullbackMetric.from_module(net, x, output_metric="fisher", damping=damping)
        evals, evecs = torch.linalg.eigh(metric.dense(w))
        evals, evecs = evals.flip(0), evecs.flip(1)
        for route in ("gram", "lanczos"):
            metric.output_max = 10_000 if route == "gram" else 0
            spec = metric.spectrum(w, 6)
            assert spec.rank == 6
            torch.testing.assert_close(spec.eigenvalues, evals[:6], rtol=1e-8, atol=1e-10)
            overlap = (spec.eigenvectors.T @ evecs[:, :6]).abs()
            torch.testing.assert_close(overlap.diagonal(), torch.ones(6, dtype=w.dtype))
            v = evecs[:, 2] + evecs[:, 40]
            assert spec.fraction(v) == pytest.approx(0.5, abs=1e-8)


def test_holdout_mask_spreads_evenly():
    mask = holdout_mask(50, 0.2)
    assert int(mask.sum()) == 10
    assert int(mask[:25].sum()) == 5  # class-ordered inputs lose the same share of each half


# --------------------------------------------------------------------- defining property
def test_one_step_moves_held_out_predictions_far_less_than_sgd(task):
    """A FIP step changes held-out anchor-task outputs < 1/5 as much as an SGD step of the
    same Euclidean length along the plain gradient."""
    base = task["net"]
    net_fip = copy.deepcopy(base)
    opt = FIP(net_fip.parameters(), model=net_fip, anchor_inputs=task["anchors"])
    new_task_backward(net_fip, task)
    grad = torch.cat([p.grad.reshape(-1) for p in net_fip.parameters()])
    w0 = flat_weights(net_fip)
    opt.step()
    length = float((flat_weights(net_fip) - w0).norm())
    assert length > 0

    net_sgd = copy.deepcopy(base)
    with torch.no_grad():
        offset = 0
        for p in net_sgd.parameters():
            n = p.numel()
            p.sub_(length * grad[offset : offset + n].view_as(p) / grad.norm())
            offset += n
    fip_change = held_out_change(net_fip, base, task["test_a"])
    sgd_change = held_out_change(net_sgd, base, task["test_a"])
    assert fip_change < sgd_change / 5, (fip_change, sgd_change)
    info = opt.last_info[0]  # the default growth rule may halve a first step
    assert info.accepted and 0 < info.scale <= 1 and info.shrunk == (info.scale < 1)
    assert 0 < info.kept_fraction < 1


def test_path_learns_new_task_and_keeps_old_outputs(task):
    """Over 40 steps FIP lowers the new-task loss while held-out old-task predictions stay."""
    base = task["net"]
    net = copy.deepcopy(base)
    opt = FIP(net.parameters(), model=net, anchor_inputs=task["anchors"], lr=0.5)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        losses.append(new_task_backward(net, task))
        opt.step()
        info = opt.last_info[0]
        # bounded steps: |lambda g^-1 grad| <= |grad|, so |step| <= lr |grad| + |pull-back|
        assert info.step_norm <= (0.5 * info.grad_norm + info.correction_norm) * (1 + 1e-9)
    assert losses[-1] < 0.5 * losses[0]

    net_sgd = sgd_on_new_task(base, task)
    x = task["test_a"]
    with torch.no_grad():
        keep = float((net(x).argmax(1) == base(x).argmax(1)).double().mean())
        keep_sgd = float((net_sgd(x).argmax(1) == base(x).argmax(1)).double().mean())
    assert keep >= 0.97, keep
    assert keep_sgd < 0.6, keep_sgd  # the problem forgets without FIP
    assert held_out_change(net, base, x) < held_out_change(net_sgd, base, x) / 20
    assert opt.last_info[0].drift.agreement >= 0.97


def test_noisy_anchors_keep_unseen_old_inputs_better(task):
    """With ``anchor_transform=GaussianNoise`` the metric covers a neighbourhood of each
    anchor: held-out old-task outputs move less than with the bare anchors, and the new
    task is still learnt."""
    changes = []
    for transform in (None, GaussianNoise(0.3)):
        net = copy.deepcopy(task["net"])
        opt = FIP(
            net.parameters(),
            model=net,
            anchor_inputs=task["anchors"],
            lr=0.5,
            anchors=AnchorSampling(transform=transform),
        )
        losses = fip_on_new_task(net, opt, task, steps=40)
        assert losses[-1] < 0.1 * losses[0]
        changes.append(held_out_change(net, task["net"], task["test_a"]))
    assert changes[1] < 0.6 * changes[0], changes


def test_anchor_batches_visit_every_fit_anchor_once_per_pass(task):
    """With ``anchor_batch`` each step's fit batch is a slice of a random order of the fit
    anchors, paired with their own frozen outputs, and a pass covers each anchor once."""
    net = copy.deepcopy(task["net"])
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=task["anchors"],
        anchors=AnchorSampling(batch=12, transform=None),
    )
    fit_x, fit_y = opt.anchor.fit_inputs, opt.anchor.fit_outputs
    assert len(fit_x) == 48
    for _ in range(2):  # two passes
        seen = []
        for _ in range(4):
            x, y0 = opt._step_anchors(opt._groups[0])
            assert x.shape == (12, DIM)
            rows = torch.cdist(x, fit_x).argmin(1)
            assert torch.equal(fit_x[rows], x) and torch.equal(fit_y[rows], y0)
            seen.append(rows)
        assert sorted(torch.cat(seen).tolist()) == list(range(48))


def test_anchor_batches_keep_old_outputs(task):
    """Solving each step with 12 of the 48 fit anchors (rotating) still learns the new task
    and keeps held-out old-task predictions, far better than SGD."""
    base = task["net"]
    net = copy.deepcopy(base)
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=task["anchors"],
        lr=0.5,
        anchors=AnchorSampling(batch=12),
    )
    losses = fip_on_new_task(net, opt, task, steps=40)
    assert losses[-1] < 0.5 * losses[0]
    net_sgd = sgd_on_new_task(base, task)
    x = task["test_a"]
    with torch.no_grad():
        keep = float((net(x).argmax(1) == base(x).argmax(1)).double().mean())
    assert keep >= 0.95, keep
    assert held_out_change(net, base, x) < held_out_change(net_sgd, base, x) / 10


def test_correct_all_pulls_every_fit_anchor_back(task):
    """With ``anchor_batch`` the Levenberg–Marquardt pull-back only sees this step's anchors;
    ``correct_all`` adds a Cauchy step on all fit anchors, so a step with no secondary
    gradient lowers the drift of the whole fit set further."""

    def fit_drift(net, opt):
        with torch.no_grad():
            return float((net(opt.anchor.fit_inputs) - opt.anchor.fit_outputs).pow(2).sum())

    drifts = []
    for correct_all in (False, True):
        net = copy.deepcopy(task["net"])
        opt = FIP(
            net.parameters(),
            model=net,
            anchor_inputs=task["anchors"],
            anchors=AnchorSampling(batch=12, transform=None),
            pullback=PullBack(all_anchors=correct_all, every=1),
        )
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        before = fit_drift(net, opt)
        opt.zero_grad()
        (0.0 * net(task["xb"]).sum()).backward()
        opt.step()
        drifts.append(fit_drift(net, opt))
    assert drifts[1] < 0.9 * drifts[0] < 0.1 * before, (before, drifts)


def test_the_profiler_sees_each_part_of_a_step_inside_it(task):
    """A step runs its parts under profiler labels (benchmarks/fip_step_anatomy.py reads
    them): each once per step, the all-anchor pull-back on the steps it is due (every
    second one here), and the parts take no more time than the step that holds them."""
    from torch.profiler import ProfilerActivity, profile

    net = copy.deepcopy(task["net"])
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=task["anchors"],
        anchors=AnchorSampling(batch=12),
        pullback=PullBack(every=2),
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fip_on_new_task(net, opt, task, steps=4)
    events = {e.key: e for e in prof.key_averages()}
    step = events["Optimizer.step#FIP.step"]
    assert step.count == 4
    parts = ["riemfip.anchors", "riemfip.direction", "riemfip.drift_guard"]
    for label in [*parts, "riemfip.step_jacobian"]:
        assert events[label].count == 4, label
    assert events["riemfip.all_anchor_pullback"].count == 2
    assert sum(events[label].cpu_time_total for label in parts) <= step.cpu_time_total
    inner = events["riemfip.step_jacobian"].cpu_time_total
    inner += events["riemfip.all_anchor_pullback"].cpu_time_total
    assert inner <= events["riemfip.direction"].cpu_time_total


def test_neighbour_noise_moves_along_neighbour_differences(task):
    """NeighbourNoise (no isotropic part) moves each input within the span of its k nearest
    stored neighbours' differences from it, never toward a farther one, and by about
    scale * rms neighbour distance."""
    stored = task["anchors"]
    k, scale = 3, 0.5
    transform = NeighbourNoise(k=k, scale=scale, inputs=stored)
    gen = torch.Generator().manual_seed(0)
    x = stored[:10]
    moves = []
    for _ in range(200):
        moves.append(transform(x, gen) - x)
    moves = torch.stack(moves, 1)  # (10, draws, DIM)
    dist = torch.cdist(x, stored)
    near = dist.topk(k + 1, largest=False).indices[:, 1:]
    for i in range(len(x)):
        basis = (stored[near[i]] - x[i]).T  # (DIM, k)
        coef = torch.linalg.lstsq(basis, moves[i].T).solution
        assert torch.allclose(basis @ coef, moves[i].T, atol=1e-10)
        expected = scale**2 / k * float(dist[i, near[i]].pow(2).sum())
        assert float(moves[i].pow(2).sum(1).mean()) == pytest.approx(expected, rel=0.25)
    # without stored inputs the neighbours come from the batch itself: the same moves here
    same = NeighbourNoise(k=k, scale=scale)(stored, torch.Generator().manual_seed(1))
    ref = transform(stored, torch.Generator().manual_seed(1))
    assert torch.allclose(same, ref, atol=1e-12)
    with pytest.raises(ValueError, match="k must be"):
        NeighbourNoise(k=len(stored), inputs=stored)


def test_neighbour_noise_as_fip_transform_draws_on_every_fit_anchor_and_no_held_out_one(task):
    """As FIP's anchor transform with an anchor batch, NeighbourNoise without inputs of its own
    takes each batch anchor's neighbours among all fit anchors (not among the batch), and
    never among the held-out anchors; its own inputs are kept; it leaves integer inputs
    alone; a k the fit anchors cannot serve is refused when FIP is built."""
    k, scale = 3, 0.5

    def fip(transform):
        net = copy.deepcopy(task["net"])
        sampling = AnchorSampling(batch=6, transform=transform, seed=4)
        return FIP(net.parameters(), model=net, anchor_inputs=task["anchors"], anchors=sampling)

    opt = fip(NeighbourNoise(k=k, scale=scale))
    fit, held_out = opt.anchor.fit_inputs, opt.anchor.holdout_inputs
    group = opt._groups[0]
    x, _ = opt._step_anchors(group)
    # the same draw as a NeighbourNoise given the fit anchors, not as one given every stored
    # input (held-out ones included)
    draws = []
    for inputs in (fit, task["anchors"]):
        other = fip(NeighbourNoise(k=k, scale=scale, inputs=inputs))
        draws.append(other._step_anchors(other._groups[0])[0])
    assert torch.equal(x, draws[0])
    assert not torch.allclose(x, draws[1])
    assert group.transform.inputs.shape[0] == len(fit) > 6
    assert not any(torch.equal(h, f) for h in held_out for f in group.transform.inputs)
    own = NeighbourNoise(k=k, inputs=task["anchors"])
    assert fip(own)._groups[0].transform is own
    tokens = torch.randint(10, (5, 4))
    assert torch.equal(NeighbourNoise(k=2)(tokens, torch.Generator()), tokens)
    with pytest.raises(ValueError, match="k must be below"):
        fip(NeighbourNoise(k=len(fit)))


def test_random_shift_translates_each_image_by_at_most_max_shift():
    """Each output is its input translated by one offset in [-s, s]^2 (zero fill), and all
    offsets occur."""
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(200, 1, 8, 8, dtype=torch.float64)
    x[:, :, 2:6, 2:6] = torch.rand(200, 1, 4, 4, generator=gen, dtype=torch.float64) + 0.1
    out = RandomShift(1, shape=(8, 8))(x.reshape(200, -1), gen).reshape(x.shape)
    seen = set()
    for i in range(len(x)):
        hits = [
            (sy, sx)
            for sy in (-1, 0, 1)
            for sx in (-1, 0, 1)
            if torch.equal(out[i], torch.roll(x[i], shifts=(sy, sx), dims=(1, 2)))
        ]
        assert len(hits) == 1, i  # the content is away from the border: roll == shift
        seen.add(hits[0])
    assert len(seen) == 9
    edge = torch.ones(1, 4, 4, dtype=torch.float64)
    shifted = RandomShift(1, shape=(4, 4))(edge.repeat(50, 1, 1, 1), gen)
    assert float(shifted.sum()) < 50 * 16  # vacated pixels are zero, not wrapped around


def test_softmax_metric_path_stays_bounded(task):
    """With the Fisher metric the first-order pull-back can be huge where the softmax
    saturates; the trust region keeps the path learning and the old outputs in place."""
    net = copy.deepcopy(task["net"])
    opt = FIP(
        net.parameters(), model=net, anchor_inputs=task["anchors"], lr=0.5, output_metric="fisher"
    )
    losses = fip_on_new_task(net, opt, task, steps=30)
    assert losses[-1] < 0.5 * losses[0]
    assert opt.anchor_drift().agreement >= 0.95
    assert all(math.isfinite(float(p.detach().abs().max())) for p in net.parameters())


def test_drift_budget_is_respected(task):
    budget = 2e-3
    net = copy.deepcopy(task["net"])
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=task["anchors"],
        lr=0.5,
        anchors=EXACT,
        guard=DriftGuard(budget=budget),
    )
    shrunk = 0
    for _ in range(25):
        opt.zero_grad()
        new_task_backward(net, task)
        opt.step()
        info = opt.last_info[0]
        shrunk += info.shrunk
        assert info.drift.divergence <= budget and info.within_budget
        assert opt.anchor_drift().divergence == pytest.approx(info.drift.divergence, rel=1e-12)
    assert shrunk > 0  # the budget was binding, so this test can fail

    free = copy.deepcopy(task["net"])
    opt = FIP(free.parameters(), model=free, anchor_inputs=task["anchors"], lr=0.5, anchors=EXACT)
    for _ in range(25):
        opt.zero_grad()
        new_task_backward(free, task)
        opt.step()
    assert opt.anchor_drift().divergence > budget


def unpulled_fip(net, task, guard: DriftGuard) -> FIP:
    """The exact per-step FIP at lr 0.5 without pull-back: a step is the secondary step alone."""
    return FIP(
        net.parameters(),
        model=net,
        anchor_inputs=task["anchors"],
        lr=0.5,
        anchors=EXACT,
        pullback=PullBack(strength=0.0),
        guard=guard,
    )


def test_growth_rule_takes_the_longest_halving_within_rho_times_the_last_drift(task):
    """With ``DriftGuard(growth=rho, floor=phi)`` each step takes the largest share 2^-k of the
    secondary step whose held-out drift is at most rho * (the last step's drift) + phi * S,
    S the spread of the frozen fit outputs (or 2^-max_backtracks); no pull-back here, so
    the move is that share of the secondary step alone."""
    rho, phi = 1.05, 1e-4
    net = copy.deepcopy(task["net"])
    opt = unpulled_fip(net, task, DriftGuard(growth=rho, floor=phi, max_backtracks=8))
    y0 = opt.anchor.fit_outputs
    spread = float(0.5 * (y0 - y0.mean(0)).pow(2).sum(1).mean())
    last, halved = 0.0, 0
    for _ in range(12):
        opt.zero_grad()
        new_task_backward(net, task)
        w = flat_weights(net)
        opt.step()
        info = opt.last_info[0]
        allowed = rho * last + phi * spread
        move = flat_weights(net) - w
        assert info.drift.divergence == pytest.approx(opt.anchor_drift().divergence, rel=1e-12)
        if info.scale > 2.0**-8:
            assert info.drift.divergence <= allowed
        if info.scale < 1:  # the step twice as long broke the rule
            halved += 1
            assert info.shrunk
            assert opt.anchor_drift(w=w + 2 * move).divergence > allowed
        last = info.drift.divergence
    assert halved > 0  # the rule was binding, so this test can fail


def test_without_a_growth_rule_no_step_is_halved(task):
    net = copy.deepcopy(task["net"])
    opt = unpulled_fip(net, task, DriftGuard())
    for _ in range(12):
        opt.zero_grad()
        new_task_backward(net, task)
        opt.step()
        assert opt.last_info[0].scale == 1.0 and not opt.last_info[0].shrunk


# --------------------------------------------------------------------- state
@pytest.mark.parametrize("mode", ["natural", "penalty", "transform", "batch"])
def test_state_dict_round_trip_reproduces_next_step(task, mode):
    net = copy.deepcopy(task["net"])
    kwargs = dict(model=net, anchor_inputs=task["anchors"])
    if mode == "transform":
        kwargs["anchors"] = AnchorSampling(transform=GaussianNoise(0.3))
    elif mode == "batch":  # the rotation is mid-pass when saved
        kwargs["anchors"] = AnchorSampling(batch=20)
    if mode != "penalty":
        kwargs["momentum"] = 0.5
    kind = FIPPenalty if mode == "penalty" else FIP
    opt = kind(net.parameters(), lr=0.05, **kwargs)
    for _ in range(3):
        opt.zero_grad()
        new_task_backward(net, task)
        opt.step()
    saved_state = copy.deepcopy(opt.state_dict())
    saved_weights = copy.deepcopy(net.state_dict())
    opt.zero_grad()
    new_task_backward(net, task)
    opt.step()
    expected = flat_weights(net)

    net2 = copy.deepcopy(task["net"])
    net2.load_state_dict(saved_weights)
    kwargs["model"] = net2
    opt2 = kind(net2.parameters(), lr=0.05, **kwargs)  # anchors re-frozen at the moved weights...
    opt2.load_state_dict(saved_state)  # ...and restored to the original ones here
    assert torch.equal(opt2.anchor.holdout_outputs, opt.anchor.holdout_outputs)
    opt2.zero_grad()
    new_task_backward(net2, task)
    opt2.step()
    assert torch.equal(flat_weights(net2), expected)
    assert opt2.last_info[0].step == 4


# --------------------------------------------------------------------- modes and groups
def test_penalty_mode_takes_eps_steps_toward_frozen_anchor(task):
    """Penalty mode: steps of Euclidean length lr; with no secondary objective it descends
    the summed divergence to the *frozen* anchor outputs (not the live network)."""
    net = copy.deepcopy(task["net"])
    with torch.no_grad():
        net[0].weight.add_(0.3 * torch.randn_like(net[0].weight))
    opt = FIPPenalty(net.parameters(), model=net, anchor_inputs=task["anchors"], lr=1e-2)
    with torch.no_grad():
        net[0].weight.copy_(task["net"][0].weight)  # anchor was frozen at the perturbed weights
    drift0 = opt.anchor_drift().divergence
    assert drift0 > 1e-5
    for _ in range(5):
        opt.zero_grad()
        (0.0 * net(task["xb"]).sum()).backward()
        w = flat_weights(net)
        opt.step()
        assert float((flat_weights(net) - w).norm()) == pytest.approx(1e-2, rel=1e-9)
    assert opt.anchor_drift().divergence < drift0
    assert opt.output_metric.name == "bhattacharyya"


def test_parameter_groups_move_jointly_within_and_separately_across(task):
    net = copy.deepcopy(task["net"])
    groups = [
        {"params": list(net[0].parameters())},
        {
            "params": list(net[2].parameters()) + list(net[4].parameters()),
            "lr": 1e-9,
        },
    ]
    opt = FIP(
        groups, model=net, anchor_inputs=task["anchors"], lr=0.1, pullback=PullBack(strength=0.0)
    )
    before = [flat_weights(net[i]) for i in (0, 2, 4)]
    opt.zero_grad()
    new_task_backward(net, task)
    opt.step()
    assert len(opt.last_info) == 2
    moved = [
        float((flat_weights(net[i]) - b).norm()) for i, b in zip((0, 2, 4), before, strict=True)
    ]
    assert moved[0] > 1e5 * max(moved[1], moved[2])  # second group's lr is tiny


# --------------------------------------------------------------------- errors
def test_anchor_of_wrong_shape_is_rejected(task):
    net = task["net"]
    with pytest.raises(ValueError, match="anchor_inputs of shape"):
        FIP(net.parameters(), model=net, anchor_inputs=torch.randn(10, DIM + 1).double())
    with pytest.raises(ValueError, match="same shape"):
        FIP(
            net.parameters(),
            model=net,
            anchor_inputs=[torch.randn(5, DIM).double(), torch.randn(5, 2, 3).double()],
        )
    with pytest.raises(ValueError, match="expected a tensor|batch"):
        FIP(net.parameters(), model=net, anchor_inputs=torch.tensor(1.0))


def test_missing_gradients_are_rejected(task):
    net = copy.deepcopy(task["net"])
    opt = FIP(net.parameters(), model=net, anchor_inputs=task["anchors"])
    with pytest.raises(RuntimeError, match="no parameter of group 0 has a gradient"):
        opt.step()


def test_nan_loss_is_rejected_and_weights_untouched(task):
    net = copy.deepcopy(task["net"])
    opt = FIP(net.parameters(), model=net, anchor_inputs=task["anchors"])
    w = flat_weights(net)
    (net(task["xb"]).sum() * float("nan")).backward()
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    assert torch.equal(flat_weights(net), w)
    with pytest.raises(ValueError, match="closure's loss is nan"):
        opt.step(lambda: torch.tensor(float("nan")))


def test_diverging_step_is_refused_and_weights_untouched(task):
    # a finite gradient with a step too large to represent: the overflow is caught before
    # anything is written, and the step count does not advance
    net = copy.deepcopy(task["net"])
    opt = FIP(net.parameters(), lr=1e308, model=net, anchor_inputs=task["anchors"])
    w = flat_weights(net)
    (1e20 * nn.functional.cross_entropy(net(task["xb"]), task["yb"])).backward()
    with pytest.raises(FloatingPointError, match="left as they were"):
        opt.step()
    assert torch.equal(flat_weights(net), w)
    assert opt.state[opt._groups[0].key]["step"] == 0


def test_a_refused_step_leaves_momentum_and_anchor_sampling_as_they_were(task):
    """After a good step, a diverging one changes nothing: the momentum buffer, the step count,
    the anchor order and the generator are restored, so the next step at a sane rate is the
    step an optimizer that never saw the bad one takes."""
    nets = [copy.deepcopy(task["net"]) for _ in range(2)]
    opts = [
        FIP(n.parameters(), lr=0.05, momentum=0.5, model=n, anchor_inputs=task["anchors"],
            anchors=AnchorSampling(batch=20))
        for n in nets
    ]  # fmt: skip
    for net, opt in zip(nets, opts, strict=True):
        opt.zero_grad()
        new_task_backward(net, task)
        opt.step()
    net, opt = nets[0], opts[0]
    key = opt._groups[0].key
    buffer = opt.state[key]["momentum_buffer"].clone()
    order, generator = opt._order.clone(), opt._generator.get_state()
    opt.param_groups[0]["lr"] = 1e308
    opt.zero_grad()
    (1e20 * nn.functional.cross_entropy(net(task["xb"]), task["yb"])).backward()
    with pytest.raises(FloatingPointError, match="step 2 of group 0"):
        opt.step()
    assert torch.equal(opt.state[key]["momentum_buffer"], buffer)
    assert opt.state[key]["step"] == 1
    assert torch.equal(opt._order, order) and torch.equal(opt._generator.get_state(), generator)
    opt.param_groups[0]["lr"] = 0.05
    for net, opt in zip(nets, opts, strict=True):
        opt.zero_grad()
        new_task_backward(net, task)
        opt.step()
    assert torch.equal(flat_weights(nets[0]), flat_weights(nets[1]))


def test_anchor_transform_of_wrong_shape_is_rejected(task):
    net = copy.deepcopy(task["net"])
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=task["anchors"],
        anchors=AnchorSampling(transform=lambda x, g: x[:3]),
    )
    new_task_backward(net, task)
    with pytest.raises(ValueError, match="anchor transform must return"):
        opt.step()


def test_a_step_that_fails_part_way_leaves_the_state_as_it_was(task):
    """An error inside a step (here the second step's anchor transform) restores the step
    count, the anchor order and the generator, as a diverging step does."""
    net = copy.deepcopy(task["net"])
    calls = []

    def transform(x, g):
        calls.append(1)
        noisy = x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype, device=g.device)
        return noisy if len(calls) != 2 else x[:3]

    opt = FIP(
        net.parameters(), model=net, anchor_inputs=task["anchors"],
        anchors=AnchorSampling(batch=20, transform=transform),
    )  # fmt: skip
    new_task_backward(net, task)
    opt.step()
    key = opt._groups[0].key
    order, generator = opt._order.clone(), opt._generator.get_state()
    with pytest.raises(ValueError, match="anchor transform must return"):
        opt.step()
    assert opt.state[key]["step"] == 1
    assert torch.equal(opt._order, order) and torch.equal(opt._generator.get_state(), generator)


def test_group_with_foreign_parameter_is_rejected(task):
    net = task["net"]
    stranger = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        FIP([stranger], model=net, anchor_inputs=task["anchors"])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda net, x: FIP(net.parameters(), lr=-1.0, model=net, anchor_inputs=x), "lr"),
        (
            lambda net, x: FIP(net.parameters(), model=net, anchor_inputs=x, momentum=1.5),
            "momentum",
        ),
        (lambda net, x: DriftGuard(budget=0.0), "budget"),
        (lambda net, x: DriftGuard(growth=0.5), "growth"),
        (lambda net, x: DriftGuard(floor=-1.0), "floor"),
        (lambda net, x: PullBack(strength=2.0), "strength"),
        (lambda net, x: AnchorSampling(holdout_fraction=1.0), "holdout_fraction"),
        (lambda net, x: Exact(refresh=0), "refresh"),
        (
            lambda net, x: FIP(
                net.parameters(), model=net, anchor_inputs=x, output_metric="hamming"
            ),
            "output metric",
        ),
        (lambda net, x: FIP(net.parameters(), model=net), "together"),
    ],
)
def test_bad_options_are_rejected(task, make, match):
    with pytest.raises(ValueError, match=match):
        make(task["net"], task["anchors"])


def test_exact_refresh_keeps_a_steps_anchors_and_metric_and_remeasures_the_residual(task):
    """With Exact(refresh=2), the step after a refresh reuses its anchors, its Jacobian J_1
    (at the refresh step's weights) and K_1 = J_1 J_1^T: the step is
    -lr (grad - J_1^T (K_1 + lam)^{-1} J_1 grad) - J_1^T (K_1 + lam)^{-1} r(w), the residual
    r(w) = F(w) - F(w_0) measured on those anchors at the current weights; the step after
    draws fresh anchors, as the second step of an every-step run does."""
    lr = 0.05
    kwargs = dict(
        lr=lr,
        anchors=AnchorSampling(batch=16, outputs=None),
        guard=DriftGuard(),  # no halving, so the whole step can be checked
        pullback=PullBack(all_anchors=False),
    )

    def fip(net, refresh):
        return FIP(
            net.parameters(),
            model=net,
            anchor_inputs=task["anchors"],
            curvature=Exact(refresh=refresh),
            **kwargs,
        )

    net = copy.deepcopy(task["net"])
    opt = fip(net, 2)
    fip_on_new_task(net, opt, task, steps=1)
    state = opt.state[opt._groups[0].key]
    kept = state["exact"]
    assert kept["step"] == 1
    w1 = flat_weights(net)
    opt.zero_grad()
    new_task_backward(net, task)
    grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    gram = kept["gram"]
    jac = gram.jacobian
    with torch.no_grad():
        outputs = net.eval()(kept["x"])
    residual = (outputs - kept["y0"]).reshape(-1) / len(kept["x"]) ** 0.5
    z = gram.solve(torch.stack([jac.jvp(grad[None])[0], residual]))
    pulled = jac.vjp(z)
    expected = -lr * (grad - pulled[0]) - pulled[1]
    opt.step()
    assert state["exact"] is kept  # not rebuilt on the second step
    assert torch.allclose(flat_weights(net) - w1, expected, rtol=1e-9, atol=1e-12)
    assert float(pulled[1].norm()) > 0  # the residual at w1 is not the refresh step's
    fip_on_new_task(net, opt, task, steps=1)
    assert state["exact"]["step"] == 3
    # the third step's anchors are the second draw of a run that refreshes every step
    every = fip(copy.deepcopy(task["net"]), 1)
    group = every._groups[0]
    every._step_anchors(group)
    assert torch.equal(every._step_anchors(group)[0], state["exact"]["x"])
    assert "exact" not in every.state[group.key]  # refresh=1 keeps nothing


def test_exact_refresh_state_dict_round_trip_between_refreshes(task):
    """Saved between refreshes, a run with Exact(refresh=3) resumes with the kept metric and
    anchors and takes the same next steps."""

    def fip(net):
        return FIP(net.parameters(), model=net, anchor_inputs=task["anchors"], curvature=Exact(3))

    net = copy.deepcopy(task["net"])
    opt = fip(net)
    fip_on_new_task(net, opt, task, steps=4)  # refresh on 1 and 4; save after 4
    saved_state = copy.deepcopy(opt.state_dict())
    saved_weights = copy.deepcopy(net.state_dict())
    fip_on_new_task(net, opt, task, steps=3)  # 5, 6 reuse step 4's metric; 7 refreshes
    net2 = copy.deepcopy(task["net"])
    net2.load_state_dict(saved_weights)
    opt2 = fip(net2)
    opt2.load_state_dict(saved_state)
    fip_on_new_task(net2, opt2, task, steps=3)
    assert torch.equal(flat_weights(net2), flat_weights(net))


def test_factored_jacobian_matches_dense_jacobian(task):
    """The factored K = JJ^T, Jv and J^T z of an nn.Linear stack equal the dense ones, for a
    group holding some weights and biases only."""
    net, x = task["net"], task["anchors"]
    params = [net[0].weight, net[2].bias, net[4].weight, net[4].bias]
    w = torch.cat([p.detach().reshape(-1) for p in params])
    for name in ("euclidean", "bhattacharyya"):
        metric = PullbackMetric.from_module(net, x, params=params, output_metric=name)
        jac = metric.jacobian(w)
        factored = metric.jacobian_operator(w)
        assert type(factored).__name__ != "AutogradJacobian"
        assert torch.allclose(factored.gram(), jac @ jac.T, rtol=1e-10, atol=1e-12)
        assert torch.allclose(factored.embedded, metric.embed(w))
        v = torch.randn(3, w.numel(), dtype=w.dtype)
        z = torch.randn(2, jac.shape[0], dtype=w.dtype)
        assert torch.allclose(factored.jvp(v), v @ jac.T, rtol=1e-10, atol=1e-12)
        assert torch.allclose(factored.vjp(z), z @ jac, rtol=1e-10, atol=1e-12)


def test_factored_and_autograd_routes_take_the_same_step(task, monkeypatch):
    steps = []
    for route in ("factored", "autograd"):
        if route == "autograd":
            monkeypatch.setattr(PullbackMetric, "_factored_jacobian", lambda self, w: None)
        net = copy.deepcopy(task["net"])
        opt = FIP(net.parameters(), model=net, anchor_inputs=task["anchors"])
        for _ in range(2):
            opt.zero_grad()
            new_task_backward(net, task)
            opt.step()
        steps.append(flat_weights(net))
    assert torch.allclose(steps[0], steps[1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("curvature", [None, Exact(refresh=2)], ids=["every-step", "exact-2"])
def test_fip_on_a_flat_manifold_parameter_equals_fip_on_the_module(task, curvature):
    """FIP([p]) on a WeightSpace whose metric is the anchor metric takes the same steps as
    FIP(net.parameters(), model=net, anchor_inputs=...) with that metric, the metric built
    every step or kept for two."""
    x = task["anchors"]
    net = copy.deepcopy(task["net"])
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=x,
        anchors=AnchorSampling(holdout_fraction=0),
        curvature=curvature,
    )
    lam = opt.damping_of()
    flat_net = copy.deepcopy(task["net"])
    space = WeightSpace(PullbackMetric.from_module(flat_net, x, damping=lam))
    p = flat_parameter(flat_net, space)
    opt_p = FIP([p], curvature=curvature)
    for _ in range(4):
        opt.zero_grad()
        new_task_backward(net, task)
        opt.step()
        opt_p.zero_grad()
        loss = nn.functional.cross_entropy(space.metric.module(p, task["xb"]), task["yb"])
        loss.backward()
        opt_p.step()
        torch.testing.assert_close(p.detach(), flat_weights(net), rtol=1e-10, atol=1e-12)
        assert opt_p.last_info[0].drift == opt.last_info[0].drift


def test_fip_on_a_mixed_precision_manifold_steps_in_its_precision(task):
    """On a WeightSpace whose metric has bfloat16 products, FIP's step metrics take them too:
    the steps agree with full precision to bfloat16's roundoff and are not equal to them."""
    x = task["anchors"].float()
    runs = []
    for precision in (None, MixedPrecision()):
        net = copy.deepcopy(task["net"]).float()
        space = WeightSpace(PullbackMetric.from_module(net, x, damping=0.1, precision=precision))
        p = flat_parameter(net, space)
        opt = FIP([p], lr=0.1, guard=DriftGuard())  # no halving decision to flip
        assert opt.step_metric(0, x, 0.1).precision is precision
        for _ in range(3):
            opt.zero_grad()
            out = space.metric.module(p, task["xb"].float())
            nn.functional.cross_entropy(out, task["yb"]).backward()
            opt.step()
        assert p.dtype == torch.float32
        runs.append(p.detach().clone() - flat_weights(task["net"]).float())
    moved, err = float(runs[0].norm()), float((runs[1] - runs[0]).norm())
    assert 0 < err < 0.05 * moved


def bn_net(task, dropout: float) -> tuple[nn.Module, torch.Tensor]:
    """A BatchNorm and Dropout MLP in train mode whose running statistics are the old task's
    (five train-mode passes over the anchors), and the anchors."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Linear(DIM, 16),
        nn.BatchNorm1d(16),
        nn.Tanh(),
        nn.Dropout(dropout),
        nn.Linear(16, CLASSES),
    ).double()
    net.train()
    for _ in range(5):
        net(task["anchors"])
    return net, task["anchors"]


def test_batchnorm_statistics_are_the_old_tasks_and_the_metric_is_taken_in_eval_mode(task):
    """Policy: the frozen outputs and the metric use eval mode (running statistics, no
    Dropout), whatever mode the model is in; train-mode forward passes on the new task
    update BatchNorm's running statistics, and FIP restores the old task's after each step."""
    net, x_old = bn_net(task, dropout=0.5)
    bn = net[1]
    old_stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    opt = FIP(net.parameters(), model=net, anchor_inputs=x_old, lr=0.1)
    assert net.training  # FIP left the model's mode alone
    with torch.no_grad():
        expected = net.eval()(opt.anchor.fit_inputs)
    net.train()
    assert torch.equal(opt.anchor.fit_outputs, expected)  # frozen in eval mode
    metric = opt.manifold().metric
    torch.testing.assert_close(
        metric.fn(flat_weights(net)), expected
    )  # deterministic despite Dropout
    for step in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(task["xb"]), task["yb"]).backward()  # train mode
        assert not torch.equal(bn.running_mean, old_stats[0])  # the new task moved them...
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        said = [w for w in caught if issubclass(w.category, BatchNormWarning)]
        assert len(said) == (step == 0)  # batch statistics that will not be kept: said once
        assert step or "batchnorm_eval" in str(said[0].message)
        for now, before in zip(
            (bn.running_mean, bn.running_var, bn.num_batches_tracked), old_stats, strict=True
        ):
            assert torch.equal(now, before)  # ...and FIP put the old task's back
    assert opt.last_info[0].drift.agreement > 0.9


def test_batchnorm_eval_makes_the_new_task_learned_under_the_kept_statistics(task):
    """With BatchNorm in eval mode (``batchnorm_eval`` after ``train()``; Dropout stays in
    train mode) FIP steps without a warning and what it learns holds in eval mode: the new
    batch's eval-mode loss falls."""
    net, x_old = bn_net(task, dropout=0.1)
    opt = FIP(net.parameters(), model=net, anchor_inputs=x_old, lr=0.1)

    def eval_loss():
        with torch.no_grad():
            out = net.eval()(task["xb"])
        return float(nn.functional.cross_entropy(out, task["yb"]))

    before = eval_loss()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchNormWarning)
        for _ in range(20):
            batchnorm_eval(net.train())
            assert not net[1].training and net[3].training
            opt.zero_grad()
            nn.functional.cross_entropy(net(task["xb"]), task["yb"]).backward()
            opt.step()
    assert eval_loss() < 0.95 * before


def test_protected_share_is_the_soft_projection_of_the_step(task):
    """The reported share equals |P_lambda d| / |d| with P_lambda = J^T (K + lambda)^{-1} J
    built densely at the step's weights (exact route, no pull-back)."""
    net = copy.deepcopy(task["net"])
    opt = FIP(
        net.parameters(),
        model=net,
        anchor_inputs=task["anchors"],
        anchors=EXACT,
        pullback=PullBack(strength=0.0),
    )
    w = flat_weights(net)
    new_task_backward(net, task)
    grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    opt.step()
    metric = opt.manifold().metric
    jac = metric.jacobian(w)
    lam = opt.damping_of()
    proj = jac.T @ torch.linalg.solve(
        jac @ jac.T + lam * torch.eye(jac.shape[0], dtype=w.dtype), jac
    )
    d = grad - proj @ grad
    expected = float((proj @ d).norm() / d.norm())
    assert opt.last_info[0].protected_share == pytest.approx(expected, rel=1e-6)
    assert 0 < expected < 1


def cnn_problem():
    """A CNN with BatchNorm (eval, running statistics) and an in-place ReLU, anchors and a
    new-task batch, float64."""
    gen = torch.Generator().manual_seed(4)
    anchors = torch.randn(40, 1, 6, 6, generator=gen, dtype=torch.float64)
    xb = torch.randn(16, 1, 6, 6, generator=gen, dtype=torch.float64) + 0.5
    yb = torch.randint(0, CLASSES, (16,), generator=gen)
    torch.manual_seed(5)
    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, stride=2),
        nn.BatchNorm2d(3),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, CLASSES),
    ).double()
    cnn[1].running_mean.normal_(generator=gen)
    cnn[1].running_var.uniform_(0.5, 2.0, generator=gen)
    return cnn, anchors, xb, yb


def test_factored_and_autograd_routes_take_the_same_step_on_a_cnn_with_batch_norm(monkeypatch):
    """The CNN's Jacobian is held in factored form (Conv2d patches, BatchNorm, Linear); FIP's
    steps on it equal those of the generic autograd route."""
    cnn, anchors, xb, yb = cnn_problem()
    metric = PullbackMetric.from_module(cnn, anchors)
    assert type(metric.jacobian_operator(flat_weights(cnn))).__name__ == "FactoredJacobian"
    steps = []
    for route in ("factored", "autograd"):
        if route == "autograd":
            monkeypatch.setattr(PullbackMetric, "_factored_jacobian", lambda self, w: None)
        net = batchnorm_eval(copy.deepcopy(cnn))
        opt = FIP(net.parameters(), model=net, anchor_inputs=anchors)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
        steps.append(flat_weights(net))
    assert not torch.allclose(steps[0], flat_weights(cnn))
    assert torch.allclose(steps[0], steps[1], rtol=1e-7, atol=1e-9)


def test_a_fip_step_on_a_cnn_moves_held_out_outputs_far_less_than_sgd():
    """The defining property on a convolutional network: with the defaults, a FIP step changes
    the outputs on held-out anchors < 1/5 as much as an SGD step of the same length."""
    cnn, anchors, xb, yb = cnn_problem()
    net = batchnorm_eval(copy.deepcopy(cnn))
    opt = FIP(net.parameters(), model=net, anchor_inputs=anchors, lr=0.1)
    nn.functional.cross_entropy(net(xb), yb).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    w0 = flat_weights(net)
    opt.step()
    length = float((flat_weights(net) - w0).norm())
    assert length > 0
    net_sgd = copy.deepcopy(cnn)
    torch.nn.utils.vector_to_parameters(w0 - length * grad / grad.norm(), net_sgd.parameters())
    held_out = opt.anchor.holdout_inputs
    fip_change = held_out_change(net.eval(), cnn.eval(), held_out)
    sgd_change = held_out_change(net_sgd.eval(), cnn.eval(), held_out)
    assert fip_change < sgd_change / 5, (fip_change, sgd_change)
