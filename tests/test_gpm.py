"""Gradient Projection Memory: the projection, the energy criterion, forgetting, state."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from riemfip.applications.continual import make_method, run_continual
from riemfip.applications.continual_methods import Heads, Memory
from riemfip.applications.gpm import GPM, BasisMemory, ProjectedSGD, input_columns, rank_for_energy
from riemfip.data import digits, split_tasks

DTYPE = torch.float64


@pytest.fixture(scope="module")
def two_tasks():
    return split_tasks(digits(), [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])


def digits_mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def conv_net():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)
    ).to(DTYPE)


def backward(net, x, seed=0):
    """Gradients of a fixed random linear functional of the outputs."""
    net.zero_grad()
    out = net(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    (out * weights).sum().backward()


def grad_matrix(layer):
    return layer.weight.grad.reshape(len(layer.weight), -1).clone()


# a low threshold projects with G M M^T, a high one (k > d/2) with the complement G Q Q^T
@pytest.mark.parametrize("threshold", [0.6, 0.999])
@pytest.mark.parametrize("make", [conv_net, lambda: digits_mlp().to(DTYPE)], ids=["conv", "mlp"])
def test_projected_gradient_is_the_gradient_minus_its_part_in_the_basis(make, threshold):
    torch.manual_seed(0)
    net = make()
    x = torch.randn(40, 2, 6, 6, dtype=DTYPE) if isinstance(net[0], nn.Conv2d) else None
    x = torch.randn(40, 64, dtype=DTYPE) if x is None else x
    memory = BasisMemory()
    memory.update(net, x[:20], threshold)
    opt = ProjectedSGD(net, memory, lr=0.1)
    backward(net, x[20:])
    layers = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    before = {name: grad_matrix(layer) for name, layer in layers.items()}
    opt.project_()
    for name, layer in layers.items():
        m = memory.bases[name]
        assert torch.allclose(m.T @ m, torch.eye(m.shape[1], dtype=DTYPE), atol=1e-12)
        g, g0 = grad_matrix(layer), before[name]
        assert torch.allclose(g, g0 - (g0 @ m) @ m.T, atol=1e-12)
        assert (g @ m).abs().max() <= 1e-12 * g0.norm()
        assert layer.bias.grad is None  # bias="freeze": biases do not move after the first task


def one_layer_problem(kind):
    """A single layer, stored inputs of low rank, and a new task's inputs of full rank."""
    torch.manual_seed(1)
    if kind == "linear":
        layer = nn.Linear(10, 4).to(DTYPE)
        # an affine plane of dimension 3 that misses the origin, so with bias="augment"
        # the columns [x; 1] do not span the bias direction [0; 1] and the bias can move
        old = torch.randn(30, 3, dtype=DTYPE) @ torch.randn(3, 10, dtype=DTYPE)
        old = old + torch.randn(10, dtype=DTYPE)
        new = torch.randn(16, 10, dtype=DTYPE)
    else:  # stride 2 over a 5x5 map: 9 patches of 18 values, so rank <= 9 < d = 18
        layer = nn.Conv2d(2, 3, 3, padding=1, stride=2).to(DTYPE)
        old = torch.randn(1, 2, 5, 5, dtype=DTYPE)
        new = torch.randn(8, 2, 5, 5, dtype=DTYPE)
    return nn.Sequential(layer), old, new


@pytest.mark.parametrize("bias", ["freeze", "augment"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_projected_step_leaves_the_outputs_on_the_stored_inputs_unchanged(kind, bias):
    net, old, new = one_layer_problem(kind)
    memory = BasisMemory(bias)
    sizes = memory.update(net, old, threshold=1.0)
    d = 11 if kind == "linear" else 19
    k, dim = sizes["0"]
    assert dim == d - (bias == "freeze") and 0 < k < dim  # something protected, something free
    before = net(old).detach()
    w0, b0 = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    opt = ProjectedSGD(net, memory, lr=0.5)
    backward(net, new)
    opt.step()
    assert (net[0].weight - w0).norm() > 1e-3  # the step moved the weights
    assert torch.allclose(net[0].bias, b0) == (bias == "freeze")
    assert (net(old) - before).abs().max() < 1e-12


def test_input_columns_reproduce_the_layer():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, (3, 2), padding=(1, 0), stride=(2, 1), dilation=(1, 2)).to(DTYPE)
    x = torch.randn(4, 3, 7, 6, dtype=DTYPE)
    out = conv(x)
    cols = input_columns(conv, x, augment=True)
    w = torch.cat([conv.weight.reshape(5, -1), conv.bias[:, None]], dim=1)
    want = out.permute(0, 2, 3, 1).reshape(-1, 5)
    assert torch.allclose(cols @ w.T, want, atol=1e-12)


def spectrum_inputs(singular_values, n, d, seed):
    """``n`` inputs of dimension ``d`` whose representation has the given singular values."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, len(singular_values), generator=gen, dtype=DTYPE))[0]
    v = torch.linalg.qr(torch.randn(d, len(singular_values), generator=gen, dtype=DTYPE))[0]
    return u @ torch.diag(torch.as_tensor(singular_values, dtype=DTYPE)) @ v.T


def kept_fraction(x, basis):
    return float((x @ basis).pow(2).sum() / x.pow(2).sum())


@pytest.mark.parametrize("n", [8, 40], ids=["columns", "gram"])  # fewer or more columns than d
def test_energy_criterion_keeps_the_smallest_basis_that_reaches_the_threshold(n):
    d, eps = 12, 0.9
    s = [5.0, 3.0, 2.0, 1.5, 1.0, 0.5]
    x = spectrum_inputs(s, n, d, seed=3)
    net = nn.Sequential(nn.Linear(d, 2, bias=False).to(DTYPE))
    memory = BasisMemory()
    (k, _) = memory.update(net, x, eps)["0"]
    energy = np.cumsum(np.square(s)) / np.sum(np.square(s))
    assert k == int(np.argmax(energy >= eps)) + 1 == 3  # 34/39.5 < 0.9 <= 38/39.5
    m = memory.bases["0"]
    assert kept_fraction(x, m) >= eps > kept_fraction(x, m[:, : k - 1])
    # a second task: the basis grows by the fewest directions that bring it to eps2 (Eq. 9)
    eps2 = 0.95
    y = spectrum_inputs([4.0, 3.0, 1.0, 0.5], n, d, seed=4)
    (k2, _) = memory.update(net, y, eps2)["0"]
    m2 = memory.bases["0"]
    assert k2 > k and torch.allclose(m2[:, :k], m)  # old directions kept as they were
    assert torch.allclose(m2.T @ m2, torch.eye(k2, dtype=DTYPE), atol=1e-10)
    assert kept_fraction(y, m2) >= eps2 > kept_fraction(y, m2[:, : k2 - 1])


def test_rank_for_energy_edge_cases():
    e = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=DTYPE)
    assert rank_for_energy(e, 7.0, 4 / 7) == 1  # reached exactly
    assert rank_for_energy(e, 7.0, 0.9) == 3
    assert rank_for_energy(e, 7.0, 1.0) == 3  # the null direction is never taken
    assert rank_for_energy(e, 10.0, 0.5, kept=6.0) == 0  # the stored basis already holds 60%
    assert rank_for_energy(e, 10.0, 0.7, kept=3.0) == 1
    assert rank_for_energy(torch.zeros(3, dtype=DTYPE), 0.0, 0.9) == 0  # no energy


def test_new_task_head_rows_are_free_and_old_ones_projected():
    torch.manual_seed(5)
    net = digits_mlp().to(DTYPE)
    memory = BasisMemory()
    memory.update(net, torch.randn(50, 64, dtype=DTYPE), 0.95)
    assert memory.head == "2"
    free = torch.tensor([False] * 5 + [True] * 5)
    opt = ProjectedSGD(net, memory, lr=0.1, free_rows=free)
    backward(net, torch.randn(20, 64, dtype=DTYPE))
    g0, b0 = grad_matrix(net[2]), net[2].bias.grad.clone()
    opt.project_()
    g, m = grad_matrix(net[2]), memory.bases["2"]
    assert torch.equal(g[free], g0[free])
    assert torch.allclose(g[~free], g0[~free] - (g0[~free] @ m) @ m.T, atol=1e-12)
    assert torch.equal(net[2].bias.grad, b0 * free)  # only the new classes' biases move


def test_gpm_keeps_task_a_where_fine_tuning_forgets_it(two_tasks):
    kw = dict(epochs=5, lr=0.5, scenario="task", seed=0, progress=False)
    tuned = run_continual(two_tasks, "finetune", digits_mlp, **kw)
    gpm = run_continual(two_tasks, "gpm", digits_mlp, **kw)
    assert gpm.accuracy[0, 0] == tuned.accuracy[0, 0]  # task 0 is plain SGD for both
    assert gpm.accuracy[1, 0] >= gpm.accuracy[0, 0] - 1.5
    assert gpm.accuracy[1, 0] >= tuned.accuracy[1, 0] + 3
    assert gpm.accuracy[1, 1] > 70  # and it still learns task B
    assert gpm.diagnostics[0]["threshold"] == 0.97
    assert gpm.diagnostics[1]["threshold"] == pytest.approx(0.973)


def test_state_round_trip_reproduces_the_next_step(two_tasks):
    torch.manual_seed(6)
    net = digits_mlp()
    method = GPM(bias="augment", samples=100)
    method.end_task(net, two_tasks[0], 0, Heads(torch.eye(2, 10, dtype=torch.bool)))
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = GPM(bias="augment", samples=100)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    x, y = two_tasks[1].x_train[:32], two_tasks[1].y_train[:32]
    nets = [copy.deepcopy(net), copy.deepcopy(net)]
    for m, n in zip([method, restored], nets, strict=True):
        opt = m.optimizer(n, 0.3, 1, Memory(0))
        assert isinstance(opt, ProjectedSGD)
        opt.zero_grad()
        nn.functional.cross_entropy(n(x), y).backward()
        opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(nets[0][0].weight, net[0].weight)


class _Crash(Exception):
    pass


class _CrashingGPM(GPM):
    """Dies at the first step of ``crash_task``, as a killed job would."""

    def __init__(self, crash_task, **kw):
        super().__init__(**kw)
        self.crash_task = crash_task

    def loss(self, model, x, y, task_ids, t, *args):
        if t == self.crash_task:
            raise _Crash
        return super().loss(model, x, y, task_ids, t, *args)


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    tasks = split_tasks(digits(), [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]])
    kw = dict(memory_per_class=0, epochs=1, lr=0.2, seed=2, progress=False)
    full = run_continual(tasks, GPM(samples=50), digits_mlp, **kw)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        run_continual(tasks, _CrashingGPM(2, samples=50), digits_mlp, checkpoint_dir=ckpt, **kw)
    resumed = run_continual(
        tasks, _CrashingGPM(0, samples=50), digits_mlp, checkpoint_dir=ckpt, **kw
    )
    assert np.array_equal(resumed.accuracy, full.accuracy)


def test_batch_norm_statistics_and_affine_parameters_are_frozen_after_task_0():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    method = GPM()
    method.memory.update(net, torch.randn(20, 6), 0.9)
    net.train()
    stats = net[1].running_mean.clone()
    opt = method.optimizer(net, 0.1, 1, Memory(0))
    opt.zero_grad()
    x, y, tid = torch.randn(8, 6), torch.randint(3, (8,)), torch.zeros(8, dtype=torch.long)
    method.loss(net, x, y, tid, 1, Memory(0), Heads(None), torch.Generator()).backward()
    opt.project_()
    assert torch.equal(net[1].running_mean, stats)
    assert net[1].weight.grad is None and net[1].bias.grad is None
    assert net[0].weight.grad is not None


def test_registered_and_bad_input():
    assert isinstance(make_method("gpm"), GPM)
    assert GPM().config()["threshold"] == 0.97
    with pytest.raises(ValueError, match="threshold"):
        GPM(threshold=0.0)
    with pytest.raises(ValueError, match="threshold_increment"):
        GPM(threshold_increment=-0.1)
    with pytest.raises(TypeError, match="samples"):
        GPM(samples=1.5)
    with pytest.raises(ValueError, match="bias"):
        GPM(bias="project")
    with pytest.raises(ValueError, match="groups=2"):
        BasisMemory().update(nn.Conv2d(4, 4, 3, groups=2), torch.randn(2, 4, 5, 5), 0.9)
    with pytest.raises(ValueError, match="nn.Linear or nn.Conv2d"):
        BasisMemory().update(nn.Sequential(nn.ReLU()), torch.randn(2, 3), 0.9)
    with pytest.raises(ValueError, match="non-empty"):
        BasisMemory().update(nn.Linear(3, 2), torch.zeros(0, 3), 0.9)
    memory = BasisMemory()
    memory.update(nn.Sequential(nn.Linear(3, 2)), torch.randn(4, 3), 0.9)
    with pytest.raises(ValueError, match="basis has 3"):
        ProjectedSGD(nn.Sequential(nn.Linear(4, 2)), memory, lr=0.1)
    with pytest.raises(ValueError, match="not in this model"):
        ProjectedSGD(nn.Sequential(nn.ReLU(), nn.Linear(3, 2)), memory, lr=0.1)
