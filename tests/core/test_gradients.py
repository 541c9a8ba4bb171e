"""Gradients through the in-process engine equal plain PyTorch autograd; the backward is a
validated plan node; forward-only requests pay nothing; deployed weights never change."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_MODELS
from tests.core.grad_helpers import metric, torch_grads
from tests.core.helpers import hf_model, ids_of
from tests.plan_strategies import recording
from tpmlab.errors import BackwardFlowError, LimitError, PlanError, ShapeError
from tpmlab.ir.codec import encode_plan
from tpmlab.ir.validate import Limits

PROMPT = "The Eiffel Tower is located in the city of"
TOL = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(scope="module", params=TINY_MODELS + [pytest.param("smollm2-135m",
                                                                   marks=pytest.mark.slow)])
def model(request, local_lab):
    return local_lab.model(request.param)


@pytest.fixture(scope="module")
def llama(local_lab):
    return local_lab.model("tiny-llama")


def _final_norm_param(model) -> str:
    return f"{model.adapter.final_norm}.weight"


def test_grads_at_every_layer_and_of_the_final_norm_match_torch(model):
    with model.trace(PROMPT):
        layers = [layer.output for layer in model.layers]
        w = model.final_norm.param("weight")
        loss = metric(model.output.logits)
        loss.backward()
        grads = [h.grad.save() for h in layers]
        embed_grad = model.embed.output.grad.save()
        w_grad = w.grad.save()
        value = loss.save()
    hf = hf_model(model)
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    ref = torch_grads(hf, model.adapter, ids_of(model, PROMPT), params=(_final_norm_param(model),))
    torch.testing.assert_close(value.value, ref["loss"], **TOL)
    for ours, theirs in zip(grads, ref["layers"]):
        torch.testing.assert_close(ours.value, theirs, **TOL)
    torch.testing.assert_close(embed_grad.value, ref["embeds"], **TOL)
    torch.testing.assert_close(w_grad.value, ref["params"][_final_norm_param(model)], **TOL)
    assert grads[-1].value.abs().sum() > 0
    # returned, never applied: the shared weights are unchanged and hold no gradient
    for n, p in hf.named_parameters():
        assert p.grad is None and not p.requires_grad
        assert torch.equal(p, before[n])
    assert model.lab.backend.host(model.name).weights.restores == 0


def test_a_written_gradient_is_what_flows_on(llama):
    k = 2
    with llama.trace(PROMPT):
        before = llama.layers[k - 1].output
        metric(llama.output.logits).backward()
        h = llama.layers[k].output
        h.grad = h.grad * 0.5
        scaled = h.grad.save()
        g = before.grad.save()
    ref = torch_grads(hf_model(llama), llama.adapter, ids_of(llama, PROMPT), scale=(k, 0.5))
    torch.testing.assert_close(g.value, ref["layers"][k - 1], **TOL)
    torch.testing.assert_close(scaled.value, ref["layers"][k], **TOL)  # retained after the hook
    with llama.trace(PROMPT):
        metric(llama.output.logits).backward()
        llama.layers[k].output.grad[:] = 0
        zero = llama.layers[0].output.grad.save()
    assert torch.count_nonzero(zero.value) == 0


def test_grads_of_inputs_embeds_and_of_a_sent_constant_match_torch(model):
    torch.manual_seed(0)
    x = torch.randn(2, 5, model.d_model)
    v = torch.randn(model.d_model) * 0.1
    with model.trace(inputs_embeds=x) as tr:
        model.layers[1].output += v
        metric(model.output.logits).backward()
        gx = tr.grad(x).save()
        gv = tr.grad(v).save()
    ref = torch_grads(hf_model(model), model.adapter, embeds=x, add=(1, v))
    torch.testing.assert_close(gx.value, ref["embeds"], **TOL)
    torch.testing.assert_close(gv.value, ref["add"], **TOL)


def test_batched_invokes_get_their_own_rows_of_the_gradient(llama):
    prompts = ["The Eiffel Tower is in", "Hello"]
    with llama.trace() as tr:
        grads, losses = [], []
        for p in prompts:
            with tr.invoke(p):
                grads.append(llama.layers[1].output)
                losses.append(llama.output.logits[:, -1, 7].sum())
        (losses[0] + losses[1]).backward()
        saved = [g.grad.save() for g in grads]
    for p, s in zip(prompts, saved):
        ref = torch_grads(hf_model(llama), llama.adapter, ids_of(llama, p),
                          loss_fn=lambda lg: lg[:, -1, 7].sum())
        torch.testing.assert_close(s.value, ref["layers"][1], **TOL)


def test_forward_only_requests_pay_nothing(llama, monkeypatch):
    from tpmlab.runtime import backward

    made = []
    monkeypatch.setattr(backward.Backprop, "__init__",
                        lambda *a, **k: made.append(1) or (_ for _ in ()).throw(AssertionError))
    with llama.trace(PROMPT) as tr:
        llama.layers[1].output.save()
    assert not made and "autograd_bytes" not in tr.result.meta


def test_autograd_memory_is_counted_and_limited(llama):
    with llama.trace(PROMPT) as tr:
        metric(llama.output.logits).backward()
        llama.layers[0].output.grad.save()
    used = tr.result.meta["autograd_bytes"][0]
    assert used > 0
    host = llama.lab.backend.host(llama.name)
    with recording(llama, llama.trace(PROMPT)) as t:
        metric(llama.output.logits).backward()
        llama.layers[0].output.grad.save()
    with pytest.raises(LimitError, match="backward would keep"):
        host.run(t.plan(), limits=Limits(max_autograd_bytes=used // 2))
    assert host.weights.restores == 0


def _plan_error(model, record):
    with recording(model, model.trace(PROMPT)) as tr:
        record(tr)
    with pytest.raises(PlanError) as err:
        model.lab.run(model.name, encode_plan(tr.plan()))
    assert "test_gradients.py" in (err.value.line or ""), err.value
    return err.value


def test_a_gradient_read_before_its_backward_names_node_and_line(llama):
    def record(tr):
        g = llama.layers[1].output.grad
        g.save()
        metric(llama.output.logits).backward()
    err = _plan_error(llama, record)
    assert "before the backward" in str(err) and err.op == "grad"


def test_gradient_errors_are_clear(llama):
    def no_backward(tr):
        llama.layers[1].output.grad.save()
    assert "no backward" in str(_plan_error(llama, no_backward))

    def two(tr):
        metric(llama.output.logits).backward()
        llama.output.logits.sum().backward()
    assert "second backward" in str(_plan_error(llama, two))

    def not_scalar(tr):
        llama.output.logits[:, -1].backward()
    assert isinstance(_plan_error(llama, not_scalar), ShapeError)

    def into_forward(tr):
        h = llama.layers[1].output
        metric(llama.output.logits).backward()
        h[:] = h.grad
    assert "gradients flow only into saves" in str(_plan_error(llama, into_forward))

    def later(tr):
        h1, h3 = llama.layers[1].output, llama.layers[3].output
        metric(llama.output.logits).backward()
        h3.grad[:] = h1.grad
    err = _plan_error(llama, later)
    assert isinstance(err, BackwardFlowError) and "model.layers.3.output" in str(err)

    def of_a_computed_value(tr):
        h = llama.layers[1].output * 2
        metric(llama.output.logits).backward()
        h.grad.save()
    assert "module points" in str(_plan_error(llama, of_a_computed_value))


def test_backward_while_generating_is_refused(llama):
    with recording(llama, llama.generate(PROMPT, max_new_tokens=2)) as tr:
        metric(llama.output.logits).backward()
    with pytest.raises(PlanError, match="not while generating"):
        llama.lab.run(llama.name, encode_plan(tr.plan()))


def test_writing_the_first_layers_input_with_a_backward(llama):
    """The input embeddings' leaf is not the value the plan writes."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, llama.d_model)
    with llama.trace(inputs_embeds=x) as tr:
        llama.layers[0].input[:, 0] = 0
        metric(llama.output.logits).backward()
        gx = tr.grad(x).save()
    assert gx.value.shape == x.shape
    assert torch.count_nonzero(gx.value[0, 0]) == 0 and torch.count_nonzero(gx.value[0, 1:]) > 0
