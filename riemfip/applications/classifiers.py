"""Small MNIST classifiers, the minibatch stream that trains them, and their accuracy.

The sparsification and robust-ensemble applications compare methods at an
equal number of optimizer steps; :func:`minibatches` is the one place a step's
batch comes from, so every method sees the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import resume_checkpoint, save_checkpoint
from ..labelled import check_labelled

__all__ = [
    "mlp",
    "lenet_300_100",
    "minibatches",
    "train_classifier",
    "trained_classifier",
    "predict_proba",
    "accuracy",
]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}

#: What the applications accept as a classifier: a module, a callable
#: ``x -> logits``, or a sequence of them (an ensemble, averaged in softmax space).
Classifier = nn.Module | Callable[[torch.Tensor], torch.Tensor] | Sequence


def mlp(sizes: Sequence[int], *, activation: str = "relu") -> nn.Sequential:
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]`` (logits out).

    Parameters
    ----------
    sizes : sequence of int
        Layer widths, input first; at least two, all positive.
    activation : {"relu", "tanh"}

    Examples
    --------
    >>> mlp([784, 100, 100, 10])[0]
    Linear(in_features=784, out_features=100, bias=True)
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must hold at least two positive widths, got {sizes}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def lenet_300_100() -> nn.Sequential:
    """LeNet-300-100 (LeCun et al. 1998; Han et al. 2015): 784-300-100-10, ReLU, 266,610 weights."""
    return mlp([784, 300, 100, 10])


def minibatches(
    n: int, batch_size: int, steps: int, *, seed: int = 0, device=None
) -> Iterator[torch.Tensor]:
    """Index tensors for ``steps`` minibatches: epoch after epoch of a seeded permutation.

    Parameters
    ----------
    n : int
        Dataset size.
    batch_size : int
        Batch size (the last batch of an epoch may be smaller).
    steps : int
        Number of batches to yield.
    seed : int
        The same seed gives the same batches in the same order.
    device : optional
        Device of the index tensors.
    """
    if n < 1 or batch_size < 1 or steps < 0:
        raise ValueError(
            f"need n >= 1, batch_size >= 1, steps >= 0; got n={n}, "
            f"batch_size={batch_size}, steps={steps}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen, device=gen.device)
        for i in range(0, n, batch_size):
            if done == steps:
                return
            yield perm[i : i + batch_size].to(device)
            done += 1


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    perturb: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> nn.Module:
    r"""Train ``model`` in place with Adam on cross-entropy for ``steps`` minibatch steps.

    A module pruned with :mod:`torch.nn.utils.prune` stays pruned: its forward
    multiplies ``weight_orig`` by the mask, so masked weights stay zero.

    Parameters
    ----------
    model : torch.nn.Module
        Returns logits.
    x, y : torch.Tensor
        Inputs ``(N, ...)`` and integer labels ``(N,)``.
    steps : int
        Optimizer steps (an epoch is ``ceil(N / batch_size)`` steps).
    lr, batch_size, seed : optional
        Adam learning rate, batch size, and the seed of :func:`minibatches`.
    perturb : callable, optional
        ``perturb(model, xb, yb) -> xb'``: each minibatch is replaced by what it
        returns before the step, e.g. PGD examples against the current weights
        (adversarial training, Madry et al. 2018:
        :math:`\min_w \mathbb E \max_{\|\delta\|_\infty \le \varepsilon} L(w, x + \delta)`).
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    torch.nn.Module
        ``model``, trained, in train mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_labelled(x, y, name="training data")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = minibatches(len(x), batch_size, steps, seed=seed, device=x.device)
    for idx in tqdm(batches, total=steps, disable=not progress, desc="train", leave=False):
        xb, yb = x[idx], y[idx]
        if perturb is not None:
            xb = perturb(model, xb, yb).detach()
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model


def trained_classifier(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    perturb: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = False,
) -> nn.Module:
    """A fresh network from ``make_model``, trained by :func:`train_classifier`, in eval mode.

    The network is built after ``torch.manual_seed(seed)`` (the global generator is
    seeded, as a script's ``torch.manual_seed`` would) and moved to the device and
    floating dtype of ``x``; ``seed`` also orders the minibatches.

    Parameters
    ----------
    make_model : callable
        ``() -> nn.Module`` returning logits, initialised from the global generator.
    x, y, steps, lr, batch_size, seed, perturb, progress
        As for :func:`train_classifier`.
    checkpoint : path, optional
        The trained weights are saved there (:mod:`riemfip.checkpoint`) with the
        training settings; a later call with the same settings loads them instead
        of training, one with other settings is refused.

    Returns
    -------
    torch.nn.Module
    """
    if not callable(make_model):
        raise TypeError(f"make_model must be callable, got {type(make_model).__name__}")
    check_labelled(x, y, name="training data")
    torch.manual_seed(seed)
    net = make_model()
    if not isinstance(net, nn.Module):
        raise TypeError(f"make_model must return a torch.nn.Module, got {type(net).__name__}")
    net.to(device=x.device, dtype=x.dtype)
    settings = {
        "parameters": {name: list(p.shape) for name, p in net.named_parameters()},
        "training": {"optimizer": "adam", "steps": steps, "lr": lr, "batch_size": batch_size},
        "seed": seed,
        "train_size": len(x),
        "perturbed": perturb is not None,
    }
    saved = resume_checkpoint(checkpoint, settings, map_location=x.device)
    if saved is not None:
        net.load_state_dict(saved.state["model"])
        return net.eval()
    train_classifier(
        net, x, y, steps=steps, lr=lr, batch_size=batch_size, seed=seed, perturb=perturb,
        progress=progress,
    )  # fmt: skip
    if checkpoint is not None:
        save_checkpoint(checkpoint, {"model": net.state_dict()}, settings=settings, step=steps)
    return net.eval()


def _members(classifier: Classifier) -> list:
    members = list(classifier) if isinstance(classifier, (list, tuple)) else [classifier]
    if not members:
        raise ValueError("an ensemble needs at least one member")
    for m in members:
        if not callable(m):
            raise TypeError(f"ensemble members must be callable, got {type(m).__name__}")
    return members


def predict_proba(classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities: the softmax of one model, or the mean softmax of an ensemble.

    Parameters
    ----------
    classifier : module, callable ``x -> logits``, or sequence of them
        Modules are evaluated in eval mode (their flags are restored).
    x : torch.Tensor
        Inputs; gradients flow through (attacks differentiate this).
    """
    probs = None
    for m in _members(classifier):
        was = m.training if isinstance(m, nn.Module) else None
        if was:
            m.eval()
        try:
            p = torch.softmax(m(x), dim=-1)
        finally:
            if was:
                m.train()
        probs = p if probs is None else probs + p
    return probs / len(_members(classifier))


@torch.no_grad()
def accuracy(classifier: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` whose most probable class (mean softmax for ensembles) is ``y``."""
    check_labelled(x, y)
    return float((predict_proba(classifier, x).argmax(-1) == y).float().mean())
