r"""
Mode connectivity of two MNIST networks
=======================================

Two networks trained from different seeds are two points in weight space. The straight
line between them passes through networks that are worse than either end; a
geodesic of the Fisher pullback metric keeps the predictions on anchor inputs as still as
it can, and Garipov et al.'s quadratic Bézier curve is trained to keep the loss low.
:func:`riemfip.connect` solves the boundary-value problem (a relaxed discrete geodesic)
and :func:`~riemfip.connectivity.compare_paths` evaluates the paths on test data.

Sizes are small so that the page builds in seconds: 784-32-10 MLPs, 64 anchor images,
9 points on each path. ``benchmarks/connectivity_mnist.py`` is the measured version.
"""

# %%
# Two networks, two seeds
# -----------------------
import matplotlib.pyplot as plt
import torch
from torch import nn

import riemfip
from riemfip.applications.classifiers import accuracy, train_classifier
from riemfip.connectivity import (
    compare_paths,
    connection_metric,
    fit_bezier,
    straight_line,
)
from riemfip.data import mnist_subset

data = mnist_subset()
nets = []
for seed in (0, 1):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))
    train_classifier(net, data.x_train, data.y_train, steps=400, seed=seed)
    nets.append(net.eval())
    acc = 100 * accuracy(net, data.x_test, data.y_test)
    print(f"seed {seed}: test accuracy {acc:.1f}%")

# %%
# The geodesic, the line and the Bézier curve
# -------------------------------------------
# ``damping`` is :math:`\lambda` in :math:`g = J^\top G J / N + \lambda I`: the smaller it
# is, the further the path may move in weights to keep the anchor predictions still.
# The solver's ``status`` and ``message`` say whether it converged (:doc:`/guide/status`).
anchors = data.x_train[:64]
path = riemfip.connect(nets[0], nets[1], anchors, damping=1e-3, n_points=9, maxiter=300)
print(
    f"relax: {path.message} (residual {path.residual:.2e}, status {path.status.name})"
)
line = straight_line(path.points[0], path.points[-1], 9)
bezier = fit_bezier(nets[0], nets[1], (data.x_train, data.y_train), epochs=2, seed=0)

metric = connection_metric(nets[0], anchors, damping=1e-3)
report = compare_paths(
    nets[0],
    {"geodesic": path, "line": line, "bezier": bezier.sample(9)},
    (data.x_test, data.y_test),
    metric=metric,
)
print(report.table())

# %%
# The geodesic minimises the path energy among paths with these ends, so the anchors'
# predictions change least along it. That is a statement about 64 anchor images, not
# the test set: the figure shows how the test loss and accuracy fare along each path
# (the Bézier curve had two epochs of training). When ``relax`` stops at its iteration
# cap (status ``MAX_ITERATIONS`` in the first line printed above), ``init=path``
# resumes it.
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
styles = {"geodesic": "o-", "line": "^-", "bezier": "s-"}
for name, ev in report.paths.items():
    ax_loss.plot(ev.s, ev.loss, styles[name], label=f"{name} (energy {ev.energy:.3f})")
    ax_acc.plot(ev.s, 100 * ev.accuracy, styles[name], label=name)
ax_loss.set(xlabel="t", ylabel="test cross-entropy", title="loss along the path")
ax_acc.set(xlabel="t", ylabel="test accuracy (%)", title="accuracy along the path")
ax_loss.legend(fontsize=8)
ax_acc.legend(fontsize=8)
fig.tight_layout()
plt.show()
