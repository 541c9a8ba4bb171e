"""The same interventions in tpmlab and in nnsight 0.8 on the same weights give the same tensors."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.conftest import TINY_MODELS
from tests.nnsight_ports import PORTS

nnsight = pytest.importorskip("nnsight")

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module", params=TINY_MODELS + [pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def pair(request, local_lab):
    """A tpmlab model and an nnsight wrapper around a separate copy of the same weights."""
    model = local_lab.model(request.param)
    loaded = model.source.load()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn_model = nnsight.LanguageModel(loaded.model, tokenizer=model.tokenizer)
    return model, nn_model


def _nn_layers(nn_model, adapter):
    env = nn_model
    for part in adapter.layers.split("."):
        env = getattr(env, part)
    return env


def test_save_every_layer_and_patch(pair):
    model, nn_model = pair
    k = model.adapter.n_layers // 2
    v = torch.linspace(-2, 2, model.d_model)
    with model.trace(PROMPT):
        model.layers[k].output[:, -1] += v
        ours = [layer.output.save() for layer in model.layers]
        logits = model.output.logits.save()
    layers = _nn_layers(nn_model, model.adapter)
    with nn_model.trace(PROMPT):
        theirs = list().save()
        for i in range(model.adapter.n_layers):
            if i == k:
                layers[i].output[:, -1] += v
            theirs.append(layers[i].output.clone())
        nn_logits = nn_model.output.logits.save()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.value, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.value, nn_logits, atol=1e-5, rtol=1e-5)


def test_module_applied_to_value(pair):
    model, nn_model = pair
    with model.trace(PROMPT):
        ours = model.unembed(model.final_norm(model.layers[1].output)).save()
    final_norm = nn_model
    for part in model.adapter.final_norm.split("."):
        final_norm = getattr(final_norm, part)
    unembed = getattr(nn_model, model.adapter.unembed)
    layers = _nn_layers(nn_model, model.adapter)
    with nn_model.trace(PROMPT):
        theirs = unembed(final_norm(layers[1].output)).save()
    torch.testing.assert_close(ours.value, theirs, atol=1e-5, rtol=1e-5)


def test_batch_of_invokes(pair):
    model, nn_model = pair
    prompts = ["Hi there", PROMPT]
    with model.trace() as tr:
        ours = []
        for p in prompts:
            with tr.invoke(p):
                ours.append(model.layers[0].output.save())
    layers = _nn_layers(nn_model, model.adapter)
    with nn_model.trace() as tr:
        theirs = list().save()
        for p in prompts:
            with tr.invoke(p):
                theirs.append(layers[0].output.clone())
    for a, b in zip(ours, theirs):
        n = a.value.shape[1]  # nnsight keeps the batch padding; tpmlab returns each invoke unpadded
        torch.testing.assert_close(a.value, b[:, -n:], atol=1e-4, rtol=1e-4)


def test_generation_with_per_step_patch(pair):
    model, nn_model = pair
    v = torch.full((model.d_model,), 2.0)
    with model.generate(PROMPT, max_new_tokens=3) as gen:
        with gen.step(1):
            model.layers[1].output[:, -1] += v
        with gen.all():
            ours = model.layers[1].output.save()
    layers = _nn_layers(nn_model, model.adapter)
    with nn_model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
        theirs = list().save()
        for step in tracer.iter[0:3]:
            if step == 1:
                layers[1].output[:, -1] += v
            theirs.append(layers[1].output.clone())
    assert len(ours.value) == len(theirs) == 3
    for a, b in zip(ours.value, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("port", PORTS, ids=lambda f: f.__name__)
def test_port(pair, port):
    model, nn_model = pair
    ours, theirs = port(model, nn_model)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
