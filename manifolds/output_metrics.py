r"""Output-space metrics :math:`G(y)` that a network's outputs are measured with.

Every metric here is written as the Euclidean pullback of an *embedding*
:math:`\phi` of one sample's outputs,

.. math::

    G(y) = D\phi(y)^\top D\phi(y),

so that the pullback metric on weights is simply the Euclidean pullback of the
composite map :math:`w \mapsto \phi(f(w))`. This gives three things at once:

* metric-vector products need one JVP and one VJP of :math:`\phi\circ f`;
* the geodesic equation needs no separate Christoffel symbols of :math:`G`:
  the second directional derivative of :math:`\phi\circ f` already contains
  :math:`D\phi\,D^2 f[v, v] + D^2\phi[Jv, Jv]`, the covariant acceleration of the
  output curve;
* the output-space (Woodbury) solve works for every :math:`G`.

Metrics
-------
``"euclidean"``
    :math:`G = I`, :math:`\phi(y) = y`. The paper's "functional distance"
    :math:`\|f(w + dw) - f(w)\|^2`.
``"fisher"``
    Softmax Fisher information on logits :math:`z`,
    :math:`G = \operatorname{diag}(p) - pp^\top` with :math:`p = \operatorname{softmax}(z)`
    (the generalized Gauss–Newton matrix of the cross-entropy). Embedding
    :math:`\phi(z) = 2\sqrt{p}`: the Fisher–Rao metric is the round metric of
    the sphere of radius 2 in :math:`\sqrt{p}` coordinates.
``"bhattacharyya"``
    The Hessian of the Bhattacharyya distance
    :math:`D_B(p, q) = -\log \sum_k \sqrt{p_k q_k}` at :math:`q = p`, which is
    :math:`G_{\text{Fisher}} / 4`; :math:`\phi(z) = \sqrt{p}`. (The familiar
    "/8" is the coefficient of the squared Fisher length:
    :math:`D_B \approx \tfrac18\, dz^\top G_{\text{Fisher}}\, dz = \tfrac12\, dz^\top (G_{\text{Fisher}}/4)\, dz`.)
    This is the distance the authors' code penalises.

Each metric also has a ``divergence(y, y0)`` whose Hessian in :math:`y` at
:math:`y = y_0` is :math:`G(y_0)`: half the squared distance, the KL divergence
:math:`\mathrm{KL}(p_0 \,\|\, p)`, and the Bhattacharyya distance respectively.
It is what a finite move of the outputs is measured with (drift, penalties).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "OutputMetric",
    "Euclidean",
    "SoftmaxFisher",
    "Bhattacharyya",
    "Sketched",
    "get_output_metric",
]


class OutputMetric:
    """A Riemannian metric on one sample's output vector (last axis).

    Subclasses implement :meth:`embed`, :meth:`matrix` and :meth:`divergence`;
    all act on the last axis and broadcast over leading (sample) axes.
    """

    name: str = "output-metric"

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        r"""The embedding :math:`\phi(y)` with :math:`G(y) = D\phi^\top D\phi`."""
        raise NotImplementedError

    def matrix(self, y: torch.Tensor) -> torch.Tensor:
        r"""Dense :math:`G(y)`, shape ``(*y.shape, C)``; for tests and small problems."""
        raise NotImplementedError

    def embed_samples(self, y: torch.Tensor, samples: int | None = None) -> torch.Tensor:
        r"""The embedded outputs of a batch, :math:`F = N^{-1/2}(\phi(y_1), \dots, \phi(y_N))`,
        flat (sample-major), for outputs ``y`` of shape ``(N, ...)`` (the metric acting on the
        last axis; a 0-D or 1-D ``y`` is one sample).

        With :math:`J = \partial F/\partial w`, the pullback metric of the batch is
        :math:`\frac1N\sum_b J_b^\top G(y_b) J_b = J^\top J`: this is the one map every
        pullback computation in :mod:`manifolds` differentiates. ``samples`` is :math:`N` when
        ``y`` is one of several batches of one metric (default: ``y``'s own length).
        """
        if y.ndim <= 1:
            y = y.reshape(1, -1)
        n = y.shape[0] if samples is None else samples
        return self.embed(y).reshape(-1) * (1.0 / math.sqrt(n))

    def divergence(self, y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        r"""Per-sample divergence :math:`D(y, y_0)` with :math:`\partial^2_y D|_{y=y_0} = G(y_0)`.

        Returns a tensor of shape ``y.shape[:-1]``.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Euclidean(OutputMetric):
    r""":math:`G = I`; :math:`D(y, y_0) = \tfrac12 \|y - y_0\|^2`."""

    name = "euclidean"

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def matrix(self, y: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
        return eye.expand(*y.shape, y.shape[-1])

    def divergence(self, y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        return 0.5 * (y - y0).pow(2).sum(-1)


class SoftmaxFisher(OutputMetric):
    r"""Fisher information of a softmax classifier in logit coordinates.

    :math:`G(z) = \operatorname{diag}(p) - pp^\top`, :math:`\phi(z) = 2\sqrt{p}`,
    :math:`D(z, z_0) = \mathrm{KL}(p_0 \,\|\, p)`.
    """

    name = "fisher"
    #: :math:`\phi = \text{scale}\cdot\sqrt{p}`, :math:`G = \text{scale}^2/4\cdot G_{\text{Fisher}}`.
    scale = 2.0

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        # exp(log p / 2) is smooth where sqrt(p) has an unbounded derivative at p -> 0.
        return self.scale * torch.exp(0.5 * torch.log_softmax(y, dim=-1))

    def matrix(self, y: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(y, dim=-1)
        fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        return (self.scale**2 / 4.0) * fisher

    def divergence(self, y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        logp0 = torch.log_softmax(y0, dim=-1)
        logp = torch.log_softmax(y, dim=-1)
        return (logp0.exp() * (logp0 - logp)).sum(-1)


class Bhattacharyya(SoftmaxFisher):
    r"""Hessian of the Bhattacharyya distance at the diagonal: Fisher / 4.

    :math:`\phi(z) = \sqrt{p}`,
    :math:`D(z, z_0) = -\log \sum_k \sqrt{p_k\, p_{0,k}}`.
    """

    name = "bhattacharyya"
    scale = 1.0

    def divergence(self, y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        half = 0.5 * (torch.log_softmax(y, dim=-1) + torch.log_softmax(y0, dim=-1))
        return -torch.logsumexp(half, dim=-1)


class Sketched(OutputMetric):
    r"""An output metric seen through :math:`r` random directions per sample.

    :math:`\phi_S(y_b) = U_b^\top \phi(y_b)` with :math:`U_b` of shape ``(C, r)`` and
    :math:`\mathbb E[U_b U_b^\top] = I` (entries :math:`\mathcal N(0, 1/r)`), so the pulled-back
    metric :math:`J^\top S^\top S J` is an unbiased estimate of :math:`J^\top J` with
    :math:`r` rows per sample instead of :math:`C`: a cheaper, stochastic constraint.
    ``divergence`` is the base metric's.

    Parameters
    ----------
    base : OutputMetric
        The metric being sketched.
    directions : torch.Tensor
        :math:`U`, shape ``(N, C, r)``: one set of directions per sample of the batch
        this metric is used on.
    """

    def __init__(self, base: OutputMetric, directions: torch.Tensor):
        self.base = base
        self.directions = directions
        self.name = f"sketched-{base.name}"

    @classmethod
    def draw(
        cls,
        base: OutputMetric,
        samples: int,
        width: int,
        rank: int,
        generator: torch.Generator,
        like: torch.Tensor,
    ) -> Sketched:
        r"""Fresh Gaussian directions, :math:`\mathcal N(0, 1/r)`, from ``generator``."""
        u = torch.randn(
            samples, width, rank, generator=generator, dtype=like.dtype, device=like.device
        )
        return cls(base, u / math.sqrt(rank))

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nc,ncr->nr", self.base.embed(y), self.directions)

    def divergence(self, y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        return self.base.divergence(y, y0)

    def __repr__(self) -> str:
        return f"Sketched({self.base!r}, rank={self.directions.shape[-1]})"


_REGISTRY = {cls.name: cls for cls in (Euclidean, SoftmaxFisher, Bhattacharyya)}


def get_output_metric(spec: str | OutputMetric) -> OutputMetric:
    """Return an :class:`OutputMetric` from a name (``"euclidean"``, ``"fisher"``,
    ``"bhattacharyya"``) or pass an instance through."""
    if isinstance(spec, OutputMetric):
        return spec
    if isinstance(spec, str) and spec.lower() in _REGISTRY:
        return _REGISTRY[spec.lower()]()
    raise ValueError(
        f"unknown output metric {spec!r}; expected one of {sorted(_REGISTRY)} "
        "or an OutputMetric instance"
    )
