"""Faults: a failing request leaves the stages clean; a killed stage worker fails the
request with a clear error, the deployment heals, and the next request works."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from tpmlab.cluster import StageLostError
from tpmlab.errors import ExecutionError, RequestTimeoutError

from .conftest import deploy

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
PROMPT = "The Eiffel Tower is located in the city of"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # goes on for many tokens without stopping


@pytest.fixture(scope="module")
def model(lab):
    m = deploy(lab, MODEL, 2)
    yield m
    lab.undeploy(MODEL)


def logits(m):
    with m.trace(PROMPT):
        out = m.output.logits.save()
    return out.value


def requests_held(lab, name=MODEL):
    return [s["requests"] for s in lab.backend.memory(name)]


def left_behind(lab, name=MODEL):
    """Per stage: requests' state and saves not yet handed to the client."""
    return [s["requests"] + s["held"] for s in lab.backend.memory(name)]


def test_saves_come_from_every_stage_and_nothing_stays(model, lab, ref_lab):
    ref = ref_lab.model(MODEL)
    outs = []
    for m in (model, ref):
        with m.trace(PROMPT):
            first = m.layers[0].output.save()
            last = m.layers[29].output.save()
        with m.generate(PROMPT, max_new_tokens=3) as gen:
            with gen.all():
                h = m.layers[29].output.save()
        outs.append([first.value, last.value, h.value])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert left_behind(lab) == [0, 0]


def test_late_or_orphan_collect_leaves_nothing(model, lab):
    dep = lab.backend.deployment(MODEL)
    # a request aborted before its collect arrives: the collect returns at once
    dep.actors[0].abort("aborted-early").result(timeout=30)
    t = time.monotonic()
    with pytest.raises(ExecutionError, match="aborted"):
        dep.actors[1].collect(b"junk", "aborted-early", 60).result(timeout=30)
    assert time.monotonic() - t < 10
    # a collect whose request never runs (its client went away) ends at its deadline
    with pytest.raises(RequestTimeoutError):
        dep.actors[1].collect(b"junk", "never-runs", 0.5).result(timeout=30)
    assert left_behind(lab) == [0, 0]


def test_runtime_error_does_not_poison_stages(model, ref_lab):
    with pytest.raises(ExecutionError, match="out of bounds"):
        with model.trace(PROMPT):
            model.layers[25].output[:, torch.tensor([400])].save()  # fails on stage 1, at run time
    assert left_behind(model.lab) == [0, 0]
    torch.testing.assert_close(logits(model), logits(ref_lab.model(MODEL)), atol=1e-4, rtol=1e-4)


def test_timeout_is_a_clear_error(model):
    with pytest.raises(RequestTimeoutError, match="timeout"):
        with model.generate(COUNTING, max_new_tokens=200, timeout=0.5):
            pass
    time.sleep(1.0)
    assert logits(model).shape[-1] == model.adapter.vocab_size
    assert left_behind(model.lab) == [0, 0]


def test_killed_worker_fails_clearly_then_heals(model, lab, ref_lab):
    backend = lab.backend
    dep = backend.deployment(MODEL)
    victim = backend.memory(MODEL)[1]
    pid = backend.client.run(os.getpid, workers=[victim["worker"]])[victim["worker"]]
    errors: list[BaseException] = []

    def long_request():
        try:
            with model.generate(COUNTING, max_new_tokens=300, timeout=120):
                pass
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while requests_held(lab)[1] == 0 and time.monotonic() < deadline:  # the request is in flight
        time.sleep(0.1)
    time.sleep(0.5)
    assert t.is_alive(), "the request ended before the worker could be killed"
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=90)
    assert not t.is_alive(), "the request hung after its stage's worker died"
    assert errors and isinstance(errors[0], StageLostError), errors
    assert "stage 1" in str(errors[0]) and "run the request again" in str(errors[0])
    dep = backend.deployment(MODEL)
    assert victim["worker"] not in dep.info.stage_workers
    torch.testing.assert_close(logits(model), logits(ref_lab.model(MODEL)), atol=1e-4, rtol=1e-4)
