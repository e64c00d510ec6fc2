"""Swap riemfip's weight space into an unmodified geoopt optimizer.

A 784-100-10 MLP learns digits 0-4 of the offline MNIST subset. Its weights then
become one flat ``geoopt.ManifoldParameter`` on a ``WeightSpace`` whose metric is
the Fisher pullback of its outputs on 100 stored digit-0-4 images; plain
``geoopt.optim.RiemannianSGD`` then learns digits 5-9 with natural-gradient steps
(each step moves the outputs on the stored images as little as possible). The
same number of plain SGD steps is the baseline.

Run: ``python examples/geoopt_natural_gradient.py`` (about a minute on 2 idle CPU cores).
Measured: SGD keeps 8.4% of digits 0-4 (new 90.8%); RiemannianSGD on WeightSpace keeps
42.6% (new 91.2%). The FIP optimizer (``riemfip.optim.FIP``, with a drift correction
toward the frozen anchor outputs) keeps 91.8% (new 92.2%) on the same two-task split
with a 784-100-100-10 MLP and 250 anchors:
``benchmarks/fip_two_task.py``.
"""

from __future__ import annotations

import copy

import geoopt
import torch
from torch import nn

from manifolds import PullbackMetric, WeightSpace, flat_parameter, write_point
from riemfip.data import mnist_subset


def accuracy(net, x, y, classes):
    with torch.no_grad():
        mask = torch.isin(y, torch.tensor(classes))
        return 100 * float((net(x[mask]).argmax(1) == y[mask]).float().mean())


def main(steps: int = 150, lr: float = 0.05, seed: int = 0) -> None:
    torch.manual_seed(seed)
    ds = mnist_subset()
    old, new = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    in_old = torch.isin(ds.y_train, torch.tensor(old))
    xa, ya = ds.x_train[in_old], ds.y_train[in_old]
    xb, yb = ds.x_train[~in_old], ds.y_train[~in_old]

    net = nn.Sequential(nn.Linear(784, 100), nn.Tanh(), nn.Linear(100, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(5):
        for i in range(0, len(xa), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xa[i : i + 64]), ya[i : i + 64]).backward()
            opt.step()
    print(f"after task A: old {accuracy(net, ds.x_test, ds.y_test, old):.1f}%")

    # Baseline: plain SGD on task B.
    sgd_net = copy.deepcopy(net)
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=lr)
    # riemfip: the same loop, an unmodified geoopt optimizer, one flat parameter on WeightSpace.
    metric = PullbackMetric.from_module(
        net, xa[:100], output_metric="fisher", damping=1.0, tol=1e-3, maxiter=100
    )
    space = WeightSpace(metric)
    w = flat_parameter(net, space)
    rsgd = geoopt.optim.RiemannianSGD([w], lr=lr)

    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(xb), (64,), generator=gen)
        sgd.zero_grad()
        nn.functional.cross_entropy(sgd_net(xb[idx]), yb[idx]).backward()
        sgd.step()
        rsgd.zero_grad()
        nn.functional.cross_entropy(metric.module(w, xb[idx]), yb[idx]).backward()
        rsgd.step()
    write_point(net, w)
    for name, model in [("SGD", sgd_net), ("RiemannianSGD on WeightSpace", net)]:
        print(
            f"{name:>30}: old {accuracy(model, ds.x_test, ds.y_test, old):5.1f}%  "
            f"new {accuracy(model, ds.x_test, ds.y_test, new):5.1f}%"
        )


if __name__ == "__main__":
    main()
