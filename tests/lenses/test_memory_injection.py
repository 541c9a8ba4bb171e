"""Memory injection: the engine's effect equals a plain forward-hook injection."""

from __future__ import annotations

import pytest
import torch

import tpmlab.lenses

from .conftest import hf_model

PROMPTS = ["one two three four", "the cat sat on the", "alpha beta gamma"]
ANSWERS = [" five", " mat", " delta"]


@pytest.fixture(scope="module")
def mi():
    return tpmlab.lenses.get("memory_injection")


def _hf_prob(hf, a, ids, target, layer=None, vec=None, positions=None):
    handle = None
    if layer is not None:
        def hook(mod, args, out):
            idx = slice(None) if positions is None else torch.tensor(positions)
            out[0][:, idx, :] += vec
            return out
        handle = hf.get_submodule(f"{a.layers}.{layer}.{a.attn}").register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf(input_ids=ids[None]).logits[0, -1].softmax(-1)[target]
    finally:
        if handle:
            handle.remove()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_sweep_equals_hook_injection(engine, lab, mi, name):
    model = engine.model(name)
    a = model.adapter
    res = mi.sweep(model, PROMPTS, ANSWERS, memory="Paris France", variant="unembed",
                   layers=[0, 2], taus=[0.5, 3.0], positions=[-1, -2], max_invokes_per_pass=8)
    assert res.options["passes"] == 2  # 3 baselines + 12 injections, 8 invokes per pass
    hf = hf_model(lab, name)
    mem = model.tokenizer("Paris France", add_special_tokens=False)["input_ids"]
    m = hf.get_submodule(a.unembed).weight[mem].sum(0).detach()
    torch.testing.assert_close(res.data["memory"], m)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor(model.tokenizer(prompt)["input_ids"])
        target = res.data["answer_ids"][i].item()
        torch.testing.assert_close(res.data["before"][i], _hf_prob(hf, a, ids, target),
                                   rtol=1e-4, atol=1e-7)
        for j, layer in enumerate([0, 2]):
            for k, tau in enumerate([0.5, 3.0]):
                ref = _hf_prob(hf, a, ids, target, layer, tau * m, [-1, -2])
                torch.testing.assert_close(res.data["after"][i, j, k], ref, rtol=1e-4, atol=1e-7)
    assert (res.data["after"] != res.data["before"][:, None, None]).any()
    summary = res.summary()
    assert len(summary) == 4 and 0 <= summary[0]["fraction_improved"] <= 1
    row = summary[0]
    delta = res.data["after"][:, 0, 0] - res.data["before"]
    assert row["mean_delta"] == pytest.approx(delta.mean().item())
    assert row["median_delta"] == pytest.approx(delta.median().item())
    assert row["fraction_improved"] == pytest.approx((delta > 0).float().mean().item())
    assert len(res.table()) == 12 and res.plot().data[0].type == "heatmap"


def test_embed_variant_all_positions(lab, mi):
    model = lab.model("tiny-llama")
    m = mi.memory_vector(model, "Paris", "embed")
    hf = hf_model(lab, "tiny-llama")
    ids = hf.model.embed_tokens.weight[model.tokenizer("Paris", add_special_tokens=False)["input_ids"]]
    torch.testing.assert_close(m, ids.sum(0).detach())
    res = mi.sweep(model, PROMPTS[:1], ANSWERS[:1], memory=m, layers=[1], taus=[2.0])
    ids = torch.tensor(model.tokenizer(PROMPTS[0])["input_ids"])
    ref = _hf_prob(hf, model.adapter, ids, res.data["answer_ids"][0].item(), 1, 2.0 * m)
    torch.testing.assert_close(res.data["after"][0, 0, 0], ref, rtol=1e-4, atol=1e-7)


def test_progress_between_passes_stops_the_sweep_and_provenance_is_built_once(lab, mi):
    """The lens calls progress(done, total, text) before each pass and after the last; a
    callback that raises stops it there. A finished sweep's provenance holds every pass's plan
    digest and cannot be changed afterwards."""
    import dataclasses

    from tpmlab.lenses import Cancelled

    model = lab.model("tiny-llama")
    calls = []
    res = mi.sweep(model, PROMPTS, ANSWERS, memory="Paris", layers=[0, 1], taus=[1.0],
                   max_invokes_per_pass=3, progress=lambda *a: calls.append(a))
    assert res.options["passes"] == 3  # 3 baselines + 6 injections, 3 per pass
    assert calls == [(0, 3, "memory injection"), (1, 3, "memory injection"),
                     (2, 3, "memory injection"), (3, 3, "memory injection")]
    assert len(res.provenance.plan_digests) == 3 and len(set(res.provenance.plan_digests)) == 3
    assert res.provenance.plan_digest not in res.provenance.plan_digests  # a digest of all three
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.provenance.plan_digests = ()

    def stop_at_second(done, total, text):
        calls.append(done)
        if done == 1:
            raise Cancelled("enough")

    calls.clear()
    with pytest.raises(Cancelled, match="enough"):
        mi.sweep(model, PROMPTS, ANSWERS, memory="Paris", layers=[0, 1], taus=[1.0],
                 max_invokes_per_pass=3, progress=stop_at_second)
    assert calls == [0, 1]  # one pass ran; the second never started
