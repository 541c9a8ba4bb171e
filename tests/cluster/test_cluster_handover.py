"""Saved values handed from stages to the notebook through shared memory on one host: the
same numbers, segments private to the user, and /dev/shm clean on every path."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tpmlab.cluster import handover
from tpmlab.cluster.wire import from_wire, to_wire

from .conftest import deploy

MODEL = "tiny-llama"
PROMPTS = ["The Eiffel Tower is located in the city of", "Hello"]


def _segments(pids=None) -> list[Path]:
    found = sorted(handover.SHM.glob(f"{handover.PREFIX}*"))
    if pids is None:
        return found
    return [p for p in found if int(p.name.split("-")[1]) in pids]


def _clean_within(pids, seconds: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + seconds
    while _segments(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _segments(pids)


# -- in this process -------------------------------------------------------------------------


def test_pack_and_unpack_give_the_same_values_through_private_segments():
    values = to_wire({1: torch.randn(700, 600), 2: torch.randn(3, 3),
                      3: torch.randn(1024, 1024).bfloat16(), 4: (torch.arange(5), [torch.ones(2)])})
    segments = handover.Segments()
    packed = segments.pack(values, "r1", handover.local_token(), deadline=0.0)
    assert isinstance(packed[1], handover.Shared) and isinstance(packed[3].data, handover.Shared)
    assert isinstance(packed[2], np.ndarray)  # small: inline
    mine = [p for p in _segments({os.getpid()})]
    assert len(mine) == 2
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in mine)
    got = from_wire(handover.unpack(packed))
    assert not _segments({os.getpid()})  # the notebook unlinks what it maps
    want = from_wire(values)
    for k in (1, 2, 3):
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    assert torch.equal(got[4][0], want[4][0])
    got[1][0, 0] = 7.0  # a mapped value is the notebook's own: writable, copy-on-write


def test_segments_not_taken_are_freed_and_other_hosts_get_frames():
    values = {1: np.ones((512, 1024))}
    segments = handover.Segments()
    segments.pack(values, "r2", handover.local_token(), deadline=0.0)
    assert segments.held() == 1
    segments.free("r2")
    assert segments.held() == 0 and not _segments({os.getpid()})
    elsewhere = {**handover.local_token(), "boot": "another-host"}
    assert segments.pack(values, "r3", elsewhere, deadline=0.0) is values
    assert segments.pack(values, "r4", None, deadline=0.0) is values


def test_a_full_shared_memory_sends_the_values_inline(monkeypatch):
    values = {1: np.ones((512, 1024)), 2: np.zeros((512, 1024))}
    monkeypatch.setattr(handover, "_to_segment", _failing_second(handover._to_segment))
    segments = handover.Segments()
    assert segments.pack(values, "r5", handover.local_token(), deadline=0.0) is values
    assert not _segments({os.getpid()}) and segments.held() == 0


def _failing_second(to_segment):
    """The second segment finds /dev/shm full."""
    calls = []

    def wrapped(array, made):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return to_segment(array, made)

    return wrapped


# -- on the cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged(lab, backend, ref_lab):
    """tiny-llama as 2 stages, with every array handed over in shared memory."""
    def lower(threshold, ttl):
        handover.THRESHOLD, handover.MIN_TTL = threshold, ttl

    backend.client.run(lower, 1, 2.0)
    model = deploy(lab, MODEL, 2)
    pids = set(backend.client.run(os.getpid).values())
    yield model, ref_lab.model(MODEL), pids
    backend.client.run(lower, 1 << 20, 60.0)
    lab.undeploy(MODEL)


def _trace_all(m):
    with m.trace(PROMPTS):
        saved = [m.layers[i].output.save() for i in range(m.adapter.n_layers)]
        saved.append(m.output.logits.save())
    return [s.value for s in saved]


@pytest.mark.slow
def test_saves_through_shared_memory_equal_the_local_executor(staged):
    model, ref, pids = staged
    got, want = _trace_all(model), _trace_all(ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not _segments(pids)


@pytest.mark.slow
def test_an_interrupted_client_leaves_no_segments(staged, backend, monkeypatch):
    model, _, pids = staged

    def interrupted(values):
        raise KeyboardInterrupt

    monkeypatch.setattr("tpmlab.cluster.backend.unpack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _trace_all(model)
    assert not _clean_within(pids)  # the client aborted: every stage freed its segments


@pytest.mark.slow
def test_segments_a_client_never_takes_are_freed_after_the_deadline(staged, monkeypatch):
    model, _, pids = staged
    monkeypatch.setattr("tpmlab.cluster.backend.unpack", lambda values: values)  # never maps
    with contextlib.suppress(Exception), model.trace(PROMPTS, timeout=1):
        model.layers[0].output.save()  # (the values left unmapped may not unpad)
    assert _segments(pids)  # handed over, and no one took them
    assert not _clean_within(pids, 15)  # the stages' timers freed them
