r"""Geodesic boundary-value problems at network scale: relax, then shoot, between two MNIST MLPs.

Two 784-300-100-10 tanh MLPs (266,610 weights) are trained from two seeds for a
few epochs on the offline MNIST subset (``riemfip.data.mnist_subset``); the metric
is the Fisher pullback of the outputs on ``--anchors`` training images with
damping ``--damping`` (:meth:`manifolds.PullbackMetric.from_module`). The script
runs :func:`riemfip.geodesic.relax` (``--points`` points) and then
:func:`riemfip.geodesic.shoot` started from the relaxed path (finite-difference
Newton–Krylov, accelerations by the metric's own solver), and records wall time,
iterations, residuals and lengths. Trained weights are cached in ``--cache``, and
the shooting velocity is checkpointed after each run (``--resume`` continues from
it), so an interrupted run loses little.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/geodesic_scale.py [--dtype float64] [--anchors 32]

Writes ``benchmarks/results/geodesic_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from manifolds import FlatModule, PullbackMetric
from riemfip.data import mnist_subset
from riemfip.geodesic import relax, shoot

HERE = Path(__file__).resolve().parent


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 300), nn.Tanh(), nn.Linear(300, 100), nn.Tanh(), nn.Linear(100, 10)
    )


def train(seed: int, ds, epochs: int, cache: Path) -> nn.Module:
    """Train (or load from ``cache``) one MLP with Adam; returns it in float32."""
    torch.manual_seed(seed)
    net = mlp()
    file = cache / f"mlp_seed{seed}_ep{epochs}.pt"
    if file.exists():
        net.load_state_dict(torch.load(file, weights_only=True))
        return net
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(ds.x_train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(ds.x_train[idx]), ds.y_train[idx]).backward()
            opt.step()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), file)
    return net


def accuracy(metric, w, x, y) -> float:
    with torch.no_grad():
        return float((metric.module(w, x, train=False).argmax(-1) == y).float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--anchors", type=int, default=32)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--points", type=int, default=9, help="relax: points K")
    parser.add_argument("--relax-maxiter", type=int, default=300)
    parser.add_argument("--steps", type=int, default=8, help="shoot: RK4 steps")
    parser.add_argument("--segments", type=int, default=1)
    parser.add_argument("--maxiter", type=int, default=10, help="shoot: Newton iterations")
    parser.add_argument("--krylov", type=int, default=20, help="shoot: GMRES iterations per step")
    parser.add_argument("--cg-tol", type=float, default=None)
    parser.add_argument(
        "--solver", default="cg", help="metric solve for accelerations (cg, output, auto)"
    )
    parser.add_argument("--tol", type=float, default=1e-4, help="shoot: endpoint tolerance")
    parser.add_argument("--skip-shoot", action="store_true")
    parser.add_argument("--resume", action="store_true", help="start shoot from the checkpoint")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/riemfip-geodesic-cache"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "geodesic_scale.json")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    ds = mnist_subset()
    t0 = time.perf_counter()
    nets = [train(seed, ds, args.epochs, args.cache) for seed in (0, 1)]
    t_train = time.perf_counter() - t0
    nets = [n.to(dtype) for n in nets]
    anchors = ds.x_train[: args.anchors].to(dtype)
    cg_tol = args.cg_tol if args.cg_tol is not None else (1e-8 if dtype == torch.float64 else 1e-5)
    metric = PullbackMetric.from_module(
        nets[0],
        anchors,
        output_metric="fisher",
        damping=args.damping,
        tol=cg_tol,
        maxiter=500,
        solver=args.solver,
        on_failure="ignore",
    )
    w0, w1 = metric.module.flatten(), FlatModule(nets[1]).flatten()
    xt, yt = ds.x_test.to(dtype), ds.y_test
    report = {
        "config": vars(args) | {"cache": str(args.cache), "out": str(args.out)},
        "n_weights": w0.numel(),
        "train_seconds": t_train,
        "test_accuracy": [accuracy(metric, w, xt, yt) for w in (w0, w1)],
        "euclidean_distance": float((w1 - w0).norm()),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=1), flush=True)

    # cost of one acceleration (CG solve) at w0 along the straight line
    t0 = time.perf_counter()
    res = metric.acceleration(w0, w1 - w0, return_info=True)
    report["acceleration"] = {
        "seconds": time.perf_counter() - t0,
        "cg_iterations": res.iterations,
        "residual": res.residual,
        "method": res.method,
    }
    print("acceleration", report["acceleration"], flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    rpath = relax(metric, w0, w1, args.points, maxiter=args.relax_maxiter)
    report["relax"] = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "iterations": rpath.iterations,
        "residual": rpath.residual,
        "tol": rpath.tol,
        "converged": rpath.converged,
        "message": rpath.message,
        "length": rpath.length,
        "energy": rpath.energy,
        "objective_line": rpath.metadata["objective_line"],
        "objective": rpath.metadata["objective"],
        "speed_spread": rpath.metadata["speed_spread"],
        "midpoint_test_accuracy": accuracy(metric, rpath.at(0.5), xt, yt),
        "line_midpoint_test_accuracy": accuracy(metric, 0.5 * (w0 + w1), xt, yt),
    }
    print("relax", report["relax"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if args.skip_shoot:
        return 0

    ckpt = args.cache / f"shoot_v0_{args.dtype}_{args.anchors}_{args.damping}_{args.steps}.pt"
    v_start = torch.load(ckpt, weights_only=True) if args.resume and ckpt.exists() else rpath.v0
    t0, c0 = time.perf_counter(), time.process_time()
    path = shoot(
        metric,
        w0,
        w1,
        v0=v_start,
        steps=args.steps,
        segments=args.segments,
        tol=args.tol,
        maxiter=args.maxiter,
        krylov_maxiter=args.krylov,
        verbose=True,
        callback=lambda it, v, rn: torch.save(v, ckpt),
    )
    torch.save(path.v0, ckpt)
    report["shoot"] = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "load_average_1min": os.getloadavg()[0],
        "seconds_including_relax": time.perf_counter() - t0 + report["relax"]["seconds"],
        "iterations": path.iterations,
        "flows": path.metadata["flows"],
        "residual": path.residual,
        "relative_residual": path.metadata["relative_residual"],
        "tol": path.tol,
        "converged": path.converged,
        "message": path.message,
        "length": path.length,
        "defect_history": path.metadata["defect_history"],
        "speed_drift_end": path.metadata["speed_drift_end"],
        "midpoint_test_accuracy": accuracy(metric, path.at(0.5), xt, yt),
        "resumed": bool(args.resume and ckpt.exists()),
    }
    print("shoot", report["shoot"], flush=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
