"""One labelled-data check: its rules, and the same named error at every boundary that
takes labelled data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from riemfip.applications.attacks import fgsm, pgd, robust_accuracy
from riemfip.applications.classifiers import accuracy, train_classifier
from riemfip.applications.continual import run_continual
from riemfip.applications.robust_ensemble import (
    compare_ensembles,
    evaluate_robustness,
    fip_ensemble,
    independent_ensemble,
)
from riemfip.applications.sparsify import fip_prune, prune_finetune, sparsify_sweep
from riemfip.connectivity import evaluate_path, fit_bezier
from riemfip.data import Dataset
from riemfip.labelled import check_dataset, check_labelled, labelled_pair

X = torch.rand(6, 4)
Y = torch.tensor([0, 1, 2, 0, 1, 2])


def _nan_x():
    x = X.clone()
    x[4, 1] = math.nan
    return x


BAD = {
    "not a tensor": ((X.tolist(), Y), TypeError, "must be tensors, got list and Tensor"),
    "one label short": ((X, Y[:-1]), ValueError, r"one label per input; got inputs \(6, 4\)"),
    "labels 2-D": ((X, Y[:, None]), ValueError, r"labels \(6, 1\)"),
    "no samples": ((X[:0], Y[:0]), ValueError, "no samples"),
    "float labels": ((X, Y.float()), TypeError, "labels must be integer.*float32"),
    "bool labels": ((X, Y > 0), TypeError, "labels must be integer.*bool"),
    "integer inputs": ((X.long(), Y), TypeError, "inputs must be floating point, got torch.int64"),
    "NaN inputs": ((_nan_x(), Y), ValueError, "NaN or Inf .1 samples, the first is sample 4"),
    "Inf inputs": ((X / 0, Y), ValueError, "NaN or Inf .6 samples, the first is sample 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_check_labelled_names_the_problem(case):
    (x, y), error, pattern = BAD[case]
    with pytest.raises(error, match=f"^training set: .*{pattern}"):
        check_labelled(x, y, name="training set")


def test_what_passes_and_the_options():
    x, y = check_labelled(X.double(), Y.int())
    assert x.dtype == torch.float64 and y.dtype == torch.int32
    tokens = torch.randint(0, 9, (6, 3))
    assert check_labelled(tokens, Y, integer_inputs=True)[0] is tokens
    with pytest.raises(TypeError, match=r"floating point or integer \(token ids\), got torch.bool"):
        check_labelled(tokens > 3, Y, integer_inputs=True)
    assert labelled_pair([X, Y])[1] is Y
    with pytest.raises(TypeError, match="data must be an .inputs, integer labels. pair"):
        labelled_pair((X, Y, Y))
    with pytest.raises(TypeError, match="must be a riemfip.data.Dataset, got tuple"):
        check_dataset((X, Y))
    with pytest.raises(ValueError, match=r"task 1 \(toy\) test set: no samples"):
        check_dataset(Dataset(X, Y, X[:0], Y[:0], 3, "toy"), name="task 1")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _flat_path(net):
    w = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return torch.stack([w, w])


# Every public entry point that takes labelled data, called with (x, y).
BOUNDARIES = {
    "train_classifier": lambda x, y: train_classifier(_net(), x, y, steps=1),
    "accuracy": lambda x, y: accuracy(_net(), x, y),
    "fgsm": lambda x, y: fgsm(_net(), x, y, 0.1),
    "pgd": lambda x, y: pgd(_net(), x, y, 0.1, steps=1),
    "robust_accuracy": lambda x, y: robust_accuracy(_net(), x, y, _clean()),
    "evaluate_robustness": lambda x, y: evaluate_robustness({"n": _net()}, x, y, [_clean()]),
    "independent_ensemble": lambda x, y: independent_ensemble(_net, x, y, size=1, steps=1),
    "fip_ensemble": lambda x, y: fip_ensemble(_net(), x, y, size=2, steps_per_member=1),
    "prune_finetune": lambda x, y: prune_finetune(_net(), 0.5, x, y, steps=1),
    "fip_prune": lambda x, y: fip_prune(_net(), 0.5, x, y, steps=1, fip_steps=1),
    "fit_bezier": lambda x, y: fit_bezier(_net(), _net(), (x, y), epochs=1),
    "evaluate_path": lambda x, y: evaluate_path(_net(), _flat_path(_net()), (x, y)),
    "sparsify_sweep": lambda x, y: sparsify_sweep(
        _net(), Dataset(X, Y, x, y, 3, "toy"), [0.5], steps=1, fip_steps=0
    ),
    "compare_ensembles": lambda x, y: compare_ensembles(
        _net, Dataset(x, y, X, Y, 3, "toy"), size=1, train_steps=1, steps_per_member=1,
        attacks=[_clean()],
    ),
    "run_continual": lambda x, y: run_continual(
        [Dataset(X, Y, X, Y, 3, "toy"), Dataset(x, y, X, Y, 3, "toy")], "finetune", _net,
        progress=False,
    ),
}  # fmt: skip


def _clean():
    from riemfip.applications.attacks import AttackConfig

    return AttackConfig.clean()


@pytest.mark.parametrize("case", ["one label short", "float labels", "NaN inputs"])
@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_every_boundary_that_takes_labelled_data_uses_the_one_check(boundary, case):
    (x, y), error, pattern = BAD[case]
    with pytest.raises(error, match=pattern):
        BOUNDARIES[boundary](x, y)
