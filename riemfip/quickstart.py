"""Quickstart: a geodesic in the weight space of a trained MNIST network.

Trains a small MLP on the offline MNIST subset, puts the Fisher pullback metric
of its outputs on 128 anchor images on weight space, and integrates the
geodesic that leaves the trained weights along the natural-gradient direction
of weight decay (a move toward smaller weights). It prints, along the geodesic
and along the straight line with the same initial velocity, the KL drift of the
predictions on held-out test images, the test accuracy, and the geodesic's
speed (constant along an exact geodesic).

Run ``python -m riemfip.quickstart --help`` for the options.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from manifolds import PullbackMetric, WeightSpace
from riemfip.applications.classifiers import train_classifier
from riemfip.data import mnist_subset


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart with command-line arguments ``argv`` (default ``sys.argv[1:]``);
    returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=100, help="hidden width (784-H-10 MLP)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--anchor", type=int, default=128, help="anchor images for the metric")
    parser.add_argument("--length", type=float, default=1.0, help="geodesic length (Fisher units)")
    parser.add_argument("--steps", type=int, default=8, help="RK4 steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    ds = mnist_subset()
    net = nn.Sequential(nn.Linear(784, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    steps_per_epoch = math.ceil(len(ds.x_train) / 64)
    train_classifier(
        net, ds.x_train, ds.y_train, steps=args.epochs * steps_per_epoch, seed=args.seed
    )

    metric = PullbackMetric.from_module(
        net, ds.x_train[: args.anchor], output_metric="fisher", damping=1e-3, tol=1e-4, maxiter=300
    )
    space = WeightSpace(metric, expmap_steps=args.steps)
    fm = metric.module
    w0 = fm.flatten()
    print(
        f"MLP 784-{args.hidden}-10, {fm.dim} weights, trained {args.epochs} epochs on "
        f"{len(ds.x_train)} MNIST images ({time.perf_counter() - t0:.1f} s)"
    )

    # Initial velocity: natural gradient of -|w|^2/2, scaled to the requested Fisher length.
    v0 = space.egrad2rgrad(w0, -w0)
    v0 = v0 * (args.length / space.norm(w0, v0))
    path = space.geodesic(w0, v0, record=True, speeds=True)

    with torch.no_grad():
        ref = fm(w0, ds.x_test, train=False)

        def report(w):
            out = fm(w, ds.x_test, train=False)
            kl = metric.output_metric.divergence(out, ref).mean()
            acc = (out.argmax(1) == ds.y_test).float().mean()
            return float(kl), 100 * float(acc), float(w.norm())

        print(
            f"\n{'t':>5} | {'geodesic: KL':>12} {'acc %':>6} {'|w|':>7} | "
            f"{'line: KL':>9} {'acc %':>6} {'|w|':>7} | {'speed':>7}"
        )
        for t, w, s in zip(path.t, path.points, path.speeds, strict=True):
            g = report(w)
            line = report(w0 + t * v0)
            print(
                f"{float(t):5.2f} | {g[0]:12.5f} {g[1]:6.1f} {g[2]:7.2f} | "
                f"{line[0]:9.5f} {line[1]:6.1f} {line[2]:7.2f} | {float(s):7.4f}"
            )
    print(
        f"\nspeed drift along the geodesic: {path.speed_drift:.2e} (0 for an exact geodesic); "
        f"{path.solves} acceleration solves, worst CG residual {path.max_solve_residual:.1e}; "
        f"total {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
