"""``tracer.stop()`` inside ``model.generate``: the generation ends where nnsight 0.8's ends
(right after the last value recorded before the stop, at its step), with nnsight's values
bit for bit; no later layer of that step and no later step runs, and no tokens come back
(the Dask engine: tests/cluster/test_cluster_nnsight.py)."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

from tests.conftest import TINY_MODELS
from tests.nnsight_ports import PROMPT, nn_model_for, stop_in_generation

from .helpers import hf_model, layer_modules

pytest.importorskip("nnsight")

STEPS = 4


@pytest.mark.parametrize("name", TINY_MODELS)
def test_stop_in_generation_gives_nnsight_values_exactly(local_lab, name):
    model = local_lab.model(name)
    ours, theirs = stop_in_generation(model, nn_model_for(model))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model("tiny-llama")


@contextlib.contextmanager
def layer_calls(model):
    """Counts the calls of each decoder layer (by index) and of the unembedding (``"unembed"``)
    while the block runs."""
    hf = hf_model(model)
    counts: Counter = Counter()
    modules = {**dict(enumerate(layer_modules(hf, model.adapter))),
               "unembed": hf.get_submodule(model.adapter.unembed)}
    handles = [m.register_forward_pre_hook(lambda *_, k=k: counts.update([k]))
               for k, m in modules.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def test_no_later_layer_or_step_runs_after_the_stop(model):
    n = model.adapter.n_layers
    with layer_calls(model) as whole:
        with model.generate(PROMPT, max_new_tokens=STEPS) as gen:
            full = [model.layers[0].output.save() for _ in gen.iter[0:2]]
    assert whole == Counter({**dict.fromkeys(range(n), STEPS), "unembed": STEPS})
    assert len(gen.output_ids[0]) > 0
    with layer_calls(model) as stopped:
        with model.generate(PROMPT, max_new_tokens=STEPS) as gen:
            hs = []
            for step in gen.iter[0:STEPS]:
                hs.append(model.layers[0].output.save())
                if step == 1:
                    gen.stop()
    # step 0 ran whole; step 1 ran layer 0 only; steps 2 and 3 did not run
    assert stopped == Counter({0: 2, **dict.fromkeys(range(1, n), 1), "unembed": 1})
    assert gen.output_ids == [] and gen.generated_ids == [] and gen.text == []
    assert len(hs) == 2
    for a, b in zip(hs, full):
        torch.testing.assert_close(a.value, b.value, atol=0, rtol=0)


def test_a_stop_before_any_value_runs_nothing(model):
    with layer_calls(model) as calls:
        with model.generate(PROMPT, max_new_tokens=STEPS) as gen:
            gen.stop()
    assert calls == Counter() and gen.output_ids == []


def test_a_stop_in_a_step_block_ends_at_the_last_value_before_it(model):
    """nnsight stops right after the last value it was asked for: a stop alone in a later
    step's block ends the generation in the step of the value before it."""
    with layer_calls(model) as calls:
        with model.generate(PROMPT, max_new_tokens=STEPS) as gen:
            with gen.step(1):
                h = model.layers[1].output.save()
            with gen.step(3):
                gen.stop()
    assert calls[1] == 2 and calls[2] == 1 and calls["unembed"] == 1
    assert h.value.shape[1] == 1 and gen.output_ids == []


def test_a_block_of_several_steps_runs_once_before_the_stop(model):
    with model.generate(PROMPT, max_new_tokens=STEPS) as gen:
        with gen.steps(1, 3):
            h = model.layers[0].output.save()
            gen.stop()
    assert isinstance(h.value, torch.Tensor) and h.value.shape[1] == 1  # step 1's, one value


def test_a_stop_after_a_block_of_every_step_is_never_reached(model):
    """As in nnsight, a stop after ``gen.all()`` comes when the generation has ended."""
    with layer_calls(model) as calls:
        with model.generate(PROMPT, max_new_tokens=STEPS, eos_token_id=[]) as gen:
            with gen.all():
                h = model.layers[0].output.save()
            gen.stop()
    assert len(h.value) == STEPS and len(gen.generated_ids[0]) == STEPS
    assert calls["unembed"] == STEPS


def test_a_stop_after_a_loop_past_the_last_step_is_never_reached(model):
    """nnsight's ``for step in tracer.iter[:]`` waits for a step past the last: the stop
    after it never comes. A loop that ends within the steps is followed by its stop."""
    with layer_calls(model) as calls:
        with model.generate(PROMPT, max_new_tokens=STEPS, eos_token_id=[]) as gen:
            hs = [model.layers[0].output.save() for _ in gen.iter[:]]
            gen.stop()
    assert len(hs) == STEPS and len(gen.generated_ids[0]) == STEPS
    assert calls["unembed"] == STEPS
    with layer_calls(model) as calls:
        with model.generate(PROMPT, max_new_tokens=STEPS, eos_token_id=[]) as gen:
            hs = [model.layers[0].output.save() for _ in gen.iter[0:STEPS]]
            gen.stop()
    assert len(hs) == STEPS and gen.output_ids == []
    assert calls["unembed"] == STEPS - 1 and calls[0] == STEPS and calls[1] == STEPS - 1


def test_a_persistent_edit_applies_until_the_stop(model):
    v = torch.linspace(-1, 1, model.d_model)
    with model.edit() as (_, edited):
        edited.layers[0].output[:, -1] += v
    with edited.generate(PROMPT, max_new_tokens=STEPS) as gen:
        whole = [edited.layers[1].output.save() for _ in gen.iter[0:2]]
    with layer_calls(model) as calls:
        with edited.generate(PROMPT, max_new_tokens=STEPS) as gen:
            hs = []
            for step in gen.iter[0:STEPS]:
                hs.append(edited.layers[1].output.save())
                if step == 1:
                    gen.stop()
    assert len(hs) == 2 and calls[1] == 2 and calls["unembed"] == 1
    for a, b in zip(hs, whole):
        torch.testing.assert_close(a.value, b.value, atol=0, rtol=0)


def test_a_stopped_generation_is_billed_the_steps_it_ran(model):
    """No tokens come back, so the gateway reads the steps from the stop's step."""
    from tpmlab.gateway.units import steps_run

    with model.generate(PROMPT, max_new_tokens=STEPS) as gen:
        for step in gen.iter[0:STEPS]:
            model.layers[0].output.save()
            if step == 2:
                gen.stop()
    assert steps_run(gen.plan(), gen.result.values) == 2
    with model.generate(PROMPT, max_new_tokens=STEPS, eos_token_id=[]) as gen:
        model.layers[0].output.save()
    assert steps_run(gen.plan(), gen.result.values) == STEPS
