"""Huge-page advice is a hint only: shapes, dtypes and values are those of torch.empty/zeros."""

import sys

import torch

from ggda.buffers import advise_huge_pages, empty_huge, zeros_huge


def test_buffers_behave_like_torch_allocations():
    big = zeros_huge(1024, 2048, dtype=torch.float32)  # 8 MB: advised on Linux
    assert big.shape == (1024, 2048) and big.dtype == torch.float32 and not big.any()
    big.fill_(3.0)
    assert float(big.sum()) == 3.0 * big.numel()
    small = empty_huge(10, dtype=torch.float64)
    assert small.shape == (10,) and small.dtype == torch.float64
    assert advise_huge_pages(small) is False  # too small to be worth advising
    assert advise_huge_pages(torch.empty(4 * 2**20)) is sys.platform.startswith("linux")


def _fake_cache(root, entries):
    for i, (level, kind, size, cpus) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
        (d / "shared_cpu_list").write_text(f"{cpus}\n")


def test_last_level_cache_share_reads_the_highest_level_per_sharing_cpu(tmp_path):
    from ggda.buffers import last_level_cache_share

    _fake_cache(
        tmp_path,
        [
            (1, "Data", "32K", "0"),
            (1, "Instruction", "32K", "0"),
            (2, "Unified", "512K", "0"),
            (3, "Unified", "32768K", "0-1"),
        ],
    )
    assert last_level_cache_share(tmp_path) == 16 * 2**20  # 32 MB shared by CPUs 0 and 1
    other = tmp_path / "other"
    other.mkdir()
    _fake_cache(other, [(2, "Unified", "1M", "0"), (3, "Unified", "96M", "0-3,8-11")])
    assert last_level_cache_share(other) == 12 * 2**20  # 96 MB over 8 CPUs
    assert last_level_cache_share(tmp_path / "missing") is None


def test_cache_block_bytes_is_a_clamped_eighth_of_the_share():
    from ggda.buffers import cache_block_bytes, last_level_cache_share

    size = cache_block_bytes("cpu")
    assert 2**20 <= size <= 16 * 2**20
    share = last_level_cache_share()
    if share:
        assert size == min(16 * 2**20, max(2**20, share // 8))


def test_block_recycler_serves_fewer_rows_from_a_free_block_only():
    """A chunk's last, shorter block reuses a free pooled block's leading rows, never a block (or
    a view of one) that the consumer still holds."""
    import pytest

    from ggda.buffers import BlockRecycler

    if not hasattr(torch.Tensor, "_use_count"):
        pytest.skip("no reference counts: the recycler hands out fresh blocks only")
    cpu = torch.device("cpu")
    r = BlockRecycler()
    a = r.empty((4, 3), torch.float32, cpu)
    ptr = a.data_ptr()
    del a
    short = r.empty((2, 3), torch.float32, cpu)  # the free (4, 3) block's first two rows
    assert short.shape == (2, 3) and short.data_ptr() == ptr
    short.fill_(1.0)
    other = r.empty((2, 3), torch.float32, cpu)  # the short view is still held: fresh memory
    assert other.data_ptr() != ptr
    other.fill_(2.0)
    assert bool((short == 1.0).all())
    del short, other
    assert r.empty((5, 3), torch.float32, cpu).data_ptr() != ptr  # too few rows to serve 5
    assert r.empty((4, 2), torch.float32, cpu).data_ptr() != ptr  # another row width
