"""Causal tracing and prompt-pair patching against a plain Hugging Face reimplementation."""

from __future__ import annotations

import pytest
import torch

import tpmlab.lenses
from tpmlab.lenses.contract import LensInputError

from .conftest import hf_model

PROMPT = "The Eiffel Tower is located in"


@pytest.fixture(scope="module")
def patching():
    return tpmlab.lenses.get("patching")


def _hf_run(hf, a, ids, target, *, eps=None, subj=None, patches=()):
    """Mean answer probability over the rows of ``eps`` with noise and clean-state patches."""
    rows = ids[None].expand(eps.shape[0] if eps is not None else 1, -1)
    hooks = []
    if eps is not None:
        def noise(mod, args, out):
            out = out.clone()
            out[:, subj] += eps
            return out
        hooks.append(hf.get_submodule(a.embed).register_forward_hook(noise))
    for path, p, vec in patches:
        def patch(mod, args, out, p=p, vec=vec):
            t = out[0] if isinstance(out, tuple) else out
            t[:, p] = vec
            return out
        hooks.append(hf.get_submodule(path).register_forward_hook(patch))
    try:
        with torch.no_grad():
            return hf(input_ids=rows).logits[:, -1].softmax(-1)[:, target].mean()
    finally:
        for h in hooks:
            h.remove()


def _clean_states(hf, paths, ids):
    states, hooks = {}, []
    for path in paths:
        hooks.append(hf.get_submodule(path).register_forward_hook(
            lambda m, a, out, path=path: states.__setitem__(
                path, (out[0] if isinstance(out, tuple) else out)[0].clone())))
    with torch.no_grad():
        hf(input_ids=ids[None])
    for h in hooks:
        h.remove()
    return states


@pytest.mark.parametrize("kind,window", [("resid", 1), ("mlp", 2)])
def test_causal_trace_equals_hf(engine, lab, patching, kind, window):
    model = engine.model("tiny-llama")
    a = model.adapter
    res = patching.causal_trace(model, PROMPT, subject="The Eiffel Tower", samples=3, seed=7,
                                kind=kind, window=window, max_invokes_per_pass=16)
    d = res.data
    hf = hf_model(lab, "tiny-llama")
    ids = d["input_ids"]
    subj = d["subject_positions"].tolist()
    assert subj == patching.subject_positions(model, PROMPT, "The Eiffel Tower") and len(subj) >= 2
    sigma = hf.get_submodule(a.embed).weight.std().item()
    assert d["noise_std"].item() == pytest.approx(3 * sigma, rel=1e-5)
    assert d["noise"].shape == (3, len(subj), a.d_model)
    target = d["answer_id"].item()
    p_corrupt = _hf_run(hf, a, ids, target, eps=d["noise"], subj=subj)
    torch.testing.assert_close(d["p_corrupt"], p_corrupt, rtol=1e-4, atol=1e-8)
    suffix = "" if kind == "resid" else f".{a.mlp}"
    paths = {i: f"{a.layers}.{i}{suffix}" for i in range(a.n_layers)}
    clean = _clean_states(hf, paths.values(), ids)
    for i in range(a.n_layers):
        win = [i] if kind == "resid" else patching._window(i, window, a.n_layers)
        for p in range(len(ids)):
            patches = [(paths[w], p, clean[paths[w]][p]) for w in win]
            ref = _hf_run(hf, a, ids, target, eps=d["noise"], subj=subj, patches=patches) - p_corrupt
            torch.testing.assert_close(d["effect"][i, p], ref, rtol=1e-3, atol=1e-8)
    # restoring the last layer's residual at the last position restores the clean answer
    if kind == "resid":
        torch.testing.assert_close(d["effect"][-1, -1] + d["p_corrupt"], d["p_clean"],
                                   rtol=1e-4, atol=1e-8)
    assert res.peak()["effect"] == d["effect"].max().item()
    assert res.plot().data[0].type == "heatmap" and len(res.table()) == d["effect"].numel()


def test_prompt_pairs_equal_hf(lab, patching):
    model = lab.model("tiny-gpt2")
    a = model.adapter
    res = patching.patch_pairs(model, "one two three four", "one two nine four",
                               answer=" five", wrong=" ten", kind="attn", max_invokes_per_pass=7)
    d = res.data
    hf = hf_model(lab, "tiny-gpt2")
    c = torch.tensor(model.tokenizer("one two three four")["input_ids"])
    x = torch.tensor(model.tokenizer("one two nine four")["input_ids"])
    good = model.tokenizer(" five", add_special_tokens=False)["input_ids"][0]
    bad = model.tokenizer(" ten", add_special_tokens=False)["input_ids"][0]
    paths = [f"{a.layers}.{i}.{a.attn}" for i in range(a.n_layers)]
    clean = _clean_states(hf, paths, c)

    def ld(ids, patches=()):
        hooks = [hf.get_submodule(path).register_forward_hook(
            lambda m, args, out, p=p, v=v: out[0].__setitem__((slice(None), p), v))
            for path, p, v in patches]
        with torch.no_grad():
            lg = hf(input_ids=ids[None]).logits[0, -1]
        for h in hooks:
            h.remove()
        return lg[good] - lg[bad]

    lc, lx = ld(c), ld(x)
    torch.testing.assert_close(d["ld_clean"], lc, rtol=1e-4, atol=1e-6)
    for i, path in enumerate(paths):
        for p in range(len(c)):
            ref = (ld(x, [(path, p, clean[path][p])]) - lx) / (lc - lx)
            torch.testing.assert_close(d["effect"][i, p], ref, rtol=1e-3, atol=1e-5)
    with pytest.raises(LensInputError, match="same number of tokens"):
        patching.patch_pairs(model, "one two", "one two three", answer=" a", wrong=" b")
