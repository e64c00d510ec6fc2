"""Fixtures shared by the tests (helpers live in ``dense_reference.py``)."""

from __future__ import annotations

import pytest
import torch
from dense_reference import make_mlp, randn

# The tests' tensors are tiny: one thread is faster than two (no synchronisation), and
# much faster on a machine whose cores are busy with other work.
torch.set_num_threads(1)


@pytest.fixture
def tiny_mlp():
    """A 3-4-2 tanh MLP (26 weights), a batch of 5 inputs, float64."""
    net = make_mlp((3, 4, 2), seed=1, scale=1.5)
    x = randn(5, 3, seed=2)
    return net, x
