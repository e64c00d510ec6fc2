"""Benchmark: LeNet-300-100 on the offline MNIST subset pruned to 90/95/98/99% global sparsity.

Methods (each from the same dense network, each that trains with the same step budget):
one-shot global magnitude pruning; magnitude pruning + masked fine-tuning; FIP
toward the magnitude-pruned target, hard mask, masked fine-tuning
(:mod:`riemfip.applications.sparsify`).

Writes ``<name>.json`` and ``<name>.png`` to ``--out`` (default name
``sparsify_lenet``). The dense network (``sparsify_lenet_dense_seed<S>_<E>ep.pt``, a
:mod:`riemfip.checkpoint`)
and every finished row (the JSON itself) are checkpoints: rerunning resumes;
``--fresh`` starts over.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/sparsify_lenet.py`` (about 2 CPU-minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from riemfip.applications.classifiers import accuracy, lenet_300_100, trained_classifier
from riemfip.applications.sparsify import sparsify_sweep
from riemfip.data import mnist_subset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--dense-epochs", type=int, default=20)
    parser.add_argument(
        "--budget-epochs", type=float, default=5.0, help="steps per method, in epochs"
    )
    parser.add_argument(
        "--fip-fraction", type=float, default=0.8, help="share of the budget on the path"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fip",
        type=json.loads,
        default={},
        help="fip_prune settings as JSON, e.g. '{\"lr\": 0.5}'",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="sparsify_lenet", help="stem of the output files")
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    ds = mnist_subset()
    steps_per_epoch = math.ceil(len(ds.x_train) / args.batch_size)
    steps = round(args.budget_epochs * steps_per_epoch)
    fip_steps = round(args.fip_fraction * steps)
    args.out.mkdir(parents=True, exist_ok=True)
    dense_path = args.out / f"sparsify_lenet_dense_seed{args.seed}_{args.dense_epochs}ep.pt"
    json_path = args.out / f"{args.name}.json"
    png_path = args.out / f"{args.name}.png"
    if args.fresh:
        dense_path.unlink(missing_ok=True)
        json_path.unlink(missing_ok=True)

    net = trained_classifier(
        lenet_300_100,
        ds.x_train,
        ds.y_train,
        steps=args.dense_epochs * steps_per_epoch,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint=dense_path,
        progress=True,
    )
    print(f"dense LeNet-300-100: test {100 * accuracy(net, ds.x_test, ds.y_test):.1f}%")

    result = sparsify_sweep(
        net,
        ds,
        args.sparsities,
        steps=steps,
        fip_steps=fip_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        fip_settings=args.fip,
        config={
            "architecture": "LeNet-300-100 (784-300-100-10, ReLU)",
            "dense_training": {
                "optimizer": "adam",
                "lr": 1e-3,
                "epochs": args.dense_epochs,
                "steps": args.dense_epochs * steps_per_epoch,
                "batch_size": args.batch_size,
                "seed": args.seed,
            },
            "budget_epochs": args.budget_epochs,
        },
        checkpoint=json_path,
        progress=True,
    )
    result.to_json(json_path)
    result.plot(png_path)
    print(result.table())
    print(f"wrote {json_path} and {png_path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
