r"""The mode-connectivity baseline: a quadratic Bézier curve trained as in Garipov et al. (2018).

.. math::

    \theta(t) = (1 - t)^2 w_a + 2t(1 - t)\,\theta_c + t^2 w_b, \qquad t \in [0, 1],

with the endpoints :math:`w_a, w_b` fixed and the control point :math:`\theta_c` trained to
minimise the expected loss along the curve, :math:`\mathbb{E}_{t \sim U(0,1)} L(\theta(t))`:
each minibatch draws one :math:`t` and takes an SGD step on :math:`\theta_c` through
:math:`\partial\theta/\partial\theta_c = 2t(1-t)`. As in the paper, :math:`\theta_c` starts at the
midpoint of the segment, SGD uses momentum 0.9, the learning rate is constant for the first half
of training, then falls linearly to 1% of its value at 90%, and BatchNorm layers run in train
mode (batch statistics) during training.

Garipov, Izmailov, Podoprikhin, Vetrov, Wilson, "Loss surfaces, mode connectivity, and fast
ensembling of DNNs", NeurIPS 2018 (arXiv 1802.10026).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from manifolds import FlatModule

from ..checkpoint import Checkpoint, SettingsMismatchError, resume_checkpoint, save_checkpoint
from ..labelled import labelled_pair
from .evaluation import _restored_batchnorm

__all__ = ["QuadraticBezier", "fit_bezier", "garipov_learning_rate"]


@dataclass
class QuadraticBezier:
    r"""A quadratic Bézier curve in flat weight space.

    Attributes
    ----------
    w_a, control, w_b : torch.Tensor
        :math:`\theta(0)`, :math:`\theta_c`, :math:`\theta(1)`, each ``(n,)``.
    losses : list of float
        Mean training loss of each epoch (empty for an untrained curve).
    """

    w_a: torch.Tensor
    control: torch.Tensor
    w_b: torch.Tensor
    losses: list[float] = field(default_factory=list)

    def point(self, t: float | torch.Tensor) -> torch.Tensor:
        r""":math:`\theta(t)` for a scalar :math:`t` (``(n,)``) or a 1-D tensor of times (``(K, n)``)."""
        t = torch.as_tensor(t, dtype=self.w_a.dtype, device=self.w_a.device)
        tt = t.reshape(-1, 1) if t.ndim else t
        out = (1 - tt) ** 2 * self.w_a + 2 * tt * (1 - tt) * self.control + tt**2 * self.w_b
        return out

    def sample(self, n_points: int) -> torch.Tensor:
        """The curve at ``n_points`` uniform times on [0, 1], shape ``(K, n)``."""
        if int(n_points) < 2:
            raise ValueError(f"n_points must be at least 2, got {n_points}")
        t = torch.linspace(0, 1, int(n_points), dtype=self.w_a.dtype, device=self.w_a.device)
        return self.point(t).detach()


def garipov_learning_rate(base: float, fraction: float) -> float:
    """Garipov et al.'s schedule: ``base`` until 50% of training, then linear to 1% at 90%."""
    if fraction <= 0.5:
        return base
    if fraction <= 0.9:
        return base * (1.0 - 0.99 * (fraction - 0.5) / 0.4)
    return 0.01 * base


def fit_bezier(
    model_a: nn.Module,
    model_b: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    checkpoint: str | Path | None = None,
) -> QuadraticBezier:
    r"""Train the control point of a quadratic Bézier curve between two networks.

    Parameters
    ----------
    model_a, model_b : torch.nn.Module
        The endpoints; same architecture (else ``ValueError`` naming the parameter that
        differs). Neither is modified; the network structure (and BatchNorm layers, run in
        train mode with batch statistics) is taken from ``model_a``.
    data : (inputs, labels)
        Training data, cast to the weights' dtype and device.
    epochs, batch_size : int
        Passes over ``data`` and minibatch size.
    lr, momentum, weight_decay : float
        SGD on :math:`\theta_c` (the learning rate follows :func:`garipov_learning_rate`
        over the steps); ``weight_decay`` adds :math:`\tfrac{\text{wd}}2\|\theta_c\|^2`.
    seed : int
        Seeds the minibatch order and the sampled times.
    checkpoint : path, optional
        Written after every epoch (:func:`riemfip.checkpoint.save_checkpoint`); an existing
        file is resumed from, so an interrupted run continues where it stopped and ends as
        the uninterrupted run would. It must belong to the same endpoints and have the same
        ``epochs``, ``batch_size``, ``lr``, ``momentum``, ``weight_decay`` and ``seed``, else
        :class:`~riemfip.checkpoint.SettingsMismatchError` (a ``ValueError``) names the one
        that differs.

    Returns
    -------
    QuadraticBezier
    """
    for name, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    if int(epochs) < 0 or int(batch_size) < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    flat, flat_b = FlatModule(model_a), FlatModule(model_b)
    flat.check_same_architecture(flat_b)
    w_a, w_b = flat.flatten(), flat_b.flatten()
    x, y = labelled_pair(data, integer_inputs=True)
    x = x.to(w_a.device, w_a.dtype) if x.is_floating_point() else x.to(w_a.device)
    y = y.to(w_a.device)

    control = (0.5 * (w_a + w_b)).requires_grad_(True)
    opt = torch.optim.SGD([control], lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    settings = {
        "schedule": {"epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr)},
        "optimizer": {"momentum": float(momentum), "weight_decay": float(weight_decay)},
        "seed": int(seed),
    }
    # Settings are checked after the endpoints: a curve between other networks is the
    # first thing to say about a checkpoint.
    saved = resume_checkpoint(checkpoint, None, map_location=w_a.device)
    losses = [] if saved is None else _restore(saved, settings, w_a, w_b, control, opt, gen)
    start = len(losses)

    n = len(x)
    steps_per_epoch = (n + int(batch_size) - 1) // int(batch_size)
    total = max(int(epochs) * steps_per_epoch, 1)
    # Train-mode BatchNorm updates model_a's running statistics: restore them afterwards.
    with _restored_batchnorm(model_a):
        for epoch in range(start, int(epochs)):
            perm = torch.randperm(n, generator=gen, device=gen.device).to(w_a.device)
            loss_sum = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * int(batch_size) : (i + 1) * int(batch_size)]
                t = float(torch.rand((), generator=gen, device=gen.device))
                for group in opt.param_groups:
                    group["lr"] = garipov_learning_rate(lr, (epoch * steps_per_epoch + i) / total)
                w = (1 - t) ** 2 * w_a + 2 * t * (1 - t) * control + t**2 * w_b
                loss = nn.functional.cross_entropy(flat(w, x[idx], train=True), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
            losses.append(loss_sum / n)
            if checkpoint is not None:
                state = {
                    "ends": torch.stack([w_a, w_b]),
                    "control": control.detach(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "losses": losses,
                }
                save_checkpoint(checkpoint, state, settings=settings, step=epoch + 1)
    return QuadraticBezier(w_a, control.detach().clone(), w_b, losses)


def _restore(saved: Checkpoint, settings: dict, w_a, w_b, control, opt, gen) -> list[float]:
    """Load a checkpoint of :func:`fit_bezier` into ``control``, ``opt`` and ``gen``;
    its per-epoch losses. It must belong to the endpoints ``w_a``, ``w_b`` and ``settings``."""
    state = saved.state
    ends = torch.stack([w_a, w_b]).to(state["ends"].dtype)
    if state["ends"].shape != ends.shape or not torch.allclose(state["ends"], ends):
        raise SettingsMismatchError(
            saved.path, "endpoints", state["ends"], ends,
            reason="it belongs to other endpoints (a curve between other networks)",
        )  # fmt: skip
    saved.check_settings(settings)
    with torch.no_grad():
        control.copy_(state["control"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return list(state["losses"])
