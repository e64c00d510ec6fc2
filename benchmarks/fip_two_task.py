"""Two-task class-incremental MNIST: FIP vs fine-tuning (and the authors' penalty mode).

Task A: digits 0-4; task B: digits 5-9; one MLP 784-100-100-10 with one shared
10-way head, trained on A, then on B for the same number of steps by each
method. FIP's anchor is 50 stored training images per old class (250), without
labels. Accuracies are 10-way, on the offline subset's test images of each task.

Run ``python benchmarks/fip_two_task.py --help``; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

from riemfip.data import mnist_subset
from riemfip.optim import FIP


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def accuracy(net, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((net(x).argmax(1) == y).float().mean())


def batches(x, y, *, steps, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch + 1, batch):
            if done == steps:
                return
            idx = perm[i : i + batch]
            yield x[idx], y[idx]
            done += 1


def train_task_a(net, x, y, *, epochs, seed):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for xb, yb in batches(x, y, steps=epochs * (len(x) // 64), batch=64, seed=seed):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()


def run_task_b(net, opt, x, y, *, steps, batch, seed):
    t0 = time.perf_counter()
    shrunk = 0
    for xb, yb in batches(x, y, steps=steps, batch=batch, seed=seed):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
        info = getattr(opt, "last_info", None)
        if info:
            shrunk += info[0].shrunk
    return time.perf_counter() - t0, shrunk


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="task-B steps for every method")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="SGD / FIP natural-mode learning rate")
    p.add_argument("--epochs-a", type=int, default=5)
    p.add_argument("--anchors-per-class", type=int, default=50)
    p.add_argument("--metric", default=None, help="FIP output metric (default: FIP's)")
    p.add_argument("--damping", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--refresh-every", type=int, default=None)
    p.add_argument("--holdout-fraction", type=float, default=None)
    p.add_argument("--drift-budget", type=float, default=None)
    p.add_argument("--penalty", action="store_true", help="also run the authors' penalty mode")
    p.add_argument("--penalty-lr", type=float, default=0.01)
    p.add_argument("--beta", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="fip_two_task.json")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    ds = mnist_subset()
    old_tr, new_tr = ds.y_train < 5, ds.y_train >= 5
    old_te, new_te = ds.y_test < 5, ds.y_test >= 5
    xa, ya = ds.x_train[old_tr], ds.y_train[old_tr]
    xb, yb = ds.x_train[new_tr], ds.y_train[new_tr]
    anchors = torch.cat([xa[ya == c][: args.anchors_per_class] for c in range(5)])

    net_a = mlp()
    train_task_a(net_a, xa, ya, epochs=args.epochs_a, seed=args.seed)

    def evaluate(net):
        return {
            "old": accuracy(net, ds.x_test[old_te], ds.y_test[old_te]),
            "new": accuracy(net, ds.x_test[new_te], ds.y_test[new_te]),
        }

    results = {"config": vars(args), "before": evaluate(net_a)}

    net = copy.deepcopy(net_a)
    secs, _ = run_task_b(
        net,
        torch.optim.SGD(net.parameters(), lr=args.lr),
        xb,
        yb,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed + 1,
    )
    results["finetune"] = {**evaluate(net), "seconds": secs}

    options = {"lr": args.lr, "momentum": args.momentum, "refresh_every": args.refresh_every}
    for key in ("metric", "damping", "holdout_fraction", "drift_budget"):
        if getattr(args, key) is not None:
            options["output_metric" if key == "metric" else key] = getattr(args, key)
    net = copy.deepcopy(net_a)
    t0 = time.perf_counter()
    opt = FIP(net.parameters(), model=net, anchor_inputs=anchors, **options)
    secs, shrunk = run_task_b(
        net, opt, xb, yb, steps=args.steps, batch=args.batch, seed=args.seed + 1
    )
    info = opt.last_info[0]
    results["fip"] = {
        **evaluate(net),
        "seconds": time.perf_counter() - t0,
        "rank": info.rank,
        "holdout_drift": info.drift.divergence,
        "holdout_agreement": info.drift.agreement,
        "shrunk_steps": shrunk,
    }

    if args.penalty:
        net = copy.deepcopy(net_a)
        opt = FIP(
            net.parameters(),
            model=net,
            anchor_inputs=anchors,
            mode="penalty",
            lr=args.penalty_lr,
            beta=args.beta,
        )
        secs, _ = run_task_b(
            net, opt, xb, yb, steps=args.steps, batch=args.batch, seed=args.seed + 1
        )
        results["penalty"] = {**evaluate(net), "seconds": secs}

    print(f"before task B: old {results['before']['old']:.1f}%")
    for name in ("finetune", "fip", "penalty"):
        if name in results:
            r = results[name]
            print(f"{name:>9}: old {r['old']:5.1f}%  new {r['new']:5.1f}%  ({r['seconds']:.1f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
