"""Block CG: the dense solve to ``tol`` for every column, converged columns leaving the block,
dependent right-hand sides (repeated targets), the product count, a preconditioner, a limited
history, and fewer products than one CG per column when the columns share outliers at both ends
of the spectrum (an indefinite H shifted positive definite, as for the MLP's exact Hessian)."""

import pytest
import torch

from ggda.errors import GGDAError
from ggda.linalg.cg import ihvp_block_cg, ihvp_cg

P = 200
LAM = 1.5


def two_sided(seed: int = 0) -> torch.Tensor:
    """A symmetric indefinite H like a trained MLP's exact Hessian: a bulk near zero, 12 outliers
    up to 14 and 10 negative eigenvalues down to -1.1 (H + 1.5 I is positive definite)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    top = torch.logspace(0.3, 1.15, 12, dtype=torch.float64)
    bottom = -torch.linspace(0.8, 1.1, 10, dtype=torch.float64)
    bulk = 0.3 * torch.rand(P - 22, generator=g, dtype=torch.float64) - 0.15
    return Q @ torch.diag(torch.cat([top, bottom, bulk])) @ Q.T


def rhs(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(A + LAM * torch.eye(P, dtype=A.dtype), B.T).T


def true_residual(A: torch.Tensor, X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return (B - X @ A.T - LAM * X).norm(dim=1) / B.norm(dim=1)


def test_block_cg_matches_the_dense_solve_with_fewer_products_than_cg():
    A, B, tol = two_sided(), rhs(8), 1e-8
    ref = dense(A, B)
    block = ihvp_block_cg(lambda V: V @ A.T, B, LAM, tol, max_iter=500)
    assert block.converged
    true = true_residual(A, block.x, B)
    assert bool((true <= 1.01 * tol).all()), true
    assert torch.allclose(block.residual, true, rtol=1e-3)  # the recurrence is the true residual
    kappa = (14.2 + LAM) / (LAM - 1.1)
    assert torch.allclose(block.x, ref, rtol=0, atol=kappa * tol * float(ref.abs().max()))
    # a block of at most T vectors per iteration: products are the vectors multiplied
    assert block.products <= len(B) * block.iterations
    cg = ihvp_cg(lambda V: V @ A.T, B, LAM, tol, max_iter=500)
    assert cg.converged
    assert block.products < cg.products, (block.products, cg.products)


def test_converged_columns_leave_the_block():
    """A target along an eigenvector is solved by the first block (its solution v/(μ+λ) is in it):
    it stops after one iteration and the later blocks multiply fewer vectors than T."""
    A = two_sided(2)
    B = rhs(5, 3)
    mu, V = torch.linalg.eigh(A)
    B[2] = 3.0 * V[:, -1]
    res = ihvp_block_cg(lambda V_: V_ @ A.T, B, LAM, 1e-9, max_iter=500)
    assert res.converged and int(res.column_iterations[2]) == 1
    assert int(res.column_iterations.max()) == res.iterations > 1
    assert res.products < len(B) * res.iterations
    assert torch.allclose(res.x[2], B[2] / (mu[-1] + LAM), rtol=1e-8)
    assert bool((true_residual(A, res.x, B) <= 1.01e-9).all())


def test_repeated_targets_make_a_rank_deficient_block_without_breaking_it():
    """Two identical targets and one a multiple of another: the block has T − 2 independent
    directions, so each iteration multiplies at most that many, and the answers still match."""
    A = two_sided(4)
    B = rhs(6, 5)
    B[3] = B[0]
    B[5] = -2.0 * B[1]
    tol = 1e-9
    res = ihvp_block_cg(lambda V: V @ A.T, B, LAM, tol, max_iter=500)
    assert res.converged
    assert res.products <= (len(B) - 2) * res.iterations
    ref = dense(A, B)
    assert torch.allclose(res.x, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    assert torch.allclose(res.x[3], res.x[0], rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
    assert bool((true_residual(A, res.x, B) <= 1.01 * tol).all())


def test_exact_preconditioner_solves_in_one_block_and_a_short_history_still_converges():
    A, B, tol = two_sided(6), rhs(4, 7), 1e-9
    M_inv = torch.linalg.inv(A + LAM * torch.eye(P, dtype=torch.float64))
    exact = ihvp_block_cg(lambda V: V @ A.T, B, LAM, tol, precondition=lambda R: R @ M_inv)
    assert exact.converged and exact.iterations == 1 and exact.products == len(B)
    short = ihvp_block_cg(lambda V: V @ A.T, B, LAM, tol, max_iter=500, history=1)
    assert short.converged and bool((true_residual(A, short.x, B) <= 1.01 * tol).all())
    single = ihvp_block_cg(lambda V: V @ A.T, B[0], LAM, tol, max_iter=500)
    assert single.x.shape == (P,) and torch.allclose(single.x, dense(A, B[:1])[0], rtol=1e-5)


def test_a_warm_start_at_the_solution_costs_one_product_per_column_and_no_iteration():
    A, B = two_sided(8), rhs(3, 9)
    res = ihvp_block_cg(lambda V: V @ A.T, B, LAM, 1e-8, x0=dense(A, B))
    assert res.iterations == 0 and res.products == len(B) and res.converged


def test_indefinite_damped_operator_and_non_finite_products_are_errors():
    A, B = two_sided(10), rhs(3, 11)
    with pytest.raises(GGDAError, match="non-positive curvature"):
        ihvp_block_cg(lambda V: V @ A.T, B, 0.5, 1e-8, max_iter=500)
    with pytest.raises(GGDAError, match="not finite"):
        ihvp_block_cg(lambda V: V @ A.T * float("nan"), B, LAM, 1e-8)


def test_plain_cg_refuses_a_non_finite_product_instead_of_reporting_convergence():
    H = two_sided()

    def broken(V: torch.Tensor) -> torch.Tensor:
        return torch.full_like(V @ H, float("nan"))

    with pytest.raises(GGDAError, match="not finite"):
        ihvp_cg(broken, rhs(3), LAM, tol=1e-6, max_iter=20)
