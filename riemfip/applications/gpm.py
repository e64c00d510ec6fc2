r"""Gradient Projection Memory (Saha, Garg & Roy, ICLR 2021): learn new tasks in the
weight directions that earlier tasks' inputs do not see.

The method
----------
After each task, every ``Linear`` and ``Conv2d`` layer stores an orthonormal basis
of the inputs the task showed it (:mod:`~riemfip.applications.gpm_basis`: the
layer view, the representation and the threshold, Eq. 5 and 9 of the paper); later
tasks train with their gradients projected off those bases
(:mod:`~riemfip.applications.gpm_projection`). This module holds the
continual-learning method, :class:`GPM`; the public names of both modules are
importable from here.

Biases and normalisation layers
-------------------------------
The paper's networks have no biases; its code trains every one-dimensional
parameter (batch-norm scales and shifts) on the first task and zeroes their
gradients afterwards. Here:

* ``bias="freeze"`` (default, the paper's rule): from the second task on, only the
  projected weights of ``Linear`` and ``Conv2d`` layers move; biases and every other
  parameter (normalisation layers' affine parameters, anything else) are frozen.
* ``bias="augment"``: a bias is the weight of a constant input 1; input columns
  become :math:`[a; 1]`, the gradient :math:`[G_W, g_b]`, and both are projected
  together. Other parameters are still frozen.
* Batch-norm running statistics are frozen after the first task as well (batch-norm
  layers run in eval mode while later tasks train), so old tasks are evaluated with
  the statistics they were learned under. (The paper instead normalises with batch
  statistics at training and test time.)
* Task-incremental heads: the paper gives each task its own unconstrained output
  head. With a shared output layer and masked logits (:class:`Heads`), the rows of
  the output layer for classes that no finished task owns are left unprojected
  (with their biases), which is the same thing; in the class-incremental scenario
  every row is projected.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .continual_base import ContinualMethod
from .gpm_basis import BasisMemory, input_columns, rank_for_energy
from .gpm_basis import protected_layers as protected_layers
from .gpm_projection import ProjectedSGD

__all__ = ["GPM", "BasisMemory", "ProjectedSGD", "input_columns", "rank_for_energy"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _check_fraction(name: str, value, low_open: bool) -> float:
    v = float(value)
    if not (math.isfinite(v) and (v > 0 if low_open else v >= 0) and v <= 1):
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value}")
    return v


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class GPM(ContinualMethod):
    r"""Gradient Projection Memory as a continual-learning method (see the module docstring).

    Task 0 trains with plain SGD. After each task :math:`t`, ``samples`` random
    training inputs of the task extend every layer's basis at threshold
    :math:`\varepsilon_t = \min(1, \varepsilon_0 + t\delta)`; later tasks train with
    :class:`ProjectedSGD`. No replay: the memory of stored images is not used.

    Parameters
    ----------
    threshold : float
        :math:`\varepsilon_0 \in (0, 1]` (default 0.97).
    threshold_increment : float
        :math:`\delta \in [0, 1]` per task (default 0.003).
    samples : int
        Training inputs of each task in its representation matrix (default 300, the
        authors' MLP setting; every output position of a convolution is a column).
    bias : {"freeze", "augment"}
        Biases frozen after the first task (the paper's rule) or projected with the
        weights as the weights of a constant input.
    batch_size : int
        Inputs per forward pass when the representation is collected.
    seed : int
        Seeds the choice of the ``samples`` inputs (per task).
    momentum : float
        SGD momentum, as for :class:`ContinualMethod`.
    """

    name = "gpm"

    def __init__(
        self,
        *,
        threshold: float = 0.97,
        threshold_increment: float = 0.003,
        samples: int = 300,
        bias: str = "freeze",
        batch_size: int = 100,
        seed: int = 0,
        momentum: float = 0.0,
    ):
        super().__init__(momentum=momentum)
        self.threshold = _check_fraction("threshold", threshold, low_open=True)
        self.threshold_increment = _check_fraction(
            "threshold_increment", threshold_increment, low_open=False
        )
        self.samples = _check_count("samples", samples)
        self.batch_size = _check_count("batch_size", batch_size)
        self.seed = int(seed)
        self.memory = BasisMemory(bias)
        self.seen_classes: list[int] = []
        self.task_incremental = False
        self._last: dict = {}

    def config(self) -> dict:
        return {
            **super().config(),
            "threshold": self.threshold,
            "threshold_increment": self.threshold_increment,
            "samples": self.samples,
            "bias": self.memory.bias,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def task_threshold(self, t: int) -> float:
        r""":math:`\varepsilon_t = \min(1, \varepsilon_0 + t\delta)`."""
        return min(1.0, self.threshold + t * self.threshold_increment)

    def free_rows(self, num_outputs: int) -> torch.Tensor | None:
        """Output units no finished task owns (task-incremental), else ``None``."""
        if not self.task_incremental:
            return None
        free = torch.ones(num_outputs, dtype=torch.bool)
        free[self.seen_classes] = False
        return free

    def optimizer(self, model, lr, t, memory):
        if not self.memory.bases:
            return super().optimizer(model, lr, t, memory)
        head = dict(model.named_modules()).get(self.memory.head)
        free = None if head is None else self.free_rows(head.weight.shape[0])
        if free is not None:
            free = free.to(head.weight.device)
        return ProjectedSGD(model, self.memory, lr=lr, momentum=self.momentum, free_rows=free)

    def loss(self, model, x, y, task_ids, t, memory, heads, generator):
        if self.memory.bases:  # running statistics stay those of the first task
            for m in model.modules():
                if isinstance(m, _BATCH_NORMS):
                    m.eval()
        return super().loss(model, x, y, task_ids, t, memory, heads, generator)

    def end_task(self, model, task, t, heads):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        pick = torch.randperm(len(task.x_train), generator=gen, device=gen.device)[: self.samples]
        threshold = self.task_threshold(t)
        sizes = self.memory.update(
            model, task.x_train[pick.to(task.x_train.device)], threshold, batch_size=self.batch_size
        )
        self.task_incremental = heads.mask is not None
        self.seen_classes = sorted(set(self.seen_classes) | {int(c) for c in task.labels})
        self._last = {"threshold": threshold, "basis": {n: list(kd) for n, kd in sizes.items()}}

    def diagnostics(self) -> dict:
        """The threshold of the last update and each layer's basis size ``[k, d]``."""
        return dict(self._last)

    def state_dict(self) -> dict:
        return {
            "memory": self.memory.state_dict(),
            "seen_classes": list(self.seen_classes),
            "task_incremental": self.task_incremental,
        }

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.seen_classes = list(state["seen_classes"])
        self.task_incremental = bool(state["task_incremental"])
