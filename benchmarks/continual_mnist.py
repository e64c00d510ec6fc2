"""Continual-learning benchmark on the offline MNIST subset: 2-task MNIST and Split-MNIST.

Runs fine-tuning, EWC, experience replay, joint training, GPM (gradient projection
memory, :mod:`riemfip.applications.gpm`, at its defaults) and FIP (when
:mod:`riemfip.optim` is available) on

* **2-task MNIST**: digits 0-4, then 5-9;
* **Split-MNIST**: five tasks {0,1}, {2,3}, ..., {8,9};

each in the task-incremental (masked per-task heads) and class-incremental (one
shared 10-way head) scenario, with an MLP 784-100-100-10, the same number of
steps for every method, and a memory of ``--memory-per-class`` training images
per old class (replay trains on them with labels; FIP anchors its metric on them).
Every method trains task 0 by SGD at ``--lr``, and so do the baselines later
tasks; FIP (natural mode) steps at ``--fip-lr``, because it passes
only the part of each gradient that leaves the anchor outputs alone; the authors'
penalty formulation (``fip-penalty``: cross-entropy + beta * summed Bhattacharyya
distance, normalised steps) ``--penalty-lr``. ``fip`` anchors its metric on a fresh
Gaussian neighbourhood of the stored images at each step (``--anchor-noise``);
``fip-bare`` on the stored images alone.

Writes to ``--out`` (default ``benchmarks/results``): one JSON record and one
heat map PNG per run (``continual_<benchmark>_<scenario>_<method>.{json,png}``),
``continual_summary.json`` and ``continual_summary.png``. Runs checkpoint per task
under ``--checkpoint-dir`` and resume when restarted with the same settings.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/continual_mnist.py
    python benchmarks/continual_mnist.py --methods replay fip --benchmarks two_task
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from torch import nn

from riemfip.applications.classifiers import mlp
from riemfip.applications.continual import run_continual
from riemfip.applications.continual_methods import EWC, FineTune, FIPMethod, Joint, Replay
from riemfip.applications.gpm import GPM
from riemfip.data import load_mnist, split_tasks
from riemfip.optim import AnchorSampling, GaussianNoise
from riemfip.plotting import png_figure

BENCHMARKS = {
    "two_task": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
    "split": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]],
}


def mlp_100_100() -> nn.Module:
    """MLP 784-100-100-10 with ReLU."""
    return mlp([784, 100, 100, 10])


def make_method(name: str, args: argparse.Namespace):
    """The benchmark's configuration of each method."""
    if name == "finetune":
        return FineTune()
    if name == "ewc":
        return EWC(lam=args.ewc_lambda, fisher_samples=args.fisher_samples)
    if name == "replay":
        return Replay()
    if name == "joint":
        return Joint()
    if name == "gpm":
        return GPM()
    if name in ("fip", "fip-bare"):
        options = json.loads(args.fip_options)
        if name == "fip" and args.anchor_noise > 0:
            options["anchors"] = AnchorSampling(transform=GaussianNoise(args.anchor_noise))
        return FIPMethod(lr_scale=args.fip_lr / args.lr, **options)
    if name == "fip-penalty":
        return FIPMethod(lr_scale=args.penalty_lr / args.lr, mode="penalty", beta=args.beta)
    raise ValueError(f"unknown method {name!r}")


def plot_summary(records: list[dict], file: Path) -> None:
    """Bar chart: final average accuracy and forgetting of each method in each setting."""
    settings = list(dict.fromkeys((r["benchmark"], r["scenario"]) for r in records))
    methods = list(dict.fromkeys(r["method"] for r in records))
    width = 0.8 / len(methods)

    def value(setting, method, key) -> float:
        hit = [r for r in records if (r["benchmark"], r["scenario"]) == setting]
        hit = [r[key] for r in hit if r["method"] == method and r[key] is not None]
        return hit[0] if hit else float("nan")

    with png_figure(file, ncols=2, figsize=(11, 3.6)) as (fig, axes):
        for ax, key, label in (
            (axes[0], "average_accuracy", "final average accuracy (%)"),
            (axes[1], "forgetting", "forgetting (points)"),
        ):
            for k, m in enumerate(methods):
                xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(settings))]
                ax.bar(xs, [value(s, m, key) for s in settings], width, label=m)
            labels = [f"{b}\n{s}-incr." for b, s in settings]
            ax.set_xticks(range(len(settings)), labels, fontsize=8)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        axes[0].set_ylim(0, 100)
        axes[1].legend(fontsize=8, ncol=2)
        title = "Continual learning on the offline MNIST subset (MLP 784-100-100-10)"
        fig.suptitle(title, fontsize=10)


def build_parser() -> argparse.ArgumentParser:
    """The options, whose defaults are the benchmark's configuration of each method."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--scenarios", nargs="+", default=["task", "class"], choices=["task", "class"])
    methods = ["finetune", "ewc", "replay", "joint", "gpm", "fip", "fip-bare", "fip-penalty"]
    p.add_argument("--methods", nargs="+", default=methods, choices=methods)
    p.add_argument("--epochs", type=int, default=5, help="epochs per task")
    p.add_argument("--lr", type=float, default=0.05, help="SGD lr of the baselines")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--memory-per-class", type=int, default=50)
    p.add_argument("--ewc-lambda", type=float, default=1e3)
    p.add_argument("--fisher-samples", type=int, default=200)
    p.add_argument(
        "--fip-options", default="{}", help="JSON keyword arguments of riemfip.optim.FIP"
    )
    p.add_argument("--fip-lr", type=float, default=0.5, help="FIP natural-mode lr (tasks >= 1)")
    p.add_argument(
        "--anchor-noise",
        type=float,
        default=0.1,
        help="fip: std of the Gaussian noise on the anchors at each step (fip-bare: none)",
    )
    p.add_argument("--beta", type=float, default=1.0, help="penalty-mode weight")
    p.add_argument("--penalty-lr", type=float, default=0.3, help="penalty-mode step length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mnist-root", default=None, help="torchvision root with MNIST/raw")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--checkpoint-dir", type=Path, default=Path("runs/continual"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    ds = load_mnist(args.mnist_root)
    print(f"data: {ds.name}, {len(ds.x_train)} train / {len(ds.x_test)} test images")
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for bench in args.benchmarks:
        tasks = split_tasks(ds, BENCHMARKS[bench])
        for scenario in args.scenarios:
            for name in args.methods:
                tag = f"{bench}_{scenario}_{name}"
                tic = time.perf_counter()
                res = run_continual(
                    tasks,
                    make_method(name, args),
                    mlp_100_100,
                    memory_per_class=args.memory_per_class,
                    scenario=scenario,
                    epochs=args.epochs,
                    lr=args.lr,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    checkpoint_dir=args.checkpoint_dir / f"{ds.name}_{tag}",
                    progress=not args.no_progress,
                )
                wall = time.perf_counter() - tic
                res.to_json(args.out / f"continual_{tag}.json")
                res.plot_heatmap(
                    args.out / f"continual_{tag}.png",
                    title=f"{bench} {scenario}-incr., {name}: avg {res.average_accuracy:.1f}%, "
                    f"forgetting {res.forgetting:.1f}",
                )
                print(f"[{tag}]", res.summary(), f"\n({wall:.1f} s)\n", flush=True)
                records.append(
                    {
                        "benchmark": bench,
                        "scenario": scenario,
                        "method": name,
                        "average_accuracy": res.average_accuracy,
                        "forgetting": res.forgetting,
                        "first_task_before": float(res.accuracy[0, 0]),
                        "first_task_final": float(res.accuracy[-1, 0]),
                        "last_task_final": float(res.accuracy[-1, -1]),
                        "train_seconds": sum(res.seconds),
                    }
                )
    summary = {"data": ds.name, "settings": vars(args) | {"out": str(args.out)}, "runs": records}
    summary["settings"]["checkpoint_dir"] = str(args.checkpoint_dir)
    (args.out / "continual_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_summary(records, args.out / "continual_summary.png")
    print(f"{'benchmark':>9} {'scenario':>8} {'method':>9} {'avg acc':>8} {'forgetting':>10}")
    for r in records:
        print(
            f"{r['benchmark']:>9} {r['scenario']:>8} {r['method']:>9} "
            f"{r['average_accuracy']:8.1f} {r['forgetting']:10.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
