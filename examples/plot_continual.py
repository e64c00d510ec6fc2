r"""
Two-task continual learning
===========================

One network learns digits 0–4, then digits 5–9, with one shared 10-way head and no task
label at test time (class-incremental: the hard case). Fine-tuning on the second task
forgets the first. :class:`~riemfip.optim.FIP` learns the second task along a
functionally invariant path: each step descends the new task's loss in the metric that
the outputs on 50 stored images per old class induce, and pulls those outputs back
toward where they were (:doc:`/theory/fip`). Experience replay, which trains on the
same stored images with their labels, is the usual baseline.

:func:`~riemfip.applications.continual.run_continual` runs each method with the same
data, budget and seed. Sizes are small so that the page builds in seconds (a 784-64-10
MLP, three epochs per task); ``benchmarks/continual_mnist.py`` runs the measured
comparison (:doc:`/benchmarks`).
"""

# %%
# The tasks and the methods
# -------------------------
import matplotlib.pyplot as plt
import numpy as np
from torch import nn

from riemfip.applications.continual import run_continual
from riemfip.applications.continual_methods import FIPMethod
from riemfip.data import mnist_subset, split_tasks

tasks = split_tasks(mnist_subset(), [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])


def model():
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


methods = {
    "fine-tuning": "finetune",
    "replay": "replay",
    # FIP steps at 10x the SGD rate: it passes only the part of each gradient that
    # leaves the stored outputs alone (see the user guide on FIP's options)
    "FIP": FIPMethod(lr_scale=10),
}
results = {
    name: run_continual(
        tasks,
        method,
        model,
        scenario="class",
        epochs=3,
        lr=0.05,
        seed=0,
        progress=False,
    )
    for name, method in methods.items()
}
for name, result in results.items():
    print(f"{name}: {result.summary()}\n")

# %%
# Accuracy on each task after the second one
# ------------------------------------------
# ``result.accuracy[i, j]`` is the test accuracy (%) on task ``j`` after training task
# ``i``; the last row is the end of the run.
fig, ax = plt.subplots(figsize=(6.5, 3.5))
width = 0.25
for k, (name, result) in enumerate(results.items()):
    bars = ax.bar(
        np.arange(2) + (k - 1) * width, result.accuracy[-1], width, label=name
    )
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
ax.set_xticks([0, 1], ["task 0 (digits 0-4)", "task 1 (digits 5-9)"])
ax.set_ylabel("test accuracy after task 1 (%)")
ax.set_ylim(0, 105)
ax.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
fig.tight_layout()
plt.show()
