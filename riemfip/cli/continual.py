"""``riemfip continual``: continual learning on a split of a dataset, FIP against baselines.

Wraps :func:`riemfip.applications.continual.run_continual`, once per method, each
checkpointed after every task. Default: two-task MNIST (digits 0-4, then 5-9) in the
class-incremental scenario (one shared head, no task identity), FIP against
fine-tuning and experience replay.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from riemfip.applications.continual import METHODS, ContinualResult, make_method, run_continual
from riemfip.applications.continual_methods import EWC, FIPMethod
from riemfip.data import Dataset, split_tasks
from riemfip.plotting import png_figure

from .config import UsageError, check_ranges
from .datasets import add_data_arguments, data_spec, load_dataset
from .networks import add_network_arguments, build_network, describe, network_spec
from .progress import Progress
from .run_folder import Figure, Outcome, RunFolder

#: The subcommand: ``riemfip continual``.
NAME = "continual"
#: Its line in ``riemfip --help``.
SUMMARY = "continual learning on a task split: FIP against fine-tuning, replay, EWC, joint"
#: The example under ``riemfip continual --help``.
EXAMPLE = "riemfip continual --tasks 0-1 2-3 4-5 6-7 8-9 --methods fip replay ewc --out runs/split"


def class_group(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,2,5-6"`` -> [0, 2, 5, 6] (an argparse type)."""
    classes = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            classes += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a class group like 0-4 or 0,2,5"
        ) from None
    if not classes:
        raise argparse.ArgumentTypeError(f"{text!r} holds no class")
    return classes


def add_continual_arguments(parser, *, methods=("fip", "finetune", "replay")) -> None:
    """The continual run's options (shared with ``demo``)."""
    group = parser.add_argument_group("continual learning")
    add = group.add_argument
    add(
        "--tasks",
        type=class_group,
        nargs="+",
        default=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
        metavar="CLASSES",
        help="one class group per task, in order, e.g. 0-4 5-9 (the default) or 0,1 2,3",
    )
    add("--methods", nargs="+", choices=sorted(METHODS), default=list(methods), help="methods")
    add(
        "--scenario",
        choices=("class", "task"),
        default="class",
        help="class-incremental (one shared head) or task-incremental (a head per task)",
    )
    add("--continual-epochs", type=int, default=5, help="epochs per task")
    add("--continual-lr", type=float, default=0.05, help="SGD lr of task 0 and the baselines")
    add("--fip-lr", type=float, default=0.4, help="FIP's natural-gradient lr from task 1 on")
    add("--ewc-lambda", type=float, default=1e3, help="EWC's penalty weight")
    add(
        "--memory-per-class",
        type=int,
        default=50,
        help="stored images per old class: replay's memory, FIP's anchors",
    )
    add("--continual-batch-size", type=int, default=64, help="minibatch size")


def add_arguments(parser) -> None:
    """The options of ``riemfip continual`` (the run options are added for it)."""
    add_data_arguments(parser)
    add_network_arguments(parser)
    add_continual_arguments(parser)


@dataclass
class ContinualJob:
    tasks: list[Dataset]
    network: dict
    args: argparse.Namespace


def prepare_tasks(args, data: Dataset) -> list[Dataset]:
    """The tasks of ``--tasks`` (labels stay global: one label space), with the options
    of the continual run checked."""
    check_ranges(
        args,
        at_least={"continual_epochs": 1, "continual_batch_size": 1, "memory_per_class": 0},
        positive=("continual_lr", "fip_lr"),
    )
    try:
        tasks = split_tasks(data, args.tasks)
    except ValueError as err:
        raise UsageError(f"--tasks: {err}") from None
    fewest = min(int((t.y_train == c).sum()) for t in tasks for c in t.labels)
    if args.memory_per_class > fewest:
        raise UsageError(
            f"--memory-per-class {args.memory_per_class}: a class of the tasks has only "
            f"{fewest} training images"
        )
    return tasks


def prepare(args, device: torch.device, progress: Progress) -> ContinualJob:
    """Read the data and split it into tasks, checking the options; writes nothing."""
    data = load_dataset(data_spec(args.data, args.data_root), device)
    tasks = prepare_tasks(args, data)
    return ContinualJob(tasks, network_spec(args.hidden, args.activation, data), args)


def method(name: str, args):
    """The method ``name`` as the options configure it."""
    if name == "fip":
        return FIPMethod(lr_scale=args.fip_lr / args.continual_lr)
    if name == "ewc":
        return EWC(lam=args.ewc_lambda)
    return make_method(name)


def run_methods(folder: RunFolder, tasks, network: dict, args) -> dict[str, ContinualResult]:
    """:func:`run_continual` for each of ``args.methods``, checkpointed per task."""
    results = {}
    for name in args.methods:
        detail = f"{len(tasks)} tasks, {args.scenario}-incremental, {describe(network)}"
        with folder.stage(f"continual {name}", detail):
            results[name] = run_continual(
                tasks,
                method(name, args),
                lambda: build_network(network),
                memory_per_class=args.memory_per_class,
                scenario=args.scenario,
                epochs=args.continual_epochs,
                lr=args.continual_lr,
                batch_size=args.continual_batch_size,
                seed=args.seed,
                checkpoint_dir=folder.checkpoint(f"continual-{name}"),
                progress=folder.progress.on,
            )
            folder.saved()
    return results


def classes_label(classes) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for c in classes:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def continual_summary(results: dict[str, ContinualResult]) -> dict:
    """Per method: the final accuracy (%) on each task, their average, the forgetting."""
    out = {}
    for name, r in results.items():
        final = {
            f"task {j}: {classes_label(c)} (%)": float(a)
            for j, (c, a) in enumerate(zip(r.task_classes, r.accuracy[-1], strict=True))
        }
        fg = r.forgetting
        out[name] = {
            **final,
            "average (%)": r.average_accuracy,
            "forgetting (points)": None if np.isnan(fg) else fg,
        }
    return out


def _draw_final(results: dict[str, ContinualResult], title: str):
    def draw(path):
        names = list(results)
        n_tasks = len(next(iter(results.values())).tasks)
        width = 0.8 / n_tasks
        with png_figure(path, figsize=(1.6 + 1.4 * len(names), 3.6)) as (_, ax):
            for j in range(n_tasks):
                xs = [i + (j - (n_tasks - 1) / 2) * width for i in range(len(names))]
                label = f"task {j} (classes {classes_label(results[names[0]].task_classes[j])})"
                ax.bar(xs, [results[m].accuracy[-1][j] for m in names], width, label=label)
            ax.set_xticks(range(len(names)), names)
            ax.set(ylabel="test accuracy after the last task (%)", ylim=(0, 119), title=title)
            ax.set_yticks(range(0, 101, 20))
            ax.legend(fontsize=8, loc="upper center", ncol=n_tasks)
            ax.grid(alpha=0.3, axis="y")

    return draw


def continual_outcome_parts(results, scenario: str) -> tuple[list[Figure], list[tuple[str, str]]]:
    """The comparison plot, one heat map per method, and each method's table."""
    title = f"After the last task ({scenario}-incremental)"
    figures = [
        Figure(
            "continual.png",
            "Test accuracy on each task after training on all of "
            "them, per method (forgetting shows as a low bar on early tasks)",
            _draw_final(results, title),
        )
    ]
    for name, r in results.items():
        figures.append(
            Figure(
                f"continual_{name}.png",
                f"{name}: accuracy on task j (columns) after training through task i (rows)",
                r.plot_heatmap,
            )
        )
    tables = [(f"Continual learning: {name}", r.summary()) for name, r in results.items()]
    return figures, tables


def execute(job: ContinualJob, folder: RunFolder) -> Outcome:
    """One continual run per method, checkpointed in ``folder``; what to publish."""
    results = run_methods(folder, job.tasks, job.network, job.args)
    figures, tables = continual_outcome_parts(results, job.args.scenario)
    summary = continual_summary(results)
    return Outcome(
        title=f"riemfip continual: {len(job.tasks)} tasks, {job.args.scenario}-incremental",
        summary=summary,
        results={name: r.to_dict() for name, r in results.items()},
        figures=figures,
        tables=tables,
        lines=[
            f"{name}: " + ", ".join(f"{k} {_number(v)}" for k, v in s.items())
            for name, s in summary.items()
        ],
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
