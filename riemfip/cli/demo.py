"""``riemfip demo``: the main job, on the offline MNIST subset, in a few minutes on 2 cores.

1. trains two MLPs from different seeds (``net_a.pt``, ``net_b.pt``, as ``riemfip train``);
2. connects them by a geodesic of the Fisher pullback metric (:func:`riemfip.connect`)
   and compares it on the test set with the straight line and a Bézier curve (as
   ``riemfip connect``);
3. runs two-task continual learning (digits 0-4, then 5-9, one shared head), FIP
   against fine-tuning and replay (as ``riemfip continual``);
4. writes record.json, the plots and report.html.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from riemfip.data import Dataset

from . import connect, continual, train
from .datasets import add_data_arguments, data_spec, load_dataset
from .networks import add_network_arguments
from .progress import Progress
from .run_folder import Outcome, RunFolder

#: The subcommand: ``riemfip demo``.
NAME = "demo"
#: Its line in ``riemfip --help``.
SUMMARY = "the main job: a geodesic between two networks, and FIP continual learning"
#: The example under ``riemfip demo --help``.
EXAMPLE = "riemfip demo --out riemfip-demo && xdg-open riemfip-demo/report.html"


def add_arguments(parser) -> None:
    """The options of ``riemfip demo`` (the run options are added for it)."""
    add_data_arguments(parser)
    add_network_arguments(parser)
    train.add_training_arguments(parser)
    connect.add_path_arguments(parser)
    continual.add_continual_arguments(parser)


@dataclass
class DemoJob:
    data: Dataset
    train: train.TrainJob
    paths: connect.PathOptions
    tasks: list[Dataset]
    args: object


def prepare(args, device: torch.device, progress: Progress) -> DemoJob:
    """Read the data and check every option; writes nothing."""
    spec = data_spec(args.data, args.data_root)
    data = load_dataset(spec, device)
    job = train.TrainJob.from_args(args, data, spec)
    paths = connect.PathOptions.from_args(args, data)
    return DemoJob(data, job, paths, continual.prepare_tasks(args, data), args)


def execute(job: DemoJob, folder: RunFolder) -> Outcome:
    """The two networks, the paths between them and the continual runs, checkpointed in ``folder``; what to publish."""
    a = job.args
    net_a, numbers_a = train.train_network(folder, job.train, "net_a.pt")
    net_b, numbers_b = train.train_network(
        folder, dataclasses.replace(job.train, seed=a.seed + 1), "net_b.pt"
    )
    report, path = connect.connect_paths(folder, net_a, net_b, job.data, job.paths)
    results = continual.run_methods(folder, job.tasks, job.train.network, a)

    path_figures, path_tables = connect.path_outcome_parts(report, path)
    cont_figures, cont_tables = continual.continual_outcome_parts(results, a.scenario)
    geo = connect.geodesic_numbers(path)
    paths = connect.path_summary(report)
    cont = continual.continual_summary(results)
    summary = {
        "networks": {
            "network": numbers_a["network"],
            "net_a test accuracy (%)": 100 * numbers_a["test_accuracy"],
            "net_b test accuracy (%)": 100 * numbers_b["test_accuracy"],
        },
        "geodesic": connect.geodesic_summary(geo),
        "paths between net_a and net_b (test set)": paths,
        f"continual learning ({a.scenario}-incremental, test set)": cont,
    }
    lines = [
        f"networks: {numbers_a['network']}, test accuracy {100 * numbers_a['test_accuracy']:.1f}%"
        f" and {100 * numbers_b['test_accuracy']:.1f}%",
        f"geodesic: {geo['status']} after {geo['iterations']} L-BFGS iterations, energy "
        f"{geo['objective']:.4g} (straight line {geo['objective_line']:.4g})",
        *(
            f"path {name}: barrier {s['barrier']:.3f}, worst test accuracy "
            f"{s['worst accuracy (%)']:.1f}%"
            for name, s in paths.items()
        ),
        *(
            f"continual {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items() if v is not None)
            for name, s in cont.items()
        ),
    ]
    return Outcome(
        title=f"riemfip demo: geodesics and functionally invariant paths on {job.data.name}",
        summary=summary,
        results={
            "networks": {"a": numbers_a, "b": numbers_b},
            "geodesic": geo,
            "connectivity": report.to_dict(),
            "continual": {name: r.to_dict() for name, r in results.items()},
            "data": job.data.describe(),
        },
        figures=path_figures + cont_figures,
        tables=path_tables + cont_tables,
        lines=lines,
    )
