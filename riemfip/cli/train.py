"""``riemfip train``: train an MLP and save it as a network checkpoint (``model.pt``).

Wraps :func:`riemfip.applications.classifiers.trained_classifier` (Adam on
cross-entropy). The network file feeds ``riemfip connect`` and ``riemfip sparsify``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from riemfip.applications.classifiers import accuracy, trained_classifier
from riemfip.data import Dataset
from riemfip.plotting import png_figure

from .config import check_ranges
from .datasets import add_data_arguments, data_spec, load_dataset
from .networks import add_network_arguments, build_network, describe, network_spec, save_network
from .progress import Progress
from .run_folder import Figure, Outcome, RunFolder

#: The subcommand: ``riemfip train``.
NAME = "train"
#: Its line in ``riemfip --help``.
SUMMARY = "train a network and save a checkpoint"
#: The example under ``riemfip train --help``.
EXAMPLE = "riemfip train --data mnist-5k --hidden 100 100 --epochs 10 --seed 1 --out runs/net1"


def add_arguments(parser) -> None:
    """The options of ``riemfip train`` (the run options are added for it)."""
    add_data_arguments(parser)
    add_network_arguments(parser)
    add_training_arguments(parser)


def add_training_arguments(parser, *, epochs: int = 10) -> None:
    """``--epochs``, ``--lr``, ``--batch-size`` of Adam training."""
    group = parser.add_argument_group("training (Adam on cross-entropy)")
    group.add_argument("--epochs", type=int, default=epochs, help="passes over the data")
    group.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    group.add_argument("--batch-size", type=int, default=64, help="minibatch size")


@dataclass
class TrainJob:
    data: Dataset
    data_spec: dict
    network: dict
    epochs: int
    lr: float
    batch_size: int
    seed: int

    @classmethod
    def from_args(cls, args, data: Dataset, spec: dict) -> TrainJob:
        """The training ``args`` ask for on ``data`` (loaded from ``spec``), checked."""
        check_ranges(args, at_least={"epochs": 1, "batch_size": 1}, positive=("lr",))
        network = network_spec(args.hidden, args.activation, data)
        return cls(data, spec, network, args.epochs, args.lr, args.batch_size, args.seed)


def prepare(args, device: torch.device, progress: Progress) -> TrainJob:
    """Read the data and check the options; writes nothing."""
    spec = data_spec(args.data, args.data_root)
    return TrainJob.from_args(args, load_dataset(spec, device), spec)


def train_network(folder: RunFolder, job: TrainJob, file: str) -> tuple[nn.Module, dict]:
    """Train (or load, when resumed) the network of ``job``; save it as ``--out/file``.

    Returns the network (eval mode) and its key numbers.
    """
    x, y = job.data.x_train, job.data.y_train
    steps = job.epochs * math.ceil(len(x) / job.batch_size)
    detail = f"{describe(job.network)}, seed {job.seed}, {steps} Adam steps"
    with folder.stage(f"train {file}", detail):
        net = trained_classifier(
            lambda: build_network(job.network),
            x,
            y,
            steps=steps,
            lr=job.lr,
            batch_size=job.batch_size,
            seed=job.seed,
            checkpoint=folder.checkpoint(file),
            progress=folder.progress.on,
        )
        folder.saved()
    numbers = {
        "network": describe(job.network),
        "parameters": sum(p.numel() for p in net.parameters()),
        "seed": job.seed,
        "steps": steps,
        "train_accuracy": accuracy(net, x, y),
        "test_accuracy": accuracy(net, job.data.x_test, job.data.y_test),
    }
    training = {
        "optimizer": "adam",
        "epochs": job.epochs,
        "steps": steps,
        "lr": job.lr,
        "batch_size": job.batch_size,
        "seed": job.seed,
    }
    settings = {"network": job.network, "data": job.data_spec, "training": training}
    save_network(folder.path(file), net, {**settings, "accuracy": numbers}, steps=steps)
    return net, numbers


def class_accuracy(net: nn.Module, data: Dataset) -> dict[int, float]:
    """Test accuracy of each class (``accuracy`` on its test images)."""
    out = {}
    for c in data.labels:
        keep = data.y_test == c
        if keep.any():
            out[int(c)] = accuracy(net, data.x_test[keep], data.y_test[keep])
    return out


def _plot_classes(per_class: dict[int, float], title: str):
    def draw(path):
        with png_figure(path, figsize=(6, 3.2)) as (_, ax):
            ax.bar([str(c) for c in per_class], [100 * a for a in per_class.values()])
            ax.set(xlabel="class", ylabel="test accuracy (%)", ylim=(0, 100), title=title)
            ax.grid(alpha=0.3, axis="y")

    return draw


def execute(job: TrainJob, folder: RunFolder) -> Outcome:
    """The trained network, saved as ``model.pt``; what to publish."""
    net, numbers = train_network(folder, job, "model.pt")
    per_class = class_accuracy(net, job.data)
    title = f"{numbers['network']} on {job.data.name}"
    return Outcome(
        title=f"riemfip train: {title}",
        summary={
            "network": numbers["network"],
            "parameters": numbers["parameters"],
            "test accuracy (%)": 100 * numbers["test_accuracy"],
            "train accuracy (%)": 100 * numbers["train_accuracy"],
        },
        results={
            "network": numbers,
            "test_accuracy_per_class": per_class,
            "data": job.data.describe(),
        },
        figures=[
            Figure("classes.png", "Test accuracy of each class", _plot_classes(per_class, title))
        ],
        lines=[
            f"{numbers['network']}: test accuracy {100 * numbers['test_accuracy']:.1f}% "
            f"(train {100 * numbers['train_accuracy']:.1f}%)",
            f"network: {folder.path('model.pt')}",
        ],
    )
