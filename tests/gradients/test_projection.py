import pytest
import torch

from ggda.errors import GGDAError
from ggda.gradients.projection import (
    DEFAULT_CACHE_MB,
    IdentityProjector,
    LayerwiseProjector,
    RandomProjector,
    allocate_dims,
    make_projector,
    module_slices,
)
from ggda.task import AttributionTask


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_deterministic_per_seed_and_distinct_across_seeds(kind):
    a = RandomProjector(300, 16, kind, seed=3, block_rows=64).matrix()
    b = RandomProjector(300, 16, kind, seed=3, block_rows=64, cache_mb=0).matrix()
    c = RandomProjector(300, 16, kind, seed=4, block_rows=64).matrix()
    d = RandomProjector(300, 16, kind, seed=3, stream=1, block_rows=64).matrix()
    assert a.shape == (300, 16)
    assert torch.equal(a, b)  # cached or regenerated: same numbers
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
    if kind == "rademacher":
        assert torch.allclose(a.abs(), torch.full_like(a, 16**-0.5))
    # blocks are independent streams: no repeated block
    assert not torch.allclose(a[:64], a[64:128])


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_unbiased_inner_products(kind):
    """E[P Pᵀ] = I: averaged over many seeds, P Pᵀ is the identity (entry std ~ 1/sqrt(k·seeds))."""
    p, k, seeds = 40, 16, 400
    acc = torch.zeros(p, p, dtype=torch.float64)
    for s in range(seeds):
        P = RandomProjector(p, k, kind, seed=s, dtype=torch.float64).matrix()
        acc += P @ P.T
    acc /= seeds
    assert (acc - torch.eye(p, dtype=torch.float64)).abs().max() < 0.08


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_johnson_lindenstrauss_bound(kind):
    """Norms and inner products of 20 fixed vectors are preserved within eps = 0.3 at k = 512
    (JL: k >= 8 ln(n)/eps^2 ≈ 266 suffices), on a fixed seed."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(20, 3000, generator=gen, dtype=torch.float64)
    proj = RandomProjector(3000, 512, kind, seed=1, dtype=torch.float64, block_rows=700)
    B = proj.project(A)
    ratio = B.norm(dim=1) ** 2 / A.norm(dim=1) ** 2
    assert ((ratio - 1).abs() < 0.3).all()
    norms = A.norm(dim=1)
    err = (B @ B.T - A @ A.T) / (norms[:, None] * norms[None, :])
    assert err.abs().max() < 0.3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_projection_equals_materialised_matrix(dtype):
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(37, 1000, generator=gen, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for cache_mb in (0, 100):
        proj = RandomProjector(1000, 24, "gaussian", seed=5, dtype=dtype, block_rows=128, cache_mb=cache_mb)
        P = proj.matrix()
        full = G @ P
        assert torch.allclose(proj.project(G), full, rtol=tol, atol=tol)
        rows = torch.cat([proj.project(G[i : i + 5]) for i in range(0, 37, 5)])
        assert torch.allclose(rows, full, rtol=tol, atol=tol)


def test_layerwise_projection_is_block_diagonal():
    slices = [slice(0, 500), slice(500, 510), slice(510, 900)]
    proj = LayerwiseProjector(slices, 40, "rademacher", seed=2, dtype=torch.float64)
    assert proj.dims == [15, 10, 15]  # the 10-wide layer is kept exactly, its leftover goes to the others
    P = proj.matrix()
    assert P.shape == (900, 40)
    assert torch.count_nonzero(P[0:500, 15:]) == 0 and torch.count_nonzero(P[500:510, :15]) == 0
    assert torch.equal(P[500:510, 15:25], torch.eye(10, dtype=torch.float64))
    G = torch.randn(7, 900, dtype=torch.float64)
    assert torch.allclose(proj.project(G), G @ P, atol=1e-12)


def test_allocate_dims():
    assert allocate_dims([100, 100], 10) == [5, 5]
    assert allocate_dims([3, 100, 1000], 30) == [3, 13, 14]
    assert sum(allocate_dims([7, 11, 13], 100)) == 31  # all exact: no more dims than coordinates
    with pytest.raises(GGDAError):
        allocate_dims([5, 5, 5], 2)


def test_make_projector_and_module_slices(trained_mlp):
    task = AttributionTask(trained_mlp)
    names, slices = module_slices(task)
    assert names == ["0", "2"]
    assert slices[0] == slice(0, 64 * 128 + 128) and slices[-1].stop == task.n_params
    p = task.n_params
    assert isinstance(make_projector("identity", p, None), IdentityProjector)
    layered = make_projector("gaussian", p, 64, layer_slices=slices, layer_names=names)
    assert isinstance(layered, LayerwiseProjector) and layered.k == 64
    with pytest.raises(GGDAError):
        make_projector("sparse", p, 64)
    with pytest.raises(GGDAError):
        make_projector("gaussian", p, 64).project(torch.zeros(3, p + 1))


def test_default_cache_keeps_a_trak_sized_matrix():
    """p = 101,770 (MLP 784-128-10), k = 512 is 208 MB fp32: under the 512 MB default P is generated once;
    over cache_mb it is regenerated per call, with identical numbers."""
    assert DEFAULT_CACHE_MB == 512.0
    assert RandomProjector(101_770, 512)._cacheable
    assert not RandomProjector(101_770, 512, cache_mb=128)._cacheable
    proj = RandomProjector(500, 8, seed=2, block_rows=100)
    G = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    first = proj.project(G)
    assert len(proj._cache) == proj.n_blocks  # kept from the first pass
    assert torch.equal(proj.project(G), first)
    fresh = RandomProjector(500, 8, seed=2, block_rows=100, cache_mb=0)
    assert torch.equal(fresh.project(G), first) and not fresh._cache  # regenerated: same numbers


@pytest.mark.parametrize("k", [512, 77])
def test_rademacher_blocks_are_the_seeded_bits_in_order(k):
    """Entry (i, 32w + j) of a block is bit j of word (i, w) of the block's generator: the byte
    lookup that unpacks them must keep exactly that definition (and so every stored sketch)."""
    import math

    from ggda.gradients.projection import block_seed

    proj = RandomProjector(3000, k, "rademacher", seed=5, block_rows=1024, cache_mb=0)
    kept = RandomProjector(3000, k, "rademacher", seed=5, block_rows=1024)
    for b in (0, 2):
        rows = min(1024, 3000 - b * 1024)
        gen = torch.Generator().manual_seed(block_seed(5, 0, b))
        words = torch.randint(-(2**31), 2**31, (rows, -(-k // 32)), generator=gen, dtype=torch.int32)
        bits = ((words[..., None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(rows, -1)[:, :k]
        expected = (bits.float() * 2 - 1) / math.sqrt(k)
        torch.testing.assert_close(proj.block(b), expected, rtol=0, atol=1e-7)
        scratch = proj._scratch()  # generating into a reused buffer gives the same numbers
        torch.testing.assert_close(proj.block(b, scratch), expected, rtol=0, atol=1e-7)
        torch.testing.assert_close(kept.block(b), expected, rtol=0, atol=1e-7)
        torch.testing.assert_close(kept.block(b), expected, rtol=0, atol=1e-7)  # from the store


@pytest.mark.parametrize(
    "kind, k, cache_mb", [("gaussian", 37, 512.0), ("rademacher", 70, 512.0), ("gaussian", 37, 0)]
)
def test_rows_are_the_materialised_matrix_rows(kind, k, cache_mb):
    """Any row range (inside one block, across blocks, empty, all) equals the same rows of P,
    kept or regenerated; outside the matrix is refused."""
    proj = RandomProjector(250, k, kind, seed=4, block_rows=64, dtype=torch.float64, cache_mb=cache_mb)
    full = RandomProjector(250, k, kind, seed=4, block_rows=64, dtype=torch.float64).matrix()
    for a, b in ((0, 10), (60, 70), (5, 250), (0, 250), (128, 192), (30, 30)):
        torch.testing.assert_close(proj.rows(a, b), full[a:b], rtol=0, atol=0)
    with pytest.raises(GGDAError):
        proj.rows(10, 251)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_rademacher_entries_are_exact_in_every_dtype(dtype):
    """The sign-bit unpacking gives exactly ±(1/√k rounded to dtype), bit j of word w at column
    32w + j, in every floating dtype (each has its own integer width for the sign trick)."""
    import math

    from ggda.gradients.projection import block_seed

    k = 77
    proj = RandomProjector(300, k, "rademacher", seed=7, block_rows=128, dtype=dtype, cache_mb=0)
    scale = torch.tensor(1 / math.sqrt(k), dtype=dtype)
    for b in range(proj.n_blocks):
        rows = min(128, 300 - b * 128)
        gen = torch.Generator().manual_seed(block_seed(7, 0, b))
        words = torch.randint(-(2**31), 2**31, (rows, 3), generator=gen, dtype=torch.int32)
        bits = ((words[..., None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(rows, -1)[:, :k]
        expected = torch.where(bits.bool(), scale, -scale)
        assert proj.block(b).dtype == dtype
        assert torch.equal(proj.block(b), expected)
        assert torch.equal(proj.words(b), words)


def test_kept_words_give_the_same_projection():
    """A Rademacher P over cache_mb whose words fit keeps the words (1/32 of P) and gives exactly
    the numbers of a P regenerated on every pass and of a P kept whole."""
    p, k = 5000, 64  # P: 1.22 MiB fp32, words: 39 KiB
    whole = RandomProjector(p, k, "rademacher", seed=3, block_rows=512)
    words = RandomProjector(p, k, "rademacher", seed=3, block_rows=512, cache_mb=0.1)
    fresh = RandomProjector(p, k, "rademacher", seed=3, block_rows=512, cache_mb=0)
    assert whole._cacheable and not words._cacheable and words._words_cacheable
    assert not fresh._cacheable and not fresh._words_cacheable
    G = torch.randn(9, p, generator=torch.Generator().manual_seed(0))
    first = words.project(G)
    assert len(words._word_cache) == words.n_blocks  # kept from the first pass
    assert torch.equal(words.project(G), first)  # second pass from the kept words
    assert torch.equal(fresh.project(G), first)
    torch.testing.assert_close(whole.project(G), first, rtol=1e-5, atol=1e-6)
    assert torch.equal(words.matrix(), whole.matrix())
    for b in range(words.n_blocks):  # drawn into the store = drawn into a fresh tensor
        assert words.words(b).data_ptr() == words._word_cache[b].data_ptr()
        assert torch.equal(words.words(b), fresh.words(b))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("cache_mb", [0, 512.0])
@pytest.mark.parametrize("m", [1, 3, 40, 300])
def test_projection_in_sub_blocks_equals_the_matrix_product(kind, cache_mb, m, monkeypatch):
    """project multiplies in slices of each block, sized from the rows of G (few rows: thin
    slices; many: whole blocks); any m gives G @ P to float64 rounding, also for a k that is not
    a multiple of 32 and a last block shorter than the others. Slices of 100 rows here (a
    100-row SUB_BLOCK_BYTES) so that small blocks are sliced."""
    import ggda.gradients.projection as projection

    p, k = 2500, 77  # rows of 96 unpacked entries
    monkeypatch.setattr(projection, "SUB_BLOCK_BYTES", 100 * 96 * 8)
    proj = RandomProjector(p, k, kind, seed=2, block_rows=1024, dtype=torch.float64, cache_mb=cache_mb)
    P = RandomProjector(p, k, kind, seed=2, block_rows=1024, dtype=torch.float64).matrix()
    G = torch.randn(m, p, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    assert proj._sub_rows(m) == min(1024, max(4 * m, 100))
    torch.testing.assert_close(proj.project(G), G @ P, rtol=1e-12, atol=1e-12)
