"""Content digests of data, for result keys: equal data, equal key; lazy inputs without a full pass.

Why one function: retraining jobs and feature stores key their stored results by the data they
were computed on, and a lazy source (a torch ``Dataset`` of image files) must not be read in full
just to be hashed — :meth:`~ggda.data.batches.ExampleInputs.fingerprint` digests its size and a
spread sample of examples instead.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ggda.data.batches import ExampleInputs


def content_digest(*parts) -> str:
    """16 hex characters over arrays, tensors and lazy inputs (shape, dtype and bytes)."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, ExampleInputs):
            h.update(part.fingerprint().encode())
            continue
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        a = np.ascontiguousarray(part)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
    return h.hexdigest()[:16]
