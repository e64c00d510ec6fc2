"""Conjugate gradients: solutions against dense solves, warm starts good and bad."""

import torch

from manifolds.conjugate_gradient import conjugate_gradient

DT = torch.float64


def _spd(n: int, cond: float, seed: int = 0, dtype=DT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    evals = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    return ((q * evals) @ q.T).to(dtype)


def test_solves_spd_system_to_tolerance():
    a = _spd(30, 1e3)
    b = torch.randn(30, dtype=DT, generator=torch.Generator().manual_seed(1))
    res = conjugate_gradient(lambda v: a @ v, b, tol=1e-12)
    assert res.converged and res.method == "cg"
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)
    assert res.residual <= 1e-12
    assert float((b - a @ res.x).norm() / b.norm()) < 1e-11


def test_exact_warm_start_costs_one_product():
    a = _spd(20, 1e2)
    x = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(2))
    res = conjugate_gradient(lambda v: a @ v, a @ x, x0=x.clone(), tol=1e-10)
    assert res.converged and res.iterations == 1
    torch.testing.assert_close(res.x, x)


def test_warm_start_worse_than_zero_is_dropped():
    a = _spd(20, 1e2, dtype=torch.float32)
    b = torch.randn(20, generator=torch.Generator().manual_seed(3))
    cold = conjugate_gradient(lambda v: a @ v, b, tol=1e-5)
    for bad in (-1e3 * torch.linalg.solve(a, b), torch.full((20,), 1e38)):  # the second overflows
        warm = conjugate_gradient(lambda v: a @ v, b, x0=bad, tol=1e-5)
        assert warm.converged and torch.isfinite(warm.x).all()
        assert warm.iterations == cold.iterations + 1  # one product to judge the guess
        torch.testing.assert_close(warm.x, cold.x)


def test_singular_operator_gives_minimum_norm_solution():
    j = torch.randn(3, 8, dtype=DT, generator=torch.Generator().manual_seed(4))
    b = j.T @ torch.randn(3, dtype=DT, generator=torch.Generator().manual_seed(5))  # in range
    res = conjugate_gradient(lambda v: j.T @ (j @ v), b, tol=1e-12)
    torch.testing.assert_close(res.x, torch.linalg.pinv(j.T @ j) @ b, rtol=1e-8, atol=1e-8)


def test_reported_residual_is_the_true_one_in_float32():
    # Ill-conditioned float32 system: the recursive residual falls below tol (measured
    # 9.6e-6) while b - A x is 2.9e-4; what is reported must be the true residual.
    a = _spd(200, 1e4, seed=6, dtype=torch.float32)
    b = torch.randn(200, generator=torch.Generator().manual_seed(7))
    res = conjugate_gradient(lambda v: a @ v, b, tol=1e-5, maxiter=2000)
    true = float((b.double() - a.double() @ res.x.double()).norm() / b.double().norm())
    # (b - A x in float32 itself carries rounding: agreement within 2x, not 30x)
    assert true / 2 < res.residual < 2 * true
    assert res.converged == (true <= 1e-5)


def test_batched_preconditioned_cg_solves_each_row_like_a_single_solve():
    """Rows of a 2-D right-hand side are solved independently (one batched product per
    iteration); a good preconditioner cuts the iterations; a zero row stays zero."""
    a = _spd(40, 1e4, seed=8)
    b = torch.randn(3, 40, dtype=DT, generator=torch.Generator().manual_seed(9))
    b[1] = 0.0
    res = conjugate_gradient(lambda v: v @ a, b, tol=1e-11)
    assert res.converged and res.x.shape == (3, 40)
    for i in (0, 2):
        torch.testing.assert_close(res.x[i], torch.linalg.solve(a, b[i]), rtol=1e-8, atol=1e-8)
    assert torch.equal(res.x[1], torch.zeros(40, dtype=DT))
    evals, evecs = torch.linalg.eigh(a)
    inverse = (evecs / evals) @ evecs.T  # the exact inverse: one iteration suffices
    pre = conjugate_gradient(lambda v: v @ a, b, tol=1e-11, preconditioner=lambda r: r @ inverse)
    assert pre.converged and pre.iterations < res.iterations and pre.iterations <= 3
    torch.testing.assert_close(pre.x, res.x, rtol=1e-8, atol=1e-8)


def test_inconsistent_singular_system_stops_with_a_status_not_a_huge_answer():
    j = torch.randn(3, 8, dtype=DT, generator=torch.Generator().manual_seed(10))
    b = torch.randn(8, dtype=DT, generator=torch.Generator().manual_seed(11))  # not in range
    res = conjugate_gradient(lambda v: j.T @ (j @ v), b, tol=1e-10, maxiter=200)
    assert not res.converged and res.status.name in ("BREAKDOWN", "MAX_ITERATIONS", "NON_FINITE")
    assert res.residual > 0.1 and f"{res.residual:.3e}" in res.message
