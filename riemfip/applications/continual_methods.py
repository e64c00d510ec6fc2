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

The base (:class:`~riemfip.applications.continual_base.ContinualMethod`, the task
:class:`~riemfip.applications.continual_base.Heads` and the replay
:class:`~riemfip.applications.continual_base.Memory`) is in
:mod:`riemfip.applications.continual_base`, and
:class:`~riemfip.applications.continual_fip.FIPMethod` in
:mod:`riemfip.applications.continual_fip`; both are re-exported here, so that every
method, and what a method takes, can be imported from this one module.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .continual_base import ContinualMethod, Heads, Memory, task_ids_of
from .continual_fip import DriftBudgetWarning, FIPMethod

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
            torch.cat([task_ids_of(d, i) for i, d in enumerate(seen)]),
        )


class Replay(ContinualMethod):
    """Experience replay: each batch of the new task is joined by an equal-sized batch
    drawn from the memory (stored inputs with their labels), one cross-entropy over both.

    Parameters
    ----------
    momentum : float
        As for :class:`~riemfip.applications.continual_base.ContinualMethod`.
    """

    name = "replay"

    def loss(self, model, x, y, task_ids, t, memory, heads, generator):
        if len(memory):
            idx = torch.randint(
                len(memory), (len(x),), generator=generator, device=generator.device
            ).to(memory.x.device)
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
        Each sample's task and the :class:`~riemfip.applications.continual_base.Heads`
        that mask its logits.
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
        As for :class:`~riemfip.applications.continual_base.ContinualMethod` (the proximal
        step is exact without momentum).
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
