"""nnsight's tutorial operations on 2 Dask stages give nnsight 0.8's numbers on the same
weights (the ports of tests/nnsight_ports.py, also run in process in
tests/core/test_nnsight_parity.py)."""

from __future__ import annotations

import pytest
import torch

from tests.nnsight_ports import PORTS, nn_model_for

from .conftest import deploy

pytest.importorskip("nnsight")


@pytest.fixture(scope="module", params=["tiny-llama", pytest.param("smollm2-135m",
                                                                   marks=pytest.mark.slow)])
def pair(request, lab):
    model = deploy(lab, request.param, 2)
    assert model.info.n_stages == 2
    yield model, nn_model_for(model)
    lab.undeploy(request.param)


@pytest.mark.parametrize("port", PORTS, ids=lambda f: f.__name__)
def test_port_on_two_stages(pair, port):
    model, nn_model = pair
    ours, theirs = port(model, nn_model)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_stop_leaves_the_later_stage_idle(backend, pair):
    """A ``tracer.stop()`` after a value of stage 0: stage 1 runs no layers (its pass count
    stays put), and the value is the one of a whole pass."""
    model, _ = pair
    stage1 = backend.deployment(model.name).actors[1]
    before = stage1.memory().result()["passes"]
    with model.trace("The Eiffel Tower is") as tr:
        h = model.layers[0].output.save()
        tr.stop()
    assert stage1.memory().result()["passes"] == before
    with model.trace("The Eiffel Tower is"):
        whole = model.layers[0].output.save()
    assert stage1.memory().result()["passes"] == before + 1
    torch.testing.assert_close(h.value, whole.value)


def test_stop_in_generation_leaves_later_stages_and_steps_idle(backend, pair):
    """A ``tracer.stop()`` at step 1 of a generation of 4: after a value of stage 0, stage 0
    runs 2 passes and stage 1 one (step 0's); after a value of stage 1, both run 2. No
    tokens come back, and the values are those of the whole generation."""
    model, _ = pair
    stages = backend.deployment(model.name).actors

    def passes():
        return [s.memory().result()["passes"] for s in stages]

    def generate(layer, stop):
        with model.generate("The Eiffel Tower is", max_new_tokens=4, eos_token_id=[]) as gen:
            hs = []
            for step in gen.iter[0:4]:
                hs.append(model.layers[layer].output.save())
                if stop and step == 1:
                    gen.stop()
        return [h.value for h in hs], gen

    for layer, work in ((0, [2, 1]), (-1, [2, 2])):
        before = passes()
        whole, gen = generate(layer, stop=False)
        assert [a - b for a, b in zip(passes(), before)] == [4, 4]
        assert len(gen.generated_ids[0]) == 4
        before = passes()
        hs, gen = generate(layer, stop=True)
        assert [a - b for a, b in zip(passes(), before)] == work
        assert gen.output_ids == [] and len(hs) == 2
        for a, b in zip(hs, whole):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
