"""tpmlab gives the same tensors as plain Hugging Face hooks and as nnsight on the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_MODELS
from tests.core.helpers import hf_forward, hf_model, ids_of, layer_modules

PROMPT = "The Eiffel Tower is located in the city of"
ATOL = 1e-5


@pytest.fixture(scope="module", params=TINY_MODELS + [pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def model(request, local_lab):
    return local_lab.model(request.param)


def test_save_every_layer_matches_hf(model):
    with model.trace(PROMPT):
        saved = [layer.output.save() for layer in model.layers]
        logits = model.output.logits.save()
    ref, ref_logits = hf_forward(hf_model(model), model.adapter, ids_of(model, PROMPT))
    assert len(saved) == model.adapter.n_layers
    for ours, theirs in zip(saved, ref):
        torch.testing.assert_close(ours.value, theirs, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(logits.value, ref_logits, atol=ATOL, rtol=1e-5)


def test_patch_one_layer_and_position_matches_hf(model):
    layer = model.adapter.n_layers // 2
    v = torch.linspace(-1, 1, model.d_model)
    with model.trace(PROMPT):
        model.layers[layer].output[:, -1] += v
        after = model.layers[layer].output.save()
        logits = model.output.logits.save()

    def patch(out):
        out[:, -1] += v
        return out

    ref, ref_logits = hf_forward(hf_model(model), model.adapter, ids_of(model, PROMPT),
                                 patch=(layer, patch))
    torch.testing.assert_close(after.value, ref[layer], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(logits.value, ref_logits, atol=ATOL, rtol=1e-5)
    with model.trace(PROMPT):
        clean = model.output.logits.save()
    assert not torch.allclose(clean.value, logits.value), "the patch must change the logits"


def test_module_applied_to_saved_value_matches_hf(model):
    with model.trace(PROMPT):
        h = model.layers[1].output.save()
        lens = model.unembed(model.final_norm(h)).save()
        top = model.unembed(model.final_norm(h)).argmax(-1).save()
    hf = hf_model(model)
    with torch.inference_mode():
        dev = next(hf.parameters()).device
        ref = hf.get_submodule(model.adapter.unembed)(
            hf.get_submodule(model.adapter.final_norm)(h.value.to(dev))).cpu()
    torch.testing.assert_close(lens.value, ref, atol=ATOL, rtol=1e-5)
    assert torch.equal(top.value, ref.argmax(-1))


def test_invokes_of_different_lengths_match_separate_runs(model):
    prompts = ["Hello", PROMPT, "One two three four"]
    with model.trace() as tr:
        saved = []
        for p in prompts:
            with tr.invoke(p):
                saved.append((model.layers[1].output.save(), model.output.logits.save()))
    hf = hf_model(model)
    for p, (layer, logits) in zip(prompts, saved):
        ref, ref_logits = hf_forward(hf, model.adapter, ids_of(model, p))
        assert layer.value.shape == ref[1].shape  # unpadded
        torch.testing.assert_close(layer.value, ref[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits.value, ref_logits, atol=1e-4, rtol=1e-4)


def test_each_invoke_patches_only_its_rows(model):
    v = torch.full((model.d_model,), 3.0)
    with model.trace() as tr:
        with tr.invoke("Hello world"):
            model.layers[0].output[:, -1] += v
            patched = model.output.logits.save()
        with tr.invoke(PROMPT):
            untouched = model.output.logits.save()
    hf = hf_model(model)
    _, ref_clean = hf_forward(hf, model.adapter, ids_of(model, PROMPT))
    torch.testing.assert_close(untouched.value, ref_clean, atol=1e-4, rtol=1e-4)

    def patch(out):
        out[:, -1] += v
        return out

    _, ref_patched = hf_forward(hf, model.adapter, ids_of(model, "Hello world"), patch=(0, patch))
    torch.testing.assert_close(patched.value, ref_patched, atol=1e-4, rtol=1e-4)


def test_inputs_embeds_and_token_ids_agree(model):
    ids = ids_of(model, PROMPT)[0]
    with model.trace(input_ids=ids):
        emb = model.embed.output.save()
        last_from_ids = model.final_norm.output.save()
    with model.trace(inputs_embeds=emb.value[0]):
        last_from_embeds = model.final_norm.output.save()
    torch.testing.assert_close(last_from_embeds.value, last_from_ids.value, atol=ATOL, rtol=1e-5)


def test_generation_with_per_step_patch_matches_hf(model):
    v = torch.full((model.d_model,), 2.0)
    n_new, patch_step, layer = 4, 2, 1
    with model.generate(PROMPT, max_new_tokens=n_new) as gen:
        with gen.step(patch_step):
            model.layers[layer].output[:, -1] += v
        with gen.all():  # recorded after the patch, so step 2 saves the patched value
            outs = model.layers[layer].output.save()
    hf = hf_model(model)
    step = {"i": -1}
    ref_outs = []

    def count(module, args, kwargs):
        step["i"] += 1

    def hook(module, args, output):
        if step["i"] == patch_step:
            output = output.clone()
            output[:, -1] += v.to(output.device)
        return output

    def record(module, args, output):
        ref_outs.append(output.clone().cpu())

    layer_mod = layer_modules(hf, model.adapter)[layer]
    handles = [hf.register_forward_pre_hook(count, with_kwargs=True),
               layer_mod.register_forward_hook(hook), layer_mod.register_forward_hook(record)]
    try:
        with torch.inference_mode():
            ids = ids_of(model, PROMPT).to(next(hf.parameters()).device)
            ref_ids = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                  do_sample=False, pad_token_id=model.tokenizer.pad_token_id,
                                  temperature=None, top_k=None, top_p=None)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(gen.output_ids[0], ref_ids[0].cpu())
    assert len(outs.value) == n_new
    for ours, theirs in zip(outs.value, ref_outs):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
