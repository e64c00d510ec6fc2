"""Continual-learning methods: fine-tuning, EWC, experience replay, joint training, FIP.

Each method is a small object that :func:`riemfip.applications.continual.run_continual`
drives through the same loop for every task::

    data = method.training_data(t, tasks, memory)      # what to train on
    opt = method.optimizer(model, lr, t, memory)       # how to step
    for each batch:
        loss = method.loss(model, x, y, tid, t, memory, heads, generator)
        loss.backward(); opt.step(); method.after_step(model, lr)
    method.end_task(model, tasks[t], t, heads)         # e.g. EWC's Fisher

so that methods differ only in what they override. A method's hyperparameters are
its constructor arguments (``config()``); whatever it learns across tasks is in
``state_dict()`` so that a run checkpointed after a task resumes exactly.

Heads
-----
``heads`` is a :class:`Heads`: in the task-incremental scenario a boolean mask
``(num_tasks, num_classes)`` whose row ``t`` marks the output units of task ``t``
(all other logits are masked out of the softmax, in training and evaluation); in
the class-incremental scenario ``None`` (one shared head, no task identity).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from riemfip.data import Dataset

__all__ = [
    "EWC",
    "ContinualMethod",
    "DriftBudgetWarning",
    "FIPMethod",
    "FineTune",
    "Heads",
    "Joint",
    "Memory",
    "Replay",
    "fisher_diagonal",
]


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
            picks.append(idx[torch.randperm(len(idx), generator=generator)[: self.per_class]])
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


def _task_ids(task: Dataset, t: int) -> torch.Tensor:
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
        return tasks[t].x_train, tasks[t].y_train, _task_ids(tasks[t], t)

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


class FineTune(ContinualMethod):
    """Fine-tuning: cross-entropy on the new task only (the lower bound)."""

    name = "finetune"


class Joint(ContinualMethod):
    """Joint training on all tasks seen so far (the upper bound).

    During task ``t`` the network trains on the union of the full training sets of
    tasks ``0..t``, starting from the weights after task ``t - 1``.
    """

    name = "joint"

    def training_data(self, t, tasks, memory):
        seen = tasks[: t + 1]
        return (
            torch.cat([d.x_train for d in seen]),
            torch.cat([d.y_train for d in seen]),
            torch.cat([_task_ids(d, i) for i, d in enumerate(seen)]),
        )


class Replay(ContinualMethod):
    """Experience replay: each batch of the new task is joined by an equal-sized batch
    drawn from the memory (stored inputs with their labels), one cross-entropy over both.

    Parameters
    ----------
    momentum : float
        As for :class:`ContinualMethod`.
    """

    name = "replay"

    def loss(self, model, x, y, task_ids, t, memory, heads, generator):
        if len(memory):
            idx = torch.randint(len(memory), (len(x),), generator=generator).to(memory.x.device)
            x = torch.cat([x, memory.x[idx]])
            y = torch.cat([y, memory.y[idx]])
            task_ids = torch.cat([task_ids, memory.task_ids[idx]])
        return super().loss(model, x, y, task_ids, t, memory, heads, generator)


def fisher_diagonal(
    model: nn.Module,
    x: torch.Tensor,
    *,
    task_ids: torch.Tensor | None = None,
    heads: Heads | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    r"""Diagonal of the Fisher information of a softmax classifier, flat.

    .. math::

        F_i = \frac1N \sum_{n=1}^{N} \sum_k p_k(x_n)
              \left(\frac{\partial \log p_k(x_n)}{\partial \theta_i}\right)^2,

    the exact expectation over the model's own predictive distribution (not the
    "empirical" Fisher of the true labels), with ``p`` the softmax of the logits
    restricted to each sample's task head when ``heads`` masks them.
    Per-sample gradients by :func:`torch.func.vmap`, evaluated in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
    x : torch.Tensor
        Inputs ``(N, ...)``.
    task_ids, heads : optional
        Each sample's task and the :class:`Heads` that mask its logits.
    batch_size : int
        Samples per vectorised chunk.

    Returns
    -------
    torch.Tensor
        Length ``n`` (the flat order of ``parameters_to_vector(model.parameters())``),
        dtype and device of the parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or len(x) == 0:
        raise ValueError("x must be a non-empty tensor of inputs (N, ...)")
    heads = Heads(None) if heads is None else heads
    if task_ids is None:
        task_ids = torch.zeros(len(x), dtype=torch.long, device=x.device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def log_probs(p, xi, ti):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return torch.log_softmax(heads.logits(out, ti.unsqueeze(0)), dim=-1)[0]

    def per_sample(xi, ti):
        logp = log_probs(params, xi, ti).detach()
        jac = jacrev(log_probs)(params, xi, ti)  # each (C, *shape)
        weight = logp.exp()
        return {k: torch.tensordot(weight, j.pow(2), dims=1) for k, j in jac.items()}

    was_training = model.training
    model.eval()
    try:
        sums = {k: torch.zeros_like(v) for k, v in params.items()}
        for start in range(0, len(x), batch_size):
            chunk = vmap(per_sample)(
                x[start : start + batch_size], task_ids[start : start + batch_size]
            )
            for k in sums:
                sums[k] += chunk[k].sum(0)
    finally:
        model.train(was_training)
    return torch.cat([sums[k].reshape(-1) for k in params]) / len(x)


class EWC(ContinualMethod):
    r"""Elastic weight consolidation (Kirkpatrick et al. 2017), one penalty per old task.

    Minimises

    .. math::

        L = \mathrm{CE} + \frac{\lambda}{2} \sum_{s < t} \sum_i F^{(s)}_i
            (\theta_i - \theta^{(s)}_i)^2,

    :math:`F^{(s)}` the :func:`fisher_diagonal` on ``fisher_samples`` training images
    of task :math:`s` (through its head) and :math:`\theta^{(s)}` the weights after it.

    The quadratic penalty is applied by its exact proximal map after each SGD step
    on the cross-entropy (forward-backward splitting, which has the same fixed
    points as gradient descent on :math:`L`),

    .. math::

        \theta_i \leftarrow \frac{\theta_i + \eta\lambda \sum_s F^{(s)}_i \theta^{(s)}_i}
                                  {1 + \eta\lambda \sum_s F^{(s)}_i},

    so that no :math:`\lambda` makes training diverge: with the penalty's gradient
    in the loss, plain SGD diverges as soon as :math:`\eta\lambda \max_i F_i > 2`
    (:math:`\lambda \approx 40` at :math:`\eta = 0.05` on MNIST).

    Parameters
    ----------
    lam : float
        :math:`\lambda \ge 0`.
    fisher_samples : int
        Training images of each task the Fisher is averaged over (default 500).
    momentum : float
        As for :class:`ContinualMethod` (the proximal step is exact without momentum).
    """

    name = "ewc"

    def __init__(self, lam: float = 100.0, *, fisher_samples: int = 500, momentum: float = 0.0):
        super().__init__(momentum=momentum)
        lam = float(lam)
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int):
            raise TypeError(f"fisher_samples must be an int, got {type(fisher_samples).__name__}")
        if fisher_samples < 1:
            raise ValueError(f"fisher_samples must be >= 1, got {fisher_samples}")
        self.lam = lam
        self.fisher_samples = fisher_samples
        self.anchors: list[torch.Tensor] = []
        self.fishers: list[torch.Tensor] = []

    def config(self) -> dict:
        return {**super().config(), "lam": self.lam, "fisher_samples": self.fisher_samples}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        r"""The penalty :math:`\frac{\lambda}{2}\sum_s \sum_i F^{(s)}_i(\theta_i - \theta^{(s)}_i)^2`."""
        w = nn.utils.parameters_to_vector(model.parameters())
        total = w.new_zeros(())
        for anchor, fisher in zip(self.anchors, self.fishers, strict=True):
            total = total + (fisher * (w - anchor).pow(2)).sum()
        return 0.5 * self.lam * total

    @torch.no_grad()
    def after_step(self, model: nn.Module, lr: float) -> None:
        if not self.fishers or self.lam == 0:
            return
        w = nn.utils.parameters_to_vector(model.parameters())
        pull = sum(f * a for f, a in zip(self.fishers, self.anchors, strict=True))
        stiffness = (lr * self.lam) * sum(self.fishers)
        w = (w + (lr * self.lam) * pull) / (1.0 + stiffness)
        nn.utils.vector_to_parameters(w, model.parameters())

    def end_task(self, model, task, t, heads):
        x = task.x_train[: self.fisher_samples]
        tid = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        self.fishers.append(fisher_diagonal(model, x, task_ids=tid, heads=heads))
        self.anchors.append(nn.utils.parameters_to_vector(model.parameters()).detach().clone())

    def diagnostics(self) -> dict:
        if not self.fishers:
            return {}
        f = self.fishers[-1]
        return {"fisher_mean": float(f.mean()), "fisher_max": float(f.max())}

    def state_dict(self) -> dict:
        return {"anchors": list(self.anchors), "fishers": list(self.fishers)}

    def load_state_dict(self, state: dict) -> None:
        self.anchors = list(state["anchors"])
        self.fishers = list(state["fishers"])


class DriftBudgetWarning(UserWarning):
    """A FIP task whose held-out anchor drift went over its :class:`~riemfip.optim.DriftGuard`
    budget (see :meth:`FIPMethod.drift_certificate`)."""


class FIPMethod(ContinualMethod):
    """Functionally invariant path: learn the new task while the outputs on the memory stay put.

    From task 1 on, each task is trained with :class:`riemfip.optim.FIP`, anchored on
    the stored inputs of all earlier tasks (the memory, without its labels) at the
    weights reached after the previous task; the loss is the new task's
    cross-entropy alone. Task 0 has nothing to keep and is trained with SGD.

    Parameters
    ----------
    lr_scale : float
        FIP steps use ``lr_scale`` times the run's learning rate (task 0's SGD uses
        the run's own, so that it matches the other methods). Natural-mode FIP
        passes only the part of each gradient that leaves the anchor outputs alone
        (``mean_kept_fraction`` in the diagnostics), so it usually wants a larger rate.
    **options
        Keyword arguments of :func:`riemfip.optim.path_optimizer` other than ``params``,
        ``model``, ``anchor_inputs`` and ``lr`` (e.g. ``mode="penalty", beta=10``,
        ``damping``, ``guard=DriftGuard(0.01)``,
        ``anchors=AnchorSampling(transform=GaussianNoise(0.3))``); recorded in the result
        (objects by their ``repr``).

    Notes
    -----
    **Drift certificate.** After each FIP task the diagnostics (and so the run's JSON
    record) hold the held-out anchor drift at the end of the task (``holdout_divergence``,
    ``holdout_agreement``), the largest held-out drift after any step
    (``max_step_drift``), the budget of the :class:`~riemfip.optim.DriftGuard`
    (``drift_budget``, ``None`` without one), the steps that ended over it
    (``steps_over_budget``) and ``budget_exceeded``: whether the drift went over the budget
    after any step or at the end (``None`` without a budget). A task whose drift went over
    its budget also raises a :class:`DriftBudgetWarning` at its end.
    """

    name = "fip"

    def __init__(self, *, lr_scale: float = 1.0, **options):
        reserved = {"params", "model", "anchor_inputs", "lr"} & set(options)
        if reserved:
            raise ValueError(f"{sorted(reserved)} are set by the continual run, not by options")
        lr_scale = float(lr_scale)
        if not (math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"lr_scale must be a positive number, got {lr_scale}")
        super().__init__(momentum=0.0)
        self.lr_scale = lr_scale
        self.options = dict(options)
        self._optimizer = None
        self._steps: list = []

    def config(self) -> dict:
        """``lr_scale`` and the FIP options; objects (e.g. an anchor transform) by ``repr``."""
        plain = (bool, int, float, str, type(None))
        options = {k: v if isinstance(v, plain) else repr(v) for k, v in self.options.items()}
        return {"lr_scale": self.lr_scale, **options}

    def optimizer(self, model, lr, t, memory):
        self._steps = []
        if t == 0 or len(memory) == 0:
            self._optimizer = None
            return torch.optim.SGD(model.parameters(), lr=lr)
        from riemfip.optim import path_optimizer

        self._optimizer = path_optimizer(
            model.parameters(),
            model=model,
            anchor_inputs=memory.x,
            lr=lr * self.lr_scale,
            **self.options,
        )
        return self._optimizer

    def after_step(self, model, lr):
        if self._optimizer is not None:
            self._steps.append(self._optimizer.last_info[0])

    def end_task(self, model, task, t, heads):
        """Warn (:class:`DriftBudgetWarning`) when the task's drift went over its budget."""
        cert = self.drift_certificate()
        if cert.get("budget_exceeded"):
            warnings.warn(
                f"FIP, task {t}: the held-out anchor drift went over its budget "
                f"{cert['drift_budget']:g} (largest after a step {cert['max_step_drift']:.4g}, "
                f"{cert['steps_over_budget']} of {len(self._steps)} steps over, "
                f"{cert['holdout_divergence']:.4g} at the end)",
                DriftBudgetWarning,
                stacklevel=2,
            )

    def drift_certificate(self) -> dict:
        """Held-out drift at the end of the task and over its steps, against the budget.

        Returns
        -------
        dict
            ``holdout_divergence`` and ``holdout_agreement`` (the held-out drift at the
            current weights), ``max_step_drift`` (largest held-out divergence after a step;
            ``None`` before any step), ``drift_budget`` (``None`` without a budget),
            ``steps_over_budget`` and ``budget_exceeded`` (whether the divergence was over
            the budget after any step or is now; ``None`` without a budget). Empty while no
            FIP optimizer has run (task 0).
        """
        opt = self._optimizer
        if opt is None:
            return {}
        out = {f"holdout_{k}": v for k, v in _jsonable(opt.anchor_drift()).items()}
        budget = opt.guard.budget
        over = sum(s.within_budget is False for s in self._steps)
        final_over = budget is not None and out["holdout_divergence"] > budget
        return out | {
            "max_step_drift": max((s.drift.divergence for s in self._steps), default=None),
            "drift_budget": budget,
            "steps_over_budget": over,
            "budget_exceeded": None if budget is None else bool(over or final_over),
        }

    def diagnostics(self) -> dict:
        """The drift certificate (:meth:`drift_certificate`) and step statistics of the
        task's FIP run."""
        out = self.drift_certificate()
        if self._steps:
            n = len(self._steps)
            out |= {
                "steps": n,
                "shrunk_steps": sum(bool(s.shrunk) for s in self._steps),
                "mean_kept_fraction": sum(s.kept_fraction for s in self._steps) / n,
                "mean_protected_share": sum(s.protected_share for s in self._steps) / n,
            }
        return out


def _jsonable(obj) -> dict:
    """A dataclass (e.g. FIP's drift report) as a dict of plain numbers and strings."""
    out = {}
    for k, v in asdict(obj).items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        out[k] = v
    return out
