"""A GPU stage's saves copied straight into hand-over segments registered with CUDA
(:mod:`tpmlab.cluster.pinned_segments`), on CPU through a recording stand-in for the
registration (:mod:`.fake_pinning`): only segments the pool registered ahead of time are
used, the pinned copy otherwise (also when registering fails), the same bytes either way,
and every registered segment unregistered exactly once, while still mapped, on success,
failure, abort, deadline and when the stage goes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import pytest
import torch

from tpmlab.cluster import handover, pinned_segments, segment_pool
from tpmlab.cluster.pinned_segments import Pinning
from tpmlab.cluster.wire import from_wire, to_wire
from tpmlab.runtime.runner import host_copy

from . import fake_pinning
from .conftest import deploy
from .test_cluster_handover import (
    PROMPTS,
    _clean_within,
    _fills_done,
    _pool_threads_finish,
    _segments,
    _trace_all,
)

cloudpickle.register_pickle_by_value(fake_pinning)  # workers need not import the tests

__all__ = ["_pool_threads_finish"]  # autouse: pool refills end before the next test counts

MODEL = "tiny-llama"
SHAPE = (512, 1024)  # 2 MiB in float32: over the hand-over's threshold
TOKEN = handover.local_token()


@pytest.fixture
def pinned():
    registrar = fake_pinning.RecordingRegistrar()
    segments = handover.Segments(Pinning(registrar))
    yield segments, registrar
    del segments
    gc.collect()


def _pool_ready(segments: handover.Segments, n: int = 1, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while segments.counts()["pooled"] < n and time.monotonic() < deadline:
        time.sleep(0.02)  # refilled (and registered) on a background thread


def _filled_pool(segments: handover.Segments, req: str = "warm") -> None:
    """A first request of the size: nothing registered yet, so its save is a pinned copy
    (here a clone) that the reply writes into a segment; then the pool registers one."""
    alloc = segments.allocator(req, TOKEN, deadline=0.0)
    before = segments.counts()
    copy = host_copy(torch.ones(SHAPE), False, alloc)
    after = segments.counts()  # none ready: never registered on the way
    assert after["unpinned"] == before["unpinned"] + 1 and after["held"] == before["held"]
    handover.unpack(segments.pack(to_wire({1: copy}), req, TOKEN, deadline=0.0))
    _pool_ready(segments)


def _settled(segments: handover.Segments) -> dict[str, int]:
    segments.pinning.wait()
    return segments.counts()


def test_saves_go_into_registered_segments_made_ahead_of_time(pinned):
    segments, registrar = pinned
    _filled_pool(segments)
    assert segments.counts()["pooled"] == 1 and registrar.summary()["registered"] == 1
    value = torch.randn(SHAPE)
    alloc = segments.allocator("r1", TOKEN, deadline=0.0)
    saved = host_copy({"a": value, "small": torch.ones(3)}, False, alloc)
    (ptr,) = registrar.summary()["open"]
    assert saved["a"].data_ptr() == ptr  # the copy went into the registered segment
    packed = segments.pack(to_wire(saved), "r1", TOKEN, deadline=0.0)
    assert isinstance(packed["a"], handover.Shared)
    taken = [str(p) for p in _segments({os.getpid()})]
    assert packed["a"].path in taken  # handed over as it is: no other copy
    del saved
    counts = _settled(segments)
    assert counts["pinned"] == 1 and counts["unpinned"] == 1  # the warm-up's save
    names: list[str] = []
    got = from_wire(handover.unpack(packed, names.extend))["a"]
    assert torch.equal(got, value)
    # lent to the notebook: still registered, the stage's mapping kept for its return
    assert counts["lent"] == 1 and counts["held"] == counts["pooled"] + counts["lent"]
    assert ("unregister", ptr) not in registrar.events
    del got
    deadline = time.monotonic() + 10
    while not names and time.monotonic() < deadline:
        time.sleep(0.02)  # the notebook unmaps it on a thread of its own, then gives it back
    assert names == [packed["a"].path]
    assert segments.take_back(names) == 1
    assert segments.counts()["lent"] == 0 and segments.counts()["pooled"] >= 1
    alloc = segments.allocator("r2", TOKEN, deadline=0.0)
    again = alloc(SHAPE, torch.float32)  # the same segment, registered all along
    assert again.data_ptr() == ptr
    summary = registrar.summary()
    assert not summary["wrong"] and summary["unregistered"] == 0
    segments.free("r2")  # a request that fails: what it took is unregistered once, mapped
    counts = _settled(segments)
    assert registrar.events.count(("unregister", ptr)) == 1
    assert registrar.summary()["unmapped_at_unregister"] == 0
    assert counts["registered"] - counts["unregistered"] == counts["held"]


def test_the_registered_path_gives_the_bytes_of_the_pinned_copy(pinned):
    segments, _ = pinned
    _filled_pool(segments)
    value = torch.randn(SHAPE[0], SHAPE[1] * 2).bfloat16()  # 2 MiB of bfloat16
    got = {}
    for req, active in (("on", True), ("off", False)):
        pinned_segments.ACTIVE = active
        try:
            alloc = segments.allocator(req, TOKEN, deadline=0.0)
            packed = segments.pack(to_wire({1: host_copy(value, False, alloc)}), req, TOKEN, 0.0)
        finally:
            pinned_segments.ACTIVE = True
        got[req] = from_wire(handover.unpack(packed))[1]
        _pool_ready(segments)
    assert got["on"].dtype == got["off"].dtype == torch.bfloat16
    assert torch.equal(got["on"].view(torch.int16), got["off"].view(torch.int16))
    assert torch.equal(got["on"].view(torch.int16), value.view(torch.int16))
    assert _settled(segments)["pinned"] == 1


def test_a_failed_or_aborted_request_unregisters_what_it_took(pinned):
    segments, registrar = pinned
    _filled_pool(segments)
    alloc = segments.allocator("r2", TOKEN, deadline=0.0)
    out = alloc(SHAPE, torch.float32)
    assert out is not None and segments.counts()["held"] == 1
    segments.free("r2")  # the client aborted (a failure elsewhere, Ctrl-C)
    segments.free("r2")  # twice: still unregistered once
    counts = _settled(segments)
    assert counts["unregistered"] == 1 and counts["held"] == 0
    assert not _segments({os.getpid()})
    summary = registrar.summary()
    assert not summary["wrong"] and not summary["open"]
    assert summary["unmapped_at_unregister"] == 0
    out.fill_(1.0)  # the stage's mapping stays valid until its tensor goes


def test_segments_the_notebook_never_takes_are_unregistered_at_the_deadline(pinned, monkeypatch):
    segments, registrar = pinned
    _filled_pool(segments)
    monkeypatch.setattr(handover, "MIN_TTL", 0.05)

    async def request() -> None:
        alloc = segments.allocator("r3", TOKEN, deadline=time.monotonic())
        assert alloc(SHAPE, torch.float32) is not None
        await asyncio.sleep(0.3)  # the stage's timer frees the request's segments

    asyncio.run(request())
    counts = _settled(segments)
    assert counts["unregistered"] == 1 and counts["held"] == 0
    assert not registrar.summary()["open"] and not _segments({os.getpid()})


def test_a_failed_registration_falls_back_to_the_pinned_copy(pinned):
    segments, registrar = pinned
    registrar.fail_register = True
    alloc = segments.allocator("w", TOKEN, deadline=0.0)
    handover.unpack(segments.pack(to_wire({1: host_copy(torch.ones(SHAPE), False, alloc)}),
                                  "w", TOKEN, 0.0))
    deadline = time.monotonic() + 10
    while not segments.pooled() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert segments.pooled() and segments.counts()["pooled"] == 0  # kept, not registered
    alloc = segments.allocator("r4", TOKEN, deadline=0.0)
    value = torch.randn(SHAPE)
    copy = host_copy(value, False, alloc)  # no registered segment: the pinned copy (a clone)
    packed = segments.pack(to_wire({1: copy}), "r4", TOKEN, 0.0)  # copied into the pool's
    assert torch.equal(from_wire(handover.unpack(packed))[1], value)
    counts = segments.counts()
    assert counts["register_failed"] >= 1 and counts["registered"] == 0
    assert counts["pinned"] == 0 and counts["unpinned"] == 2


def test_a_failed_unregistration_never_fails_the_request(pinned, monkeypatch):
    monkeypatch.setattr(segment_pool, "RECYCLE", False)  # unregistered as the reply is packed
    segments, registrar = pinned
    _filled_pool(segments)
    registrar.fail_unregister = True
    alloc = segments.allocator("r5", TOKEN, deadline=0.0)
    value = torch.randn(SHAPE)
    packed = segments.pack(to_wire({1: host_copy(value, False, alloc)}), "r5", TOKEN, 0.0)
    assert torch.equal(from_wire(handover.unpack(packed))[1], value)
    counts = _settled(segments)
    assert counts["pinned"] == 1 and counts["unregister_failed"] == 1
    assert counts["held"] == segments.counts()["pooled"]  # let go all the same


def test_the_pool_and_what_requests_hold_are_unregistered_when_the_stage_goes():
    registrar = fake_pinning.RecordingRegistrar()
    segments = handover.Segments(Pinning(registrar))
    _filled_pool(segments)
    alloc = segments.allocator("r6", TOKEN, deadline=0.0)
    held = alloc(SHAPE, torch.float32)  # a request in flight when the stage goes
    assert held is not None
    _filled_pool(segments, "warm2")  # and one in the pool
    assert len(registrar.summary()["open"]) == 2
    del segments, alloc
    gc.collect()
    summary = registrar.summary()
    assert summary["registered"] == summary["unregistered"] == 2
    assert not summary["open"] and not summary["wrong"]
    assert summary["unmapped_at_unregister"] == 0
    held.fill_(1.0)  # the request's own mapping is still valid
    del held
    gc.collect()
    assert not _segments({os.getpid()}) and not _segments({os.getpid()}, pool=True)


def test_segments_made_while_registration_was_off_are_registered_in_place(
        pinned, monkeypatch):
    """Registration switched on with the pool full of segments made (or given back) while
    it was off: the pool registers those rather than leave them crowding out registered
    ones, and makes no new memory for it."""
    segments, registrar = pinned
    monkeypatch.setattr(segment_pool, "POOL_BYTES", 4 << 20)
    nbytes = math.prod(SHAPE) * 4
    monkeypatch.setattr(pinned_segments, "ACTIVE", False)
    segments._pool.refill([nbytes, nbytes])
    _fills_done()
    assert segments.pooled() == 4 << 20 and segments.counts()["pooled"] == 0
    monkeypatch.setattr(pinned_segments, "ACTIVE", True)
    segments._pool.refill([nbytes, nbytes])  # what a request of two such saves asks for
    _fills_done()
    counts = segments.counts()
    assert counts["pooled"] == 2 and registrar.summary()["registered"] == 2
    assert segments.pooled() == 4 << 20 and segments.recycling()["made"] == 2
    alloc = segments.allocator("r", TOKEN, deadline=0.0)
    assert alloc(SHAPE, torch.float32) is not None  # a save goes straight into one
    segments.free("r")


def test_unregistering_waits_for_the_stage_thread():
    """The request's copies are queued on the stage's thread: a release (an abort arriving
    while that thread still runs) unregisters only after what runs there now."""
    registrar = fake_pinning.RecordingRegistrar()
    stage = ThreadPoolExecutor(1)
    gate = threading.Event()
    stage.submit(gate.wait, 10)
    pinning = Pinning(registrar, order=stage.submit)
    flat = torch.zeros(16, dtype=torch.uint8)
    assert pinning.register(flat)
    pinning.release([flat])
    time.sleep(0.2)
    assert registrar.summary()["unregistered"] == 0
    gate.set()
    pinning.wait()
    assert registrar.summary()["unregistered"] == 1 and registrar.settles == 1
    pinning.release([flat])  # released already: nothing more
    pinning.wait()
    assert registrar.summary()["unregistered"] == 1
    stage.shutdown()


def test_which_stages_register(monkeypatch):
    assert pinned_segments._cuda_registrar(torch.device("cpu")) is None  # a CPU stage
    pinned_segments.use_registrar(fake_pinning.Registrars())
    try:
        assert isinstance(pinned_segments.for_device(torch.device("cpu")), Pinning)
        monkeypatch.setenv(pinned_segments.ENV, "0")  # switched off in the worker
        assert pinned_segments.for_device(torch.device("cpu")) is None
    finally:
        pinned_segments.use_registrar(None)
    monkeypatch.delenv(pinned_segments.ENV)
    if not torch.cuda.is_available():
        assert pinned_segments.for_device(torch.device("cuda")) is None
    segments = handover.Segments()
    assert segments.counts() == {}  # a stage without registration reports nothing


# -- on the cluster: CPU stages taking a GPU stage's path -------------------------------------------


@pytest.fixture(scope="module")
def staged(lab, backend, ref_lab):
    """tiny-llama as 2 stages whose saves go through registered segments (the stand-in),
    every array handed over in shared memory."""
    def lower(threshold, ttl):
        handover.THRESHOLD, handover.MIN_TTL = threshold, ttl

    client = backend.client
    client.run(fake_pinning.install)
    client.run(lower, 1, 2.0)
    model = deploy(lab, MODEL, 2)
    pids = set(client.run(os.getpid).values())
    yield model, ref_lab.model(MODEL), pids
    client.run(lower, 1 << 20, 60.0)
    client.run(fake_pinning.set_active, True)
    lab.undeploy(MODEL)
    client.run(fake_pinning.uninstall)


def _stages_settled(backend, seconds: float = 10.0) -> list[dict[str, int]]:
    """Each stage's registration counts once no request in flight holds a registered segment
    (those lent to the notebook stay registered until they come back)."""
    deadline = time.monotonic() + seconds
    while True:
        counts = [m["handover"] for m in backend.memory(MODEL)]
        if all(c["held"] == c["pooled"] + c["lent"] for c in counts) \
                or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def _reports_clean(backend) -> None:
    for summaries in backend.client.run(fake_pinning.report).values():
        for s in summaries:
            assert not s["wrong"] and s["unmapped_at_unregister"] == 0, s


@pytest.mark.slow
def test_registered_saves_equal_the_pinned_copies_bit_for_bit(staged, backend):
    model, ref, pids = staged
    client = backend.client
    client.run(fake_pinning.set_active, False)
    off = _trace_all(model)
    client.run(fake_pinning.set_active, True)
    _trace_all(model)  # the pool made unregistered segments while off: registered now
    on = _trace_all(model)
    for a, b, c in zip(on, off, _trace_all(ref)):
        assert a.dtype == b.dtype and torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    counts = _stages_settled(backend)
    assert all(c["pinned"] > 0 for c in counts), counts
    assert all(c["held"] == c["pooled"] + c["lent"] for c in counts), counts  # none in flight
    assert all(c["registered"] - c["unregistered"] == c["held"] for c in counts), counts
    _reports_clean(backend)
    assert not _clean_within(pids)


@pytest.mark.slow
def test_a_failing_request_unregisters_its_segments(staged, backend):
    from tests.plan_strategies import recording
    from tpmlab.errors import LimitError
    from tpmlab.ir.codec import encode_plan
    from tpmlab.ir.validate import Limits

    model, _, pids = staged
    last = model.adapter.n_layers - 1
    with recording(model, model.generate("The Eiffel Tower is in", max_new_tokens=3)) as gen:
        with gen.all():
            first = model.layers[0].output.save()
            model.layers[last].output.save()
    blob = encode_plan(gen.plan())
    for _ in range(2):  # the second one finds registered segments of its sizes
        values, _ = backend.run_values(MODEL, blob)
    per_stage = sum(v.numel() * v.element_size() for v in values[first._node])
    before = [c["pinned"] for c in _stages_settled(backend)]
    assert before[0] > 0
    with pytest.raises(LimitError):  # the last stage crosses the limit, stage 0 has saved
        backend.run_values(MODEL, blob, limits=Limits(max_saved_bytes=int(per_stage * 1.5)))
    counts = _stages_settled(backend)
    assert all(c["held"] == c["pooled"] + c["lent"] for c in counts), counts
    _reports_clean(backend)
    assert not _clean_within(pids)


@pytest.mark.slow
def test_an_interrupted_client_and_a_missed_deadline_unregister(staged, backend, monkeypatch):
    model, _, pids = staged
    _trace_all(model)  # registered segments of these sizes ready

    def interrupted(values, give_back=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("tpmlab.cluster.backend.unpack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _trace_all(model)
    assert not _clean_within(pids)
    counts = _stages_settled(backend)
    assert all(c["held"] == c["pooled"] + c["lent"] for c in counts), counts
    monkeypatch.setattr("tpmlab.cluster.backend.unpack", lambda values, give_back=None: values)  # never maps
    with contextlib.suppress(Exception), model.trace(PROMPTS, timeout=1):
        model.layers[0].output.save()
    assert not _clean_within(pids, 15)  # the stages' timers freed them
    counts = _stages_settled(backend)
    assert all(c["held"] == c["pooled"] + c["lent"] for c in counts), counts
    _reports_clean(backend)


async def _stage_work_is_computing(dask_worker=None) -> list[tuple[bool, bool]]:
    """On a worker: for each stage, whether work run through its thread counts as the
    stage's computation, and whether the stage counts as computing outside it."""
    from tpmlab.cluster.actor import StageActor

    out = []
    for actor in dask_worker.state.actors.values():
        if isinstance(actor, StageActor):
            inside = await actor._compute(actor.gaps.busy)
            out.append((inside, actor.gaps.busy()))
    return out


@pytest.mark.slow
def test_a_stages_work_keeps_its_pool_waiting(staged, backend):
    """The stage's requests run on its thread as computations, which the pool's fill
    waits out (:mod:`tpmlab.cluster.compute_gaps`)."""
    model, _, _ = staged
    _trace_all(model)
    found = [r for rows in backend.client.run(_stage_work_is_computing).values() for r in rows]
    assert found and all(r == (True, False) for r in found), found


@pytest.mark.slow
def test_undeploying_unregisters_the_pools(staged, lab, backend):
    """Last in this module: stages deployed anew, used, then undeployed: every registration
    they made is undone as they go (their pools, and anything a request held). A stage's
    segments live until its last request's deadline (the notebook may still map them), so
    these requests have a short one."""
    model = deploy(lab, MODEL, 2)  # new stages: each with a new stand-in, the last made
    for _ in range(2):
        with model.trace(PROMPTS, timeout=3):
            for layer in model.layers:
                layer.output.save()
    assert all(c["pinned"] > 0 and c["pooled"] > 0 for c in _stages_settled(backend))
    lab.undeploy(MODEL)
    deadline = time.monotonic() + 15
    while True:
        newest = [ss[-1] for ss in backend.client.run(fake_pinning.report).values() if ss]
        if all(not s["open"] for s in newest) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(newest) == 2 and all(s["registered"] > 0 for s in newest), newest
    assert all(s["registered"] == s["unregistered"] for s in newest), newest
    _reports_clean(backend)


class _Driver:
    """A stand-in for the CUDA driver library's calls :class:`DriverRegistrar` makes,
    recording them in order; ``fail``: the call that returns an error code."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def __getattr__(self, name: str):
        if not name.startswith("cu"):
            raise AttributeError(name)

        def call(*args):
            self.calls.append((name, *(getattr(a, "value", a) for a in args)))
            if name == "cuDevicePrimaryCtxRetain":
                args[0]._obj.value = 0xC0  # the context's handle, written through the pointer
            return 700 if name == self.fail else 0

        return call


def test_driver_registrar_registers_in_the_devices_primary_context():
    driver = _Driver()
    registrar = pinned_segments.DriverRegistrar(torch.device("cuda", 1), driver)
    registrar.register(0x1000, 1 << 20)
    registrar.unregister(0x1000)
    names = [c[0] for c in driver.calls]
    assert names == ["cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent",
                     "cuMemHostRegister_v2", "cuCtxSetCurrent", "cuMemHostUnregister"]
    assert driver.calls[0][2] == 1  # the stage's device
    assert driver.calls[2][1] == 0xC0 and driver.calls[4][1] == 0xC0  # its primary context
    assert driver.calls[3][1:] == (0x1000, 1 << 20, registrar.PORTABLE)
    assert driver.calls[5][1] == 0x1000


@pytest.mark.parametrize("fail", ["cuMemHostRegister_v2", "cuMemHostUnregister"])
def test_driver_registrar_raises_on_an_error_code(fail):
    registrar = pinned_segments.DriverRegistrar(torch.device("cuda", 0), _Driver(fail))
    with pytest.raises(RuntimeError, match=f"{fail.removesuffix('_v2')} failed with CUresult 700"):
        if fail == "cuMemHostUnregister":
            registrar.unregister(0x2000)
        else:
            registrar.register(0x2000, 4096)


def test_a_failed_registration_through_the_driver_costs_only_its_segment():
    pinning = Pinning(pinned_segments.DriverRegistrar(torch.device("cuda", 0),
                                                      _Driver("cuMemHostRegister_v2")))
    flat = torch.zeros(4096, dtype=torch.uint8)
    assert pinning.register(flat) is False
    assert pinning.counts()["register_failed"] == 1 and pinning.counts()["held"] == 0


def test_without_a_driver_library_the_runtime_bindings_register(monkeypatch):
    monkeypatch.setattr(pinned_segments, "_driver_library", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    registrar = pinned_segments._cuda_registrar(torch.device("cuda", 0))
    assert type(registrar) is pinned_segments.CudaRegistrar
    monkeypatch.setattr(pinned_segments, "_driver_library", lambda: _Driver())
    assert type(pinned_segments._cuda_registrar(torch.device("cuda", 0))) \
        is pinned_segments.DriverRegistrar
    monkeypatch.setattr(pinned_segments, "_driver_library", lambda: _Driver("cuDeviceGet"))
    assert type(pinned_segments._cuda_registrar(torch.device("cuda", 0))) \
        is pinned_segments.CudaRegistrar  # the driver refused: the runtime's way

