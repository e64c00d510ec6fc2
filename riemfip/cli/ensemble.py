"""``riemfip ensemble``: adversarial robustness of a FIP ensemble against independent networks.

Wraps :func:`riemfip.applications.robust_ensemble.compare_ensembles`: one network, an
ensemble of independently trained networks, and an ensemble sampled along a FIP from the
first, under clean, FGSM and PGD (L-infinity, white-box) attacks on the test set. Each
ensemble is checkpointed when built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from riemfip.applications.robust_ensemble import compare_ensembles, default_attacks
from riemfip.data import Dataset

from .config import UsageError, check_ranges
from .datasets import add_data_arguments, data_spec, load_dataset
from .networks import add_network_arguments, build_network, describe, network_spec
from .progress import Progress
from .run_folder import Figure, Outcome, RunFolder

#: The subcommand: ``riemfip ensemble``.
NAME = "ensemble"
#: Its line in ``riemfip --help``.
SUMMARY = "adversarial robustness: FIP ensemble against independent networks"
#: The example under ``riemfip ensemble --help``.
EXAMPLE = "riemfip ensemble --size 5 --eps 0.05 0.1 0.15 --out runs/ensemble"


def add_arguments(parser) -> None:
    """The options of ``riemfip ensemble`` (the run options are added for it)."""
    add_data_arguments(parser)
    add_network_arguments(parser)
    group = parser.add_argument_group("ensembles and attacks")
    add = group.add_argument
    add("--size", type=int, default=3, help="members of each ensemble")
    add("--epochs", type=int, default=5, help="Adam epochs of each independent network")
    add("--steps-per-member", type=int, default=50, help="FIP steps between sampled members")
    add(
        "--eps",
        type=float,
        nargs="+",
        default=[0.05, 0.1],
        help="L-infinity attack radii (pixels in [0, 1])",
    )
    add("--pgd-steps", type=int, default=10, help="PGD steps (of eps/10)")
    add("--test-size", type=int, default=500, help="test images attacked")
    add("--lr", type=float, default=1e-3, help="Adam lr of the independent networks")
    add("--batch-size", type=int, default=64, help="minibatch size")


@dataclass
class EnsembleJob:
    data: Dataset
    network: dict
    args: object


def prepare(args, device: torch.device, progress: Progress) -> EnsembleJob:
    """Read the data and check the options; writes nothing."""
    minimums = {
        "size": 2,
        "epochs": 1,
        "steps_per_member": 1,
        "pgd_steps": 1,
        "test_size": 1,
        "batch_size": 1,
    }
    check_ranges(args, at_least=minimums, positive=("eps", "lr"))
    data = load_dataset(data_spec(args.data, args.data_root), device)
    if args.test_size > len(data.x_test):
        raise UsageError(
            f"--test-size {args.test_size}: {data.name} has {len(data.x_test)} test images"
        )
    data = dataclasses.replace(
        data, x_test=data.x_test[: args.test_size], y_test=data.y_test[: args.test_size]
    )
    return EnsembleJob(data, network_spec(args.hidden, args.activation, data), args)


def execute(job: EnsembleJob, folder: RunFolder) -> Outcome:
    """The ensembles, built and checkpointed in ``folder``, under attack; what to publish."""
    a = job.args
    steps = a.epochs * math.ceil(len(job.data.x_train) / a.batch_size)
    with folder.stage("ensembles", f"{a.size} x {describe(job.network)}", seed=a.seed):
        result = compare_ensembles(
            lambda: build_network(job.network),
            job.data,
            size=a.size,
            train_steps=steps,
            steps_per_member=a.steps_per_member,
            attacks=default_attacks(a.eps, pgd_steps=a.pgd_steps, seed=a.seed),
            lr=a.lr,
            batch_size=a.batch_size,
            seed=a.seed,
            config={"architecture": describe(job.network)},
            checkpoint_dir=folder.checkpoint("ensemble"),
            progress=folder.progress.on,
        )
        folder.saved()
    summary = {}
    for r in result.rows:
        attack = (
            r.attack["name"]
            if r.attack["name"] == "clean"
            else f"{r.attack['name']} {r.attack['eps']:g}"
        )
        summary.setdefault(r.model, {})[attack] = r.accuracy
    return Outcome(
        title=f"riemfip ensemble: {a.size} x {describe(job.network)} on {job.data.name}",
        summary=summary,
        results={"ensemble": result.to_dict()},
        figures=[
            Figure("ensemble.png", "Test accuracy under attack against the radius", result.plot)
        ],
        tables=[("Accuracy (%) by classifier and attack", result.table())],
        lines=[result.table()],
    )
