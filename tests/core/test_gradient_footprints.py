"""A gradient request of a shape the engine measured before runs the model without
autograd's saved-tensor hooks (tpmlab.runtime.footprints) and keeps every guarantee of the
counted path: the same gradients, the same autograd bytes, the same limit error, and
nothing held once it finished, failed or passed its deadline, even while its error's
traceback is kept (as a notebook keeps the last one)."""

from __future__ import annotations

import time
import weakref

import pytest
import torch

from tests.core.grad_helpers import metric, slow_backward, torch_grads
from tests.core.helpers import hf_model, ids_of
from tests.plan_strategies import recording
from tpmlab.errors import ExecutionError, LimitError, RequestTimeoutError
from tpmlab.ir.validate import Limits
from tpmlab.runtime import backward
from tpmlab.runtime.footprints import MARGIN, Footprints, shape_key

PROMPT = "The Eiffel Tower is located in the city of"
NOTHING = {"autograd_states": 0, "autograd_bytes": 0}


@pytest.fixture(scope="module")
def llama(local_lab):
    return local_lab.model("tiny-llama")


def _host(model):
    return model.lab.backend.host(model.name)


@pytest.fixture
def packs(monkeypatch):
    """How many tensors autograd's pack hook saw, request by request."""
    calls = []
    pack = backward.Backprop._pack

    def counted(self, t):
        calls.append(1)
        return pack(self, t)

    monkeypatch.setattr(backward.Backprop, "_pack", counted)
    return calls


@pytest.fixture
def activations(llama):
    """Weak references to every layer's MLP activation in the next forwards: autograd saves
    each one for the backward, so it lives exactly as long as the request's graph."""
    refs: list[weakref.ref] = []
    hf = hf_model(llama)
    layers = hf.get_submodule(llama.adapter.layers)
    handles = [layer.mlp.act_fn.register_forward_hook(
        lambda m, a, out: refs.append(weakref.ref(out))) for layer in layers]
    yield refs
    for h in handles:
        h.remove()


def _grad_trace(model, prompt=PROMPT, layer=0):
    with model.trace(prompt) as tr:
        metric(model.output.logits).backward()
        g = model.layers[layer].output.grad.save()
    return g.value, tr.result.meta


def test_a_repeated_shape_skips_the_hooks_with_the_same_result(llama, packs):
    first, meta1 = _grad_trace(llama, layer=1)
    counted = len(packs)
    assert counted > 40  # every tensor the model saved, one call each
    packs.clear()
    second, meta2 = _grad_trace(llama, layer=1)
    assert len(packs) < 8  # the plan's own nodes only
    assert meta2["autograd_bytes"] == meta1["autograd_bytes"]
    assert torch.equal(first, second)
    want = torch_grads(hf_model(llama), llama.adapter, ids_of(llama, PROMPT))["layers"][1]
    torch.testing.assert_close(second, want, atol=1e-5, rtol=1e-4)
    assert _host(llama).autograd_held() == NOTHING


def test_another_prompt_of_the_same_length_reuses_the_figure(llama, packs):
    _grad_trace(llama, "one two three four five", layer=2)
    packs.clear()
    other = "six seven eight nine ten"
    assert ids_of(llama, other).shape == ids_of(llama, "one two three four five").shape
    g, _ = _grad_trace(llama, other, layer=2)
    assert len(packs) < 8
    want = torch_grads(hf_model(llama), llama.adapter, ids_of(llama, other))["layers"][2]
    torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4)


def test_the_limit_raises_the_same_error_after_the_shape_was_measured(llama, packs):
    """Near or over its limit a request is counted tensor by tensor whatever was measured:
    the error (and the bytes it names) are those of a first request of that shape."""
    host = _host(llama)
    with recording(llama, llama.trace("Limits are kept by the hooks")) as t:
        metric(llama.output.logits).backward()
        llama.layers[0].output.grad.save()
    plan = t.plan()
    fresh = Footprints()
    host.footprints, kept = fresh, host.footprints
    try:
        with pytest.raises(LimitError, match="backward would keep") as first:
            host.run(plan, limits=Limits(max_autograd_bytes=4096))
        assert len(fresh) == 0  # a forward that failed records nothing
        _, meta = host.run(plan)
        measured = fresh.get(shape_key(plan))
        assert measured is not None and meta["autograd_bytes"][0] >= measured > 4096
        for limit in (4096, measured + 1, MARGIN * measured - 1):
            packs.clear()
            if limit < meta["autograd_bytes"][0]:
                with pytest.raises(LimitError, match="backward would keep") as again:
                    host.run(plan, limits=Limits(max_autograd_bytes=limit))
                if limit == 4096:
                    assert str(again.value) == str(first.value)
            else:
                host.run(plan, limits=Limits(max_autograd_bytes=limit))
                assert len(packs) > 40  # counted tensor by tensor
            assert host.autograd_held() == NOTHING
        packs.clear()
        _, meta = host.run(plan, limits=Limits(max_autograd_bytes=MARGIN * measured + 10**6))
        assert len(packs) < 8  # far enough under the limit: the measured figure
        assert meta["autograd_bytes"][0] >= measured
    finally:
        host.footprints = kept
    assert host.autograd_held() == NOTHING


def test_a_failure_mid_backward_without_the_hooks_frees_the_graph(llama, packs, activations):
    def failing():
        with llama.trace(PROMPT):
            metric(llama.output.logits).backward()
            g = llama.layers[0].output.grad.flatten()
            g[g.abs().argmax() + 10**9].save()  # out of range, found only in the backward

    with pytest.raises(ExecutionError):
        failing()  # measures the shape (its forward finished)
    packs.clear()
    activations.clear()
    with pytest.raises(ExecutionError) as kept:  # its traceback stays alive below
        failing()
    assert len(packs) < 8
    assert activations and all(r() is None for r in activations)
    assert _host(llama).autograd_held() == NOTHING
    assert kept.value is not None


def test_a_failure_in_the_forward_without_the_hooks_frees_the_graph(llama, packs, activations):
    def request(index):
        with llama.trace(PROMPT):
            h = llama.layers[1].output
            h[0, 0, torch.tensor([index])].save()  # out of range: fails in the forward
            metric(llama.output.logits).backward()
            llama.layers[0].output.grad.save()

    request(5)  # measures the shape (the index is a value: the same shape)
    packs.clear()
    activations.clear()
    with pytest.raises(ExecutionError) as kept:
        request(10**9)
    assert len(packs) < 8
    assert activations and all(r() is None for r in activations)
    assert _host(llama).autograd_held() == NOTHING
    assert kept.value is not None


def test_a_deadline_without_the_hooks_frees_the_graph(llama, packs, activations):
    with pytest.raises(RequestTimeoutError):
        slow_backward(llama, PROMPT, timeout=1.0)  # measures the shape
    packs.clear()
    activations.clear()
    start = time.monotonic()
    with pytest.raises(RequestTimeoutError, match="deadline") as kept:
        slow_backward(llama, PROMPT, timeout=1.0)
    assert time.monotonic() - start < 4.0
    assert len(packs) < 8
    assert activations and all(r() is None for r in activations)
    assert _host(llama).autograd_held() == NOTHING
    assert kept.value is not None


def test_a_finished_request_without_the_hooks_frees_the_graph(llama, activations):
    _grad_trace(llama, layer=3)
    activations.clear()
    _grad_trace(llama, layer=3)
    assert activations and all(r() is None for r in activations)


def test_the_shape_key_ignores_values_and_lines_only():
    from tpmlab.ir.args import Ref, TensorRef
    from tpmlab.ir.plan import Invoke, Node, Plan

    def plan(ids, op="add", line="x.py:1", names=("t0", "c0"), c=None):
        c = torch.ones(2) if c is None else c
        return Plan(model="m", model_version="v", invokes=[Invoke("tokens", [names[0]])],
                    nodes=[Node(0, "point", path="a", io="output", line=line),
                           Node(1, op, args=[Ref(0), TensorRef(names[1])], line=line)],
                    tensors={names[0]: ids, names[1]: c})

    base = shape_key(plan(torch.tensor([1, 2, 3])))
    assert shape_key(plan(torch.tensor([4, 5, 6]), line="y.py:9")) == base
    assert shape_key(plan(torch.tensor([1, 2, 3]), names=("sha-b", "sha-a"))) == base
    assert shape_key(plan(torch.tensor([1, 2, 3]), c=torch.zeros(2))) == base
    assert shape_key(plan(torch.tensor([1, 2, 3]), c=torch.zeros(3))) != base
    assert shape_key(plan(torch.tensor([1, 2, 3, 4]))) != base
    assert shape_key(plan(torch.tensor([1.0, 2.0, 3.0]))) != base
    assert shape_key(plan(torch.tensor([1, 2, 3]), op="mul")) != base


def test_footprints_keep_the_most_recent_shapes():
    f = Footprints(size=2)
    f.record(("a",), 10)
    f.record(("b",), 20)
    assert f.get(("a",)) == 10  # now the most recent
    f.record(("c",), 30)
    assert f.get(("b",)) is None and f.get(("a",)) == 10 and len(f) == 2
    assert f.usable(("a",), None) == 10
    assert f.usable(("a",), MARGIN * 10) == 10
    assert f.usable(("a",), MARGIN * 10 - 1) is None
