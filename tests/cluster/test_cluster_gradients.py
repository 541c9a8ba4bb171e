"""Gradients across 1, 2 and 3 Dask stages (worker processes) equal plain PyTorch autograd;
each stage hands its input's gradient back to the previous stage's worker; what autograd
keeps is released when the request ends or fails."""

from __future__ import annotations

import pytest
import torch

from tests.core.grad_helpers import metric, torch_grads
from tests.core.helpers import hf_model, ids_of
from tpmlab.errors import ExecutionError

from .conftest import deploy

PROMPT = "The Eiffel Tower is located in the city of"
TOL = {"atol": 1e-5, "rtol": 1e-4}
CASES = [("tiny-llama", 1), ("tiny-llama", 2), ("tiny-llama", 3), ("tiny-gpt2", 2),
         ("tiny-gpt-neox", 3), pytest.param(("smollm2-135m", 2), marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}stages")
def pair(request, lab, ref_lab):
    name, stages = request.param
    model = deploy(lab, name, stages)
    assert model.info.n_stages == stages
    yield model, ref_lab.model(name)
    lab.undeploy(name)


def _held(model) -> list[int]:
    return [s["requests"] + s["held"] + s["autograd_states"] + s["autograd_bytes"]
            for s in model.lab.backend.memory(model.name)]


def test_grads_match_torch_on_every_stage_count(pair):
    model, ref = pair
    torch.manual_seed(0)
    v = torch.randn(model.d_model) * 0.1
    last = model.adapter.n_layers - 1
    with model.trace(PROMPT) as tr:
        model.layers[0].output += v  # the same constant on the first and the last stage:
        model.layers[last].output += v  # its gradient is summed over both
        layers = [layer.output for layer in model.layers]
        w = model.final_norm.param("weight")
        loss = metric(model.output.logits)
        loss.backward()
        grads = [h.grad.save() for h in layers]
        embed_grad = model.embed.output.grad.save()
        w_grad = w.grad.save()
        v_grad = tr.grad(v).save()
        # a backward node on the first stage reading a forward value of the last stage
        mixed = (layers[0].grad.sum() * model.output.logits[0, -1, 0]).save()
    assert len(tr.result.meta["autograd_bytes"]) == model.info.n_stages
    # the same plan in process (equal to plain PyTorch autograd: tests/core/test_gradients.py)
    with ref.trace(PROMPT) as rt:
        ref.layers[0].output += v
        ref.layers[last].output += v
        rl = [layer.output for layer in ref.layers]
        rw = ref.final_norm.param("weight")
        ref_logit = ref.output.logits[0, -1, 0].save()
        metric(ref.output.logits).backward()
        rg = [h.grad.save() for h in rl]
        re = ref.embed.output.grad.save()
        rwg = rw.grad.save()
        rv = rt.grad(v).save()
    for ours, theirs in zip(grads, rg):
        torch.testing.assert_close(ours.value, theirs.value, **TOL)
    torch.testing.assert_close(v_grad.value, rv.value, **TOL)
    torch.testing.assert_close(w_grad.value, rwg.value, **TOL)
    torch.testing.assert_close(embed_grad.value, re.value, **TOL)
    torch.testing.assert_close(mixed.value, grads[0].value.sum() * ref_logit.value, **TOL)
    assert _held(model) == [0] * model.info.n_stages


def test_in_process_reference_is_plain_torch(pair):
    model, ref = pair
    with ref.trace(PROMPT):
        metric(ref.output.logits).backward()
        g = [layer.output.grad.save() for layer in ref.layers]
    want = torch_grads(hf_model(ref), ref.adapter, ids_of(ref, PROMPT))
    for ours, theirs in zip(g, want["layers"]):
        torch.testing.assert_close(ours.value, theirs, **TOL)


def test_a_gradient_written_on_a_later_stage_reaches_the_first(pair):
    model, ref = pair
    k = model.adapter.n_layers - 1
    for m in (model, ref):
        with m.trace(PROMPT):
            metric(m.output.logits).backward()
            m.layers[k].output.grad[:, :-1] = 0  # only the last position's gradient goes on
            m.layers[k].output.grad *= 2
            first = m.layers[0].output.grad.save()
        m._first = first.value
    torch.testing.assert_close(model._first, ref._first, **TOL)


def test_inputs_embeds_gradient_across_stages(pair):
    model, ref = pair
    torch.manual_seed(1)
    x = torch.randn(2, 4, model.d_model)
    with model.trace(inputs_embeds=x) as tr:
        metric(model.output.logits).backward()
        gx = tr.grad(x).save()
    want = torch_grads(hf_model(ref), ref.adapter, embeds=x)
    torch.testing.assert_close(gx.value, want["embeds"], **TOL)


def test_a_failing_backward_leaves_nothing_behind(pair):
    model, _ = pair
    with pytest.raises(ExecutionError):
        with model.trace(PROMPT):
            metric(model.output.logits).backward()
            g = model.layers[0].output.grad.flatten()
            g[g.abs().argmax() + 10**9].save()  # out of range, found only while it runs
    assert _held(model) == [0] * model.info.n_stages
    with model.trace(PROMPT):  # and the stages go on
        metric(model.output.logits).backward()
        ok = model.layers[0].output.grad.save()
    assert ok.value.shape[-1] == model.d_model
