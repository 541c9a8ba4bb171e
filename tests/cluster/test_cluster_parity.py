"""The same plans give the same tensors on 1, 2 and 3 Dask stages as in-process (contract 5),
on the default model, on a real LocalCluster of worker processes."""

from __future__ import annotations

import pytest
import torch

from .conftest import deploy

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
PROMPT = "The Eiffel Tower is located in the city of"
ATOL = 1e-4


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}stages")
def pair(request, lab, ref_lab):
    model = deploy(lab, MODEL, request.param)
    assert model.info.n_stages == request.param
    yield model, ref_lab.model(MODEL)
    lab.undeploy(MODEL)


def both(pair, body):
    """Run ``body(model)`` (a function that records a trace and returns proxies) on the
    cluster model and on the reference; return the two lists of values."""
    out = []
    for m in pair:
        proxies = body(m)
        out.append([p.value for p in proxies])
    return out


def close(a, b):
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y)
        return
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_events_match_in_process_probe(pair):
    m, r = pair
    assert m.info.events == r.info.events
    assert m.info.stage_starts[0] == -1 and len(m.info.stage_workers) == m.info.n_stages


def test_every_layer_and_logits(pair):
    def body(m):
        with m.trace(PROMPT):
            saved = [m.layers[i].output.save() for i in range(m.adapter.n_layers)]
            saved.append(m.output.logits.save())
        return saved

    got, want = both(pair, body)
    close(got, want)
    tok = pair[1].tokenizer
    assert tok.decode(got[-1][0, -1].argmax()) == " Paris"


def test_patch_one_layer_position(pair):
    def body(m):
        with m.trace(PROMPT):
            m.layers[7].output[:, -2] = 0.0
            logits = m.output.logits.save()
        return [logits]

    got, want = both(pair, body)
    close(got, want)


def test_cross_stage_patch_and_module_on_saved_value(pair):
    def body(m):
        with m.trace(PROMPT):
            early = m.layers[2].output[:, -1]
            m.layers[25].output[:, -1] = early
            lens = m.unembed(m.final_norm(m.layers[2].output)).save()
            logits = m.output.logits.save()
        return [lens, logits]

    got, want = both(pair, body)
    close(got, want)


def test_batch_of_invokes_of_different_lengths(pair):
    def body(m):
        with m.trace() as tr:
            with tr.invoke("Hi"):
                a = m.layers[12].output.save()
            with tr.invoke(PROMPT):
                m.layers[3].output[:, 0] *= 0.5
                b = m.layers[12].output.save()
                c = m.output.logits.save()
        return [a, b, c]

    got, want = both(pair, body)
    close(got, want)
    assert got[0].shape[1] < got[1].shape[1]  # each invoke comes back unpadded


def test_generation_with_per_step_patch(pair):
    outs = []
    for m in pair:
        with m.generate([PROMPT, "Hello"], max_new_tokens=4) as gen:
            with gen.all():
                m.layers[20].output[:, -1] *= 1.5
                h = m.layers[28].output.save()
        outs.append((gen.output_ids, h.value))
    (ids, h), (ref_ids, ref_h) = outs
    assert [t.tolist() for t in ids] == [t.tolist() for t in ref_ids]
    close(h, ref_h)
