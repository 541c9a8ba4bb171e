"""Attention lens: per-head outputs, direct logit attribution (exact sum identity) and the
head-alone lens, against plain Hugging Face hooks on the same weights."""

from __future__ import annotations

import pytest
import torch

import tpmlab.lenses
from tpmlab.lenses.artifact import ArtifactMismatchError

from .conftest import hf_model

IDS = torch.tensor([1, 55, 66, 77, 88, 99])


@pytest.fixture(scope="module")
def attention():
    return tpmlab.lenses.get("attention")


def _hf_reference(hf, a, ids, positions):
    """Per-head outputs, attention outputs and the final residual from hooks."""
    z, attn, x = {}, {}, {}
    hooks = []
    for i in range(a.n_layers):
        lp = f"{a.layers}.{i}"
        hooks.append(hf.get_submodule(f"{lp}.{a.o_proj}").register_forward_pre_hook(
            lambda m, args, i=i: z.__setitem__(i, args[0][0].clone())))
        hooks.append(hf.get_submodule(f"{lp}.{a.attn}").register_forward_hook(
            lambda m, args, out, i=i: attn.__setitem__(i, out[0][0].clone())))
    hooks.append(hf.get_submodule(f"{a.layers}.{a.n_layers - 1}").register_forward_hook(
        lambda m, args, out: x.__setitem__("final", out[0].clone())))
    with torch.no_grad():
        logits = hf(input_ids=ids[None]).logits[0]
    for h in hooks:
        h.remove()
    return z, attn, x["final"], logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gpt-neox"])
def test_heads_sum_to_the_layer_and_match_hf(lab, attention, name):
    model = lab.model(name)
    a = model.adapter
    res = attention.run(model, IDS, positions=(-1, 2), top_k=3)
    d = res.data
    L, P, H, T = d["dla"].shape
    assert (L, P, H, T) == (a.n_layers, 2, a.n_heads, 1)
    # exact decomposition: heads + bias term = the layer's attention contribution
    torch.testing.assert_close(d["dla"].sum(2) + d["bias_dla"], d["layer_dla"], rtol=1e-4, atol=1e-5)
    assert d["bias_dla"].shape == (L, P, T)  # GPT-2's c_proj bias, attributed on its own
    # against a plain computation
    hf = hf_model(lab, name)
    z, attn, x_final, logits = _hf_reference(hf, a, IDS, d["positions"])
    norm = hf.get_submodule(a.final_norm)
    W_U = hf.get_submodule(a.unembed).weight
    pos = d["positions"]
    xf = x_final[pos]
    if hasattr(norm, "variance_epsilon"):
        scale = norm.weight / (xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
        centre = lambda c: c  # noqa: E731
    else:
        scale = norm.weight / (xf.var(-1, keepdim=True, unbiased=False) + norm.eps).sqrt()
        centre = lambda c: c - c.mean(-1, keepdim=True)  # noqa: E731
    targets = logits[pos].argmax(-1)
    assert torch.equal(d["targets"][:, 0], targets)
    o_proj = hf.get_submodule(f"{a.layers}.0.{a.o_proj}")
    conv = type(o_proj).__name__ == "Conv1D"
    with torch.no_grad():
        for layer in range(a.n_layers):
            W = hf.get_submodule(f"{a.layers}.{layer}.{a.o_proj}").weight
            layer_ref = (centre(attn[layer][pos]) * scale) @ W_U[targets].T
            torch.testing.assert_close(d["layer_dla"][layer, :, 0], layer_ref.diagonal(),
                                       rtol=1e-4, atol=1e-5)
            for h in range(a.n_heads):
                sl = slice(h * a.head_dim, (h + 1) * a.head_dim)
                o = z[layer][pos][:, sl] @ (W[sl, :] if conv else W[:, sl].T)
                ref = ((centre(o) * scale) * W_U[targets]).sum(-1)
                torch.testing.assert_close(d["dla"][layer, :, h, 0], ref, rtol=1e-4, atol=1e-5)
                alone = hf.get_submodule(a.unembed)(norm(o)).log_softmax(-1)
                torch.testing.assert_close(d["alone_top_probs"][layer, :, h, 0],
                                           alone.max(-1).values.exp(), rtol=1e-4, atol=1e-6)


def test_full_decomposition_llama(lab):
    """No biases anywhere (RMSNorm, Llama): embeddings + every attention and MLP output,
    each through the linearised final norm, add up to the model's logits."""
    model = lab.model("tiny-llama")
    a = model.adapter
    attention = tpmlab.lenses.get("attention")
    res = attention.run(model, IDS, positions=(-1,), targets=[5, 300])
    with model.trace(input_ids=IDS):
        x = model.layers[-1].output[0, -1]
        scale = model.final_norm.param("weight") * (x.square().mean(-1, keepdim=True) + 1e-6).rsqrt()
        parts = [model.layers[0].input[0, -1]] + [model.layers[i].mlp.output[0, -1]
                                                  for i in range(a.n_layers)]
        other = model.unembed(torch.stack(parts) * scale)[:, torch.tensor([5, 300])].sum(0).save()
        logits = model.output.logits[0, -1, torch.tensor([5, 300])].save()
    assert model.config.rms_norm_eps == 1e-6
    total = res.data["layer_dla"][:, 0].sum(0) + other.value
    torch.testing.assert_close(total, logits.value, rtol=1e-4, atol=1e-4)


def test_translators_round_trip(lab, attention, tmp_path):
    model = lab.model("tiny-llama")
    a = model.adapter
    g = torch.Generator().manual_seed(0)
    heads = [(1, 0), (3, 2)]
    tr = attention.HeadTranslators(model.name, model.version, heads,
                                   up=torch.randn(2, a.d_model, 4, generator=g),
                                   down=torch.randn(2, a.d_model, 4, generator=g) * 0.1,
                                   bias=torch.randn(2, a.d_model, generator=g))
    path = tr.save(tmp_path / "heads.safetensors")
    loaded = attention.load_translators(path, model)
    assert loaded.heads == heads and torch.equal(loaded.up, tr.up)
    plain = attention.run(model, IDS, top_k=2)
    tuned = attention.run(model, IDS, top_k=2, translators=loaded)
    # DLA is untouched; the head-alone lens changes exactly on the translated heads
    torch.testing.assert_close(plain.data["dla"], tuned.data["dla"])
    changed = (plain.data["alone_top_probs"] - tuned.data["alone_top_probs"]).abs().amax((1, 3))
    assert changed[1, 0] > 0 and changed[3, 2] > 0 and changed[0].max() == 0 and changed[2].max() == 0
    # client-side reference for one translated head
    hf = hf_model(lab, "tiny-llama")
    z, _, _, _ = _hf_reference(hf, a, IDS, None)
    W = hf.get_submodule(f"{a.layers}.3.{a.o_proj}").weight
    sl = slice(2 * a.head_dim, 3 * a.head_dim)
    o = z[3][-1, sl] @ W[:, sl].T
    t = o + (o @ tr.down[1]) @ tr.up[1].T + tr.bias[1]
    with torch.no_grad():
        p = hf.lm_head(hf.get_submodule(a.final_norm)(t)).softmax(-1)
    torch.testing.assert_close(tuned.data["alone_top_probs"][3, 0, 2], p.topk(2).values,
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ArtifactMismatchError, match="trained on 'tiny-llama'"):
        attention.load_translators(path, lab.model("tiny-gpt2"))


def test_default_model_paris(engine, attention):
    model = engine.model("smollm2-135m")
    res = attention.run(model, "The Eiffel Tower is located in the city of", targets=[" Paris"])
    d = res.data
    assert d["dla"].shape == (30, 1, 9, 1) and res.target_tokens[0] == [" Paris"]
    torch.testing.assert_close(d["dla"].sum(2) + d["bias_dla"], d["layer_dla"], rtol=1e-4, atol=1e-4)
    assert d["dla"].max() > 1.0  # some head writes ' Paris' directly
    rows = res.table()
    assert len(rows) == 270 and {"layer", "head", "dla", "alone_top1"} <= set(rows[0])
    fig = res.plot()
    assert fig.data[0].type == "heatmap" and len(fig.data[0].z) == 30
