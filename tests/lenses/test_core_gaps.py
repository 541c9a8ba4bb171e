"""Behaviour of the tracing core that the lenses rely on."""

from __future__ import annotations

import pytest
import torch


def test_one_constant_used_twice(lab):
    """A tensor passed twice (or the same ids in two invokes) shares memory; the plan
    must still encode (safetensors refuses shared tensors unless they are copied)."""
    model = lab.model("tiny-llama")
    ids = torch.tensor([1, 5, 9, 13])
    pos = torch.arange(4)
    with model.trace() as tr:
        with tr.invoke(input_ids=ids):
            a = model.layers[0].output[0, pos].sum().save()
            b = model.layers[1].output[0, pos].sum().save()
        with tr.invoke(input_ids=ids):
            c = model.layers[0].output[0, pos].sum().save()
    torch.testing.assert_close(a.value, c.value)
    assert b.value.shape == ()


def test_topk_values_attribute(lab):
    model = lab.model("tiny-llama")
    with model.trace(torch.tensor([1, 5, 9])):
        top = model.output.logits[0, -1].topk(3).values.save()
    assert top.value.shape == (3,)


def test_dask_engine_unpadded_trace(lab):
    """One prompt (no padding, so no attention mask) on the Dask engine, whose stages run on
    worker processes, gives the in-process numbers; so does a padded batch of two."""
    from .conftest import _broken, lab_for

    try:
        dask_lab = lab_for("dask")
    except pytest.skip.Exception:
        pytest.fail(f"the Dask engine is unavailable: {_broken.get('dask')}")
    ids, short = torch.tensor([1, 5, 9, 13]), torch.tensor([2, 7])
    out = {}
    for name, engine in (("local", lab), ("dask", dask_lab)):
        model = engine.model("tiny-llama")
        with model.trace(input_ids=ids):
            alone = model.output.logits.save()
            hidden = model.layers[1].output.save()
        with model.trace() as tr:
            with tr.invoke(input_ids=ids):
                first = model.output.logits.save()
            with tr.invoke(input_ids=short):
                second = model.output.logits.save()
        out[name] = [alone.value, hidden.value, first.value, second.value]
    assert out["dask"][0].shape[-2] == len(ids) and out["dask"][3].shape[-2] == len(short)
    for ours, ref in zip(out["dask"], out["local"]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
