"""examples/hf_trainer_tracin.py at a small size: Trainer + callback, then TracIn and TRAK."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "transformers", reason="the hf extra (transformers) is not installed: pip install 'ggda[hf]'"
)
pytest.importorskip("accelerate", reason="the hf extra (accelerate) is not installed: pip install 'ggda[hf]'")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_trains_records_and_attributes(tmp_path, capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import hf_trainer_tracin as example
    finally:
        sys.path.remove(str(EXAMPLES))
    from ggda.integrations import read_index

    result = example.run(tmp_path, n_train=48, epochs=2, n_targets=2)
    entries = read_index(tmp_path)["checkpoints"]
    assert [e["epoch"] for e in entries] == [1.0, 2.0]
    # linear decay over 2 epochs of 3 steps: the epoch-end steps 3 and 6 used 2e-2 * (6 - s + 1) / 6
    assert [e["lr"] for e in entries] == pytest.approx([2e-2 * 4 / 6, 2e-2 * 1 / 6])
    saved = np.load(tmp_path / "scores.npz")
    assert saved["tracin"].shape == saved["trak"].shape == (2, 48)
    assert np.array_equal(saved["tracin"], result["tracin"]) and np.isfinite(saved["trak"]).all()
    out = capsys.readouterr().out
    assert "2 checkpoints" in out and "TracIn most helpful" in out
