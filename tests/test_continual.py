"""Continual learning: accuracy matrix bookkeeping, EWC's Fisher, memory, checkpoint/resume."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from riemfip.applications.continual import ContinualResult, forgetting, run_continual
from riemfip.applications.continual_methods import (
    EWC,
    ContinualMethod,
    FIPMethod,
    Heads,
    Memory,
    Replay,
    fisher_diagonal,
)
from riemfip.checkpoint import CorruptCheckpointError, load_checkpoint
from riemfip.data import digits, split_tasks


@pytest.fixture(scope="module")
def tasks():
    return split_tasks(digits(), [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]])


def small_mlp():
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def test_forgetting_on_a_hand_made_matrix():
    r = np.array([[90.0, 10.0, 0.0], [70.0, 95.0, 5.0], [80.0, 60.0, 99.0]])
    mean, per_task = forgetting(r)
    # task 0: best before last 90, final 80 -> 10; task 1: best 95, final 60 -> 35
    assert per_task == [10.0, 35.0]
    assert mean == 22.5
    res = ContinualResult("x", {}, "task", ["a", "b", "c"], [[0], [1], [2]], r)
    assert res.average_accuracy == pytest.approx((80 + 60 + 99) / 3)
    assert res.forgetting == 22.5
    assert math.isnan(forgetting(np.array([[50.0]]))[0])
    with pytest.raises(ValueError, match="square"):
        forgetting(np.zeros((2, 3)))


def test_forgetting_uses_best_earlier_accuracy_not_first():
    # accuracy on task 0 rose after task 1 (backward transfer) and then fell
    r = np.array([[60.0, 0, 0], [90.0, 80.0, 0], [75.0, 80.0, 70.0]])
    assert forgetting(r)[1] == [15.0, 0.0]


def _brute_force_fisher(model, x, task_ids, heads):
    params = list(model.parameters())
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for xi, ti in zip(x, task_ids, strict=True):
        logits = heads.logits(model(xi[None]), ti[None])[0]
        logp = torch.log_softmax(logits, -1)
        for k in range(len(logp)):
            if not torch.isfinite(logp[k]):
                continue  # masked class: probability 0
            g = torch.autograd.grad(logp[k], params, retain_graph=True)
            g = torch.cat([gi.reshape(-1) for gi in g]).double()
            total += logp[k].exp().double() * g.pow(2)
    return total / len(x)


@pytest.mark.parametrize("masked", [False, True])
def test_fisher_diagonal_matches_per_sample_brute_force(masked):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    task_ids = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    heads = Heads(mask if masked else None)
    got = fisher_diagonal(model, x, task_ids=task_ids, heads=heads, batch_size=3)
    want = _brute_force_fisher(model, x, task_ids, heads)
    assert got.shape == (sum(p.numel() for p in model.parameters()),)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    assert (got > 0).any()


def test_ewc_proximal_step_is_the_exact_proximal_map():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ewc = EWC(lam=7.0)
    n = sum(p.numel() for p in model.parameters())
    for _ in range(2):
        ewc.fishers.append(torch.rand(n, dtype=torch.float64))
        ewc.anchors.append(torch.randn(n, dtype=torch.float64))
    v = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    lr = 0.3
    ewc.after_step(model, lr)
    w = nn.utils.parameters_to_vector(model.parameters()).detach().clone().requires_grad_(True)
    # optimality of argmin_w |w - v|^2 / (2 lr) + penalty(w)
    nn.utils.vector_to_parameters(w, model.parameters())
    pen = ewc.penalty(model)
    grads = torch.autograd.grad(pen, list(model.parameters()))
    grad_pen = torch.cat([gi.reshape(-1) for gi in grads])
    assert torch.allclose(
        (w.detach() - v) / lr + grad_pen, torch.zeros(n, dtype=torch.float64), atol=1e-12
    )
    assert not torch.allclose(w.detach(), v)


def test_heads_mask_other_tasks_logits():
    out = torch.arange(12.0).reshape(2, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    masked = Heads(mask).logits(out, torch.tensor([1, 0]))
    assert torch.equal(masked[0, 2:], out[0, 2:]) and torch.isinf(masked[0, :2]).all()
    assert torch.equal(masked[1, :2], out[1, :2]) and torch.isinf(masked[1, 2:]).all()
    assert torch.equal(Heads(None).logits(out, torch.tensor([1, 0])), out)


def test_memory_keeps_k_images_of_each_class_of_each_task(tasks):
    mem = Memory(4)
    gen = torch.Generator().manual_seed(0)
    mem.add_task(tasks[0], 0, gen)
    mem.add_task(tasks[1], 1, gen)
    assert len(mem) == 24
    assert torch.equal(torch.bincount(mem.y, minlength=10)[:6], torch.full((6,), 4))
    assert torch.equal(mem.task_ids, torch.tensor([0] * 12 + [1] * 12))
    # each stored image is a training image of its task with its label
    for x, y, t in zip(mem.x, mem.y, mem.task_ids, strict=True):
        hit = (tasks[int(t)].x_train == x).all(1)
        assert hit.any() and int(tasks[int(t)].y_train[hit][0]) == int(y)
    with pytest.raises(ValueError, match="fewer than memory_per_class"):
        Memory(10_000).add_task(tasks[0], 0, gen)


def test_replay_loss_is_cross_entropy_over_new_and_replayed_samples(tasks):
    torch.manual_seed(0)
    model = small_mlp()
    mem = Memory(2)
    mem.add_task(tasks[0], 0, torch.Generator().manual_seed(0))
    x, y = tasks[1].x_train[:5], tasks[1].y_train[:5]
    tid = torch.ones(5, dtype=torch.long)
    heads = Heads(None)
    loss = Replay().loss(model, x, y, tid, 1, mem, heads, torch.Generator().manual_seed(3))
    idx = torch.randint(len(mem), (5,), generator=torch.Generator().manual_seed(3))
    want = nn.functional.cross_entropy(
        model(torch.cat([x, mem.x[idx]])), torch.cat([y, mem.y[idx]])
    )
    assert torch.allclose(loss, want)


@pytest.mark.parametrize("method", ["finetune", "ewc", "replay", "joint"])
@pytest.mark.parametrize("scenario", ["task", "class"])
def test_run_continual_end_to_end(tasks, method, scenario, tmp_path):
    if method == "ewc":
        method = EWC(lam=10.0, fisher_samples=20)
    res = run_continual(
        tasks, method, small_mlp, memory_per_class=3, scenario=scenario,
        epochs=1, lr=0.1, batch_size=64, seed=0, progress=False,
    )  # fmt: skip
    assert res.accuracy.shape == (3, 3)
    assert ((res.accuracy >= 0) & (res.accuracy <= 100)).all()
    # trained task beats chance through its head (task) or among 10 classes (class)
    chance = 100 / 3 if scenario == "task" else 10.0
    assert res.accuracy[0, 0] > chance + 20
    assert len(res.seconds) == 3 and len(res.diagnostics) == 3
    assert len(res.cpu_seconds) == 3 and min(res.cpu_seconds) > 0
    sizes = [len(t.x_train) for t in tasks]
    if method == "joint":
        sizes = [sum(sizes[: i + 1]) for i in range(3)]
    assert res.steps == [math.ceil(n / 64) for n in sizes]
    d = json.loads(res.to_json(tmp_path / "r.json"))
    for key in (
        "method", "method_config", "scenario", "tasks", "task_classes", "accuracy",
        "average_accuracy", "forgetting", "per_task_forgetting", "config", "seconds",
        "cpu_seconds", "steps",
    ):  # fmt: skip
        assert key in d
    assert d["accuracy"] == res.accuracy.tolist()
    assert d["average_accuracy"] == pytest.approx(np.mean(res.accuracy[-1]))
    assert d["task_classes"] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    back = ContinualResult.from_json(tmp_path / "r.json")
    assert np.array_equal(back.accuracy, res.accuracy) and back.forgetting == res.forgetting


def test_task_incremental_predictions_stay_in_the_task_head(tasks):
    # even a network that forgot everything answers task 0's images with a task-0 class,
    # so task-incremental accuracy is at least the class-incremental one
    kw = dict(memory_per_class=0, epochs=2, lr=0.1, seed=1, progress=False)
    task = run_continual(tasks, "finetune", small_mlp, scenario="task", **kw)
    cls = run_continual(tasks, "finetune", small_mlp, scenario="class", **kw)
    assert (task.accuracy[-1] >= cls.accuracy[-1]).all()
    assert cls.accuracy[-1, 0] < 20  # class-incremental fine-tuning forgets task 0


def test_heatmap_png(tasks, tmp_path):
    r = np.array([[90.0, 0.0], [40.0, 95.0]])
    res = ContinualResult("replay", {}, "class", ["a", "b"], [[0, 1], [2, 3]], r)
    path = res.plot_heatmap(tmp_path / "sub" / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "average accuracy 67.5%" in res.summary()


class _Crash(Exception):
    pass


def _crash_in_task(method, crash_task):
    """Make ``method`` die at the first training step of ``crash_task``, as a killed job would."""
    loss = method.loss

    def crashing(model, x, y, task_ids, t, *args):
        if t == crash_task:
            raise _Crash
        return loss(model, x, y, task_ids, t, *args)

    method.loss = crashing
    return method


@pytest.mark.parametrize(
    "make", [lambda: Replay(), lambda: EWC(lam=50.0, fisher_samples=10)], ids=["replay", "ewc"]
)
def test_checkpoint_resume_equals_uninterrupted_run(tasks, tmp_path, make):
    kw = dict(memory_per_class=3, scenario="task", epochs=1, lr=0.1, seed=2, progress=False)
    full = run_continual(tasks, make(), small_mlp, **kw)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        run_continual(tasks, _crash_in_task(make(), 2), small_mlp, checkpoint_dir=ckpt, **kw)
    assert (ckpt / "task_01.pt").is_file() and not (ckpt / "task_02.pt").exists()
    # the resumed run trains only task 2, from the saved weights, memory and method state
    resumed = run_continual(tasks, _crash_in_task(make(), 0), small_mlp, checkpoint_dir=ckpt, **kw)
    assert np.array_equal(resumed.accuracy, full.accuracy)
    assert resumed.method_config == full.method_config
    # a finished run resumes to the same result without training at all
    again = run_continual(tasks, _crash_in_task(make(), 2), small_mlp, checkpoint_dir=ckpt, **kw)
    assert np.array_equal(again.accuracy, full.accuracy)


def test_checkpoint_from_other_settings_is_refused(tasks, tmp_path):
    kw = dict(memory_per_class=2, epochs=1, progress=False, checkpoint_dir=tmp_path)
    run_continual(tasks[:2], "finetune", small_mlp, lr=0.1, **kw)
    with pytest.raises(ValueError, match="different run: its lr is 0.1, this call's is 0.2"):
        run_continual(tasks[:2], "finetune", small_mlp, lr=0.2, **kw)


def test_a_damaged_checkpoint_is_named_not_unpickled(tasks, tmp_path):
    kw = dict(memory_per_class=2, epochs=1, lr=0.1, progress=False, checkpoint_dir=tmp_path)
    run_continual(tasks[:2], "finetune", small_mlp, **kw)
    last = tmp_path / "task_01.pt"
    assert load_checkpoint(last).step == 2  # tasks finished
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="task_01.pt is truncated or corrupted"):
        run_continual(tasks[:2], "finetune", small_mlp, **kw)


def test_bad_arguments(tasks):
    with pytest.raises(ValueError, match="unknown method"):
        run_continual(tasks, "sgd", small_mlp, progress=False)
    with pytest.raises(ValueError, match="scenario"):
        run_continual(tasks, "finetune", small_mlp, scenario="domain", progress=False)
    with pytest.raises(TypeError, match="sequence of Dataset"):
        run_continual(tasks[0], "finetune", small_mlp, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        run_continual(tasks, "finetune", small_mlp, epochs=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        run_continual(tasks, "finetune", small_mlp, lr=-1, progress=False)
    with pytest.raises(TypeError, match="model_fn"):
        run_continual(tasks, "finetune", lambda: "net", progress=False)
    with pytest.raises(ValueError, match="lam"):
        EWC(lam=-1)
    relabelled = split_tasks(digits(), [[0, 1], [2, 3, 4]], relabel=True)
    with pytest.raises(ValueError, match="one label space"):
        run_continual(relabelled, "finetune", small_mlp, progress=False)


def test_diverging_training_raises_with_advice(tasks):
    class Exploding(ContinualMethod):
        def loss(self, *args):
            return super().loss(*args) * float("inf")

    with pytest.raises(FloatingPointError, match="lower lr"):
        run_continual(tasks, Exploding(), small_mlp, progress=False)


def test_fip_keeps_the_old_task_where_fine_tuning_forgets_it(tasks):
    two = tasks[:2]
    kw = dict(memory_per_class=10, scenario="class", epochs=5, lr=0.5, seed=0, progress=False)
    fine = run_continual(two, "finetune", small_mlp, **kw)
    options = dict(damping=1.0)
    fip = run_continual(two, FIPMethod(**options), small_mlp, **kw)
    assert fip.accuracy[0, 0] == fine.accuracy[0, 0]  # task 0 is the same SGD run
    assert fine.accuracy[1, 0] < 10  # class-incremental fine-tuning forgets task 0 ...
    assert fip.accuracy[1, 0] > fip.accuracy[0, 0] - 10  # ... FIP keeps it
    assert fip.accuracy[1, 1] > 70  # and still learns task 1
    assert fip.method == "fip" and fip.method_config == {"lr_scale": 1.0, **options}
    assert fip.diagnostics[0] == {}  # task 0: plain SGD, nothing to keep
    diag = fip.diagnostics[1]
    assert diag["steps"] == 5 * math.ceil(len(two[1].x_train) / 64)
    assert 0 < diag["mean_kept_fraction"] < 1 and 0 <= diag["holdout_agreement"] <= 1


def test_fip_options_cannot_override_what_the_run_sets():
    with pytest.raises(ValueError, match="anchor_inputs"):
        FIPMethod(anchor_inputs=torch.zeros(3, 64))
    with pytest.raises(ValueError, match="lr_scale"):
        FIPMethod(lr_scale=0)


def test_fip_config_with_an_anchor_transform_is_json():
    from riemfip.optim import AnchorSampling, GaussianNoise

    config = FIPMethod(anchors=AnchorSampling(transform=GaussianNoise(0.3)), damping=0.1).config()
    assert json.loads(json.dumps(config)) == {
        "lr_scale": 1.0,
        "anchors": "AnchorSampling(batch=32, transform=GaussianNoise(std=0.3), outputs=2, "
        "holdout_fraction=0.2, seed=0)",
        "damping": 0.1,
    }


def test_fip_record_carries_the_drift_certificate_and_warns_over_budget(tasks, tmp_path):
    from riemfip.applications.continual_methods import DriftBudgetWarning
    from riemfip.optim import DriftGuard

    two = tasks[:2]
    kw = dict(memory_per_class=5, scenario="class", epochs=1, lr=0.5, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftBudgetWarning)  # no budget: nothing to warn about
        free = run_continual(two, FIPMethod(), small_mlp, **kw)
    cert = free.diagnostics[1]
    assert cert["drift_budget"] is None and cert["budget_exceeded"] is None
    assert cert["steps_over_budget"] == 0
    assert cert["max_step_drift"] >= cert["holdout_divergence"] >= 0

    class Nudged(FIPMethod):
        """Something outside the optimizer moves the weights after each step (a user's hook):
        the guard certifies each step from where it starts, so the drift ends over budget."""

        def after_step(self, model, lr):
            super().after_step(model, lr)
            if self._optimizer is not None:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.05 * torch.randn(p.shape, generator=gen))

    gen = torch.Generator().manual_seed(0)
    with pytest.warns(DriftBudgetWarning, match="went over its budget 0.001"):
        over = run_continual(two, Nudged(guard=DriftGuard(budget=1e-3)), small_mlp, **kw)
    over.to_json(tmp_path / "over.json")
    cert = json.loads((tmp_path / "over.json").read_text())["diagnostics"][1]
    assert cert["drift_budget"] == 1e-3 and cert["budget_exceeded"] is True
    assert 0 < cert["steps_over_budget"] <= cert["steps"]
    assert cert["max_step_drift"] > 1e-3

    loose = run_continual(two, FIPMethod(guard=DriftGuard(budget=1e6)), small_mlp, **kw)
    cert = loose.diagnostics[1]
    assert cert["budget_exceeded"] is False and cert["steps_over_budget"] == 0
