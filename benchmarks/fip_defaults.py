"""Do FIP's defaults hold? Two-task class-incremental problems, FIP given only ``model`` and
``anchor_inputs``, against fine-tuning at its best learning rate.

Each problem trains a network on task A (the first half of the classes, 0-4) and then on
task B (5-9) with one shared 10-way head and no task labels (class-incremental). Task B
runs for the same steps (same batches, same order) for every method:

* **fine-tuning**: SGD on task B's cross-entropy; its learning rate is picked on the first
  seed from ``--ft-lrs`` (the one with the best new-task accuracy) and used for every seed;
* **FIP** (``fip:defaults``): ``FIP(net.parameters(), model=net, anchor_inputs=anchors)``,
  nothing else set, on the same cross-entropy; the anchors are 50 training inputs per old
  class (250), without labels;
* other FIP settings for comparison (``--variants``; each on the problems named in
  ``VARIANTS``): ``previous`` (the defaults before issue 9's growth rule and two-output
  sketch: ``anchors=AnchorSampling(outputs=None), guard=DriftGuard()``), ``no-growth``
  (``guard=DriftGuard()``: the sketch without the growth rule), ``exact``
  (``anchors=AnchorSampling(batch=None, transform=None, outputs=None)``: every fit anchor,
  the points only, every output, every step; MLPs only, it costs 0.55 s a step on the CNNs),
  ``damping=1``, ``all-sketched`` (every fit anchor each step), ``all-sketched-lr0.1``; and
  any ``--setting NAME=KWARGS`` (a Python dict of FIP keyword arguments, evaluated with
  :mod:`riemfip.optim`'s names, the stored inputs ``anchors``, the ``fit_anchors`` among them
  and fine-tuning's chosen ``ft_lr`` in scope; ``NAME@P1,P2=...`` for some problems only);
* with ``--references``, methods that see what FIP is denied, to show where the targets
  sit: SGD at fine-tuning's lr (times ``--ref-lr-factor``) on each task-B batch plus as
  many labelled old-task examples, drawn from all of task A's training set (``joint``) or
  from the stored examples with their labels (``replay``).

Targets (issue 9, item 2), per seed: the old task within 3 points of its accuracy before
task B, and the new task at least 95% of fine-tuning's new-task accuracy (same seed).

Problems (``--problems``):

==============  ========================  =================================  ========  ========
name            data                      network                            A epochs  B epochs
==============  ========================  =================================  ========  ========
mlp-mnist       offline MNIST subset      MLP 784-100-100-10                 5         5
lenet5-mnist    offline MNIST subset      LeNet-5 (``riemfip.networks``)     5         5
mlp-digits      scikit-learn 8x8 digits   MLP 64-100-100-10                  20        15
cnn-digits      scikit-learn 8x8 digits   CNN conv16-conv32-pool-64-10       20        15
bn-cnn-digits   scikit-learn 8x8 digits   the same with BatchNorm            20        15
==============  ========================  =================================  ========  ========

The first four run by default; ``bn-cnn-digits`` (a BatchNorm network) when named.

Task A: plain SGD at lr 0.1, batch 64, as ``run_continual`` trains a first task
(``--task-a adam``: Adam at lr 1e-3, as ``fip_two_task.py`` does; an Adam-trained CNN
ends with penultimate features 4-6 times larger, and SGD on it diverges at lr 0.05).
Task B: batch 64, full batches only (MNIST: 2,000 task-B images, 31 steps an epoch, 155
steps; digits: 11 steps an epoch, 165 steps).
Times are process CPU time on one thread (``torch.set_num_threads(1)``) of the whole step:
forward, backward and ``step()``; the optimizer's constructor is timed apart (``setup_s``).

Usage::

    PYTHONPATH=. python benchmarks/fip_defaults.py                          # everything
    PYTHONPATH=. python benchmarks/fip_defaults.py --problems mlp-mnist --seeds 0 \\
        --variants defaults --setting "lr1=dict(lr=1.0)" --out /tmp/probe.json

Writes ``--out`` (default ``benchmarks/results/fip_defaults.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import riemfip.optim as ro
from riemfip.applications.classifiers import mlp
from riemfip.data import digits, mnist_subset
from riemfip.networks import lenet5
from riemfip.optim import FIP, AnchorSampling, DriftGuard
from riemfip.optim.anchor import holdout_mask

OLD, NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
NAN = float("nan")


def small_cnn(batchnorm: bool = False) -> nn.Module:
    """A small CNN for 1x8x8 inputs: conv 16@3x3, conv 32@3x3, 2x2 max pool, 512-64-10, ReLU;
    with ``batchnorm``, BatchNorm after each convolution (FIP then keeps the old task's running
    statistics and takes its metric in eval mode)."""

    def conv(c_in: int, c_out: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(c_out)] if batchnorm else []
        return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU()]

    return nn.Sequential(
        *conv(1, 16),
        *conv(16, 32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@dataclass(frozen=True)
class Problem:
    """A two-task problem: data source, image shape, network, epochs of each task."""

    data: str
    flatten: bool
    build: object
    label: str
    epochs_a: int
    epochs_b: int


PROBLEMS = {
    "mlp-mnist": Problem(
        "mnist", True, lambda: mlp([784, 100, 100, 10]), "MLP 784-100-100-10", 5, 5
    ),
    "lenet5-mnist": Problem("mnist", False, lenet5, "LeNet-5", 5, 5),
    "mlp-digits": Problem(
        "digits", True, lambda: mlp([64, 100, 100, 10]), "MLP 64-100-100-10", 20, 15
    ),
    "cnn-digits": Problem("digits", False, small_cnn, "CNN 8x8 (conv16-conv32-64)", 20, 15),
    "bn-cnn-digits": Problem(
        "digits",
        False,
        lambda: small_cnn(batchnorm=True),
        "CNN 8x8 with BatchNorm (conv16-BN-conv32-BN-64)",
        20,
        15,
    ),
}

ALL = frozenset(PROBLEMS)
#: The four problems of issue 9, run by default (``bn-cnn-digits`` when asked for).
ISSUE_PROBLEMS = [name for name in PROBLEMS if name != "bn-cnn-digits"]

#: name -> (FIP keyword arguments, problems it runs on by default)
VARIANTS = {
    "defaults": ({}, ALL),
    # the defaults before the growth rule and the two-output sketch (all C outputs per anchor,
    # no guard)
    "previous": ({"anchors": AnchorSampling(outputs=None), "guard": DriftGuard()}, ALL),
    # the two-output sketch without the growth rule
    "no-growth": ({"guard": DriftGuard()}, ALL),
    # every fit anchor, the points only, every output, every step (the exact per-step FIP)
    "exact": (
        {"anchors": AnchorSampling(batch=None, transform=None, outputs=None)},
        {"mlp-mnist", "mlp-digits"},
    ),
    # a softer metric: damping 1 instead of 1e-2 (relative to the metric's mean eigenvalue)
    "damping=1": ({"damping": 1.0}, ALL),
    # every fit anchor each step (with its ScaledNoise neighbourhood), sketched to 2 outputs
    "all-sketched": ({"anchors": AnchorSampling(batch=None)}, {"mlp-mnist"}),
    "all-sketched-lr0.1": (
        {"lr": 0.1, "anchors": AnchorSampling(batch=None)},
        {"mlp-mnist", "lenet5-mnist"},
    ),
}


def load(problem: Problem):
    """Train/test inputs and labels of the problem's dataset."""
    if problem.data == "mnist":
        return mnist_subset(flatten=problem.flatten)
    return digits(flatten=problem.flatten)


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """10-way accuracy (%) in eval mode."""
    net.eval()
    with torch.no_grad():
        return 100.0 * float((net(x).argmax(1) == y).float().mean())


def batches(n: int, batch: int, epochs: int, seed: int):
    """Index batches: ``epochs`` seeded permutations of ``range(n)``, full batches only."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i : i + batch]


def train_task_a(net, x, y, *, epochs: int, batch: int, seed: int, optimizer: str = "sgd") -> None:
    """Task A: plain SGD at lr 0.1 (``"sgd"``, as ``run_continual`` trains task 0), or Adam at
    lr 1e-3 (``"adam"``, as ``fip_two_task.py`` does)."""
    if optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for idx in batches(len(x), batch, epochs, seed):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()


def run_task_b(net, make_opt, x, y, *, epochs: int, batch: int, seed: int, mixed=None) -> dict:
    """Build the optimizer (timed apart) and train on task B; CPU time per step, FIP drift.
    ``mixed``: a callable giving a labelled old-task batch ``(x, y)`` that each step adds to
    task B's (joint training, replay)."""
    c0 = time.process_time()
    opt = make_opt(net)
    setup = time.process_time() - c0
    drifts, shares, kept, over = [], [], [], 0
    steps, error = 0, None
    net.train()
    if isinstance(opt, ro.PathOptimizer):  # FIP: BatchNorm by the old task's kept statistics
        ro.batchnorm_eval(net)
    c0 = time.process_time()
    try:
        for idx in batches(len(x), batch, epochs, seed):
            xb, yb = x[idx], y[idx]
            if mixed is not None:
                xo, yo = mixed()
                xb, yb = torch.cat([xb, xo]), torch.cat([yb, yo])
            opt.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
            steps += 1
            info = getattr(opt, "last_info", None)
            if info:
                drifts.append(info[0].drift.divergence)
                shares.append(info[0].protected_share)
                kept.append(info[0].kept_fraction)
                over += info[0].within_budget is False
    except (ValueError, RuntimeError, FloatingPointError) as err:  # FIP refuses to diverge
        error = f"step {steps + 1}: {type(err).__name__}: {err}"
    cpu = time.process_time() - c0
    out = {"steps": steps, "setup_s": setup, "step_ms": 1e3 * cpu / max(steps, 1)}
    if error is not None:
        return out | {"error": error}
    if drifts:
        final = opt.anchor_drift()
        out |= {
            "final_drift": final.divergence,
            "final_agreement": final.agreement,
            "max_drift": max(drifts),
            "mean_protected_share": statistics.fmean(shares),
            "mean_kept_fraction": statistics.fmean(kept),
            "steps_over_budget": over,
        }
    return out


def setting_options(options: dict | str, anchors: torch.Tensor, ft_lr: float) -> dict:
    """FIP keyword arguments, given as such or as the text of a ``--setting``, evaluated with
    :mod:`riemfip.optim`'s names, the run's ``anchors``, the ``fit_anchors`` among them (those
    FIP fits at the default ``holdout_fraction``, not the ones it holds out to measure drift)
    and fine-tuning's chosen ``ft_lr`` in scope."""
    if not isinstance(options, str):
        return options
    held_out = holdout_mask(len(anchors), AnchorSampling().holdout_fraction)
    scope = {k: getattr(ro, k) for k in ro.__all__} | {
        "anchors": anchors,
        "fit_anchors": anchors[~held_out],
        "ft_lr": ft_lr,
    }
    return eval(options, scope)  # a benchmark option, written by whoever runs it


def fip_maker(anchors: torch.Tensor, options: dict | str, ft_lr: float):
    """A maker of FIP with ``options`` (:func:`setting_options`) on ``model``'s parameters."""
    options = setting_options(options, anchors, ft_lr)

    def make(net):
        return FIP(net.parameters(), model=net, anchor_inputs=anchors, **options)

    return make


def sgd_maker(lr: float):
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=lr)

    return make


def split_tasks(ds):
    """``(task A train, task B train, test sets)``: task A the classes ``OLD``, task B the
    rest, each an ``(x, y)`` pair; the test sets ``{"old": (x, y), "new": (x, y)}``."""
    old_tr = torch.isin(ds.y_train, torch.tensor(OLD))
    old_te = torch.isin(ds.y_test, torch.tensor(OLD))
    tests = {
        "old": (ds.x_test[old_te], ds.y_test[old_te]),
        "new": (ds.x_test[~old_te], ds.y_test[~old_te]),
    }
    return (
        (ds.x_train[old_tr], ds.y_train[old_tr]),
        (ds.x_train[~old_tr], ds.y_train[~old_tr]),
        tests,
    )


def stored_examples(xa: torch.Tensor, ya: torch.Tensor, seed: int, per_class: int):
    """The old task's memory of a seed with its labels, ``(x, y)``: ``per_class`` training
    examples of each class in ``OLD``, drawn by a generator seeded ``10_000 + seed``."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    picks = [
        torch.nonzero(ya == c).flatten()[torch.randperm(int((ya == c).sum()), generator=gen)]
        for c in OLD
    ]
    idx = torch.cat([p[:per_class] for p in picks])
    return xa[idx], ya[idx]


def stored_inputs(xa: torch.Tensor, ya: torch.Tensor, seed: int, per_class: int) -> torch.Tensor:
    """The old task's memory of a seed, without labels (what FIP gets)."""
    return stored_examples(xa, ya, seed, per_class)[0]


#: Reference methods (``--references``): SGD at fine-tuning's lr on each task-B batch plus a
#: batch of the same size of labelled old-task examples, drawn with replacement from all of
#: task A's training set (``joint``) or from the stored examples FIP gets without labels
#: (``replay``). They see what FIP is denied (labels, or all of task A).
REFERENCES = ("joint", "replay")


def old_batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int):
    """A callable giving ``size`` random labelled examples of ``(x, y)`` per call."""
    gen = torch.Generator().manual_seed(20_000 + seed)

    def draw():
        idx = torch.randint(len(x), (size,), generator=gen)
        return x[idx], y[idx]

    return draw


def run_problem(name: str, args, variants: dict[str, dict]) -> dict:
    """Every seed of one problem: task A, fine-tuning (grid on the first seed), FIP variants."""
    problem = PROBLEMS[name]
    ds = load(problem)
    (xa, ya), (xb, yb), tests = split_tasks(ds)

    def evaluate(net) -> dict:
        return {k: accuracy(net, *v) for k, v in tests.items()}

    result = {
        "network": problem.label,
        "data": ds.name,
        "num_parameters": sum(p.numel() for p in problem.build().parameters()),
        "task_a_train": len(xa),
        "task_b_train": len(xb),
        "epochs_a": problem.epochs_a,
        "epochs_b": problem.epochs_b,
        "seeds": {},
    }
    ft_lr = None
    for seed in args.seeds:
        torch.manual_seed(seed)
        net_a = problem.build()
        train_task_a(
            net_a,
            xa,
            ya,
            epochs=problem.epochs_a,
            batch=args.batch,
            seed=seed,
            optimizer=args.task_a,
        )
        anchors = stored_inputs(xa, ya, seed, args.per_class)
        row = {"before": evaluate(net_a)}

        def run(make_opt, net_a=net_a, seed=seed, mixed=None):
            net = copy.deepcopy(net_a)
            stats = run_task_b(
                net,
                make_opt,
                xb,
                yb,
                epochs=problem.epochs_b,
                batch=args.batch,
                seed=seed + 1,
                mixed=mixed,
            )
            if "error" in stats:  # diverged: no accuracy to report
                return {"old": NAN, "new": NAN, **stats}
            return {**evaluate(net), **stats}

        if ft_lr is None:
            grid = {str(lr): run(sgd_maker(lr)) for lr in args.ft_lrs}
            result["ft_grid"] = {k: {"old": v["old"], "new": v["new"]} for k, v in grid.items()}
            ft_lr = float(max(grid, key=lambda k: (grid[k]["new"], -float(k))))
            result["ft_lr"] = ft_lr
            row["finetune"] = grid[str(ft_lr)]
        else:
            row["finetune"] = run(sgd_maker(ft_lr))
        for vname, options in variants.items():
            if name not in args.where[vname]:
                continue
            row[f"fip:{vname}"] = run(fip_maker(anchors, options, ft_lr))
            print(f"  {name} seed {seed} {vname}: {short(row, f'fip:{vname}')}", flush=True)
        memory = {"joint": (xa, ya), "replay": stored_examples(xa, ya, seed, args.per_class)}
        for ref in args.references:
            mixed = old_batches(*memory[ref], args.batch, seed)
            row[f"ref:{ref}"] = run(sgd_maker(args.ref_lr_factor * ft_lr), mixed=mixed)
            print(f"  {name} seed {seed} {ref}: {short(row, f'ref:{ref}')}", flush=True)
        result["seeds"][str(seed)] = row
    result["summary"] = summarise(result, args)
    return result


def short(row: dict, key: str) -> str:
    r, ft = row[key], row["finetune"]
    return (
        f"before {row['before']['old']:.1f}, old {r['old']:.1f}, new {r['new']:.1f} "
        f"(FT {ft['new']:.1f}), {r.get('step_ms', NAN):.1f} ms/step (FT {ft['step_ms']:.2f})"
        + (f" FAILED: {r['error']}" if "error" in r else "")
    )


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation of the finite values (failed runs are NaN)."""
    ok = [v for v in values if math.isfinite(v)]
    return {
        "mean": statistics.fmean(ok) if ok else NAN,
        "std": statistics.stdev(ok) if len(ok) > 1 else 0.0,
        "values": values,
    }


def summarise(result: dict, args) -> dict:
    """Per method: mean ± std over seeds of each figure, and how many seeds meet each target."""
    seeds = list(result["seeds"].values())
    methods = [k for k in seeds[0] if k.startswith(METHOD_PREFIXES)]
    out = {
        "before": mean_std([s["before"]["old"] for s in seeds]),
        "finetune": {
            k: mean_std([s["finetune"][k] for s in seeds]) for k in ("old", "new", "step_ms")
        },
    }
    for m in methods:
        rows = [s for s in seeds if m in s]
        ratio = [s[m]["new"] / s["finetune"]["new"] for s in rows]
        drop = [s["before"]["old"] - s[m]["old"] for s in rows]
        cost = [s[m].get("step_ms", NAN) / s["finetune"]["step_ms"] for s in rows]
        out[m] = {
            "old": mean_std([s[m]["old"] for s in rows]),
            "new": mean_std([s[m]["new"] for s in rows]),
            "old_drop": mean_std(drop),
            "new_ratio": mean_std(ratio),
            "within_3": sum(d <= 3.0 for d in drop),
            "at_least_95": sum(r >= 0.95 for r in ratio),
            "both": sum(d <= 3.0 and r >= 0.95 for d, r in zip(drop, ratio, strict=True)),
            "seeds": len(rows),
            "step_ms": mean_std([s[m].get("step_ms", NAN) for s in rows]),
            "failed": sum("error" in s[m] for s in rows),
            "cost_ratio": mean_std(cost),
            "final_drift": mean_std([s[m].get("final_drift", NAN) for s in rows]),
            "max_drift": mean_std([s[m].get("max_drift", NAN) for s in rows]),
        }
    return out


def pm(d: dict, fmt: str = ".1f") -> str:
    return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"


def table(results: dict) -> str:
    head = (
        "| problem | FIP setting | before | FIP old | FIP new | FT new (lr) | new / FT | "
        "within 3 | ≥ 95% | both | ms CPU/step | × FT step |"
    )
    lines = [head, "|" + "---|" * 12]
    for name, res in results.items():
        s = res["summary"]
        for m in (k for k in s if k.startswith(METHOD_PREFIXES)):
            r = s[m]
            n = r["seeds"]
            lines.append(
                f"| {name} | {label(m)} | {pm(s['before'])} | {pm(r['old'])} | {pm(r['new'])} | "
                f"{pm(s['finetune']['new'])} ({res['ft_lr']:g}) | {pm(r['new_ratio'], '.3f')} | "
                f"{r['within_3']}/{n} | {r['at_least_95']}/{n} | {r['both']}/{n} | "
                f"{pm(r['step_ms'])} | {pm(r['cost_ratio'])} |"
            )
    return "\n".join(lines)


def per_seed_table(results: dict) -> str:
    lines = [
        "| problem | seed | before | FT new | "
        + " | ".join(f"{label(m)} old / new" for m in _methods(results))
        + " |"
    ]
    lines.append("|" + "---|" * (4 + len(_methods(results))))
    for name, res in results.items():
        for seed, row in res["seeds"].items():
            cells = [
                f"{row[m]['old']:.1f} / {row[m]['new']:.1f}" if m in row else "-"
                for m in _methods(results)
            ]
            lines.append(
                f"| {name} | {seed} | {row['before']['old']:.1f} | {row['finetune']['new']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def _methods(results: dict) -> list[str]:
    seen = {}
    for res in results.values():
        for row in res["seeds"].values():
            seen |= dict.fromkeys(k for k in row if k.startswith(METHOD_PREFIXES))
    return list(seen)


#: Row keys of the compared methods: FIP settings (``fip:NAME``) and references (``ref:NAME``).
METHOD_PREFIXES = ("fip:", "ref:")


def label(key: str) -> str:
    """A row's name in the tables: the FIP setting, or ``joint (reference)``."""
    kind, _, name = key.partition(":")
    return name if kind == "fip" else f"{name} (reference)"


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": "process CPU time",
        "load_average_start": os.getloadavg(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=ISSUE_PROBLEMS, choices=list(PROBLEMS))
    p.add_argument(
        "--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 3, 4]
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated FIP variants, of {', '.join(VARIANTS)}",
    )
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=KWARGS",
        help="extra FIP setting, e.g. 'lr1=dict(lr=1.0)' (riemfip.optim's names, the stored "
        "inputs anchors and fine-tuning's chosen ft_lr in scope); 'NAME@P1,P2=...' runs it on "
        "problems P1, P2 only",
    )
    p.add_argument(
        "--variant-problems",
        action="append",
        default=[],
        metavar="NAME@P1,P2",
        help="run variant NAME (e.g. exact) on these problems (instead of its default ones)",
    )
    p.add_argument(
        "--ft-lrs",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
        help="fine-tuning learning rates tried on the first seed",
    )
    p.add_argument(
        "--task-a",
        choices=["sgd", "adam"],
        default="sgd",
        help="task A's optimizer: SGD lr 0.1 (default) or Adam lr 1e-3",
    )
    p.add_argument(
        "--references",
        type=lambda v: [r for r in v.split(",") if r],
        default=[],
        help="comma-separated reference methods, of joint, replay: SGD at fine-tuning's lr "
        "with a labelled old-task batch added to each step (all of task A, or the stored "
        "examples)",
    )
    p.add_argument(
        "--ref-lr-factor",
        type=float,
        default=1.0,
        help="the references' SGD lr as a multiple of fine-tuning's chosen lr",
    )
    p.add_argument("--per-class", type=int, default=50, help="stored inputs per old class")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fip_defaults.json"))
    args = p.parse_args(argv)
    unknown = sorted(set(args.references) - set(REFERENCES))
    if unknown:
        p.error(f"unknown references {unknown}; choose from {', '.join(REFERENCES)}")
    torch.set_num_threads(args.threads)

    variants, args.where = {}, {}
    for v in (v for v in args.variants.split(",") if v):
        variants[v], args.where[v] = VARIANTS[v]
    for spec in args.setting:
        head, _, expr = spec.partition("=")
        vname, _, problems = head.partition("@")
        variants[vname] = expr
        args.where[vname] = set(problems.split(",")) if problems else ALL
    for spec in args.variant_problems:
        vname, _, problems = spec.partition("@")
        args.where[vname] = set(problems.split(","))

    wall = time.perf_counter()
    results = {}
    for name in args.problems:
        print(f"{name} ...", flush=True)
        results[name] = run_problem(name, args, variants)
    record = {
        "command": "python benchmarks/fip_defaults.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine() | {"load_average_end": os.getloadavg()},
        "wall_seconds": time.perf_counter() - wall,
        "settings": {
            "variants": {
                k: opts if isinstance(opts, str) else {o: repr(v) for o, v in opts.items()}
                for k, opts in variants.items()
            },
            "seeds": args.seeds,
            "ft_lrs": args.ft_lrs,
            "per_class": args.per_class,
            "task_a": args.task_a,
            "batch": args.batch,
            "problems_of_variant": {k: sorted(v) for k, v in args.where.items()},
        },
        "problems": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(table(results))
    print()
    print(per_seed_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
