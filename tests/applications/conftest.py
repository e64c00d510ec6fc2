"""Shared fixtures for the application tests: a small slice of the offline MNIST subset."""

import pytest
import torch

from riemfip.data import mnist_subset


@pytest.fixture(scope="session")
def mnist_small():
    """1,000 training and 200 test images (every fifth: the test split is sorted by class)."""
    ds = mnist_subset()
    return ds.x_train[:1000], ds.y_train[:1000], ds.x_test[::5], ds.y_test[::5]


@pytest.fixture(scope="session")
def trained_mlp(mnist_small):
    """A 784-32-10 MLP trained for 150 Adam steps (about 88% test accuracy)."""
    from riemfip.applications.classifiers import mlp, train_classifier

    x, y, _, _ = mnist_small
    torch.manual_seed(0)
    return train_classifier(mlp([784, 32, 10]), x, y, steps=150, lr=3e-3).eval()
