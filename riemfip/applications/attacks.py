r"""White-box L∞ attacks on a classifier or on the mean softmax of an ensemble.

Both attacks maximise the cross-entropy of the (ensemble) prediction,
:math:`-\log \bar p_y(x + \delta)` with :math:`\bar p` the mean of the members'
softmax outputs, subject to :math:`\|\delta\|_\infty \le \varepsilon` and
:math:`x + \delta \in [0, 1]`:

* :func:`fgsm` — one signed-gradient step of size :math:`\varepsilon` (Goodfellow et al. 2015);
* :func:`pgd` — ``steps`` signed-gradient steps of ``step_size``, each followed by
  projection onto the ε-ball and the box, from a uniform random start in the
  ball (Madry et al. 2018).

Attacking the mean softmax (not each member separately) is the white-box
threat model for an ensemble that predicts with its mean softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..labelled import check_labelled
from ..records import JsonRecord
from .classifiers import Classifier, _members, predict_proba

__all__ = ["AttackConfig", "ensemble_loss", "fgsm", "pgd", "attack", "robust_accuracy"]


@dataclass(frozen=True)
class AttackConfig(JsonRecord):
    """One white-box L∞ attack, as recorded in result JSON (:meth:`to_dict`, :meth:`from_json`).

    Attributes
    ----------
    name : {"clean", "fgsm", "pgd"}
    eps : float
        L∞ radius (pixels in [0, 1]); 0 for ``"clean"``.
    steps : int
        PGD iterations (1 for FGSM, 0 for clean).
    step_size : float
        PGD step (``eps`` for FGSM).
    random_start : bool
        PGD starts from a uniform point of the ε-ball.
    seed : int
        Seed of the random start.
    """

    name: str
    eps: float = 0.0
    steps: int = 0
    step_size: float = 0.0
    random_start: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.name not in ("clean", "fgsm", "pgd"):
            raise ValueError(f"attack name must be 'clean', 'fgsm' or 'pgd', got {self.name!r}")
        _check_eps(self.eps)
        if self.name == "pgd":
            _check_pgd(self.steps, self.step_size)

    @classmethod
    def clean(cls) -> AttackConfig:
        return cls("clean")

    @classmethod
    def fgsm(cls, eps: float) -> AttackConfig:
        return cls("fgsm", float(eps), 1, float(eps), False, 0)

    @classmethod
    def pgd(
        cls,
        eps: float,
        steps: int = 20,
        step_size: float | None = None,
        random_start: bool = True,
        seed: int = 0,
    ) -> AttackConfig:
        """PGD; ``step_size`` defaults to ``eps / 10`` (ε 0.1 → 20 steps of 0.01)."""
        step = float(eps) / 10 if step_size is None else float(step_size)
        return cls("pgd", float(eps), int(steps), step, bool(random_start), int(seed))


def _check_eps(eps: float) -> None:
    if not isinstance(eps, (int, float)) or not (0.0 <= float(eps) <= 1.0):
        raise ValueError(f"eps must be a number in [0, 1] (pixels in [0, 1]), got {eps!r}")


def _check_pgd(steps: int, step_size: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(step_size, (int, float)) or not float(step_size) > 0:
        raise ValueError(f"step_size must be > 0, got {step_size!r}")


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    """Labelled data (:func:`~riemfip.labelled.check_labelled`) with inputs in the box."""
    check_labelled(x, y, name="attacked data")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError("inputs must lie in [0, 1]: the attacks keep x + delta in that box")


def ensemble_loss(classifier: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Per-sample :math:`-\log \bar p_y(x)`, :math:`\bar p` the (mean) softmax; shape ``(N,)``."""
    p = predict_proba(classifier, x)
    return -torch.log(p.gather(-1, y.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30))


def _input_grad(classifier: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(ensemble_loss(classifier, xg, y).sum(), xg)
    return grad


def fgsm(classifier: Classifier, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    r"""Fast gradient sign method: :math:`\mathrm{clip}_{[0,1]}(x + \varepsilon\,\mathrm{sign}\nabla_x \ell)`.

    Parameters
    ----------
    classifier : module, callable ``x -> logits``, or a sequence of them (ensemble)
    x : torch.Tensor
        Clean inputs in [0, 1].
    y : torch.Tensor
        Integer labels.
    eps : float
        L∞ radius.

    Returns
    -------
    torch.Tensor
        Adversarial inputs (detached), same shape, dtype and device as ``x``.
    """
    _members(classifier)
    _check_inputs(x, y)
    _check_eps(eps)
    x = x.detach()
    return (x + eps * _input_grad(classifier, x, y).sign()).clamp(0.0, 1.0)


def pgd(
    classifier: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    r"""Projected gradient descent (ascent on the loss) in the L∞ ball of radius ``eps``.

    Parameters
    ----------
    classifier, x, y, eps
        As for :func:`fgsm`.
    steps : int
        Signed-gradient steps.
    step_size : float, optional
        Size of each step (default ``eps / 10``).
    random_start : bool
        Start from :math:`x + \mathcal U[-\varepsilon, \varepsilon]` (clipped to the box).
    seed : int
        Seed of the random start (a local generator; global RNG untouched).

    Returns
    -------
    torch.Tensor
        Adversarial inputs with :math:`\|x_{adv} - x\|_\infty \le \varepsilon` and
        :math:`x_{adv} \in [0, 1]`.
    """
    _members(classifier)
    _check_inputs(x, y)
    _check_eps(eps)
    if eps == 0:
        return x.detach().clone()  # the ball is a point
    step_size = float(eps) / 10 if step_size is None else step_size
    _check_pgd(steps, step_size)
    x = x.detach()
    if random_start:
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        adv = (x + (2 * noise - 1) * eps).clamp(0.0, 1.0)
    else:
        adv = x.clone()
    for _ in range(steps):
        adv = adv + step_size * _input_grad(classifier, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0)
    return adv.detach()


def attack(
    classifier: Classifier, x: torch.Tensor, y: torch.Tensor, config: AttackConfig
) -> torch.Tensor:
    """Inputs perturbed by the attack that ``config`` describes (``x`` itself for clean)."""
    if not isinstance(config, AttackConfig):
        raise TypeError(f"config must be an AttackConfig, got {type(config).__name__}")
    if config.name == "clean":
        return x
    if config.name == "fgsm":
        return fgsm(classifier, x, y, config.eps)
    return pgd(
        classifier,
        x,
        y,
        config.eps,
        steps=config.steps,
        step_size=config.step_size,
        random_start=config.random_start,
        seed=config.seed,
    )


def robust_accuracy(
    classifier: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    config: AttackConfig,
    *,
    batch_size: int = 500,
) -> float:
    """Accuracy of ``classifier`` on inputs attacked (white-box, against it) as ``config`` says."""
    _check_inputs(x, y)
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        adv = attack(classifier, xb, yb, config)
        with torch.no_grad():
            correct += int((predict_proba(classifier, adv).argmax(-1) == yb).sum())
    return correct / len(x)
