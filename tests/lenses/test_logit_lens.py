"""Logit lens: the last row is the model's own logits; every statistic matches a plain
Hugging Face computation with forward hooks on the same weights."""

from __future__ import annotations

import pytest
import torch

import tpmlab.lenses
from tpmlab.lenses.contract import LensInputError

from .conftest import hf_logits_hidden, hf_model

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def logit():
    return tpmlab.lenses.get("logit")


def _reference(hf, adapter, ids, top_k):
    paths = [f"{adapter.layers}.{i}" for i in range(adapter.n_layers)]
    logits, outs = hf_logits_hidden(hf, ids, paths)
    norm, head = hf.get_submodule(adapter.final_norm), hf.get_submodule(adapter.unembed)
    with torch.no_grad():
        lens = torch.stack([head(norm(outs[p][0])) for p in paths])  # [L, P, V]
    logq, logp = lens.log_softmax(-1), logits.log_softmax(-1)
    target = logits.argmax(-1)
    tl = lens.gather(-1, target[None, :, None].expand(len(paths), -1, 1))
    return {
        "logits": lens, "final": logits,
        "kl": (logp.exp() * (logp - logq)).sum(-1),
        "entropy": -(logq.exp() * logq).sum(-1),
        "target_prob": logq.exp().gather(-1, target[None, :, None].expand(len(paths), -1, 1))[..., 0],
        "target_rank": (lens > tl).sum(-1) + 1,
        "top_ids": logq.topk(top_k, -1).indices,
    }


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gpt-neox"])
def test_matches_plain_hf(lab, logit, name):
    model = lab.model(name)
    ids = torch.tensor([1, 523, 8821, 77, 3051, 919, 42])
    res = logit.run(model, ids, top_k=3, keep_logits=True, include_input=False)
    ref = _reference(hf_model(lab, name), model.adapter, ids, 3)
    d = res.data
    assert res.rows == [str(i) for i in range(model.adapter.n_layers)]
    torch.testing.assert_close(d["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d["kl"], ref["kl"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d["entropy"], ref["entropy"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d["target_prob"], ref["target_prob"], rtol=1e-4, atol=1e-6)
    assert torch.equal(d["target_rank"], ref["target_rank"])
    assert torch.equal(d["top_ids"], ref["top_ids"])
    assert torch.equal(d["target_ids"], ref["final"].argmax(-1))
    # the last row is the model's own output: final norm applied once, not twice
    torch.testing.assert_close(d["logits"][-1], ref["final"], rtol=1e-5, atol=1e-5)
    assert d["kl"][-1].abs().max() < 1e-4
    assert (d["target_rank"][-1] == 1).all()


def test_default_model_last_row_is_model_logits(engine, logit):
    model = engine.model("smollm2-135m")
    res = logit.run(model, PROMPT, top_k=5)
    with model.trace(PROMPT):
        final = model.output.logits[0, -1].softmax(-1).save()
    d = res.data
    assert res.rows[0] == "input" and res.rows[-1] == "29" and d["kl"].shape == (31, 10)
    assert res.top_tokens[-1][-1][0] == " Paris" and res.target_tokens[-1] == " Paris"
    assert d["kl"][-1].abs().max() < 1e-4
    torch.testing.assert_close(d["top_probs"][-1, -1], final.value.topk(5).values,
                               rtol=1e-4, atol=1e-6)
    # only small tensors came back
    assert "logits" not in d and all(v.numel() < 10_000 for v in d.values())
    # the model's answer emerges late: rank 1 in the last layers, far from it early on
    ranks = d["target_rank"][:, -1]
    assert ranks[-3:].eq(1).all() and ranks[1:10].min() > 100
    assert res.model_version == model.version and res.plan_digest.startswith("sha256:")


def test_batch_table_and_plot(lab, logit):
    model = lab.model("tiny-llama")
    prompts = ["one two three", "a longer prompt than the first one here"]
    batch = logit.run(model, prompts, top_k=2, layers=[0, -1])
    alone = logit.run(model, prompts[1], top_k=2, layers=[0, -1])
    assert len(batch) == 2 and batch[0].rows == ["input", "0", "3"]
    torch.testing.assert_close(batch[1].data["kl"], alone.data["kl"], rtol=1e-4, atol=1e-5)
    assert batch[0].data["kl"].shape[1] == len(model.tokenizer(prompts[0])["input_ids"])
    rows = batch[0].table()
    assert len(rows) == 3 * batch[0].data["kl"].shape[1]
    assert set(rows[0]) >= {"layer", "position", "token", "top1", "kl", "entropy", "target_rank"}
    assert isinstance(rows[0]["kl"], float)
    fig = batch[0].plot(metric="kl")
    assert fig.data[0].type == "heatmap" and len(fig.data[0].z) == 3
    with pytest.raises(LensInputError, match="unknown metric"):
        batch[0].plot(metric="nope")
