"""A stage's pool makes and registers segments only between the stage's computations
(:mod:`tpmlab.cluster.compute_gaps`): registering takes the driver's locks that the stage's
kernel launches need."""

from __future__ import annotations

import threading
import time

import torch

from tpmlab.cluster import handover
from tpmlab.cluster.compute_gaps import Gaps
from tpmlab.cluster.pinned_segments import Pinning
from tpmlab.cluster.wire import to_wire
from tpmlab.runtime.runner import host_copy

from . import fake_pinning
from .test_cluster_pinned_handover import SHAPE, TOKEN, _pool_ready


def _until(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_wait_returns_at_once_when_nothing_computes():
    gaps = Gaps()
    assert gaps.wait(timeout=0.0) and not gaps.busy()


def test_wait_blocks_until_the_last_computation_ends():
    gaps = Gaps()
    outer, inner = gaps.computing(), gaps.computing()
    outer.__enter__()
    inner.__enter__()  # two computations (a request's work, a backward queued after it)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(gaps.wait(timeout=30.0)))
    waiter.start()
    _until(lambda: gaps.waiting == 1)
    inner.__exit__(None, None, None)
    time.sleep(0.05)
    assert not got and gaps.busy()  # one still runs
    outer.__exit__(None, None, None)
    waiter.join(10)
    assert got == [True] and gaps.waiting == 0


def test_a_stage_that_never_pauses_still_lets_the_wait_end():
    gaps = Gaps()
    with gaps.computing():
        assert gaps.wait(timeout=0.05) is False
    assert gaps.wait(timeout=0.0)


def test_a_computation_that_raises_still_ends():
    gaps = Gaps()
    try:
        with gaps.computing():
            raise ValueError("a failing forward")
    except ValueError:
        pass
    assert not gaps.busy()


def test_the_pool_registers_only_between_the_stages_computations():
    registrar = fake_pinning.RecordingRegistrar()
    gaps = Gaps()
    segments = handover.Segments(Pinning(registrar), gaps)
    # a first request of the size, packed while its stage still computes (as a stage packs
    # its reply on its thread): the refill it asks for waits
    with gaps.computing():
        alloc = segments.allocator("r1", TOKEN, deadline=0.0)
        copy = host_copy(torch.ones(SHAPE), False, alloc)
        handover.unpack(segments.pack(to_wire({1: copy}), "r1", TOKEN, deadline=0.0))
        _until(lambda: gaps.waiting == 1)  # the pool's thread is parked
        assert registrar.summary()["registered"] == 0
        assert segments.counts()["pooled"] == 0
    _pool_ready(segments)  # the stage idles: made and registered now
    assert registrar.summary()["registered"] == 1 and gaps.waiting == 0


def test_switched_off_the_wait_ends_at_once(monkeypatch):
    """``compute_gaps.ACTIVE = False`` (the benchmark's other way): the pool fills beside."""
    from tpmlab.cluster import compute_gaps

    monkeypatch.setattr(compute_gaps, "ACTIVE", False)
    gaps = Gaps()
    with gaps.computing():
        assert gaps.wait(timeout=30.0) is True and gaps.waiting == 0
