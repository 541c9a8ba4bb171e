"""In process, what autograd keeps for a request is released when the request finishes,
fails in the middle of its backward, or passes its deadline there; the model goes on
serving (gradients equal to plain PyTorch after each)."""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch

from tests.core.grad_helpers import metric, slow_backward, torch_grads
from tests.core.helpers import hf_model, ids_of
from tests.plan_strategies import recording
from tpmlab.errors import ExecutionError, LimitError, RequestTimeoutError
from tpmlab.ir.validate import Limits

PROMPT = "The Eiffel Tower is located in the city of"
NOTHING = {"autograd_states": 0, "autograd_bytes": 0}


@pytest.fixture(scope="module")
def llama(local_lab):
    return local_lab.model("tiny-llama")


def _host(model):
    return model.lab.backend.host(model.name)


def _still_serves(model):
    with model.trace(PROMPT):
        metric(model.output.logits).backward()
        g = model.layers[0].output.grad.save()
    want = torch_grads(hf_model(model), model.adapter, ids_of(model, PROMPT))["layers"][0]
    torch.testing.assert_close(g.value, want, atol=1e-5, rtol=1e-4)
    assert _host(model).autograd_held() == NOTHING


def test_a_finished_request_holds_nothing(llama):
    with llama.trace(PROMPT) as tr:
        metric(llama.output.logits).backward()
        llama.layers[0].output.grad.save()
    assert tr.result.meta["autograd_bytes"][0] > 0  # it did keep something while it ran
    assert _host(llama).autograd_held() == NOTHING


def test_saved_gradients_go_as_soon_as_the_user_lets_go(llama):
    """No reference cycle holds a request's saves (pinned host memory on a GPU): they are
    freed when the last user reference goes, not when the garbage collector runs."""
    gc.collect()
    gc.disable()
    try:
        with llama.trace(PROMPT) as tr:
            metric(llama.output.logits).backward()
            saved = [llama.layers[i].output.grad.save() for i in range(2)]
        refs = [weakref.ref(s.value) for s in saved]
        assert all(r() is not None for r in refs)
        del tr, saved
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


def test_a_failure_mid_backward_holds_nothing(llama):
    with pytest.raises(ExecutionError):
        with llama.trace(PROMPT):
            metric(llama.output.logits).backward()
            g = llama.layers[0].output.grad.flatten()
            g[g.abs().argmax() + 10**9].save()  # out of range, found only in the backward
    assert _host(llama).autograd_held() == NOTHING
    _still_serves(llama)


def test_a_failure_in_the_forward_holds_nothing(llama):
    with recording(llama, llama.trace(PROMPT)) as t:
        metric(llama.output.logits).backward()
        llama.layers[0].output.grad.save()
    with pytest.raises(LimitError, match="backward would keep"):
        _host(llama).run(t.plan(), limits=Limits(max_autograd_bytes=1024))
    assert _host(llama).autograd_held() == NOTHING
    _still_serves(llama)


def test_a_deadline_stops_the_backward_and_holds_nothing(llama):
    start = time.monotonic()
    with pytest.raises(RequestTimeoutError, match="deadline"):
        slow_backward(llama, PROMPT, timeout=1.0)
    assert time.monotonic() - start < 4.0  # the chain of nodes (15 s or more) stopped at its deadline
    assert _host(llama).autograd_held() == NOTHING
    _still_serves(llama)
