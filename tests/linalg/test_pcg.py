"""Preconditioned CG: the dense solve, the stopping rule on the true residual, the product count,
and fewer iterations with a good preconditioner (same answer)."""

import torch

from ggda.linalg.cg import ihvp_cg

P = 60


def ill_conditioned(seed: int = 0) -> torch.Tensor:
    """An SPD matrix with eigenvalues spread over four decades (CG needs many iterations)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.logspace(-2, 2, P, dtype=torch.float64)) @ Q.T


def true_residual(A: torch.Tensor, lam: float, X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return (B - X @ A.T - lam * X).norm(dim=1) / B.norm(dim=1)


def test_pcg_converges_to_the_dense_solve_with_fewer_iterations():
    A, lam = ill_conditioned(), 1e-3
    B = torch.randn(4, P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = torch.linalg.solve(A + lam * torch.eye(P, dtype=torch.float64), B.T).T
    # a rough preconditioner: the damped inverse of a perturbed A (what EK-FAC / Arnoldi give)
    E = 0.2 * ill_conditioned(2) / 100
    M_inv = torch.linalg.inv(A + E + lam * torch.eye(P, dtype=torch.float64))
    tol = 1e-8
    plain = ihvp_cg(lambda V: V @ A.T, B, lam, tol, max_iter=1000)
    pcg = ihvp_cg(lambda V: V @ A.T, B, lam, tol, max_iter=1000, precondition=lambda R: R @ M_inv)
    for res in (plain, pcg):
        assert res.converged
        assert bool((true_residual(A, lam, res.x, B) <= 10 * tol).all())
        # error ≤ κ · residual: the solve agrees with the dense one to that bound
        assert torch.allclose(res.x, ref, rtol=0, atol=1e5 * tol * float(ref.abs().max()))
    assert pcg.iterations < plain.iterations / 3
    # one product per target per iteration it ran
    assert plain.products == int(plain.column_iterations.sum())
    assert pcg.products == int(pcg.column_iterations.sum())


def test_verify_makes_the_exit_residual_the_true_one():
    A, lam = ill_conditioned(3), 1e-3
    B = torch.randn(3, P, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tol = 1e-6
    res = ihvp_cg(lambda V: V @ A.T, B, lam, tol, max_iter=1000, verify=True)
    true = true_residual(A, lam, res.x, B)
    assert res.converged and bool((true <= tol).all())
    assert torch.allclose(res.residual, true, rtol=1e-6)  # the reported residual is recomputed
    # the confirmation costs one product per target on top of the iterations
    assert res.products >= int(res.column_iterations.sum()) + len(B)


def test_a_warm_start_at_the_solution_costs_one_product_and_no_iteration():
    A, lam = ill_conditioned(5), 1e-2
    B = torch.randn(2, P, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref = torch.linalg.solve(A + lam * torch.eye(P, dtype=torch.float64), B.T).T
    res = ihvp_cg(lambda V: V @ A.T, B, lam, 1e-8, x0=ref)
    assert res.iterations == 0 and res.products == len(B) and res.converged
    assert torch.equal(res.x, ref)
