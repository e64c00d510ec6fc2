"""The base of every continual-learning method: the task heads, the replay memory, and
:class:`ContinualMethod` (plain fine-tuning), whose hooks the other methods override.

The methods themselves are in :mod:`riemfip.applications.continual_methods` (which also
re-exports these names), :mod:`riemfip.applications.continual_fip` and
:mod:`riemfip.applications.gpm`.

Heads
-----
``heads`` is a :class:`Heads`: in the task-incremental scenario a boolean mask
``(num_tasks, num_classes)`` whose row ``t`` marks the output units of task ``t``
(all other logits are masked out of the softmax, in training and evaluation); in
the class-incremental scenario ``None`` (one shared head, no task identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from riemfip.data import Dataset

__all__ = ["ContinualMethod", "Heads", "Memory", "task_ids_of"]


@dataclass
class Heads:
    """Which output units a sample of each task may use.

    Attributes
    ----------
    mask : torch.Tensor or None
        Boolean ``(num_tasks, num_classes)``: row ``t`` marks task ``t``'s classes
        (task-incremental), or ``None``: every unit for every sample (class-incremental).
    """

    mask: torch.Tensor | None

    def logits(self, out: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``out`` with each sample's logits outside its task's head set to ``-inf``."""
        if self.mask is None:
            return out
        keep = self.mask.to(out.device)[task_ids]
        return out.masked_fill(~keep, float("-inf"))


class Memory:
    """A fixed store of ``per_class`` training inputs of each class of every finished task.

    Attributes
    ----------
    x, y, task_ids : torch.Tensor or None
        Stored inputs, their labels and the task each came from (``None`` while empty).
    """

    def __init__(self, per_class: int):
        if isinstance(per_class, bool) or not isinstance(per_class, int):
            raise TypeError(f"memory_per_class must be an int, got {type(per_class).__name__}")
        if per_class < 0:
            raise ValueError(f"memory_per_class must be >= 0, got {per_class}")
        self.per_class = per_class
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.task_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.x is None else len(self.x)

    def add_task(self, task: Dataset, task_id: int, generator: torch.Generator) -> None:
        """Store ``per_class`` random training images of each class of ``task``."""
        if self.per_class == 0:
            return
        picks = []
        for c in task.labels:
            idx = torch.nonzero(task.y_train.cpu() == c).flatten()
            if len(idx) < self.per_class:
                raise ValueError(
                    f"task {task_id} has {len(idx)} training images of class {c}, "
                    f"fewer than memory_per_class={self.per_class}"
                )
            order = torch.randperm(len(idx), generator=generator, device=generator.device)
            picks.append(idx[order[: self.per_class]])
        idx = torch.cat(picks).to(task.y_train.device)
        x, y = task.x_train[idx], task.y_train[idx]
        tid = torch.full_like(y, task_id)
        if self.x is None:
            self.x, self.y, self.task_ids = x, y, tid
        else:
            self.x = torch.cat([self.x, x])
            self.y = torch.cat([self.y, y])
            self.task_ids = torch.cat([self.task_ids, tid])

    def state_dict(self) -> dict:
        return {"per_class": self.per_class, "x": self.x, "y": self.y, "task_ids": self.task_ids}

    def load_state_dict(self, state: dict) -> None:
        self.per_class = state["per_class"]
        self.x, self.y, self.task_ids = state["x"], state["y"], state["task_ids"]


def task_ids_of(task: Dataset, t: int) -> torch.Tensor:
    """Task id ``t`` for every training sample of ``task``."""
    return torch.full_like(task.y_train, t)


class ContinualMethod:
    """Plain fine-tuning; the base every other method overrides parts of.

    Parameters
    ----------
    momentum : float
        Momentum of the SGD optimizer built for each task (restarted per task).
    """

    name = "finetune"

    def __init__(self, *, momentum: float = 0.0):
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def config(self) -> dict:
        """Hyperparameters, as recorded in results and checked on resume."""
        return {"momentum": self.momentum}

    def training_data(
        self, t: int, tasks: Sequence[Dataset], memory: Memory
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, task_ids)`` to train on during task ``t`` (default: task ``t`` only)."""
        return tasks[t].x_train, tasks[t].y_train, task_ids_of(tasks[t], t)

    def optimizer(
        self, model: nn.Module, lr: float, t: int, memory: Memory
    ) -> torch.optim.Optimizer:
        """The optimizer for task ``t`` (default: SGD with ``momentum``)."""
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=self.momentum)

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        task_ids: torch.Tensor,
        t: int,
        memory: Memory,
        heads: Heads,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Training loss of one batch (default: cross-entropy through the task heads)."""
        return nn.functional.cross_entropy(heads.logits(model(x), task_ids), y)

    def after_step(self, model: nn.Module, lr: float) -> None:
        """Called after each optimizer step (default: nothing)."""

    def end_task(self, model: nn.Module, task: Dataset, t: int, heads: Heads) -> None:
        """Called after training on task ``t`` (before it enters the memory)."""

    def diagnostics(self) -> dict:
        """JSON-ready facts about the last task's training (default: none)."""
        return {}

    def state_dict(self) -> dict:
        """What the method carries from task to task (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
