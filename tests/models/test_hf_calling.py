"""A plain Hugging Face sequence classifier fed dict batches works per example under vmap (the
4-D padding mask is built in the model-calling layer), and influence functions work under SDPA
attention (switched to eager) — no task subclass, no download: a tiny BertConfig built offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from ggda.data.sources import from_torch  # noqa: E402
from ggda.errors import GGDAError  # noqa: E402
from ggda.methods import make_method  # noqa: E402
from ggda.models.calling import expands_padding_mask  # noqa: E402
from ggda.properties import ExampleLoss  # noqa: E402
from ggda.task import AttributionTask  # noqa: E402

LAYERS = ["bert.encoder.layer.1", "classifier"]


def _bert(attn: str | None = None, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def _dict_data(n: int, seed: int):
    """Dict items (input_ids, attention_mask, label), half of them padded: a lazy dataset."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (n, 8), generator=gen)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[::2, 5:] = 0
    ids[mask == 0] = 0
    y = torch.randint(0, 2, (n,), generator=gen)
    items = [{"input_ids": ids[i], "attention_mask": mask[i], "label": y[i]} for i in range(n)]
    return from_torch(items), items


def _brute_grads(model, items, names) -> torch.Tensor:
    """∇ℓ_i one example at a time through transformers' own forward (its 2-D mask path)."""
    params = [model.get_parameter(n) for n in names]
    rows = []
    for it in items:
        out = model(input_ids=it["input_ids"][None], attention_mask=it["attention_mask"][None]).logits
        loss = torch.nn.functional.cross_entropy(out, it["label"][None])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_grad_dot_on_dict_batches_matches_a_per_example_loop():
    model = _bert()
    task = AttributionTask(model, layers=LAYERS, gradients="generic")
    assert task.padding_mask_4d and expands_padding_mask(model)
    train, train_items = _dict_data(10, 0)
    test, test_items = _dict_data(3, 1)
    scores = make_method("grad-dot", task).cache(train).attribute(ExampleLoss(test))
    G = _brute_grads(model, train_items, task.param_names)
    Gt = _brute_grads(model, test_items, task.param_names)
    np.testing.assert_allclose(scores, (Gt @ G.T).numpy(), rtol=1e-4, atol=1e-6)


def test_influence_under_sdpa_switches_to_eager_with_the_same_scores():
    train, _ = _dict_data(8, 0)
    test, _ = _dict_data(2, 1)
    sdpa, eager = _bert("sdpa"), _bert("eager")
    assert sdpa.config._attn_implementation == "sdpa"
    scores = {}
    for name, model in (("sdpa", sdpa), ("eager", eager)):
        task = AttributionTask(model, layers=LAYERS)
        with pytest.warns(RuntimeWarning, match="eager") if name == "sdpa" else _no_warning():
            scores[name] = make_method("if-cg", task, damping=1e-2).cache(train).attribute(ExampleLoss(test))
    assert sdpa.config._attn_implementation == "eager"
    np.testing.assert_allclose(scores["sdpa"], scores["eager"], rtol=1e-4, atol=1e-6)
    assert np.isfinite(scores["sdpa"]).all() and np.abs(scores["sdpa"]).max() > 0


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


class _NoForwardAD(torch.nn.Module):
    """Stands for a model whose fused attention has no forward-mode rule and cannot switch."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        raise NotImplementedError(
            "Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu that does not support it"
        )


def test_attention_without_forward_ad_names_the_fix_in_one_line():
    task = AttributionTask(_NoForwardAD())
    with pytest.raises(GGDAError, match='attn_implementation="eager"') as err:
        task.forward(task.params(), torch.zeros(2, 3))
    assert "\n" not in str(err.value)


def test_other_models_keep_their_own_calls():
    """Not a Hugging Face model: no 4-D mask, dict batches reach it unchanged."""

    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x, attention_mask):
            assert attention_mask.ndim == 2 and not attention_mask.is_floating_point()
            return self.lin(x * attention_mask[..., None].float()).sum(1)

    task = AttributionTask(DictModel())
    assert not task.padding_mask_4d
    out = task.forward(
        task.params(), {"x": torch.ones(2, 3, 4), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    )
    assert out.shape == (2, 2)


class _Branchy(torch.nn.Module):
    """Branches on an input value, as transformers' mask builder does (``if mask.all():``)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) if bool(x.sum() > 0) else -self.lin(x)


def test_input_dependent_branches_under_vmap_name_the_fix_in_one_line():
    from ggda.gradients import per_example_gradients

    task = AttributionTask(_Branchy())
    with pytest.raises(GGDAError, match="override forward") as err:
        per_example_gradients(task, np.ones((4, 3), np.float32), np.zeros(4, np.int64))
    assert "\n" not in str(err.value)


def test_every_grouping_on_dict_batches_of_a_plain_hf_task():
    from ggda.groups import make_grouping

    train, _ = _dict_data(24, 0)
    task = AttributionTask(_bert(), layers=LAYERS)
    for method, options in [
        ("random", {}),
        ("repr-kmeans", {}),
        ("grad-kmeans", {}),
        ("grad-kmeans", {"features": "projected", "projection_dim": 8}),
    ]:
        for per_class in (False, True):
            g = make_grouping(method, train, n_groups=4, task=task, per_class=per_class, **options)
            assert g.labels.shape == (24,) and np.array_equal(np.unique(g.labels), np.arange(4))
            assert not per_class or g.meta["purity"] == 1.0
    with pytest.raises(GGDAError, match="repr-kmeans or grad-kmeans"):
        make_grouping("kmeans", train, n_groups=4)
