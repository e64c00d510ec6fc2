r"""Tiny float64 networks and *independent* dense references for the tests.

The references here never call :mod:`manifolds`: a network is unpacked from its
flat weight vector by hand (the documented flat order is that of
``torch.nn.utils.parameters_to_vector(module.parameters())``), Jacobians come from
:func:`torch.func.jacrev` of the raw logits, and each output metric :math:`G` is
written out explicitly, so a test that compares :mod:`manifolds` with these
compares two separate computations of the same mathematics.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, hessian, jacfwd, jacrev

DTYPE = torch.float64
OUTPUT_METRICS = ("euclidean", "fisher", "bhattacharyya")


def make_mlp(
    sizes: tuple[int, ...], *, seed: int = 0, last_bias: bool = True, scale: float = 1.0
) -> nn.Sequential:
    """A float64 tanh MLP ``sizes[0] -> ... -> sizes[-1]`` with seeded weights."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        last = i == len(sizes) - 2
        lin = nn.Linear(a, b, bias=(last_bias or not last)).to(DTYPE)
        with torch.no_grad():
            lin.weight.copy_(scale * torch.randn(b, a, generator=gen, dtype=DTYPE) / math.sqrt(a))
            if lin.bias is not None:
                lin.bias.copy_(0.5 * torch.randn(b, generator=gen, dtype=DTYPE))
        layers.append(lin)
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded float64 standard normal tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def flat_weights(net: nn.Module) -> torch.Tensor:
    """The documented flat order: ``parameters_to_vector(net.parameters())``."""
    return nn.utils.parameters_to_vector(net.parameters()).detach().clone()


def unflatten(net: nn.Module, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split ``w`` into ``net``'s named parameters by hand (reference, not FlatModule)."""
    out, start = {}, 0
    for name, p in net.named_parameters():
        out[name] = w[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    assert start == w.numel()
    return out


def logits_fn(net: nn.Module, x: torch.Tensor):
    """``w -> net(x)`` (raw outputs, shape ``(N, C)``) via ``functional_call``."""
    return lambda w: functional_call(net, unflatten(net, w), (x,))


def fisher_ref(y: torch.Tensor) -> torch.Tensor:
    """:math:`\\operatorname{diag}(p) - pp^\\top` for one sample's logits ``y`` (C,)."""
    p = torch.softmax(y, dim=-1)
    return torch.diag(p) - torch.outer(p, p)


def bhattacharyya_hessian(y: torch.Tensor) -> torch.Tensor:
    r"""Hessian in ``z`` of :math:`-\log\sum_k \sqrt{p_k(z)\, q_k}` at ``z = y``, with :math:`q = p(y)`."""
    q = torch.softmax(y, dim=-1)

    def dist(z):
        return -torch.log(torch.sqrt(torch.softmax(z, dim=-1) * q).sum())

    return hessian(dist)(y)


def output_metric_ref(name: str, y: torch.Tensor) -> torch.Tensor:
    """Explicit :math:`G(y)` for one sample ``y`` (C,)."""
    if name == "euclidean":
        return torch.eye(y.numel(), dtype=y.dtype)
    if name == "fisher":
        return fisher_ref(y)
    if name == "bhattacharyya":
        return bhattacharyya_hessian(y)
    raise KeyError(name)


def dense_metric_ref(fn, name: str, damping: float):
    r"""``w -> g(w) = (1/N) sum_b J_b^T G(y_b) J_b + damping I`` built from ``jacrev`` of ``fn``.

    ``fn(w)`` returns raw outputs of shape ``(N, C)``. The returned function is
    differentiable (by ``jacfwd``), for brute-force Christoffel symbols.
    """

    def g(w):
        y = fn(w)
        jac = jacrev(fn)(w)  # (N, C, n)
        gs = torch.stack([output_metric_ref(name, yb) for yb in y])  # (N, C, C)
        out = torch.einsum("bci,bcd,bdj->ij", jac, gs, jac) / y.shape[0]
        return out + damping * torch.eye(w.numel(), dtype=w.dtype)

    return g


def christoffel_ref(g_fn, w: torch.Tensor) -> torch.Tensor:
    r"""Brute-force :math:`\Gamma^k_{ij} = \tfrac12 g^{kl}(\partial_i g_{lj} + \partial_j g_{li} - \partial_l g_{ij})`.

    Returns ``gamma[k, i, j]``.
    """
    g = g_fn(w)
    dg = jacfwd(g_fn)(w)  # dg[a, b, c] = d g_ab / d w_c
    # first kind: Gamma_{l i j} = 1/2 (d_i g_lj + d_j g_li - d_l g_ij)
    first = 0.5 * (
        dg.permute(0, 2, 1)  # [l, i, j] = d_i g_lj  (dg[l, j, i])
        + dg  # [l, i, j] = d_j g_li  (dg[l, i, j])
        - dg.permute(2, 0, 1)  # [l, i, j] = d_l g_ij (dg[i, j, l])
    )
    return torch.einsum("kl,lij->kij", torch.linalg.inv(g), first)
