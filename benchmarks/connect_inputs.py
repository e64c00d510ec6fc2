r"""Geodesics against the number of inputs: full-batch relax against the minibatch route.

Two pairs of MLPs are trained from two seeds on the offline MNIST subset (4,000 training /
1,000 test images, :func:`riemfip.data.mnist_subset`): a wide pair (784-100-100-10 by
default) and a narrow pair (784-16-10), whose straight line loses more. Between the two
networks of each pair, for each number :math:`N` of training inputs:

* ``relax``: :func:`riemfip.connectivity.connect`, full-batch L-BFGS on the energy of all
  :math:`N` inputs (``--relax-iters`` iterations at most);
* ``minibatch``: the same with ``method=Minibatch(...)``, a ``DataLoader`` over the :math:`N`
  inputs (batch 128), Adam on one batch's energy at a time, stopped when the energy on
  ``--held-out`` other training images stops improving (early stopping);
* ``minibatch+noise`` (the smallest :math:`N` only): the same, each batch's inputs perturbed
  afresh by :class:`riemfip.optim.ScaledNoise` (input neighbourhoods).

The held-out images are the last ``--held-out`` of the 4,000 training images; the
:math:`N` inputs are taken from the others (so :math:`N \le 4000 - \text{held-out}`, and the
largest :math:`N` is 4000 - held-out). Every path is scored on the 1,000 test images at its
``--n-points`` points: the worst accuracy along it, against the endpoints'. Costs are CPU
seconds of this process on one thread: training one endpoint, the Bézier curve
(:func:`riemfip.connectivity.fit_bezier`, on all 4,000 training images) and each geodesic.

Run: ``PYTHONPATH=. python benchmarks/connect_inputs.py`` (about 10 CPU minutes);
``--quick`` for a smoke run. Writes ``benchmarks/results/connect_inputs.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from manifolds.geodesic import Minibatch
from riemfip.applications.classifiers import mlp, trained_classifier
from riemfip.connectivity import (
    connect,
    connection_metric,
    evaluate_path,
    fit_bezier,
    path_energy,
    straight_line,
)
from riemfip.data import mnist_subset
from riemfip.optim import ScaledNoise

RESULTS = Path(__file__).resolve().parent / "results"


def cpu() -> float:
    """CPU seconds of this process."""
    return time.process_time()


def scored(model, path, test) -> dict:
    """Test accuracy (%) along ``path``: worst point, both ends, the midpoint."""
    ev = evaluate_path(model, path, test)
    acc = 100 * ev.accuracy
    return {
        "worst": float(acc.min()),
        "ends": [float(acc[0]), float(acc[-1])],
        "midpoint": float(acc[len(acc) // 2]),
        "gap": float(min(acc[0], acc[-1]) - acc.min()),
    }


def run_pair(hidden, ds, args) -> dict:
    """Everything for one architecture."""
    x, y = ds.x_train, ds.y_train
    test = (ds.x_test, ds.y_test)
    steps = args.epochs * math.ceil(len(x) / 64)
    arch = "784-" + "-".join(map(str, hidden)) + "-10"
    nets, train_s = [], []
    for seed in args.seeds:
        c = cpu()
        nets.append(
            trained_classifier(lambda: mlp([784, *hidden, 10]), x, y, steps=steps, seed=seed)
        )
        train_s.append(cpu() - c)
    a, b = nets
    out = {"architecture": arch, "train_endpoint_cpu_s": sum(train_s) / len(train_s)}
    line = straight_line(
        *(torch.nn.utils.parameters_to_vector(n.parameters()) for n in nets), args.n_points
    )
    out["line"] = scored(a, line, test)
    print(
        f"{arch}: endpoint trained in {out['train_endpoint_cpu_s']:.1f} CPU s; line {out['line']}",
        flush=True,
    )

    c = cpu()
    curve = fit_bezier(a, b, (x, y), epochs=args.bezier_epochs, seed=0)
    out["bezier"] = {**scored(a, curve.sample(args.n_points), test), "cpu_s": cpu() - c}
    print(f"  bezier {out['bezier']}", flush=True)

    pool, held_out = x[: len(x) - args.held_out], x[len(x) - args.held_out :]
    held_metric = connection_metric(a, held_out, damping=args.damping)
    out["line"]["held_out_energy"] = path_energy(held_metric, line)
    runs = []
    for n in args.inputs:
        n = min(n, len(pool))
        inputs = pool[:n]
        routes = ["relax", "minibatch"] + (["minibatch+noise"] if n == min(args.inputs) else [])
        for route in routes:
            c = cpu()
            if route == "relax":
                path = connect(
                    a,
                    b,
                    inputs,
                    damping=args.damping,
                    n_points=args.n_points,
                    maxiter=args.relax_iters,
                )
            else:
                loader = DataLoader(
                    TensorDataset(inputs),
                    batch_size=128,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(0),
                )
                policy = Minibatch(
                    epochs=math.ceil(args.mb_steps * 128 / n),
                    lr=args.lr,
                    patience=args.patience,
                    transform=ScaledNoise(args.noise) if route.endswith("noise") else None,
                )
                path = connect(
                    a,
                    b,
                    loader,
                    damping=args.damping,
                    n_points=args.n_points,
                    method=policy,
                    held_out=held_out,
                )
            spent = cpu() - c
            row = {
                "route": route,
                "inputs": n,
                **scored(a, path, test),
                "cpu_s": spent,
                "held_out_energy": path_energy(held_metric, path),
                "status": path.status.name,
                "iterations": path.iterations,
                "objective": path.metadata["objective"],
                "objective_line": path.metadata["objective_line"],
                "epochs": path.metadata.get("epochs"),
            }
            runs.append(row)
            print(
                f"  {route:16s} N={n:5d}: worst {row['worst']:.1f} (ends {row['ends'][0]:.1f}, "
                f"{row['ends'][1]:.1f}) {row['cpu_s']:.1f} CPU s {row['status']} "
                f"it {row['iterations']} E {row['objective']:.4f} (line {row['objective_line']:.4f}) "
                f"held-out E {row['held_out_energy']:.4f}",
                flush=True,
            )
    out["geodesics"] = runs
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wide", type=int, nargs="*", default=[100, 100])
    p.add_argument("--narrow", type=int, nargs="*", default=[16])
    p.add_argument("--epochs", type=int, default=10, help="training epochs of each MLP")
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    p.add_argument("--inputs", type=int, nargs="+", default=[256, 1024, 3500])
    p.add_argument("--held-out", type=int, default=500)
    p.add_argument("--damping", type=float, default=1e-4)
    p.add_argument("--n-points", type=int, default=9)
    p.add_argument("--relax-iters", type=int, default=150)
    p.add_argument("--mb-steps", type=int, default=2000, help="minibatch Adam steps at most")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--noise", type=float, default=0.3, help="ScaledNoise scale")
    p.add_argument("--bezier-epochs", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "connect_inputs.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.inputs, args.relax_iters, args.mb_epochs, args.bezier_epochs = (
            2,
            [256],
            10,
            2,
            1,
        )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = mnist_subset()
    start = cpu()
    pairs = [run_pair(h, ds, args) for h in (args.wide, args.narrow) if h]
    record = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pairs": pairs,
        "total_cpu_s": cpu() - start,
        "threads": 1,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out} ({record['total_cpu_s']:.0f} CPU s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
