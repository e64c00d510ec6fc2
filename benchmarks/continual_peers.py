"""FIP against its peers at their best settings, in one run: accuracy, forgetting, CPU per step.

Every run goes through :func:`riemfip.applications.continual.run_continual`, the harness of
``continual_mnist.py`` (same tasks, memory, seeds, step counts), with the methods of
``continual_mnist.py``'s ``make_method`` where they exist:

* ``finetune``, ``ewc`` (lambda 1e3, Fisher on 200 images), ``replay``, ``joint``;
* ``gpm`` (gradient projection memory at its defaults: threshold 0.97 + 0.003 per task,
  300 samples, biases frozen);
* ``fip``: :class:`riemfip.optim.FIP` at its defaults (lr 0.4, 32 rotating anchors with
  ``ScaledNoise(0.33)``, all-anchor pull-back every 10 steps, damping 1e-2) from the second
  task on, anchored on the memory (50 stored inputs per old class, no labels);
* ``fip-penalty``: the authors' penalty form (:class:`riemfip.optim.FIPPenalty` at its
  defaults: normalised steps of length 0.3, beta 1, summed Bhattacharyya distance).

Task 0 is trained by SGD at the run's learning rate for every method; the FIP forms then
step at their own default rates (``lr_scale`` = default / run lr).

Protocols (``--protocols``):

================  ============================  ===========  ================  ======
name              tasks                         scenario     network           epochs
================  ============================  ===========  ================  ======
split-task        Split-MNIST {0,1}, ..., {8,9}  task-incr.   MLP 784-100-100-10  5
split-class       Split-MNIST                   class-incr.  MLP 784-100-100-10  5
two-task-task     MNIST 0-4, then 5-9           task-incr.   MLP 784-100-100-10  5
two-task-class    MNIST 0-4, then 5-9           class-incr.  MLP 784-100-100-10  5
digits-cnn-class  digits 0-4, then 5-9 (8x8)    class-incr.  small CNN           15
================  ============================  ===========  ================  ======

MNIST is the offline 5,000-image subset (4,000 train / 1,000 test), digits scikit-learn's 8x8
digits; batch 64; 50 stored inputs per old class.

**Best settings.** Each method's SGD learning rate is picked on seed 0 from ``--lrs`` by the
final average accuracy, then ``--seeds`` run at it. Where ``--reuse`` finds a sweep over the
same grid, harness, seed and epochs (``results/continual_baseline_lr_sweep.json``,
``results/continual_gpm_lr_sweep.json``: the MLP protocols, every method but the FIP forms),
its best lr is taken instead of rerunning the grid; when that best is the largest rate of the
grid, ``2 x`` it is also tried on seed 0 (and kept if better).

**Cost.** CPU time of the process (one thread) over the tasks after the first, divided by
their optimizer steps: what a method pays per step where the methods differ, its end-of-task
work (EWC's Fisher, GPM's bases) included; the ratio is to fine-tuning's on the same protocol.

Writes ``--out`` (JSON, rewritten after every run; ``--resume`` skips runs already in it) and
the retention-against-cost plot next to it (PNG), and prints one table per protocol.

Usage::

    PYTHONPATH=. python benchmarks/continual_peers.py
    PYTHONPATH=. python benchmarks/continual_peers.py --protocols two-task-class --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import riemfip.optim as ro
from riemfip.applications.classifiers import mlp
from riemfip.applications.continual import run_continual
from riemfip.applications.continual_methods import FIPMethod
from riemfip.data import digits, mnist_subset, split_tasks
from riemfip.plotting import png_figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
import continual_mnist  # noqa: E402
from fip_defaults import machine, small_cnn  # noqa: E402

METHODS = ("finetune", "ewc", "replay", "joint", "gpm", "fip", "fip-penalty")
SPLIT = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
TWO = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]

#: protocol -> (data, class groups, scenario, network, epochs, sweep name in the old files)
PROTOCOLS = {
    "split-task": ("mnist", SPLIT, "task", "mlp", 5, ("split", "task")),
    "split-class": ("mnist", SPLIT, "class", "mlp", 5, ("split", "class")),
    "two-task-task": ("mnist", TWO, "task", "mlp", 5, ("two_task", "task")),
    "two-task-class": ("mnist", TWO, "class", "mlp", 5, ("two_task", "class")),
    "digits-cnn-class": ("digits", TWO, "class", "cnn", 15, None),
}
NETWORKS = {
    "mlp": (lambda: mlp([784, 100, 100, 10]), "MLP 784-100-100-10"),
    "cnn": (small_cnn, "CNN 8x8 (conv16-conv32-64)"),
}
SWEEPS = ("continual_baseline_lr_sweep.json", "continual_gpm_lr_sweep.json")

#: the FIP forms' own default step sizes (FIP lr 0.4, FIPPenalty lr 0.3)
FIP_LR, PENALTY_LR = 0.4, 0.3


#: extra FIP settings (``--fip-setting NAME=KWARGS``): name -> FIP keyword arguments (text)
EXTRA: dict[str, str] = {}


#: continual_mnist.py's configuration of the baselines (its option defaults)
BASELINES = continual_mnist.build_parser().parse_args([])


def make_method(name: str, lr: float):
    """Each method: the baselines as ``continual_mnist.py`` configures them, the FIP forms
    at their defaults."""
    if name in EXTRA:
        options = eval(EXTRA[name], {k: getattr(ro, k) for k in ro.__all__})  # benchmark option
        return FIPMethod(lr_scale=options.pop("lr", FIP_LR) / lr, **options)
    if name in ("finetune", "ewc", "replay", "joint", "gpm"):
        return continual_mnist.make_method(name, BASELINES)
    if name == "fip":
        return FIPMethod(lr_scale=FIP_LR / lr)
    if name == "fip-penalty":
        return FIPMethod(lr_scale=PENALTY_LR / lr, mode="penalty")
    raise ValueError(f"unknown method {name!r}")


def tasks_of(protocol: str):
    data, groups, *_ = PROTOCOLS[protocol]
    flat = PROTOCOLS[protocol][3] == "mlp"
    ds = mnist_subset(flatten=flat) if data == "mnist" else digits(flatten=flat)
    return split_tasks(ds, groups)


def run_one(protocol: str, method: str, lr: float, seed: int) -> dict:
    """One run: accuracy matrix, summary numbers, CPU per step after task 0, diagnostics."""
    _, _, scenario, net, epochs, _ = PROTOCOLS[protocol]
    res = run_continual(
        tasks_of(protocol),
        make_method(method, lr),
        NETWORKS[net][0],
        memory_per_class=50,
        scenario=scenario,
        epochs=epochs,
        lr=lr,
        batch_size=64,
        seed=seed,
        progress=False,
    )
    later_cpu, later_steps = sum(res.cpu_seconds[1:]), sum(res.steps[1:])
    return {
        "accuracy": res.accuracy.tolist(),
        "average_accuracy": res.average_accuracy,
        "forgetting": res.forgetting,
        "first_task_before": float(res.accuracy[0, 0]),
        "first_task_final": float(res.accuracy[-1, 0]),
        "last_task_final": float(res.accuracy[-1, -1]),
        "cpu_seconds": res.cpu_seconds,
        "steps": res.steps,
        "step_ms_after_task0": 1e3 * later_cpu / later_steps,
        "method_config": res.method_config,
        "diagnostics": res.diagnostics,
    }


def reused_best(protocol: str, method: str, folder: Path) -> tuple[float, dict] | None:
    """Best lr and the sweep's figures for (protocol, method) from an earlier sweep, if any."""
    key = PROTOCOLS[protocol][5]
    if key is None:
        return None
    for name in SWEEPS:
        path = folder / name
        if not path.is_file():
            continue
        for row in json.loads(path.read_text())["rows"]:
            if (row["benchmark"], row["scenario"], row["method"]) == (*key, method):
                return float(row["best_lr"]), {
                    "source": f"benchmarks/results/{name}",
                    "average_accuracy_by_lr": row["average_accuracy_by_lr"],
                }
    return None


def mean_std(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return {
        "mean": statistics.fmean(vals) if vals else math.nan,
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def summarise(entry: dict) -> dict:
    runs = list(entry["runs"].values())
    keys = (
        "average_accuracy",
        "forgetting",
        "first_task_final",
        "last_task_final",
        "step_ms_after_task0",
    )
    return {k: mean_std([r[k] for r in runs]) for k in keys}


def pm(d: dict, fmt: str = ".1f") -> str:
    return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"


def tables(record: dict) -> str:
    out = []
    for protocol, methods in record["protocols"].items():
        ft = methods.get("finetune", {}).get("summary", {}).get("step_ms_after_task0")
        out += [
            f"\n{protocol} ({PROTOCOLS[protocol][2]}-incremental, "
            f"{NETWORKS[PROTOCOLS[protocol][3]][1]}, {PROTOCOLS[protocol][4]} epochs/task)",
            "| method | lr (picked) | seeds | average acc. % | forgetting (points) | "
            "first task, final % | last task % | ms CPU/step (tasks ≥ 1) | × fine-tuning |",
            "|" + "---|" * 9,
        ]
        for name, entry in methods.items():
            s = entry.get("summary")
            if not s:
                continue
            ratio = s["step_ms_after_task0"]["mean"] / ft["mean"] if ft else math.nan
            how = "sweep" if entry.get("lr_source", "").startswith("benchmarks") else "grid"
            out.append(
                f"| {name} | {entry['lr']:g} ({how}) | {s['average_accuracy']['n']} | "
                f"{pm(s['average_accuracy'])} | {pm(s['forgetting'])} | "
                f"{pm(s['first_task_final'])} | {pm(s['last_task_final'])} | "
                f"{pm(s['step_ms_after_task0'], '.2f')} | {ratio:.1f}× |"
            )
    return "\n".join(out)


def plot(record: dict, file: Path) -> None:
    """Average accuracy against CPU ms per step (log), one panel per protocol, ± std bars."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    protocols = list(record["protocols"])
    ncols = min(3, len(protocols))
    nrows = math.ceil(len(protocols) / ncols)
    markers = dict(zip(METHODS, "os^vDP*", strict=True)) | dict.fromkeys(EXTRA, "X")
    with png_figure(
        file, nrows=nrows, ncols=ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False
    ) as (fig, axes):
        for ax, protocol in zip(axes.flat, protocols, strict=False):
            for name, entry in record["protocols"][protocol].items():
                s = entry.get("summary")
                if not s:
                    continue
                x, y = s["step_ms_after_task0"], s["average_accuracy"]
                ax.errorbar(
                    x["mean"], y["mean"], xerr=x["std"], yerr=y["std"],
                    marker=markers.get(name, "o"), ls="none", capsize=3, label=name,
                )  # fmt: skip
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("CPU ms per step (tasks after the first)")
            ax.set_ylabel("final average accuracy (%)")
            ax.set_title(protocol, fontsize=9)
            ax.grid(alpha=0.3)
        spare = list(axes.flat)[len(protocols) :]
        for ax in spare:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if spare:  # the legend in the empty panel, clear of the points
            spare[0].legend(handles, labels, loc="center", fontsize=9, title="method")
        else:
            axes.flat[0].legend(fontsize=7)
        fig.suptitle("Retention against cost per step (mean ± std over seeds)", fontsize=10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--fip-setting",
        action="append",
        default=[],
        metavar="NAME=KWARGS",
        help="also run FIP with these keyword arguments as method NAME, e.g. "
        "'fip-o2=dict(anchors=AnchorSampling(outputs=2))' (riemfip.optim's names in scope; "
        "an 'lr' key is FIP's own rate, default 0.4)",
    )
    p.add_argument(
        "--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 3, 4]
    )
    p.add_argument(
        "--lrs",
        type=lambda s: [float(v) for v in s.split(",")],
        default=[0.05, 0.1, 0.2, 0.5],
        help="learning-rate grid tried on the first seed",
    )
    p.add_argument(
        "--reuse", type=Path, default=Path("benchmarks/results"), help="folder of earlier sweeps"
    )
    p.add_argument("--no-reuse", action="store_true", help="run every grid here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/continual_peers.json"))
    p.add_argument("--resume", action="store_true", help="skip runs already in --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for spec in args.fip_setting:
        name, _, expr = spec.partition("=")
        EXTRA[name] = expr
        args.methods.append(name)

    record = {"protocols": {}}
    if args.resume and args.out.is_file():
        record = json.loads(args.out.read_text())
    record |= {
        "command": "python benchmarks/continual_peers.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "settings": {
            "lrs": args.lrs,
            "seeds": args.seeds,
            "memory_per_class": 50,
            "batch_size": 64,
            "fip": "FIP defaults (lr 0.4) from task 1; task 0 SGD at the run lr",
            "fip-penalty": "FIPPenalty defaults (lr 0.3, beta 1) from task 1",
            "ewc": "lambda 1e3, fisher_samples 200",
            "gpm": "defaults (threshold 0.97 + 0.003/task, 300 samples, biases frozen)",
            **{name: f"FIP({expr}) from task 1" for name, expr in EXTRA.items()},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()

    wall_before = record.get("wall_seconds", 0.0)

    def save():
        record["wall_seconds"] = wall_before + time.perf_counter() - wall
        args.out.write_text(json.dumps(record, indent=1) + "\n")

    for protocol in args.protocols:
        per = record["protocols"].setdefault(protocol, {})
        for method in args.methods:
            entry = per.setdefault(method, {"grid": {}, "runs": {}})
            first = args.seeds[0]
            if "lr" not in entry:
                reused = None if args.no_reuse else reused_best(protocol, method, args.reuse)
                grid = entry["grid"]
                if reused is not None:
                    lr, info = reused
                    entry["lr_source"] = info["source"]
                    entry["sweep"] = info["average_accuracy_by_lr"]
                    tried = [lr] + ([2 * lr] if lr == max(args.lrs) else [])
                else:
                    entry["lr_source"] = f"grid on seed {first}"
                    tried = args.lrs
                for lr in tried:
                    if str(lr) not in grid:
                        tic = time.process_time()
                        grid[str(lr)] = run_one(protocol, method, lr, first)
                        print(
                            f"{protocol} {method} lr {lr:g} seed {first}: "
                            f"avg {grid[str(lr)]['average_accuracy']:.1f} "
                            f"({time.process_time() - tic:.0f} s CPU)",
                            flush=True,
                        )
                        save()
                best = max(tried, key=lambda v: grid[str(v)]["average_accuracy"])
                entry["lr"] = best
                entry["runs"][str(first)] = grid[str(best)]
                entry["grid"] = {k: v["average_accuracy"] for k, v in grid.items()}
                save()
            for seed in args.seeds:
                if str(seed) in entry["runs"]:
                    continue
                tic = time.process_time()
                entry["runs"][str(seed)] = run_one(protocol, method, entry["lr"], seed)
                r = entry["runs"][str(seed)]
                print(
                    f"{protocol} {method} lr {entry['lr']:g} seed {seed}: avg "
                    f"{r['average_accuracy']:.1f}, forgetting {r['forgetting']:.1f}, "
                    f"{r['step_ms_after_task0']:.2f} ms/step "
                    f"({time.process_time() - tic:.0f} s CPU)",
                    flush=True,
                )
                save()
            entry["summary"] = summarise(entry)
            save()
    record["machine"]["load_average_end"] = os.getloadavg()
    save()
    plot(record, args.out.with_suffix(".png"))
    print(tables(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
