"""What the geometry costs on this machine, relative to plain training.

:func:`cost_ratios` times, in CPU time (:func:`time.process_time`) on one thread, on one
batch of a network:

``forward+backward``
    the cross-entropy's forward and backward pass (the reference);
``metric-vector``
    ``PullbackMetric.matvec(w, v)``, g(w)v by one JVP and one VJP;
``SGD step``
    zero_grad, forward, backward, ``torch.optim.SGD.step``;
``FIP step``
    the same with :class:`riemfip.optim.FIP` (its default settings, anchored on other
    inputs).

Each repeat runs the four in a fresh random order, each ``inner`` times in a row; a
ratio is the median over repeats of the ratio within a repeat, so that the load of a
shared machine, which drifts between repeats, cancels.
"""

from __future__ import annotations

import contextlib
import copy
import random
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from manifolds import PullbackMetric
from riemfip.optim import FIP

__all__ = ["RATIOS", "cost_ratios"]

#: Each ratio as (numerator, denominator).
RATIOS = {
    "metric-vector / forward+backward": ("metric-vector", "forward+backward"),
    "FIP step / SGD step": ("FIP step", "SGD step"),
    "SGD step / forward+backward": ("SGD step", "forward+backward"),
    "FIP step / forward+backward": ("FIP step", "forward+backward"),
}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _operations(
    net: nn.Module, x, y, anchors, output_metric: str, seed: int
) -> dict[str, Callable]:
    """The four timed operations, each on its own copy of ``net``."""

    def loss(model):
        return nn.functional.cross_entropy(model(x), y)

    ref, sgd_net, fip_net = (copy.deepcopy(net).train() for _ in range(3))
    sgd = torch.optim.SGD(sgd_net.parameters(), lr=0.01)
    fip = FIP(fip_net.parameters(), model=fip_net, anchor_inputs=anchors)
    metric = PullbackMetric.from_module(ref, x, output_metric=output_metric, damping=1e-4)
    w = metric.module.flatten().detach()
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), device="cpu").to(w)

    def forward_backward():
        ref.zero_grad(set_to_none=True)
        loss(ref).backward()

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        loss(model).backward()
        opt.step()

    return {
        "forward+backward": forward_backward,
        "metric-vector": lambda: metric.matvec(w, v),
        "SGD step": lambda: step(sgd_net, sgd),
        "FIP step": lambda: step(fip_net, fip),
    }


def cost_ratios(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    anchors: torch.Tensor,
    *,
    repeats: int = 7,
    inner: int = 10,
    output_metric: str = "fisher",
    seed: int = 0,
    bar=None,
) -> dict:
    """CPU seconds per call of each operation, and the median ratios of :data:`RATIOS`.

    Parameters
    ----------
    net : torch.nn.Module
        A classifier (copied; left untouched).
    x, y : torch.Tensor
        The batch every operation runs on.
    anchors : torch.Tensor
        FIP's anchor inputs.
    repeats, inner : int
        Interleaved repeats, and calls of an operation in a row within one (FIP's
        default all-anchor pull-back runs every 10th step: ``inner=10`` holds one).
    output_metric : str
        The metric of the metric-vector product.
    bar : tqdm, optional
        Advanced once per repeat.

    Returns
    -------
    dict
        ``seconds`` (per call, per repeat), ``median_seconds``, ``ratios`` (medians) and
        ``ratio_range`` (min, max over repeats).
    """
    if repeats < 1 or inner < 1:
        raise ValueError(f"--repeats and --inner must be >= 1, got {repeats}, {inner}")
    with _one_thread():
        ops = _operations(net, x, y, anchors, output_metric, seed)
        for op in ops.values():  # warm-up: allocations, FIP's first factorisation
            op()
        seconds: dict[str, list[float]] = {name: [] for name in ops}
        order = random.Random(seed)
        for _ in range(repeats):
            names = list(ops)
            order.shuffle(names)
            for name in names:
                start = time.process_time()
                for _ in range(inner):
                    ops[name]()
                seconds[name].append((time.process_time() - start) / inner)
            if bar is not None:
                bar.update(1)
    per_repeat = {
        key: [a / b for a, b in zip(seconds[num], seconds[den], strict=True)]
        for key, (num, den) in RATIOS.items()
    }
    return {
        "clock": "time.process_time, 1 thread",
        "repeats": repeats,
        "inner": inner,
        "seconds": seconds,
        "median_seconds": {name: statistics.median(s) for name, s in seconds.items()},
        "ratios": {key: statistics.median(r) for key, r in per_repeat.items()},
        "ratio_range": {key: [min(r), max(r)] for key, r in per_repeat.items()},
    }
