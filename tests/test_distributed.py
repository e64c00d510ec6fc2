r"""Data parallelism (:mod:`manifolds.data_parallel`): two CPU processes, gloo.

Two ranks each hold a shard of six task inputs (2 and 4 samples) and the same 5-4-3
network; every result of the data-parallel metric must be the same on both ranks (bit for
bit: every reduction is one two-term all-reduce, after which the ranks compute alike) and
equal to the one-process metric on the union of the shards (the definition,
:math:`g = N^{-1}\sum_{\text{all } b} J_b^\top G J_b + \lambda I`). Checked against a dense
reference built without :mod:`manifolds` as well. The geodesic solvers that run with a group
(minibatch relaxation, each step on the ranks' parts of one batch; Newton-Krylov shooting
on 3 inputs split 1 and 2) must equal one process on the union too. The ranks run
``tests/data_parallel_case.py`` once for the whole module (several seconds, most of them
importing torch twice and shooting), each joining the group through a ``file://`` store in a fresh
temporary folder, so that no TCP port is chosen or raced for; a hung rank is killed after
:data:`TIMEOUT` seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from data_parallel_case import (
    DAMPING,
    OUTPUT_METRIC,
    SHARDS,
    SHOOT,
    compute,
    fip_problem,
    fip_weights,
    minibatch_batches,
    minibatch_path,
    network,
    shooting_ends,
    shooting_metric,
    shooting_path,
    task_inputs,
    vectors,
)
from dense_reference import dense_metric_ref, flat_weights, logits_fn

from manifolds import PullbackMetric
from manifolds.geodesic import integrate_geodesic
from riemfip.optim import FIP

WORLD = 2
TIMEOUT = 120
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's saved results (the two processes run once per module)."""
    tmp = tmp_path_factory.mktemp("gloo")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    outs = [tmp / f"rank{r}.pt" for r in range(WORLD)]
    logs = [tmp / f"rank{r}.log" for r in range(WORLD)]  # files: a full pipe cannot block a rank
    procs = []
    for r in range(WORLD):
        with open(logs[r], "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(HERE / "data_parallel_case.py"), str(r), str(WORLD)]
                    + [str(tmp / "store"), str(outs[r])],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed (exit {p.returncode}):\n{logs[r].read_text()}"
    return [torch.load(o, weights_only=False) for o in outs]


@pytest.fixture(scope="module")
def union() -> dict:
    """The one-process metric on all six inputs: the definition the ranks must reproduce."""
    metric = PullbackMetric.from_module(
        network(), task_inputs(), output_metric=OUTPUT_METRIC, damping=DAMPING
    )
    return compute(metric)


@pytest.fixture(scope="module")
def dense_g() -> torch.Tensor:
    """Dense :math:`g(w)` of the union, built without :mod:`manifolds`."""
    net = network()
    w = vectors(39)["w"]
    return dense_metric_ref(logits_fn(net, task_inputs()), OUTPUT_METRIC, DAMPING)(w)


def _close(a, b, rtol=1e-12):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


def test_ranks_agree_bit_for_bit(ranks):
    a, b = ranks
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("error") or key == "samples":
            continue
        va, vb = a[key], b[key]
        if isinstance(va, list):
            assert all(torch.equal(x, y) for x, y in zip(va, vb, strict=True)), key
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), key
        else:
            assert va == vb, key


def test_global_sample_count(ranks):
    assert [r["samples"] for r in ranks] == [(6, 2), (6, 4)]


def test_matvec_inner_norm(ranks, union, dense_g):
    vec = vectors(39)
    v, b = vec["v"], vec["b"]
    for r in ranks:
        _close(r["matvec"], union["matvec"])
        _close(r["matvec"], dense_g @ v)
        _close(r["inner"], v @ dense_g @ b)
        _close(r["norm"], (v @ dense_g @ v).sqrt())
    # a metric of one shard alone is not the metric of the union
    alone = PullbackMetric.from_module(
        network(), task_inputs()[SHARDS[0]], output_metric=OUTPUT_METRIC, damping=DAMPING
    )
    assert float((alone.matvec(vec["w"], v) - dense_g @ v).abs().max()) > 1e-3


def test_solve_is_cg_and_solves_the_union(ranks, union, dense_g):
    b = vectors(39)["b"]
    x = torch.linalg.solve(dense_g, b)
    for r in ranks:
        assert r["solve_method"] == "cg"
        _close(r["solve"], union["solve"], rtol=1e-10)
        _close(r["solve"], x, rtol=1e-10)
        _close(dense_g @ r["solve"], b, rtol=1e-12)


def test_spectrum(ranks, dense_g):
    evals, evecs = torch.linalg.eigh(dense_g)
    top = evals.flip(0)[:3]
    for r in ranks:
        _close(r["eigenvalues"], top)
        u = r["eigenvectors"]
        _close(dense_g @ u, u * r["eigenvalues"], rtol=1e-10)
        # the same subspace: the projector onto the top three eigenvectors
        ref = evecs[:, -3:]
        _close(u @ u.T, ref @ ref.T, rtol=1e-10)


def test_acceleration(ranks, union):
    for r in ranks:
        assert r["acceleration_method"] == "cg"
        _close(r["acceleration"], union["acceleration"], rtol=1e-10)


def test_path_energy_and_its_gradient(ranks, union):
    for r in ranks:
        _close(r["energy"], union["energy"])
        _close(r["energy_grad"], union["energy_grad"])
        _close(r["path_energy"], union["path_energy"])
        _close(r["relax_points"], union["relax_points"], rtol=1e-10)


def test_minibatch_relaxation_is_the_one_on_the_union_of_each_steps_batches(ranks):
    # At step i every rank holds its part of the i-th union batch (the same order every
    # epoch), so each step's energy, its gradient and every held-out check are those of
    # the union: the ranks' Adam iterates are one process's on the union batches.
    union = minibatch_path(*minibatch_batches())
    assert union["mb_objective"] < 0.9 * union["mb_objective_line"]  # the path moved
    assert len(union["mb_held_out"]) == 7  # a check every 2 of the 12 steps, and the start
    for r in ranks:
        assert r["mb_iterations"] == union["mb_iterations"] == 12
        assert r["mb_status"] == union["mb_status"]
        _close(r["mb_held_out"], union["mb_held_out"], rtol=1e-10)
        _close(r["mb_points"], union["mb_points"], rtol=1e-10)
        _close(r["mb_objective"], union["mb_objective"], rtol=1e-10)
        _close(r["mb_length"], union["mb_length"], rtol=1e-10)
    # rank 0's batches alone relax to another path
    alone = minibatch_path(*minibatch_batches(0))
    assert float((alone["mb_points"] - union["mb_points"]).abs().max()) > 1e-2


def test_newton_krylov_shooting_solves_the_union_of_the_shards(ranks):
    w0, w1 = shooting_ends()
    union_metric = shooting_metric()
    union = shooting_path(union_metric)
    assert union["shoot_status"] == 0 and union["shoot_residual"] <= SHOOT["tol"]
    assert float((union["shoot_v0"] - (w1 - w0)).norm()) > 1e-2  # not the line's velocity

    def end(metric, v0):  # one flow as shoot takes it: where v0 leads from w0
        return integrate_geodesic(metric, w0, v0, steps=SHOOT["steps"], method="cg").end

    for r in ranks:
        assert r["shoot_status"] == 0 and r["shoot_iterations"] == union["shoot_iterations"]
        assert r["shoot_residual"] <= SHOOT["tol"]
        _close(r["shoot_v0"], union["shoot_v0"], rtol=1e-9)
        _close(r["shoot_points"], union["shoot_points"], rtol=1e-9)
        # the ranks' v0 is a geodesic's of the union's metric, not of one shard's
        assert float((end(union_metric, r["shoot_v0"]) - w1).norm()) <= 2 * SHOOT["tol"]
        shard = shooting_metric(rank=0)
        assert float((end(shard, r["shoot_v0"]) - w1).norm()) > 1e-3
        # with a group, "auto" takes the Krylov route: the dense one needs all of J
        assert r["shoot_auto"] == "krylov"


def test_fip_averages_the_task_gradient(ranks):
    _, _, x, y = fip_problem()

    def both_halves(net):  # the mean over the two ranks of each one's mean loss
        halves = [F.cross_entropy(net(x[s : s + 4]), y[s : s + 4]) for s in (0, 4)]
        return 0.5 * (halves[0] + halves[1])

    single = fip_weights(both_halves)
    for r in ranks:
        for got, want in zip(r["fip"], single, strict=True):
            _close(got, want)
    start = flat_weights(fip_problem()[0])
    assert float((single[0] - start).abs().max()) > 1e-3  # the step moved


def test_errors_that_need_a_group(ranks):
    for r in ranks:
        keys = ("error_dense", "error_output", "error_dense_matrix")
        for key in (*keys, "error_shoot_dense", "error_collocation"):
            kind, message = r[key]
            assert kind == "ValueError" and "whole output Jacobian" in message, r[key]
        kind, message = r["error_group_type"]
        assert kind == "TypeError" and "ProcessGroup" in message
        kind, message = r["error_shapes"]
        assert kind == "ValueError" and "[(5,), (1, 5)]" in message
        kind, message = r["error_dims"]
        assert kind == "ValueError" and "[39, 30]" in message
        kind, message = r["error_batch_counts"]  # both ranks raise; neither waits forever
        assert kind == "ValueError" and "1 of the 2 ranks have another batch" in message


def test_process_group_without_torch_distributed():
    import torch.distributed as dist

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        PullbackMetric.from_module(network(), task_inputs(), process_group=object())
    net, anchors, _, _ = fip_problem()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        FIP(net.parameters(), model=net, anchor_inputs=anchors, process_group=object())
