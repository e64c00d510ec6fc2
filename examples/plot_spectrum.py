r"""
The metric's spectrum of a trained network
==========================================

The pullback metric :math:`g = J^\top G J / N + \lambda I` of a network's outputs on
:math:`N` inputs has rank at most :math:`NC` above the floor :math:`\lambda`: a few hundred
directions out of tens of thousands of weights. The top eigenvectors are the directions
in which those outputs move most per unit of weight change. A step with little weight
in their span leaves the outputs nearly unchanged, which is what a functionally
invariant path exploits (:doc:`/theory/spectrum`).

:meth:`~manifolds.PullbackMetric.spectrum` returns the top-:math:`k` eigenpairs as a
:class:`~manifolds.Spectrum`, and :meth:`~manifolds.Spectrum.fraction` measures how much of
a direction lies in their span.
"""

# %%
# A trained network and its Fisher metric on 25 images
# ----------------------------------------------------
# With 25 images and 10 classes, :math:`m = 250` embedded outputs: the spectrum comes
# exactly from the :math:`250 \times 250` output-space Gram matrix :math:`JJ^\top`
# (for larger :math:`m`, by Lanczos on the metric-vector product).
import matplotlib.pyplot as plt
import torch
from torch import nn

from manifolds import PullbackMetric, Spectrum
from riemfip.applications.classifiers import train_classifier
from riemfip.data import mnist_subset, split_tasks

task_a, task_b = split_tasks(mnist_subset(), [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))
train_classifier(net, task_a.x_train, task_a.y_train, steps=300, seed=0)

metric = PullbackMetric.from_module(
    net, task_a.x_train[:25], output_metric="fisher", damping=1e-4
)
w = metric.module.flatten()
spectrum = metric.spectrum(w, 250)
print(f"n = {w.numel()} weights; {spectrum.rank} eigenpairs (the numerical rank of J)")
print("top eigenvalues:", [f"{float(e):.3g}" for e in spectrum.eigenvalues[:5]])

# %%
# How much of a direction lies in the top-k subspace
# --------------------------------------------------
# Three directions at the trained weights: the gradient of task A's loss on *other*
# task-A images, the gradient of a new task's loss (digits 5–9), and a random direction.
# For a random direction the share is about :math:`k/n`.


def gradient(x, y):
    wp = w.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(metric.module(wp, x), y)
    return torch.autograd.grad(loss, wp)[0]


directions = {
    "task A gradient (held-out images)": gradient(
        task_a.x_train[500:1000], task_a.y_train[500:1000]
    ),
    "task B gradient": gradient(task_b.x_train[:500], task_b.y_train[:500]),
    "random direction": torch.randn(
        w.numel(), generator=torch.Generator().manual_seed(0)
    ),
}
ks = list(range(1, spectrum.rank + 1))
shares = {}
for name, v in directions.items():
    shares[name] = [
        Spectrum(spectrum.eigenvalues[:k], spectrum.eigenvectors[:, :k]).fraction(v)
        for k in ks
    ]
    print(f"{name:>34}: {100 * shares[name][-1]:5.1f}% in the top {ks[-1]}")

# %%
# The eigenvalues fall by orders of magnitude (left): a few directions carry most of the
# change in the anchor outputs; past the rank of :math:`J` every eigenvalue is
# :math:`\lambda`. Both gradients lie largely in the top subspace, a random direction
# hardly at all (right). The new task's gradient does so because, with one shared head,
# learning digits 5–9 means moving the logits of the stored digits 0–4 too. The natural
# gradient in FIP's units, :math:`\lambda g^{-1}\nabla L`, keeps the component outside
# the subspace at full length and scales the component along eigenvector :math:`i` by
# :math:`\lambda/\mu_i`: what a functionally invariant path follows is mostly the outside
# component.
fig, (ax_ev, ax_share) = plt.subplots(1, 2, figsize=(10, 3.8))
ax_ev.semilogy(ks, spectrum.eigenvalues.numpy(), ".", markersize=3)
ax_ev.axhline(spectrum.damping, color="0.5", ls="--", label=r"$\lambda$")
ax_ev.set(xlabel="index i", ylabel=r"eigenvalue $\mu_i$ of g", title="spectrum")
ax_ev.legend()
for name, s in shares.items():
    ax_share.plot(ks, [100 * f for f in s], label=name)
ax_share.set(
    xlabel="k",
    ylabel="share in top-k eigenvectors (%)",
    title="Spectrum.fraction",
    ylim=(0, 100),
)
ax_share.legend(fontsize=8)
fig.tight_layout()
plt.show()
