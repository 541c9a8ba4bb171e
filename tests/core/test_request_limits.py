"""A request's own limits (a gateway passes its user's tier limits) hold while it runs, on the
in-process engine: at validation where sizes are known, at run time where they are not,
and never wider than the engine's own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tpmlab
from tests.plan_strategies import recording
from tpmlab.errors import LimitError
from tpmlab.ir.codec import decode_result, encode_plan
from tpmlab.ir.validate import Limits
from tpmlab.runtime.limits import limits_from_wire, limits_to_wire, request_limits

PROMPT = "The Eiffel Tower is located in the city of"  # 10 tokens
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model(MODEL)


def _blob(model, record, **generate) -> bytes:
    tracer = model.generate(PROMPT, **generate) if generate else model.trace(PROMPT)
    with recording(model, tracer) as tr:
        record(tr)
    return encode_plan(tr.plan())


def test_request_limits_are_the_minimum_of_the_engines_and_the_callers():
    engine = Limits(max_saved_bytes=1_000, max_nodes=50)
    asked = Limits(max_saved_bytes=10**12, max_nodes=10)
    held = request_limits(engine, asked)
    assert held.max_saved_bytes == 1_000 and held.max_nodes == 10
    for f in dataclasses.fields(Limits):
        assert getattr(held, f.name) == min(getattr(engine, f.name), getattr(asked, f.name))
    assert request_limits(engine, None) is engine
    assert limits_from_wire(limits_to_wire(held)) == held and limits_from_wire(None) is None
    with pytest.raises(ValueError, match="unknown limits"):
        limits_from_wire({"max_saved_bytes": 1, "max_everything": 2})


def test_saves_over_the_requests_limit_are_refused_at_validation(local_lab, model):
    blob = _blob(model, lambda tr: model.output.logits.save())  # [1, 10, 49152] float32
    backend = local_lab.backend
    with pytest.raises(LimitError, match="saves 1,966,080 bytes, over the limit of 10,000"):
        backend.run_values(MODEL, blob, limits=Limits(max_saved_bytes=10_000))
    with pytest.raises(LimitError, match="over the limit of 10,000"):
        backend.run(MODEL, blob, limits=Limits(max_saved_bytes=10_000))
    with pytest.raises(LimitError, match="over the limit of 10,000"):
        local_lab.run_values(MODEL, blob, limits=Limits(max_saved_bytes=10_000))
    values, _ = backend.run_values(MODEL, blob)  # the engine's own limits allow it
    assert values


def test_saves_of_unknown_size_are_held_to_the_requests_limit_at_run_time(local_lab, model):
    def record(gen):
        with gen.steps(1, None):
            model.output.logits.save()  # [1, 1, 49152] float32 = 196,608 bytes a step

    blob = _blob(model, record, max_new_tokens=3)
    with pytest.raises(LimitError, match="saved 393,216 bytes, over the limit of 200,000"):
        local_lab.backend.run_values(MODEL, blob, limits=Limits(max_saved_bytes=200_000))
    local_lab.backend.run_values(MODEL, blob)


def test_values_over_the_intermediate_limit_are_refused_at_run_time(local_lab, model):
    def record(gen):
        with gen.step(1):  # a later step: sizes known only at run time
            model.layers[2].output.repeat(1, 1, 400).sum().save()

    blob = _blob(model, record, max_new_tokens=2)
    with pytest.raises(LimitError, match=r"made a value of 102,400 bytes, over the limit of "
                                         r"50,000 bytes for one value") as err:
        local_lab.backend.run_values(MODEL, blob, limits=Limits(max_intermediate_bytes=50_000))
    assert err.value.op == "repeat" and "test_request_limits.py" in err.value.line
    local_lab.backend.run_values(MODEL, blob)


def test_a_request_cannot_widen_the_engines_limits():
    from tpmlab.runtime.backend import LocalBackend

    lab = tpmlab.Lab(LocalBackend(device="cpu", dtype=torch.float32,
                                  limits=Limits(max_saved_bytes=10_000)))
    small = lab.model(MODEL)
    blob = _blob(small, lambda tr: small.output.logits.save())
    with pytest.raises(LimitError, match="over the limit of 10,000"):
        lab.run_values(MODEL, blob, limits=Limits(max_saved_bytes=10**15))
    with pytest.raises(LimitError, match="over the limit of 10,000"):
        decode_result(lab.run(MODEL, blob, limits=Limits(max_saved_bytes=10**15)))
