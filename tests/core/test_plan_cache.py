"""A repeated plan skips decoding and validation (:mod:`tpmlab.runtime.plan_cache`) and
gets exactly what a fresh request would: its own tensors, the same schedule."""

from __future__ import annotations

import pytest
import torch

from tpmlab.errors import PlanError
from tpmlab.ir.codec import encode_plan
from tpmlab.ir.plan import Plan
from tpmlab.ir.validate import Limits
from tpmlab.runtime import request
from tpmlab.runtime.plan_cache import PlanCache


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model("tiny-llama")


def blob_of(model) -> bytes:
    tr = model.trace(torch.tensor([5, 6, 7, 8]))
    with tr.recording():
        model.layers[0].output[:, -1] += torch.full((1,), 2.0)
        model.layers[1].output.save()
    return encode_plan(tr.plan())


def test_repeat_hits_and_owns_its_tensors(model):
    host = model.lab.backend.host(model.name)
    blob, cache, calls = blob_of(model), PlanCache(), []

    def admit():
        calls.append(1)
        plan = request.decode(blob, Limits())[0]
        return plan, request.admit(plan, model=model.name, info=host.info, limits=Limits(),
                                   meta_module=host._meta.get)

    p1, s1 = cache.get(blob, ("admit", Limits()), admit)
    p2, s2 = cache.get(blob, ("admit", Limits()), admit)
    assert len(calls) == 1 and cache.hits == 1 and s1 is s2
    assert p1.tensors and p1.tensors.keys() == p2.tensors.keys()
    for name, t in p1.tensors.items():  # a run writing into its constants changes no other run
        assert t is not p2.tensors[name] and torch.equal(t, p2.tensors[name])
        t.add_(1)
        assert not torch.equal(t, cache.get(blob, ("admit", Limits()), admit)[0].tensors[name])
    # other limits, other validation
    cache.get(blob, ("admit", Limits(max_nodes=50)), admit)
    assert len(calls) == 2


def test_refusals_are_not_kept_and_size_is_bounded():
    cache, calls = PlanCache(size=2), []

    def refuse():
        calls.append(1)
        raise PlanError("no")

    for _ in range(2):
        with pytest.raises(PlanError):
            cache.get(b"x", "c", refuse)
    assert len(calls) == 2
    for k in range(4):
        cache.get(bytes([k]), "c", lambda: (Plan("m", "", [], []), None))
    assert len(cache._entries) == 2


def test_an_in_process_repeat_skips_decode_and_validation(model):
    """The in-process engine keeps what it learned from a plan's bytes, as a first stage does:
    a repeated request gives the same values and the same digest, without a second admit."""
    host = model.lab.backend.host(model.name)

    def run():
        with model.trace(torch.tensor([5, 6, 7, 8])) as tr:
            model.layers[0].output[:, -1] += torch.full((1,), 2.0)
            out = model.layers[1].output.save()
        return out.value, tr.result.meta

    v1, m1 = run()
    hits = host.plans.hits
    v2, m2 = run()
    assert host.plans.hits == hits + 1
    assert torch.equal(v1, v2) and m1["plan_digest"] == m2["plan_digest"]
