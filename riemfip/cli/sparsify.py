"""``riemfip sparsify MODEL.pt``: prune a trained network along a FIP, against magnitude pruning.

Wraps :func:`riemfip.applications.sparsify.sparsify_sweep`: at every sparsity, one-shot
global magnitude pruning, magnitude pruning plus masked fine-tuning, and FIP toward the
pruned network then masked fine-tuning, each with the same step budget. The sweep's
JSON checkpoint is written after every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from riemfip.applications.sparsify import METHODS, SparsifyResult, sparsify_sweep
from riemfip.data import Dataset

from .config import UsageError, check_ranges
from .datasets import add_data_arguments, data_spec, load_dataset
from .networks import describe, load_network
from .progress import Progress
from .run_folder import Figure, Outcome, RunFolder

#: The subcommand: ``riemfip sparsify``.
NAME = "sparsify"
#: Its line in ``riemfip --help``.
SUMMARY = "prune a network along a FIP, against magnitude pruning and fine-tuning"
#: The example under ``riemfip sparsify --help``.
EXAMPLE = "riemfip sparsify runs/net0/model.pt --sparsities 0.9 0.95 0.98 --out runs/sparse"


def add_arguments(parser) -> None:
    """The options of ``riemfip sparsify`` (the run options are added for it)."""
    parser.add_argument("model", type=Path, metavar="MODEL.pt", help="a network (riemfip train)")
    add_data_arguments(parser, default=None)
    group = parser.add_argument_group("pruning")
    add = group.add_argument
    add(
        "--sparsities",
        type=float,
        nargs="+",
        default=[0.9, 0.95, 0.98],
        help="fractions of the weights set to zero",
    )
    add("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods")
    add("--steps", type=int, default=300, help="optimizer steps per method and sparsity")
    add("--fip-steps", type=int, default=240, help="FIP's share of --steps; the rest fine-tunes")
    add("--finetune-lr", type=float, default=1e-3, help="Adam lr of the masked fine-tuning")
    add("--batch-size", type=int, default=64, help="minibatch size")


@dataclass
class SparsifyJob:
    net: nn.Module
    network: dict
    data: Dataset
    args: object


def prepare(args, device: torch.device, progress: Progress) -> SparsifyJob:
    """Read the network and its data and check the options; writes nothing."""
    net, saved = load_network(args.model, device)
    spec = saved["data"] if args.data is None else data_spec(args.data, args.data_root)
    data = load_dataset(spec, device)
    check_ranges(
        args, at_least={"steps": 0, "fip_steps": 0, "batch_size": 1}, positive=("finetune_lr",)
    )
    if args.fip_steps > args.steps:
        raise UsageError(f"--fip-steps {args.fip_steps} is more than --steps {args.steps}")
    if not all(0 <= s < 1 for s in args.sparsities):
        raise UsageError(f"--sparsities must lie in [0, 1), got {args.sparsities}")
    return SparsifyJob(net, saved["network"], data, args)


def execute(job: SparsifyJob, folder: RunFolder) -> Outcome:
    """The sparsity sweep, checkpointed in ``folder``; what to publish."""
    a = job.args
    detail = f"{describe(job.network)}, {len(a.methods)} methods x {len(a.sparsities)} sparsities"
    with folder.stage("sparsify", detail, seed=a.seed):
        result: SparsifyResult = sparsify_sweep(
            job.net,
            job.data,
            a.sparsities,
            steps=a.steps,
            fip_steps=a.fip_steps,
            methods=a.methods,
            finetune_lr=a.finetune_lr,
            batch_size=a.batch_size,
            seed=a.seed,
            config={"architecture": describe(job.network)},
            checkpoint=folder.checkpoint("sparsify.json"),
            progress=folder.progress.on,
        )
        folder.saved()
    summary = {"dense_test_accuracy": result.dense_test_accuracy}
    for r in result.rows:
        summary.setdefault(r.method, {})[f"{100 * r.target_sparsity:g}% sparse"] = r.test_accuracy
    return Outcome(
        title=f"riemfip sparsify: {describe(job.network)} on {job.data.name}",
        summary=summary,
        results={"sparsify": result.to_dict()},
        figures=[Figure("sparsify.png", "Test accuracy against sparsity, per method", result.plot)],
        tables=[("Test accuracy (%) by method and sparsity", result.table())],
        lines=[result.table()],
    )
