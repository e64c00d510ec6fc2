r"""Mode connectivity on MNIST MLPs: geodesic vs. quadratic Bézier vs. straight line.

Two MLPs (784-512-512-10 ReLU by default) are trained from two seeds on the offline MNIST
subset (4,000 training / 1,000 test images, :func:`riemfip.data.mnist_subset`). Between them:

* the straight line :math:`(1-t) w_a + t w_b`;
* Garipov et al.'s quadratic Bézier curve, its control point trained on the training set
  (:func:`riemfip.connectivity.fit_bezier`);
* the geodesic of the Fisher pullback metric on ``--anchor`` training images
  (:func:`riemfip.connectivity.connect`, ``relax``), for each anchor size given.

Each path is evaluated at ``--n-points`` points on the test set and on the training set
(loss, accuracy, barrier, max error, lengths in weights and in function space on a fixed
held-out "probe" set of test images, and the Fisher energy on each geodesic's own anchors).
Results go to ``benchmarks/results/connectivity_mnist.json`` and ``.png``. Trained networks,
the Bézier control point and the geodesics are checkpointed under
``benchmarks/results/connectivity_mnist_cache/``, so an interrupted run resumes
(``--fresh`` starts over).

Reference (Garipov et al. 2018, MNIST MLP 784-512-512-512-10 on 60,000 images): endpoints
about 98.2% test accuracy, straight-line midpoint about 86.6%.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/connectivity_mnist.py``
(``--quick`` for a 784-64-10 smoke run).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from manifolds import FlatModule, Status
from riemfip.applications.classifiers import mlp, trained_classifier
from riemfip.connectivity import (
    compare_paths,
    connect,
    connection_metric,
    fit_bezier,
    path_energy,
    straight_line,
)
from riemfip.data import mnist_subset
from riemfip.geodesic import GeodesicPath

RESULTS = Path(__file__).resolve().parent / "results"


def train_mlp(hidden, x, y, *, seed: int, epochs: int, cache: Path) -> tuple[nn.Module, float]:
    """MLP 784-hidden-10 (ReLU), Adam (lr 1e-3, batch 64) from ``seed``; loaded from its
    checkpoint in ``cache`` when already trained (then the time is that of the load)."""
    start = time.perf_counter()
    net = trained_classifier(
        lambda: mlp([784, *hidden, 10]),
        x,
        y,
        steps=epochs * math.ceil(len(x) / 64),
        seed=seed,
        checkpoint=cache / f"mlp_{'-'.join(map(str, hidden))}_seed{seed}_ep{epochs}.pt",
    )
    return net, time.perf_counter() - start


def geodesic(a, b, anchor, args, cache: Path) -> GeodesicPath:
    """``connect`` on ``anchor``; resumed from (and saved to) the cache, in rounds."""
    file = cache / f"geodesic_anchor{len(anchor)}_K{args.n_points}_lam{args.damping:g}.pt"
    start = time.perf_counter()
    path = GeodesicPath.load(file) if file.is_file() else None
    done = 0 if path is None else int(path.metadata.get("total_iterations", path.iterations))
    spent = 0.0 if path is None else path.metadata.get("total_seconds")
    while done < args.relax_iters and (path is None or not path.converged):
        rnd = min(args.relax_round, args.relax_iters - done)
        new = connect(
            a,
            b,
            anchor,
            damping=args.damping,
            n_points=args.n_points,
            maxiter=rnd,
            history_size=args.history,
            init=path,
        )
        done += max(new.iterations, 1)
        new.metadata["total_iterations"] = done
        # Solver time over all rounds (None for a path cached before this was recorded).
        spent = None if spent is None else spent + new.metadata["seconds"]
        new.metadata["total_seconds"] = spent
        path = new
        path.save(file)
        print(
            f"  anchor {len(anchor)}: {done} L-BFGS iterations, objective "
            f"{path.metadata['objective']:.5f} (line {path.metadata['objective_line']:.5f}), "
            f"|grad| {path.residual:.2e}, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        if new.iterations == 0 or new.status == Status.BREAKDOWN:  # L-BFGS made no progress
            break
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    p.add_argument("--epochs", type=int, default=20, help="training epochs of each MLP")
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    p.add_argument("--anchor", type=int, nargs="+", default=[256], help="anchor sizes")
    p.add_argument("--damping", type=float, default=1e-4)
    p.add_argument("--n-points", type=int, default=9)
    p.add_argument("--relax-iters", type=int, default=150, help="L-BFGS iterations in all")
    p.add_argument("--relax-round", type=int, default=25, help="iterations between checkpoints")
    p.add_argument("--history", type=int, default=10, help="L-BFGS memory")
    p.add_argument("--bezier-epochs", type=int, default=20)
    p.add_argument("--bezier-lr", type=float, default=0.05)
    p.add_argument("--probe", type=int, default=500, help="test images for function length")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--fresh", action="store_true", help="ignore cached networks and paths")
    p.add_argument("--quick", action="store_true", help="784-64-10, small everything")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.epochs, args.anchor = [64], 5, [64]
        args.relax_iters, args.relax_round, args.bezier_epochs = 20, 10, 3
    torch.manual_seed(0)
    name = "connectivity_mnist" + ("_quick" if args.quick else "")
    cache = args.out / f"{name}_cache"
    if args.fresh and cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    ds = mnist_subset()
    train, test = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
    a, ta = train_mlp(args.hidden, *train, seed=args.seeds[0], epochs=args.epochs, cache=cache)
    b, tb = train_mlp(args.hidden, *train, seed=args.seeds[1], epochs=args.epochs, cache=cache)
    w_a, w_b = FlatModule(a).flatten(), FlatModule(b).flatten()
    arch = "784-" + "-".join(map(str, args.hidden)) + "-10"
    print(f"MLP {arch}: {w_a.numel()} weights; trained in {ta + tb:.0f} s", flush=True)

    start = time.perf_counter()
    bezier = fit_bezier(
        a,
        b,
        train,
        epochs=args.bezier_epochs,
        lr=args.bezier_lr,
        seed=0,
        checkpoint=cache / f"bezier_ep{args.bezier_epochs}.pt",
    )
    t_bezier = time.perf_counter() - start
    print(f"Bézier: {args.bezier_epochs} epochs, {t_bezier:.0f} s", flush=True)

    paths, timings, solver = {}, {}, {}
    for size in args.anchor:
        path = geodesic(a, b, ds.x_train[:size], args, cache)
        key = "geodesic" if len(args.anchor) == 1 else f"geodesic_{size}"
        paths[key] = path
        timings[key] = path.metadata.get("total_seconds")
        metric = connection_metric(a, ds.x_train[:size], damping=args.damping)
        solver[key] = {
            "anchor": size,
            "iterations": path.metadata.get("total_iterations", path.iterations),
            "converged": path.converged,
            "message": path.message,
            "grad_norm": path.residual,
            "energy_anchor_metric": path_energy(metric, path),
            "energy_line_anchor_metric": path_energy(
                metric, straight_line(w_a, w_b, args.n_points)
            ),
        }
    paths["bezier"] = bezier.sample(args.n_points)
    paths["line"] = straight_line(w_a, w_b, args.n_points)

    # Function-space lengths on held-out test images, the same metric for every path.
    probe = connection_metric(a, ds.x_test[: args.probe], damping=args.damping)
    meta = {
        "architecture": arch,
        "weights": w_a.numel(),
        "train_images": len(ds.x_train),
        "test_images": len(ds.x_test),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "output_metric": "fisher",
        "damping": args.damping,
        "n_points": args.n_points,
        "bezier_epochs": args.bezier_epochs,
        "bezier_lr": args.bezier_lr,
        "probe_images": args.probe,
        "geodesic_solver": solver,
        "seconds": {"bezier": t_bezier, **timings},
        "seconds_note": (
            "wall time on a shared 2-core CPU; Bézier: this invocation (a few seconds when "
            "resumed from its checkpoint); geodesics: solver time over all rounds (null for "
            "paths cached before that was recorded)"
        ),
        "reference": "Garipov et al. 2018 MNIST MLP: endpoints ~98.2%, line midpoint ~86.6%",
    }
    report = compare_paths(a, paths, test, metric=probe, metadata={**meta, "split": "test"})
    train_report = compare_paths(a, paths, train, metadata={**meta, "split": "train"})
    meta["seconds"]["total"] = time.perf_counter() - t0

    out = {
        "test": report.to_dict(),
        "train": train_report.to_dict(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    report.plot(
        args.out / f"{name}.png",
        title=f"MNIST MLP {arch}, seeds {args.seeds[0]} and {args.seeds[1]}: test set",
    )
    print("\ntest set (function length: Fisher chords on held-out probe images)")
    print(report.table())
    print("\ntraining set")
    print(train_report.table())
    for key, s in solver.items():
        print(
            f"{key}: {s['iterations']} L-BFGS iterations, converged={s['converged']}, "
            f"Fisher energy on its anchors {s['energy_anchor_metric']:.4f} vs line "
            f"{s['energy_line_anchor_metric']:.4f}"
        )
    print(f"\nwrote {args.out / name}.json and .png ({meta['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
