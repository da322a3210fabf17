"""examples/minilm_reviews_hf.py at a tiny size: a 2-layer random BERT, a word-level tokenizer and
synthetic reviews through a Hugging Face ``datasets.Dataset``; fine-tune, attribute, LDS."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import import_example

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")


GOOD = ["love", "great", "perfect", "comfortable", "beautiful", "soft"]
BAD = ["ripped", "cheap", "awful", "itchy", "returned", "small"]
FILLER = ["the", "dress", "top", "fabric", "colour", "fit", "it", "is", "and", "so", "very", "this"]


def _word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", *GOOD, *BAD, *FILLER])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"), len(vocab)


def _reviews(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    texts = []
    for label in y:
        words = list(rng.choice(FILLER, 5)) + list(rng.choice(GOOD if label else BAD, 2))
        rng.shuffle(words)
        texts.append(" ".join(words[: rng.integers(4, 8)]))
    return texts, y


@pytest.fixture(scope="module")
def example():
    return import_example("minilm_reviews_hf")


def test_text_example_end_to_end(example, tmp_path):
    import torch

    torch.set_num_threads(1)
    tok, vocab = _word_tokenizer()
    factory = example.BertClassifier(
        config={
            "vocab_size": vocab,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 32,
        }
    )
    tr_texts, tr_y = _reviews(48, 0)
    te_texts, te_y = _reviews(16, 1)
    opts = example.Options(
        max_len=10, epochs=2, lr=3e-3, batch_size=8, targets=6, groups=6, lds_subsets=4,
        methods=("grad-dot", "tracin", "trak", "datainf", "if-cg"), trak_dim=32, out=tmp_path,
    )  # fmt: skip
    report = example.run(factory, tok, (tr_texts, tr_y, te_texts, te_y), opts)
    scores = report.pop("_scores")
    assert report["n_train"] == 48 and report["groups"] == 6
    for name in opts.methods:
        assert scores["points"][name].shape == (6, 48) and np.isfinite(scores["points"][name]).all()
        assert scores["groups"][name].shape == (6, 6) and np.isfinite(scores["groups"][name]).all()
        assert (tmp_path / f"groups_{name}.npy").exists()
    # first-order methods are linear in the group: group score = sum of its members' scores
    for name in ("grad-dot", "tracin"):
        assert report["group_vs_summed_points_corr"][name] > 0.999
    # TracIn over the epoch checkpoints is not Grad-Dot at the final model
    assert not np.allclose(scores["points"]["tracin"], scores["points"]["grad-dot"])
    assert set(report["lds"]) == {*opts.methods, "random"} and report["retrains"] == 4
    assert all(np.isfinite(v) for v in report["lds"].values())
