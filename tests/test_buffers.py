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
