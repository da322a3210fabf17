"""The linear-algebra primitives against dense references (float64, small problems)."""

import pytest
import torch

from ggda.errors import GGDAError
from ggda.linalg import (
    arnoldi,
    dense_from_matvec,
    gauss_newton,
    gnhvp,
    hessian,
    hvp,
    ihvp_arnoldi,
    ihvp_cg,
    ihvp_dense,
    ihvp_lissa,
)

torch.manual_seed(0)
P = 7


@pytest.fixture(scope="module")
def problem():
    """A small tanh network as a function of a flat vector, with its dense Hessian."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    theta = torch.randn(3 * 2 + 1, generator=gen, dtype=torch.float64) * 0.5  # p = 7

    def model_fn(t):
        W = t[:6].reshape(2, 3)
        return torch.tanh(X @ W.T + t[6])

    def loss_fn(z):
        return 0.5 * ((z - y) ** 2).sum() + (z**4).sum() * 0.01  # convex in z, non-quadratic

    def func(t):
        return loss_fn(model_fn(t))

    return func, model_fn, loss_fn, theta


def spd(p=P, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(p, p, generator=gen, dtype=torch.float64)
    return A @ A.T / p + 0.1 * torch.eye(p, dtype=torch.float64)


def test_hvp_matches_dense_hessian(problem):
    func, _, _, theta = problem
    H = hessian(func, theta)
    V = torch.randn(4, P, dtype=torch.float64)
    assert torch.allclose(hvp(func, theta, V), V @ H.T, atol=1e-10)
    assert torch.allclose(hvp(func, theta, V[0]), H @ V[0], atol=1e-10)
    assert torch.allclose(dense_from_matvec(lambda B: hvp(func, theta, B), P, torch.float64, block_size=3), H)


def test_gnhvp_matches_dense_gauss_newton(problem):
    func, model_fn, loss_fn, theta = problem
    G = gauss_newton(model_fn, loss_fn, theta)
    V = torch.randn(5, P, dtype=torch.float64)
    assert torch.allclose(gnhvp(model_fn, loss_fn, theta, V), V @ G.T, atol=1e-10)
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # PSD for a convex loss
    H = hessian(func, theta)
    assert not torch.allclose(G, H, atol=1e-3)  # the network is non-linear: GN ≠ Hessian


def test_gn_equals_hessian_for_linear_model():
    X = torch.randn(15, 4, dtype=torch.float64)
    y = torch.randn(15, dtype=torch.float64)
    theta = torch.randn(4, dtype=torch.float64)

    def model_fn(t):
        return X @ t

    def loss_fn(z):
        return torch.nn.functional.softplus(z - y).sum()

    assert torch.allclose(
        gauss_newton(model_fn, loss_fn, theta), hessian(lambda t: loss_fn(model_fn(t)), theta)
    )


def test_cg_solves_batched_systems():
    A = spd()
    B = torch.randn(3, P, dtype=torch.float64)
    res = ihvp_cg(lambda V: V @ A.T, B, damping=0.05, tol=1e-12, max_iter=50)
    ref = torch.linalg.solve(A + 0.05 * torch.eye(P, dtype=torch.float64), B.T).T
    assert res.converged and res.iterations <= P + 2
    assert torch.allclose(res.x, ref, atol=1e-9)
    assert torch.allclose(ihvp_dense(A, B, 0.05), ref, atol=1e-10)
    one = ihvp_cg(lambda V: V @ A.T, B[0], damping=0.05, tol=1e-12)
    assert torch.allclose(one.x, ref[0], atol=1e-9)


def test_cg_refuses_indefinite_systems():
    A = spd() - 2.0 * torch.eye(P, dtype=torch.float64)
    with pytest.raises(GGDAError, match="damping"):
        ihvp_cg(lambda V: V @ A.T, torch.ones(P, dtype=torch.float64), damping=0.0)


def test_lissa_converges_to_the_inverse():
    A = spd()
    B = torch.randn(2, P, dtype=torch.float64)
    top = float(torch.linalg.eigvalsh(A).max())
    out = ihvp_lissa(lambda V: V @ A.T, B, damping=0.05, scale=1.2 * (top + 0.05), depth=2000, repeat=2)
    ref = torch.linalg.solve(A + 0.05 * torch.eye(P, dtype=torch.float64), B.T).T
    assert torch.allclose(out, ref, atol=1e-8)


def test_lissa_divergence_raises_instead_of_nan():
    A = spd() * 10
    with pytest.raises(GGDAError, match="scale"):
        ihvp_lissa(lambda V: V @ A.T, torch.ones(P, dtype=torch.float64), damping=0.01, scale=1.0, depth=500)


def test_arnoldi_full_rank_is_exact_and_low_rank_finds_top_eigenpairs():
    p = 30
    gen = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))[0]
    mu = torch.cat([torch.tensor([50.0, 20.0, 10.0], dtype=torch.float64), torch.linspace(0.01, 1, p - 3)])
    mu = mu.to(torch.float64)
    A = Q @ torch.diag(mu) @ Q.T
    full = arnoldi(lambda V: V @ A.T, p, iterations=p, rank=p, dtype=torch.float64)
    B = torch.randn(2, p, dtype=torch.float64)
    ref = torch.linalg.solve(A + 0.1 * torch.eye(p, dtype=torch.float64), B.T).T
    assert torch.allclose(ihvp_arnoldi(full, B, 0.1), ref, atol=1e-8)
    low = arnoldi(lambda V: V @ A.T, p, iterations=20, rank=3, dtype=torch.float64)
    assert torch.allclose(low.values, torch.tensor([50.0, 20.0, 10.0], dtype=torch.float64), atol=1e-8)
    # the low-rank inverse is the exact inverse restricted to the top eigenspace
    U = Q[:, :3]
    proj = (B @ U) / (mu[:3] + 0.1) @ U.T
    assert torch.allclose(ihvp_arnoldi(low, B, 0.1), proj, atol=1e-8)


def test_arnoldi_complement_floor_is_exact_for_a_flat_complement():
    """(H + λI)⁻¹ with the complement at the smallest kept |Ritz value|: exact when the rest of
    the spectrum is flat at that value; between "drop" and the exact inverse otherwise."""
    gen = torch.Generator().manual_seed(3)
    p = 12
    Q = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))[0]
    vals = torch.tensor([9.0, 7.0, 5.0] + [0.5] * (p - 3), dtype=torch.float64)
    A = Q @ torch.diag(vals) @ Q.T
    B = torch.randn(4, p, generator=gen, dtype=torch.float64)
    low = arnoldi(lambda V: V @ A.T, p, iterations=p, rank=4, dtype=torch.float64)
    floor = float(low.values.abs().min())
    assert floor == pytest.approx(0.5)
    ref = torch.linalg.solve(A + 0.1 * torch.eye(p, dtype=torch.float64), B.T).T
    assert torch.allclose(ihvp_arnoldi(low, B, 0.1, complement=floor), ref, atol=1e-10)
    with pytest.raises(GGDAError, match="complement"):
        ihvp_arnoldi(low, B, 0.0, complement=0.0)


@pytest.mark.parametrize("block", [1, 3, 5])
def test_block_arnoldi_is_exact_at_full_size_and_finds_outliers_in_few_block_steps(block):
    """Block Arnoldi (``block`` vectors per product): the same Ritz pairs as a dense eigensolve
    when its products span the space, the outliers of an indefinite spectrum (both ends) from
    a few block steps, and exactly ``iterations`` products made ``block`` at a time."""
    p = 30
    gen = torch.Generator().manual_seed(5)
    Q = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))[0]
    mu = torch.cat(
        [
            torch.tensor([40.0, 25.0, -12.0], dtype=torch.float64),
            torch.linspace(-0.5, 0.5, p - 3, dtype=torch.float64),
        ]
    )
    A = Q @ torch.diag(mu) @ Q.T
    calls = []

    def matvec(V):
        calls.append(V.shape[0])
        return V @ A.T

    full = arnoldi(matvec, p, iterations=p, rank=p, dtype=torch.float64, block=block)
    assert sum(calls) == p and set(calls) == {block}
    ref = torch.linalg.eigvalsh(A)
    assert torch.allclose(full.values.sort().values, ref, atol=1e-10)
    # Ritz vectors are eigenvectors: A u = μ u, orthonormal
    U = full.vectors
    assert torch.allclose(A @ U, U * full.values, atol=1e-9)
    assert torch.allclose(U.T @ U, torch.eye(p, dtype=torch.float64), atol=1e-10)
    calls.clear()
    low = arnoldi(matvec, p, iterations=18, rank=3, dtype=torch.float64, block=block)
    assert sum(calls) == 18 // block * block and set(calls) == {block}  # whole blocks only
    assert torch.allclose(low.values, torch.tensor([40.0, 25.0, -12.0], dtype=torch.float64), atol=1e-6)


def test_block_arnoldi_stops_on_an_invariant_subspace():
    """A rank-2 operator: the block Krylov space is invariant after two blocks of 4 products (the
    start block, then A's two directions padded with two fresh ones); the iteration stops there
    (no division by a vanishing direction) with the exact nonzero pairs."""
    gen = torch.Generator().manual_seed(6)
    u = torch.linalg.qr(torch.randn(20, 2, generator=gen, dtype=torch.float64))[0]
    A = u @ torch.diag(torch.tensor([3.0, -2.0], dtype=torch.float64)) @ u.T
    calls = []

    def matvec(V):
        calls.append(V.shape[0])
        return V @ A.T

    eig = arnoldi(matvec, 20, iterations=16, rank=2, dtype=torch.float64, block=4)
    assert calls == [4, 4]
    assert torch.allclose(eig.values, torch.tensor([3.0, -2.0], dtype=torch.float64), atol=1e-12)
    assert bool(torch.isfinite(eig.vectors).all())
