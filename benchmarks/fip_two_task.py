"""Two-task class-incremental MNIST: FIP vs fine-tuning (and the authors' penalty mode).

Task A: digits 0-4; task B: digits 5-9; one MLP 784-100-100-10 with one shared
10-way head, trained on A, then on B for the same number of steps by each
method. FIP's anchor is 50 stored training images per old class (250), without
labels. Accuracies are 10-way, on the offline subset's test images of each task.

Run ``python benchmarks/fip_two_task.py --help``; prints a table and writes JSON.
Defaults take about 6 minutes on one CPU core (the two all-anchor FIP rows);
``--methods finetune,fip-shift --seeds 0,1,2,3,4`` about 2.

Measured with the defaults (``fip_two_task.json``: seed 0, 1200 task-B steps of batch
64, old-task accuracy 96.2% before task B; CPU time per step, 1 thread, on a shared
2-core machine):

==========  =======  =======  ===========  =============
method      old %    new %    ms CPU/step  x fine-tuning
==========  =======  =======  ===========  =============
finetune      0.0     96.6       0.9          1
fip          69.4     95.0     145          166
fip-noise    89.2     87.4      99          113
fip-shift    93.6     92.2       9.1         10.5
penalty      84.6     93.0       3.1          3.5
==========  =======  =======  ===========  =============

(The table above is from before FIP's rewrite; the rerun is in ``benchmarks/README.md``.)
``fip`` is FIP with only ``model`` and ``anchor_inputs`` (its defaults); ``fip-exact`` is
natural mode with lr 1.0 on the 200 fit anchors (50 held out), solved with all of them, as
points, at every step (the ``fip`` row of the table above); ``fip-noise`` adds
``GaussianNoise(0.1)`` neighbourhoods; ``fip-shift`` solves each step with 32 of the 200
fit anchors in rotation, each shifted by up to one pixel and given noise 0.1
(``RandomShift(1, std=0.1)``), pulls all fit anchors back after each step, at lr 0.5;
``penalty`` is the authors' formulation (``FIPPenalty``) with normalised steps of length
0.3 and beta 1.

Over seeds 0-4 (``fip_two_task_seeds.json``) ``fip-shift`` keeps 93.9% old (every seed
within 3 points of its 95.6-96.2% before) and reaches 91.9% new, against 96.5% for
fine-tuning; seed 4 falls short of 95% of fine-tuning (90.8% vs 91.6%). The
new-task accuracy of ``fip-shift`` levels off near 92% while fine-tuning's stays near
96.6%, so the 95% bar sits at its plateau and the outcome per seed depends on the
step count (``--steps``, every method alike; ``fip_two_task_seeds_{1800,2400}.json``):

=====  ===============  ===============  =========================
steps  old % (mean)     new % (mean)     seeds meeting both targets
=====  ===============  ===============  =========================
1200   93.9             91.9             4 of 5 (seed 4 new 90.8 < 91.6)
1800   94.0             92.2             5 of 5
2400   93.8             91.9             3 of 5 (new 0.2-0.5 short)
=====  ===============  ===============  ========================= With 300 steps
at lr 1 (the previous setting) the subset steps diverged on shifted anchors unless
``correct_all`` was on, and all-anchor steps on shifted anchors learned the new task
slowly (93.2% old, 75.4% new).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from torch import nn

from riemfip.data import mnist_subset
from riemfip.optim import (
    FIP,
    AnchorSampling,
    DriftGuard,
    FIPPenalty,
    GaussianNoise,
    NeighbourNoise,
    PullBack,
    RandomShift,
)

METHODS = ("finetune", "fip", "fip-exact", "fip-noise", "fip-shift", "penalty")


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


def run_task_b(net, opt, x, y, *, steps, batch, seed, classes=None):
    """Train on task B; with ``classes`` (the labels trick) the cross-entropy is taken over
    those logits only, so the new task's loss never pushes the old classes' logits down."""
    t0, c0 = time.perf_counter(), time.thread_time()
    shrunk = 0
    for xb, yb in batches(x, y, steps=steps, batch=batch, seed=seed):
        opt.zero_grad()
        out = net(xb)
        if classes is not None:
            out, yb = out[:, classes], yb - classes[0]
        nn.functional.cross_entropy(out, yb).backward()
        opt.step()
        info = getattr(opt, "last_info", None)
        if info:
            shrunk += info[0].shrunk
    return time.perf_counter() - t0, time.thread_time() - c0, shrunk


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="task-B steps for every method")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ft-lr", type=float, default=0.3, help="fine-tuning SGD learning rate")
    p.add_argument("--lr", type=float, default=1.0, help="fip, fip-noise: natural-mode lr")
    p.add_argument("--shift-lr", type=float, default=0.5, help="fip-shift: natural-mode lr")
    p.add_argument("--epochs-a", type=int, default=5)
    p.add_argument("--anchors-per-class", type=int, default=50)
    p.add_argument("--metric", default=None, help="FIP output metric (default: FIP's)")
    p.add_argument("--damping", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--holdout-fraction", type=float, default=None)
    p.add_argument("--drift-budget", type=float, default=None)
    p.add_argument("--correction", type=float, default=None)
    p.add_argument(
        "--anchor-batch", type=int, default=32, help="fip-shift: fit anchors per step (0: all)"
    )
    p.add_argument(
        "--no-correct-all",
        action="store_true",
        help="fip-shift: no Cauchy pull-back on all fit anchors after each step",
    )
    p.add_argument("--shift", type=int, default=1, help="fip-shift: RandomShift max pixel shift")
    p.add_argument("--noise", type=float, default=0.1, help="fip-noise, fip-shift: noise std")
    p.add_argument(
        "--neighbours",
        type=int,
        default=0,
        help="fip-noise: NeighbourNoise with this many neighbours instead of GaussianNoise",
    )
    p.add_argument("--neighbour-scale", type=float, default=0.5)
    p.add_argument(
        "--labels-trick",
        action="store_true",
        help="every method: task-B cross-entropy over the new classes' logits only",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--penalty-lr", type=float, default=0.3, help="penalty mode: step length")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="", help="comma-separated seeds: per-seed runs and means")
    p.add_argument("--json", default="fip_two_task.json", help="output file ('' for none)")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)

    if args.seeds:
        seeds = [int(v) for v in args.seeds.split(",")]
        runs = {str(seed): run_seed(args, methods, seed) for seed in seeds}
        mean = {
            key: {
                k: sum(r[key][k] for r in runs.values()) / len(runs)
                for k in runs[str(seeds[0])][key]
                if k in ("old", "new", "step_cpu_seconds")
            }
            for key in ["before", *methods]
        }
        results = {"config": vars(args), "seeds": runs, "mean": mean}
        shown = mean
        print(f"mean over seeds {seeds}:")
    else:
        results = {"config": vars(args), **run_seed(args, methods, args.seed)}
        shown = results
    print(f"before task B: old {shown['before']['old']:.1f}%  ({args.steps} task-B steps each)")
    for method in methods:
        r = shown[method]
        ratio = (
            r["step_cpu_seconds"] / shown["finetune"]["step_cpu_seconds"]
            if "finetune" in shown
            else math.nan
        )
        print(
            f"{method:>10}: old {r['old']:5.1f}%  new {r['new']:5.1f}%  "
            f"({r['step_cpu_seconds'] * 1e3:.1f} ms CPU/step, {ratio:.1f}x fine-tuning)"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


def run_seed(args, methods, seed: int) -> dict:
    """Train task A with ``seed``, then task B with every method; accuracies and step times."""
    torch.manual_seed(seed)
    ds = mnist_subset()
    old_tr, new_tr = ds.y_train < 5, ds.y_train >= 5
    old_te, new_te = ds.y_test < 5, ds.y_test >= 5
    xa, ya = ds.x_train[old_tr], ds.y_train[old_tr]
    xb, yb = ds.x_train[new_tr], ds.y_train[new_tr]
    anchors = torch.cat([xa[ya == c][: args.anchors_per_class] for c in range(5)])

    net_a = mlp()
    train_task_a(net_a, xa, ya, epochs=args.epochs_a, seed=seed)

    def evaluate(net):
        return {
            "old": accuracy(net, ds.x_test[old_te], ds.y_test[old_te]),
            "new": accuracy(net, ds.x_test[new_te], ds.y_test[new_te]),
        }

    def fip_options(method: str) -> dict:
        if method == "fip":  # the defaults: only model and anchor_inputs
            return {}
        options = {"momentum": args.momentum}
        for key in ("metric", "damping"):
            if getattr(args, key) is not None:
                options["output_metric" if key == "metric" else key] = getattr(args, key)
        if args.drift_budget is not None:
            options["guard"] = DriftGuard(budget=args.drift_budget)
        if args.correction is not None:
            options["pullback"] = PullBack(strength=args.correction)
        sampling = {}
        if args.holdout_fraction is not None:
            sampling["holdout_fraction"] = args.holdout_fraction
        if method == "fip-shift":
            options["lr"] = args.shift_lr
            sampling["transform"] = RandomShift(args.shift, shape=(28, 28), std=args.noise)
            sampling["batch"] = args.anchor_batch or None
            options["pullback"] = PullBack(
                strength=1.0 if args.correction is None else args.correction,
                all_anchors=not args.no_correct_all,
            )
        else:
            options["lr"] = args.lr
            sampling["batch"] = None  # every fit anchor at every step
            sampling["transform"] = None
            if method == "fip-noise" and args.neighbours > 0:
                sampling["transform"] = NeighbourNoise(
                    k=args.neighbours, scale=args.neighbour_scale, std=args.noise, inputs=anchors
                )
            elif method == "fip-noise":
                sampling["transform"] = GaussianNoise(args.noise)
        options["anchors"] = AnchorSampling(**sampling)
        return options

    results = {"before": evaluate(net_a)}
    for method in methods:
        net = copy.deepcopy(net_a)
        t0 = time.perf_counter()
        if method == "finetune":
            opt = torch.optim.SGD(net.parameters(), lr=args.ft_lr)
        elif method in ("fip", "fip-exact", "fip-noise", "fip-shift"):
            opt = FIP(net.parameters(), model=net, anchor_inputs=anchors, **fip_options(method))
        elif method == "penalty":
            opt = FIPPenalty(
                net.parameters(),
                model=net,
                anchor_inputs=anchors,
                lr=args.penalty_lr,
                beta=args.beta,
            )
        else:
            raise SystemExit(f"unknown method {method!r}")
        secs, cpu, shrunk = run_task_b(
            net,
            opt,
            xb,
            yb,
            steps=args.steps,
            batch=args.batch,
            seed=seed + 1,
            classes=list(range(5, 10)) if args.labels_trick else None,
        )
        row = {
            **evaluate(net),
            "seconds": time.perf_counter() - t0,
            "step_seconds": secs / args.steps,
            "step_cpu_seconds": cpu / args.steps,
        }
        if isinstance(opt, (FIP, FIPPenalty)):
            info = opt.last_info[0]
            row.update(
                holdout_drift=info.drift.divergence,
                holdout_agreement=info.drift.agreement,
                shrunk_steps=shrunk,
            )
        results[method] = row
    return results


if __name__ == "__main__":
    raise SystemExit(main())
