r"""The problem of ``test_distributed.py``, and one rank of its two-process run.

Imported by the test (the problem, and :func:`compute` for the one-process reference on the
union of the shards) and run as a script by each rank::

    python tests/data_parallel_case.py RANK WORLD_SIZE INIT_FILE OUT_FILE

A rank joins a gloo process group through ``file://INIT_FILE``, runs :func:`compute` on its
shard with ``process_group``, runs FIP steps on its half of a new-task batch, provokes the
errors that need a live group, and saves everything to ``OUT_FILE`` (:func:`torch.save`).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
from dense_reference import flat_weights, make_mlp, randn

from manifolds import PullbackMetric
from manifolds.geodesic import discrete_energy, relax
from riemfip.connectivity import path_energy
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

    # errors: local ones first, then the ones the collective check finds (on both ranks)
    out["error_dense"] = _error(lambda: metric.solve(w, b, method="dense"))
    out["error_output"] = _error(lambda: metric.acceleration(w, b, method="output"))
    out["error_dense_matrix"] = _error(lambda: metric.dense(w))
    out["error_group_type"] = _error(
        lambda: PullbackMetric.from_module(net, x, process_group="world")
    )
    odd = x if rank == 0 else x.unsqueeze(1)  # samples (5,) on rank 0, (1, 5) on rank 1
    out["error_shapes"] = _error(lambda: PullbackMetric.from_module(net, odd, process_group=group))
    other = net if rank == 0 else make_mlp((5, 3, 3), seed=3)
    out["error_dims"] = _error(lambda: PullbackMetric.from_module(other, x, process_group=group))
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
