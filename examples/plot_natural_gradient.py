r"""
Natural-gradient descent with an unmodified geoopt optimizer
============================================================

A network's weights become one flat :class:`geoopt.ManifoldParameter` on a
:class:`~manifolds.WeightSpace`, whose metric is the Fisher pullback of the network's
outputs on stored inputs of an old task. Plain ``geoopt.optim.RiemannianSGD`` then takes
natural-gradient steps :math:`w \leftarrow w - \eta\, g(w)^{-1}\nabla L(w)` on a new task:
each step moves the outputs on the stored inputs as little as its length allows.
The baseline is the same loop with ``torch.optim.SGD``.

Sizes are small so that the page builds in seconds: a 784-32-10 MLP, 2,000 images per
task, 25 stored images. (``benchmarks/fip_two_task.py`` runs the measured version with
:class:`~riemfip.optim.FIP`; see :doc:`/benchmarks`.)
"""

# %%
# Task A: digits 0–4
# ------------------
import copy

import geoopt
import matplotlib.pyplot as plt
import torch
from torch import nn

from manifolds import PullbackMetric, WeightSpace, flat_parameter, write_point
from riemfip.applications.classifiers import accuracy, train_classifier
from riemfip.data import mnist_subset, split_tasks

torch.manual_seed(0)
task_a, task_b = split_tasks(mnist_subset(), [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
net = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))
train_classifier(net, task_a.x_train, task_a.y_train, steps=300, seed=0)
acc = 100 * accuracy(net, task_a.x_test, task_a.y_test)
print(f"after task A: {acc:.1f}% on digits 0-4")

# %%
# The manifold and the optimizer
# ------------------------------
# 25 stored task-A images, 10 logits each: :math:`m = 250` embedded outputs, so
# :meth:`~manifolds.PullbackMetric.solve` inverts :math:`g` exactly in output space
# (Woodbury) although :math:`n = 25{,}450`. ``damping`` is :math:`\lambda`: directions
# that leave the stored outputs alone get :math:`\lambda^{-1}` times the gradient.
metric = PullbackMetric.from_module(
    net, task_a.x_train[:25], output_metric="fisher", damping=1.0
)
space = WeightSpace(metric)
w = flat_parameter(net, space)  # one flat ManifoldParameter, a copy of the weights
rsgd = geoopt.optim.RiemannianSGD([w], lr=0.05)

sgd_net = copy.deepcopy(net)
sgd = torch.optim.SGD(sgd_net.parameters(), lr=0.05)

# %%
# The same training loop for both
# -------------------------------
# ``metric.module(w, x)`` evaluates the network at the flat weights ``w``.
gen = torch.Generator().manual_seed(0)
history = {"SGD": [], "RiemannianSGD on WeightSpace": []}
steps = list(range(0, 101, 10))
for step in range(steps[-1] + 1):
    if step in steps:
        write_point(net, w)  # copy the flat point back into the network to evaluate it
        for name, model in (("SGD", sgd_net), ("RiemannianSGD on WeightSpace", net)):
            old = 100 * accuracy(model, task_a.x_test, task_a.y_test)
            new = 100 * accuracy(model, task_b.x_test, task_b.y_test)
            history[name].append((old, new))
    idx = torch.randint(len(task_b.x_train), (64,), generator=gen)
    xb, yb = task_b.x_train[idx], task_b.y_train[idx]
    sgd.zero_grad()
    nn.functional.cross_entropy(sgd_net(xb), yb).backward()
    sgd.step()
    rsgd.zero_grad()
    nn.functional.cross_entropy(metric.module(w, xb), yb).backward()
    rsgd.step()

for name, h in history.items():
    print(f"{name:>30}: digits 0-4 {h[-1][0]:5.1f}%, digits 5-9 {h[-1][1]:5.1f}%")

# %%
# Both learn digits 5–9; the natural-gradient steps forget less of digits 0–4. One
# shared head with no replay is the hardest setting (class-incremental): the metric
# protects the 25 stored images' outputs, not the whole task. :class:`~riemfip.optim.FIP`
# adds a pull-back toward the frozen outputs and protects neighbourhoods of the stored
# inputs (:doc:`/guide/fip_options`).
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
for name, h in history.items():
    axes[0].plot(steps, [o for o, _ in h], marker="o", label=name)
    axes[1].plot(steps, [n for _, n in h], marker="o", label=name)
axes[0].set(
    title="old task (digits 0-4)", xlabel="steps on task B", ylabel="test accuracy (%)"
)
axes[1].set(title="new task (digits 5-9)", xlabel="steps on task B")
axes[1].legend()
fig.tight_layout()
plt.show()
