r"""The problem of ``test_distributed.py``, and one rank of its two-process run.

Imported by the test (the problem, and :func:`compute` for the one-process reference on the
union of the shards) and run as a script by each rank::

    python tests/data_parallel_case.py RANK WORLD_SIZE INIT_FILE OUT_FILE

A rank joins a gloo process group through ``file://INIT_FILE``, runs :func:`compute` on its
shard with ``process_group``, runs FIP steps on its half of a new-task batch, relaxes a
geodesic by minibatches of its shards (:func:`minibatch_path`), shoots one by Newton-Krylov
(:func:`shooting_path`), provokes the errors that need a live group, and saves everything to
``OUT_FILE`` (:func:`torch.save`).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
from dense_reference import flat_weights, make_mlp, randn

from manifolds import PullbackMetric
from manifolds.geodesic import Minibatch, collocation, discrete_energy, relax, shoot
from riemfip.connectivity import connect, path_energy
from riemfip.optim import FIP

OUTPUT_METRIC = "fisher"
DAMPING = 1e-2
#: Six task inputs, split unevenly: rank 0 holds ``x[:2]``, rank 1 ``x[2:]``.
SHARDS = (slice(0, 2), slice(2, 6))
#: Conjugate-gradient tolerance of the solves, near float64's attainable accuracy.
TOL = 1e-13


def network():
    """The 5-4-3 tanh MLP (39 weights), float64."""
    return make_mlp((5, 4, 3), seed=3, scale=1.5)


def task_inputs() -> torch.Tensor:
    """All six task inputs; each rank takes its :data:`SHARDS` entry."""
    return randn(6, 5, seed=4)


def vectors(n: int) -> dict[str, torch.Tensor]:
    """A tangent ``v``, a right-hand side ``b`` and a bent 4-point path from ``w``."""
    w = flat_weights(network())
    t = torch.linspace(0, 1, 4, dtype=w.dtype)[:, None]
    bend = randn(n, seed=7)
    points = w + t * randn(n, seed=8) + t * (1 - t) * bend
    return {"w": w, "v": randn(n, seed=5), "b": randn(n, seed=6), "points": points}


def compute(metric: PullbackMetric) -> dict[str, object]:
    """Every data-parallel route of ``metric``, the same calls in one process or on every rank."""
    vec = vectors(metric.dim)
    w, v, b, points = vec["w"], vec["v"], vec["b"], vec["points"]
    solve = metric.solve_result(w, b, tol=TOL)
    acc = metric.acceleration_result(w, v, tol=TOL, method=None)
    spectrum = metric.spectrum(w, 3)
    pts = points.clone().requires_grad_(True)
    energy = discrete_energy(metric, pts)
    (energy_grad,) = torch.autograd.grad(energy, pts)
    path = relax(metric, points[0], points[-1], n_points=5, maxiter=4)
    return {
        "matvec": metric.matvec(w, v),
        "inner": metric.inner(w, v, b),
        "norm": metric.norm(w, v),
        "solve": solve.x,
        "solve_method": solve.method,
        "acceleration": acc.x,
        "acceleration_method": acc.method,
        "eigenvalues": spectrum.eigenvalues,
        "eigenvectors": spectrum.eigenvectors,
        "energy": energy.detach(),
        "energy_grad": energy_grad,
        "path_energy": path_energy(metric, points),
        "relax_points": path.points,
    }


#: The new task of the FIP check: 8 inputs, rank r trains on ``[4 r, 4 r + 4)``.
FIP_STEPS = 2


def fip_problem():
    """A 5-4-3 network, 10 replicated anchors, and the new task's 8 labelled inputs."""
    net = make_mlp((5, 4, 3), seed=11)
    anchors = randn(10, 5, seed=12)
    x = randn(8, 5, seed=13)
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(14))
    return net, anchors, x, y


def fip_weights(loss_fn, process_group=None) -> list[torch.Tensor]:
    """The flat weights after each of :data:`FIP_STEPS` FIP steps on ``loss_fn(net)``."""
    net, anchors, _, _ = fip_problem()
    opt = FIP(
        net.parameters(), lr=0.2, model=net, anchor_inputs=anchors, process_group=process_group
    )
    out = []
    for _ in range(FIP_STEPS):
        opt.zero_grad()
        loss_fn(net).backward()
        opt.step()
        out.append(flat_weights(net))
    return out


#: The minibatch route: 15 inputs met in 3 batches per epoch, the same batch order every
#: epoch; at iteration ``i`` the ranks together hold ``x[5 i : 5 i + 5]``, rank 0 its first
#: :data:`MB_SPLIT` inputs and rank 1 the rest. 4 held-out inputs, rank 0 holds the first.
MB_BATCHES, MB_SPLIT = 3, 2
#: 12 Adam steps, a held-out check every 2 (a plateau, and a step-size cut, within the run).
MB_POLICY = Minibatch(epochs=4, lr=0.05, check_every=2, patience=2, rtol=0.02)


def minibatch_batches(rank: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(batches, held_out)``: the union's (``rank=None``) or rank ``rank``'s share."""
    x, held = randn(5 * MB_BATCHES, 5, seed=20), randn(4, 5, seed=21)
    union = [x[5 * i : 5 * i + 5] for i in range(MB_BATCHES)]
    if rank is None:
        return union, held
    part = slice(0, MB_SPLIT) if rank == 0 else slice(MB_SPLIT, None)
    return [b[part] for b in union], held[:1] if rank == 0 else held[1:]


def minibatch_path(batches, held_out, process_group=None) -> dict[str, object]:
    """:func:`riemfip.connect` by minibatches between :func:`network` and another 5-4-3
    network (a 4-point path)."""
    other = make_mlp((5, 4, 3), seed=22, scale=1.5)
    options = {} if process_group is None else {"process_group": process_group}
    path = connect(
        network(),
        other,
        batches,
        output_metric=OUTPUT_METRIC,
        damping=DAMPING,
        n_points=4,
        method=MB_POLICY,
        held_out=held_out,
        metric_options=options,
    )
    return {
        "mb_points": path.points,
        "mb_iterations": path.iterations,
        "mb_status": int(path.status),
        "mb_objective": path.metadata["objective"],
        "mb_objective_line": path.metadata["objective_line"],
        "mb_held_out": torch.tensor(path.metadata["held_out_energies"]),
        "mb_length": path.length,
    }


#: Newton-Krylov shooting on the first three task inputs (rank 0 holds one, rank 1 two):
#: one RK4 step, CG accelerations, to an end 0.3 (per weight) from ``w``.
SHOOT_SHARDS = (slice(0, 1), slice(1, 3))
SHOOT = {"steps": 1, "jacobian": "krylov", "solver": "cg", "maxiter": 8, "tol": 1e-9}


def shooting_metric(process_group=None, rank: int | None = None) -> PullbackMetric:
    """The metric of the shooting check: of all three inputs, or of rank ``rank``'s share."""
    x = task_inputs()[: SHOOT_SHARDS[-1].stop]
    x = x if rank is None else x[SHOOT_SHARDS[rank]]
    return PullbackMetric.from_module(
        network(), x, output_metric=OUTPUT_METRIC, damping=DAMPING, process_group=process_group
    )


def shooting_ends() -> tuple[torch.Tensor, torch.Tensor]:
    w = flat_weights(network())
    return w, w + 0.3 * randn(w.numel(), seed=23)


def shooting_path(metric: PullbackMetric) -> dict[str, object]:
    """:func:`manifolds.geodesic.shoot` with ``jacobian="krylov"`` between
    :func:`shooting_ends`."""
    path = shoot(metric, *shooting_ends(), **SHOOT)
    return {
        "shoot_v0": path.v0,
        "shoot_points": path.points,
        "shoot_status": int(path.status),
        "shoot_residual": path.residual,
        "shoot_iterations": path.iterations,
        "shoot_defects": torch.tensor(path.metadata["defect_history"]),
    }


def _error(fn) -> tuple[str, str] | None:
    """``(type name, message)`` of what ``fn()`` raises, or ``None``."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 -- recorded for the test to judge
        return type(err).__name__, str(err)
    return None


def run_rank(rank: int) -> dict[str, object]:
    """This rank's results (the process group is initialized)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    group = dist.group.WORLD
    net, x = network(), task_inputs()[SHARDS[rank]]
    metric = PullbackMetric.from_module(
        net, x, output_metric=OUTPUT_METRIC, damping=DAMPING, process_group=group
    )
    out = compute(metric)
    out["samples"] = (metric.data_parallel.samples, metric.data_parallel.local_samples)
    w, b = vectors(metric.dim)["w"], vectors(metric.dim)["b"]

    _, _, xf, yf = fip_problem()
    mine = slice(4 * rank, 4 * rank + 4)
    out["fip"] = fip_weights(lambda m: F.cross_entropy(m(xf[mine]), yf[mine]), group)
    out |= minibatch_path(*minibatch_batches(rank), group)
    shooting = shooting_metric(group, rank)
    out |= shooting_path(shooting)
    ends = shooting_ends()
    out["shoot_auto"] = shoot(shooting, *ends, steps=1, maxiter=0).metadata["jacobian"]

    # errors: local ones first, then the ones the collective check finds (on both ranks)
    out["error_dense"] = _error(lambda: metric.solve(w, b, method="dense"))
    out["error_output"] = _error(lambda: metric.acceleration(w, b, method="output"))
    out["error_dense_matrix"] = _error(lambda: metric.dense(w))
    out["error_shoot_dense"] = _error(lambda: shoot(shooting, *ends, jacobian="dense"))
    out["error_collocation"] = _error(lambda: collocation(shooting, *ends))
    out["error_group_type"] = _error(
        lambda: PullbackMetric.from_module(net, x, process_group="world")
    )
    odd = x if rank == 0 else x.unsqueeze(1)  # samples (5,) on rank 0, (1, 5) on rank 1
    out["error_shapes"] = _error(lambda: PullbackMetric.from_module(net, odd, process_group=group))
    other = net if rank == 0 else make_mlp((5, 3, 3), seed=3)
    out["error_dims"] = _error(lambda: PullbackMetric.from_module(other, x, process_group=group))
    batches, held = minibatch_batches(rank)
    uneven = batches[:2] if rank == 0 else batches  # rank 0 runs out of batches first
    out["error_batch_counts"] = _error(lambda: minibatch_path(uneven, held, group))
    return out


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    rank, world, init_file, out_file = int(argv[1]), int(argv[2]), argv[3], argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = run_rank(rank)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    torch.save(results, out_file)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: gloo's background threads can still be joined there
    # and abort the process ("terminate called without an active exception", exit -6) after
    # the results are safely written.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
