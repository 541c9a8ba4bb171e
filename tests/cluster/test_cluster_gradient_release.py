"""On a Dask cluster of worker processes (2 stages), a gradient request that passes its
deadline in the middle of the backward, or fails there, leaves no gradient state and no
bytes of autograd's on any stage (each stage's own accounting: ``memory()``'s
``autograd_states``, ``autograd_bytes``, ``requests``, ``held``), and the stages go on
serving gradients equal to the in-process engine's."""

from __future__ import annotations

import time

import pytest
import torch

from tests.core.grad_helpers import metric, slow_backward
from tpmlab.errors import ExecutionError, RequestTimeoutError

from .conftest import deploy

PROMPT = "The Eiffel Tower is located in the city of"
NAME = "tiny-gpt2"


@pytest.fixture(scope="module")
def pair(lab, ref_lab):
    model = deploy(lab, NAME, 2)
    yield model, ref_lab.model(NAME)
    lab.undeploy(NAME)


def _held(model) -> list[dict[str, int]]:
    keys = ("requests", "held", "autograd_states", "autograd_bytes")
    return [{k: s[k] for k in keys} for s in model.lab.backend.memory(model.name)]


def _settled(model, within: float = 30.0) -> list[dict[str, int]]:
    """The stages' accounting once they are idle (a stage ends its part of a failed request
    in its own thread, moments after the client got the error)."""
    end = time.monotonic() + within
    while True:
        held = _held(model)
        if all(not any(s.values()) for s in held) or time.monotonic() > end:
            return held
        time.sleep(0.2)


def _still_serves(model, ref):
    grads = {}
    for m in (model, ref):
        with m.trace(PROMPT):
            metric(m.output.logits).backward()
            grads[m] = [layer.output.grad.save() for layer in m.layers]
    for ours, theirs in zip(grads[model], grads[ref]):
        torch.testing.assert_close(ours.value, theirs.value, atol=1e-5, rtol=1e-4)


def test_a_deadline_mid_backward_leaves_nothing_on_any_stage(pair):
    model, ref = pair
    with model.trace(PROMPT) as tr:  # a request that ends well kept something on each stage
        metric(model.output.logits).backward()
        model.layers[0].output.grad.save()
    assert sum(tr.result.meta["autograd_bytes"]) > 0, tr.result.meta["autograd_bytes"]
    start = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        slow_backward(model, PROMPT, timeout=2.0)  # 15 s or more of nodes on the last stage
    assert _settled(model) == [dict.fromkeys(("requests", "held", "autograd_states",
                                              "autograd_bytes"), 0)] * 2
    # the last stage stopped its backward at the deadline, not after the whole chain
    assert time.monotonic() - start < 5.0
    _still_serves(model, ref)


def test_a_failure_mid_backward_leaves_nothing_on_any_stage(pair):
    model, ref = pair
    with pytest.raises(ExecutionError):
        with model.trace(PROMPT):
            metric(model.output.logits).backward()
            g = model.layers[model.adapter.n_layers - 1].output.grad.flatten()
            g[g.abs().argmax() + 10**9].save()  # out of range, on the last stage's backward
    assert _settled(model) == [dict.fromkeys(("requests", "held", "autograd_states",
                                              "autograd_bytes"), 0)] * 2
    _still_serves(model, ref)


def test_a_measured_shape_fails_without_the_hooks_and_leaves_nothing(pair):
    """The second of two requests of one shape runs the stages' models without autograd's
    saved-tensor hooks (the first measured what they keep: tpmlab.runtime.footprints); its
    failure and its deadline leave nothing either."""
    model, ref = pair
    nothing = [dict.fromkeys(("requests", "held", "autograd_states", "autograd_bytes"), 0)] * 2
    for _ in range(2):
        with pytest.raises(ExecutionError):
            with model.trace(PROMPT):
                metric(model.output.logits).backward()
                g = model.layers[0].output.grad.flatten()
                g[g.abs().argmax() + 10**9].save()  # on the first stage's backward
        assert _settled(model) == nothing
    for _ in range(2):
        with pytest.raises(RequestTimeoutError):
            slow_backward(model, PROMPT, timeout=2.0)
        assert _settled(model) == nothing
    _still_serves(model, ref)
