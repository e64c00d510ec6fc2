r"""Output metrics :math:`G(y)` against explicit formulas.

Euclidean :math:`I`; softmax Fisher :math:`\operatorname{diag}(p) - pp^\top`; Bhattacharyya
the Hessian of :math:`-\log\sum_k\sqrt{p_k q_k}` at :math:`q = p` (computed here with
:func:`torch.func.hessian`), which is Fisher / 4 (the issue's "Fisher / 8" is the
coefficient of the squared Fisher length in :math:`D_B`, i.e. half the Hessian).
"""

from __future__ import annotations

import pytest
import torch
from dense_reference import (
    DTYPE,
    OUTPUT_METRICS,
    bhattacharyya_hessian,
    fisher_ref,
    output_metric_ref,
)
from torch.func import grad, hessian, jacrev

from manifolds import Bhattacharyya, Euclidean, SoftmaxFisher, get_output_metric


def logits(seed: int, c: int = 4) -> torch.Tensor:
    return 1.5 * torch.randn(c, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("seed", range(3))
def test_bhattacharyya_hessian_is_fisher_over_four(seed):
    # The issue and design notes say "Fisher / 8"; the Hessian is Fisher / 4. The 1/8 is the
    # coefficient of the squared Fisher length: D_B = dz^T F dz / 8 + O(dz^3) = 1/2 dz^T (F/4) dz.
    y = logits(seed, c=5)
    f = fisher_ref(y)
    h = bhattacharyya_hessian(y)
    torch.testing.assert_close(h, f / 4, rtol=1e-12, atol=1e-14)
    assert float(h.abs().max()) > 1e-3  # not a trivially small matrix
    # the quadratic form by finite differences, independent of any Hessian code
    d, eps = logits(seed + 5, c=5), 1e-4
    p, q = torch.softmax(y + eps * d, -1), torch.softmax(y, -1)
    d_b = -torch.log(torch.sqrt(p * q).sum())
    torch.testing.assert_close(d_b / eps**2, d @ f @ d / 8, rtol=1e-3, atol=0)
    assert get_output_metric("bhattacharyya").matrix(y).allclose(f / 4, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", OUTPUT_METRICS)
def test_registry_names_and_types(name):
    m = get_output_metric(name)
    assert m.name == name
    assert type(m) is {"euclidean": Euclidean, "fisher": SoftmaxFisher}.get(name, Bhattacharyya)
    assert get_output_metric(m) is m
    assert get_output_metric(name.upper()).name == name


@pytest.mark.parametrize("name", OUTPUT_METRICS)
def test_matrix_and_embedding_give_the_explicit_metric(name):
    m = get_output_metric(name)
    for seed in range(3):
        y = logits(seed)
        g = output_metric_ref(name, y)
        torch.testing.assert_close(m.matrix(y), g, rtol=1e-12, atol=1e-14)
        # G = Dphi^T Dphi: the embedding is what the pullback metric actually uses
        dphi = jacrev(m.embed)(y)
        torch.testing.assert_close(dphi.T @ dphi, g, rtol=1e-12, atol=1e-14)
    # batched: matrix acts on the last axis, one matrix per sample
    ys = torch.stack([logits(s) for s in range(3)])
    expected = torch.stack([output_metric_ref(name, y) for y in ys])
    torch.testing.assert_close(m.matrix(ys), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", OUTPUT_METRICS)
def test_divergence_is_zero_at_y0_with_hessian_g(name):
    m = get_output_metric(name)
    for seed in range(3):
        y0 = logits(seed)
        assert abs(float(m.divergence(y0, y0))) < 1e-14
        # a minimum: zero gradient, Hessian G(y0)
        g0 = grad(lambda y, y0=y0: m.divergence(y, y0))(y0)
        assert float(g0.abs().max()) < 1e-14
        h = hessian(lambda y, y0=y0: m.divergence(y, y0))(y0)
        torch.testing.assert_close(h, output_metric_ref(name, y0), rtol=1e-10, atol=1e-13)
        # a divergence: positive away from y0 (up to a shift of all logits for softmax ones)
        y = logits(seed + 10)
        assert float(m.divergence(y, y0)) > 1e-6


def test_divergences_match_their_closed_forms():
    y0, y = logits(0), logits(1)
    p0, p = torch.softmax(y0, -1), torch.softmax(y, -1)
    torch.testing.assert_close(Euclidean().divergence(y, y0), 0.5 * ((y - y0) ** 2).sum())
    torch.testing.assert_close(SoftmaxFisher().divergence(y, y0), (p0 * (p0 / p).log()).sum())
    torch.testing.assert_close(Bhattacharyya().divergence(y, y0), -(p * p0).sqrt().sum().log())
    # batched over samples: one value per sample
    ys, y0s = torch.stack([y, y0]), torch.stack([y0, y0])
    assert SoftmaxFisher().divergence(ys, y0s).shape == (2,)


def test_softmax_metrics_ignore_a_shift_of_all_logits():
    y = logits(3)
    for name in ("fisher", "bhattacharyya"):
        m = get_output_metric(name)
        torch.testing.assert_close(m.embed(y + 7.0), m.embed(y), rtol=1e-12, atol=1e-14)
        assert abs(float(m.divergence(y + 7.0, y))) < 1e-14
        # and G has the all-ones vector in its kernel
        ones = torch.ones_like(y)
        assert float((m.matrix(y) @ ones).abs().max()) < 1e-14
