r"""
Accuracy against sparsity
=========================

Prune a trained network to a given fraction of zero weights and keep its accuracy.
One-shot global magnitude pruning costs accuracy as the sparsity grows; fine-tuning the
masked network wins some of it back. The FIP route first walks a functionally invariant
path toward the magnitude-pruned network (the outputs on anchor images held where the
dense network had them), then applies the mask and fine-tunes for the rest of the same
step budget (:mod:`riemfip.applications.sparsify`).

Sizes are small so that the page builds in seconds: LeNet-style 784-100-10 MLP,
150 optimizer steps per method and sparsity. ``benchmarks/sparsify_lenet.py`` runs
LeNet-300-100 with the measured budgets (:doc:`/benchmarks`).
"""

# %%
# A dense network and the sweep
# -----------------------------
import matplotlib.pyplot as plt
import torch
from torch import nn

from riemfip.applications.classifiers import train_classifier
from riemfip.applications.sparsify import sparsify_sweep
from riemfip.data import mnist_subset

data = mnist_subset()
torch.manual_seed(0)
dense = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
train_classifier(dense, data.x_train, data.y_train, steps=600, seed=0)

sparsities = [0.5, 0.8, 0.9, 0.95, 0.98]
result = sparsify_sweep(dense, data, sparsities, steps=150, fip_steps=75, seed=0)
print(result.table())

# %%
# Every method that trains gets the same 150 steps at each sparsity; the FIP route spends
# half of them on the path. The dashed line is the dense network.
fig, ax = plt.subplots(figsize=(6, 4))
for method in result.methods():
    acc = [100 * result.row(method, s).test_accuracy for s in sparsities]
    ax.plot([100 * s for s in sparsities], acc, marker="o", label=method)
ax.axhline(100 * result.dense_test_accuracy, color="0.5", ls="--", label="dense")
ax.set(xlabel="sparsity (% of weights zero)", ylabel="test accuracy (%)")
ax.legend()
fig.tight_layout()
plt.show()
