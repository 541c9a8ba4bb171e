"""Saved values handed from stages to the notebook through shared memory on one host: the
same numbers, segments private to the user, and /dev/shm clean on every path."""

from __future__ import annotations

import contextlib
import gc
import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tpmlab.cluster import handover, segment_pool
from tpmlab.cluster.wire import from_wire, to_wire

from .conftest import deploy

MODEL = "tiny-llama"
PROMPTS = ["The Eiffel Tower is located in the city of", "Hello"]


def _segments(pids=None, pool: bool = False) -> list[Path]:
    """Segments (handed over, or with ``pool`` those of the stages' pools) of ``pids``."""
    found = sorted(p for p in segment_pool.SHM.glob(f"{segment_pool.PREFIX}*")
                   if (segment_pool.POOL_KIND in p.name) == pool)
    if pids is None:
        return found
    return [p for p in found if int(p.name.split("-")[1]) in pids]


@pytest.fixture(autouse=True)
def _pool_threads_finish():
    """A pool refill started by one test ends (and its pool is unlinked) before the next
    test counts this process's segments: on a busy machine it may still be running."""
    yield
    import gc
    import threading

    for thread in threading.enumerate():
        if thread.name == "tpmlab-handover-pool":
            thread.join(timeout=60)
    gc.collect()


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


def _mapped(paths: list[str]) -> set[str]:
    """Which of ``paths`` this process maps now (/proc/self/maps names unlinked files too)."""
    maps = Path("/proc/self/maps").read_text()
    return {p for p in paths if p in maps}


def test_a_mapping_stays_while_any_view_of_it_lives_and_then_goes_off_the_thread(monkeypatch):
    """The notebook's mapping of a segment lives as long as the last array or tensor over it
    (a slice, a reinterpreting view, a tensor of either), whichever is dropped last; then
    it is handed to the unmapping thread, once per mapping, and unmapped there."""
    handed: list[str] = []
    put = handover._UNMAPPER.put
    monkeypatch.setattr(handover._UNMAPPER, "put",
                        lambda m: (handed.append(threading.current_thread().name), put(m)))
    value = torch.randn(512, 1024)
    segments = handover.Segments()
    packed = segments.pack(to_wire({1: value, 2: [value[:256], value[256:]]}), "r",
                           handover.local_token(), deadline=0.0)
    paths = [packed[1].path, packed[2][0].path, packed[2][1].path]
    got = from_wire(handover.unpack(packed))
    assert _mapped(paths) == set(paths)
    kept = got[1][100:102].view(torch.int32)  # a view of a slice of a tensor over the segment
    half = got[2][1].numpy()[3:]  # a numpy view of the other
    del got
    gc.collect()
    deadline = time.monotonic() + 10
    while _mapped(paths) != {paths[0], paths[2]} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _mapped(paths) == {paths[0], paths[2]}  # the untouched one went, the viewed stay
    assert torch.equal(kept.view(torch.float32), value[100:102])
    assert np.array_equal(half, value[259:].numpy())
    del kept, half
    deadline = time.monotonic() + 10
    while _mapped(paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _mapped(paths)
    assert handed == ["MainThread"] * 3  # each mapping handed over once, by whoever let go
    assert any(t.name == "tpmlab-unmap" for t in threading.enumerate())


def test_small_arrays_of_a_reply_share_one_segment():
    layers = [torch.randn(16, 576) for _ in range(30)]  # 36 KB each, 1.1 MB together
    values = to_wire({**dict(enumerate(layers)), 30: torch.randn(3, 3),
                      31: torch.randn(1024, 1024).bfloat16(), 32: [torch.arange(2048)],
                      33: torch.randn(64, 64).bfloat16()})
    segments = handover.Segments()
    packed = segments.pack(values, "rb", handover.local_token(), deadline=0.0)
    bundled = [packed[k] for k in range(30)] + [packed[32][0], packed[33].data]
    assert all(isinstance(v, handover.Shared) for v in bundled)
    assert len({v.path for v in bundled}) == 1  # one file for all of them
    assert all(v.offset % handover.ALIGN == 0 for v in bundled)
    assert isinstance(packed[30], np.ndarray)  # under BUNDLE_MIN: inline
    assert isinstance(packed[31].data, handover.Shared) and packed[31].data.path != bundled[0].path
    assert len(_segments({os.getpid()})) == 2
    got = from_wire(handover.unpack(packed))
    assert not _segments({os.getpid()})  # unlinked once mapped, the bundle too
    want = from_wire(values)
    for k in (*range(32),):
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    assert torch.equal(got[32][0], want[32][0])
    assert got[33].dtype == torch.bfloat16 and torch.equal(got[33], want[33])
    got[0][0, 0] = 7.0  # each value is the notebook's own: copy-on-write, and apart
    assert got[1][0, 0] == want[1][0, 0] and got[0][1, 0] == want[0][1, 0]


def test_small_arrays_below_the_bundle_total_travel_inline():
    values = {k: np.ones(1024, np.float32) for k in range(8)}  # 32 KB together
    packed = handover.Segments().pack(values, "rs", handover.local_token(), deadline=0.0)
    assert all(isinstance(v, np.ndarray) for v in packed.values())
    assert not _segments({os.getpid()})


def test_a_bundle_not_taken_is_freed():
    values = {k: np.ones(16 << 10, np.float32) for k in range(8)}  # 512 KB in a bundle
    segments = handover.Segments()
    segments.pack(values, "rf", handover.local_token(), deadline=0.0)
    assert segments.held() == 1
    segments.free("rf")
    assert segments.held() == 0 and not _segments({os.getpid()})


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


def test_a_save_copied_into_a_segment_is_handed_over_without_another_copy(monkeypatch):
    """The runner's copy of a large save goes straight into a segment (``allocator``); the
    reply names that segment: no other segment is made, nothing is written again."""
    from tpmlab.runtime.runner import host_copy

    segments = handover.Segments()
    alloc = segments.allocator("r6", handover.local_token(), deadline=0.0)
    live = {"a": torch.randn(700, 600), "b": torch.randn(1024, 1024).bfloat16(),
            "small": torch.randn(3, 3), "part": torch.randn(4, 600, 700)}
    saved = host_copy({**live, "part": live["part"]}, False, alloc)
    mine = _segments({os.getpid()})
    assert len(mine) == 3  # a, b, part: each copy made in a segment; small: ordinary memory
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in mine)
    for k in live:
        assert torch.equal(saved[k], live[k]) and saved[k].dtype == live[k].dtype
    before = live["a"].clone()
    live["a"].add_(1)  # a later write to the live value does not reach the save
    assert not torch.equal(saved["a"], live["a"])
    wire = to_wire({**saved, "part": saved["part"][1]})  # a part of a segment: written anew

    def no_writes(array, made):
        if array.nbytes >= handover.THRESHOLD and array.nbytes != 600 * 700 * 4:
            raise AssertionError("a value already in a segment was copied again")
        return to_segment(array, made)

    to_segment = handover._to_segment
    monkeypatch.setattr(handover, "_to_segment", no_writes)
    packed = segments.pack(wire, "r6", handover.local_token(), deadline=0.0)
    assert {packed["a"].path, packed["b"].data.path} <= {str(p) for p in mine}
    # the part's own segment is new; the whole it came from was never handed over: freed
    assert len(_segments({os.getpid()})) == 3 and packed["part"].path not in map(str, mine)
    got = from_wire(handover.unpack(packed))
    del saved, wire
    assert not _segments({os.getpid()})
    assert torch.equal(got["a"], before) and torch.equal(got["b"], live["b"])
    assert torch.equal(got["part"], live["part"][1]) and torch.equal(got["small"], live["small"])
    assert segments.held() == 0


def test_segments_allocated_for_a_failed_request_are_freed(monkeypatch):
    segments = handover.Segments()
    alloc = segments.allocator("r7", handover.local_token(), deadline=0.0)
    kept = alloc((512, 1024), torch.float32)
    assert kept is not None and segments.held() == 1
    assert alloc((10,), torch.float32) is None  # small: ordinary memory
    segments.free("r7")  # the request failed before its reply was packed
    assert not _segments({os.getpid()}) and segments.held() == 0
    kept.fill_(1.0)  # the stage's mapping stays valid until its tensor goes
    assert segments.allocator("r8", {**handover.local_token(), "boot": "x"}, 0.0) is None

    def full(nbytes, **kwargs):  # a pool refill still running finds it full too
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segment_pool, "new_segment", full)
    alloc = segments.allocator("r9", handover.local_token(), deadline=0.0)
    assert alloc((512, 1024), torch.float32) is None  # /dev/shm full: an ordinary copy


def test_segments_made_ahead_of_time_take_the_next_request_of_the_same_sizes():
    segments = handover.Segments()
    alloc = segments.allocator("r10", handover.local_token(), deadline=0.0)
    first = alloc((512, 1024), torch.float32).fill_(1.0)
    packed = segments.pack(to_wire({1: first}), "r10", handover.local_token(), deadline=0.0)
    del first
    deadline = time.monotonic() + 10
    while segments.pooled() < 2 << 20 and time.monotonic() < deadline:
        time.sleep(0.02)  # refilled on a background thread
    # the one made ahead of time, and the one lent to r10 (its pool name kept for its return)
    pooled = _segments({os.getpid()}, pool=True)
    assert len(pooled) == 2 and segments.recycling()["lent"] == 1
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 and p.stat().st_size == 2 << 20
               for p in pooled)
    assert torch.equal(from_wire(handover.unpack(packed))[1], torch.ones(512, 1024))
    alloc = segments.allocator("r11", handover.local_token(), deadline=0.0)
    again = alloc((1024, 512), torch.float32)  # the same size: the pooled segment, lent
    assert segments.pooled() == 0 and segments.recycling()["lent"] == 2
    (taken,) = _segments({os.getpid()})
    again.fill_(2.0)
    packed = segments.pack(to_wire({1: again}), "r11", handover.local_token(), deadline=0.0)
    assert packed[1].path == str(taken)
    assert torch.equal(from_wire(handover.unpack(packed))[1], torch.full((1024, 512), 2.0))
    del again
    deadline = time.monotonic() + 10
    while segments.pooled() < 2 << 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _segments({os.getpid()}, pool=True)
    del segments, alloc  # the pool is unlinked with its stage
    import gc

    gc.collect()
    assert not _segments({os.getpid()}, pool=True) and not _segments({os.getpid()})


def test_sizes_asked_for_while_the_pool_fills_are_made_after(monkeypatch):
    """A request handed over while the pool was still filling (or registering) finds its
    sizes ready next time: the fill running makes them after its own."""
    import threading

    gate = threading.Event()
    new_segment = segment_pool.new_segment

    def slow(nbytes, **kwargs):
        gate.wait(10)
        return new_segment(nbytes, **kwargs)

    monkeypatch.setattr(segment_pool, "new_segment", slow)
    segments = handover.Segments()
    segments._pool.refill([2 << 20])
    segments._pool.refill([3 << 20, 4 << 20])  # while the first fill waits
    gate.set()
    deadline = time.monotonic() + 10
    while segments.pooled() < (9 << 20) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert segments.pooled() == 9 << 20
    for nbytes in (2 << 20, 3 << 20, 4 << 20):
        path, flat, registered, lent = segments._pool.take(nbytes)
        assert flat.numel() == nbytes and not registered and not lent
        os.unlink(path)
    del segments
    import gc

    gc.collect()
    assert not _segments({os.getpid()}, pool=True)


def test_the_pool_makes_segments_on_several_threads_within_its_budget(monkeypatch):
    """With several fill threads the pool makes segments at once (two are being made at the
    same moment here), never more than its budget, and a segment that fails to be made
    (/dev/shm full) leaves the others and the pool's count right."""
    monkeypatch.setattr(segment_pool, "FILL_THREADS", 3)
    monkeypatch.setattr(segment_pool, "POOL_BYTES", 10 << 20)
    inside, most, lock = [0], [0], threading.Lock()
    both = threading.Barrier(2, timeout=10)
    new_segment = segment_pool.new_segment

    def counted(nbytes, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            if nbytes == 3 << 20:
                both.wait()  # the two 3 MiB segments meet: made at the same time
            if nbytes == 1 << 20:
                raise OSError(28, "No space left on device")
            return new_segment(nbytes, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(segment_pool, "new_segment", counted)
    segments = handover.Segments()
    # 3 + 3 + 1 + 2 MiB fit the 10 MiB budget, the last 4 MiB does not
    segments._pool.refill([3 << 20, 3 << 20, 1 << 20, 2 << 20, 4 << 20])
    for thread in threading.enumerate():
        if thread.name == "tpmlab-handover-pool":
            thread.join(timeout=30)
    assert most[0] >= 2
    assert segments.pooled() == 8 << 20
    assert sorted(p.stat().st_size for p in _segments({os.getpid()}, pool=True)) == \
        [2 << 20, 3 << 20, 3 << 20]
    # one 2 MiB is ready, one is made: the failed 1 MiB holds no budget, 8 + 2 fit in 10
    segments._pool.refill([2 << 20, 2 << 20])
    for thread in threading.enumerate():
        if thread.name == "tpmlab-handover-pool":
            thread.join(timeout=30)
    assert segments.pooled() == 10 << 20
    del segments
    gc.collect()
    assert not _segments({os.getpid()}, pool=True)


def _hand_over(segments: handover.Segments, req: str, value: torch.Tensor,
               names: list[str], addresses: set[int] | None = None) -> torch.Tensor:
    """One request's save of ``value`` through ``segments``, as the notebook gets it, its
    segment given back into ``names`` once unmapped (``addresses``: where the stage's copy
    went, added)."""
    alloc = segments.allocator(req, handover.local_token(), deadline=0.0)
    saved = alloc(tuple(value.shape), value.dtype).copy_(value)
    if addresses is not None:
        addresses.add(saved.data_ptr())
    packed = segments.pack(to_wire({1: saved}), req, handover.local_token(), deadline=0.0)
    return from_wire(handover.unpack(packed, names.extend))[1]


def _given_back(names: list[str], n: int, seconds: float = 10.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while len(names) < n and time.monotonic() < deadline:
        time.sleep(0.02)  # unmapped on the notebook's unmapping thread, then given back
    return list(names)


def test_segments_the_notebook_unmapped_come_back_to_their_stage():
    """A request's segment goes back into its stage's pool once the notebook has unmapped
    it: later requests of the size take it (the same mapping on the stage, no new memory),
    and each gets its own numbers."""
    segments = handover.Segments()
    addresses: set[int] = set()
    for k in range(6):
        names: list[str] = []
        value = torch.full((512, 1024), float(k))
        got = _hand_over(segments, f"r{k}", value, names, addresses)
        assert torch.equal(got, value)
        del got
        (name,) = _given_back(names, 1)
        assert segments.take_back(names) == 1
        assert not Path(name).exists()  # the name handed over is gone; the pool keeps its own
    counts = segments.recycling()
    # the first request's segment and one the pool made before any came back: no more
    assert counts["made"] <= 2 and counts["returned"] == 6 and counts["lent"] == 0
    assert len(addresses) <= counts["made"]  # the stage copied into those mappings only
    assert segments.take_back(names) == 0  # given back twice: the second is ignored
    del segments
    gc.collect()
    assert not _segments({os.getpid()}, pool=True) and not _segments({os.getpid()})


def test_a_value_the_notebook_keeps_is_never_written_by_later_requests():
    segments = handover.Segments()
    kept_names: list[str] = []
    kept = _hand_over(segments, "kept", torch.full((512, 1024), -1.0), kept_names)
    for k in range(4):  # later requests of the same size, each given back
        names: list[str] = []
        got = _hand_over(segments, f"r{k}", torch.full((512, 1024), float(k)), names)
        assert torch.equal(got, torch.full((512, 1024), float(k)))
        del got
        segments.take_back(_given_back(names, 1))
    assert torch.equal(kept, torch.full((512, 1024), -1.0))
    assert not kept_names and segments.recycling()["lent"] == 1  # still the notebook's
    segments.take_back([str(p) for p in _segments({os.getpid()}, pool=True)])  # not those
    assert torch.equal(kept, torch.full((512, 1024), -1.0))
    del kept
    segments.take_back(_given_back(kept_names, 1))
    assert segments.recycling()["lent"] == 0


def _fills_done() -> None:
    for thread in threading.enumerate():
        if thread.name == "tpmlab-handover-pool":
            thread.join(timeout=30)


@pytest.mark.parametrize("stock", [1, 2])
def test_the_pool_counts_on_returns_only_while_the_notebook_gives_back(stock):
    """While the notebook gives segments back, the pool makes none for them; once it keeps
    its values, the pool fills again after at most one request that found none ready,
    whether one or two segments were ready when it began keeping."""
    segments = handover.Segments()
    for k in range(4):  # given back: no new memory after the first requests
        names: list[str] = []
        got = _hand_over(segments, f"r{k}", torch.full((512, 1024), float(k)), names)
        del got
        segments.take_back(_given_back(names, 1))
        _fills_done()
    made = segments.recycling()["made"]
    assert made <= 2
    while segments.pooled() > stock * (2 << 20):  # taken for good: unlinked, unmapped
        path, *_ = segments._pool.take(2 << 20)
        os.unlink(path)
    kept, ready = [], []
    try:
        for k in range(5):  # now kept
            ready.append(segments.pooled())
            kept.append(_hand_over(segments, f"k{k}", torch.full((512, 1024), -float(k)), []))
            _fills_done()
        assert ready[0] >= 2 << 20, ready  # given back
        assert ready.count(0) <= 1 and ready[-1] >= 2 << 20, ready
        for k, value in enumerate(kept):
            assert torch.equal(value, torch.full((512, 1024), -float(k)))
    finally:  # a failure's traceback must not keep the mappings for the next tests
        kept.clear()


def test_segments_given_back_while_the_pool_fills_take_the_place_of_those_it_would_make(
        monkeypatch):
    """The pool's budget holds when the notebook's returns arrive while a fill is on its way
    (waiting for the stage's computation to end): the fill makes only what still fits."""
    monkeypatch.setattr(segment_pool, "POOL_BYTES", 4 << 20)
    gate = threading.Event()

    class Computing:  # a stage computing until the gate opens
        def wait(self) -> None:
            gate.wait(30)

    pool = segment_pool.SegmentPool(gaps=Computing())
    lent = [pool.fresh(2 << 20, "r")[0] for _ in range(2)]
    pool.handed("r")
    try:
        pool.refill([2 << 20, 2 << 20])  # the fill counts on nothing coming back: makes two
        time.sleep(0.1)
        assert pool.take_back(lent) == 2  # ... but both come back first
        gate.set()
        _fills_done()
        assert pool.ready_bytes() == 4 << 20
        assert pool.recycling()["made"] == 2  # the two lent ones, nothing more
    finally:
        gate.set()
        for path in lent:
            Path(path).unlink(missing_ok=True)
        del pool
        gc.collect()


def test_a_notebook_whose_returns_come_a_request_late_finds_its_segments_ready():
    """Returns that reach the stage only after the next request was packed: the pool makes
    what that lag needs (one request finds none ready), then every request finds its segment
    ready, and the pool stops growing."""
    segments = handover.Segments()
    late: list[str] = []
    ready = []
    for k in range(8):
        ready.append(segments.pooled())
        names: list[str] = []
        got = _hand_over(segments, f"r{k}", torch.full((512, 1024), float(k)), names)
        assert torch.equal(got, torch.full((512, 1024), float(k)))
        segments.take_back(late)  # the previous request's, after this one's
        del got
        late = _given_back(names, 1)
        _fills_done()
    counts = segments.recycling()
    assert ready[3:].count(0) == 0, ready
    assert counts["made"] <= 3, counts
    assert counts["returned"] == 7 and counts["lent"] == 1


def _handed_mapped() -> set[str]:
    """The segments handed over by this process that it maps now."""
    return {line.split()[5] for line in Path("/proc/self/maps").read_text().splitlines()
            if f"{segment_pool.PREFIX}{os.getpid()}-" in line
            and segment_pool.POOL_KIND not in line}


def test_a_mapping_that_lived_through_a_fork_is_never_given_back():
    """A child forked while the notebook mapped a segment maps it too: the stage must never
    write into it again, so the parent does not give it back when it lets go."""
    segments = handover.Segments()
    names: list[str] = []
    before = _handed_mapped()  # none, unless an earlier test failed holding its values
    got = _hand_over(segments, "r", torch.ones(512, 1024), names)
    (handed,) = _handed_mapped() - before
    pid = os.fork()
    if pid == 0:  # the child exits at once, without running the parent's cleanup
        os._exit(0)
    os.waitpid(pid, 0)
    del got
    deadline = time.monotonic() + 10
    while _mapped([handed]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _mapped([handed])  # unmapped
    time.sleep(0.2)
    assert names == [] and segments.recycling()["lent"] == 1  # never given back
    later: list[str] = []
    again = _hand_over(segments, "r2", torch.ones(512, 1024), later)  # mapped after the fork
    del again
    assert len(_given_back(later, 1)) == 1


def test_take_back_ignores_names_not_lent_or_still_being_packed():
    segments = handover.Segments()
    before = set(_segments({os.getpid()}))  # none, unless an earlier test failed holding some
    pooled = set(_segments({os.getpid()}, pool=True))
    alloc = segments.allocator("packing", handover.local_token(), deadline=0.0)
    alloc((512, 1024), torch.float32)  # lent to a request whose reply is not packed yet
    (name,) = [str(p) for p in set(_segments({os.getpid()})) - before]
    assert segments.take_back([name, "/dev/shm/tpmlab-1-0", "../../etc/passwd", ""]) == 0
    assert segments.recycling()["lent"] == 1 and os.path.exists(name)
    segments.free("packing")  # the request failed: its name unlinked, its segment dropped
    counts = segments.recycling()
    assert counts["lent"] == 0 and counts["dropped"] == 1
    assert set(_segments({os.getpid()})) <= before
    assert set(_segments({os.getpid()}, pool=True)) <= pooled


def test_the_oldest_lent_segments_are_dropped_past_the_lent_budget(monkeypatch):
    """A notebook that keeps what it gets (or went away): the stage stops lending the oldest
    once more than LENT_BYTES are out (their pool names go; the notebook's values stay)."""
    monkeypatch.setattr(segment_pool, "LENT_BYTES", 5 << 20)
    segments = handover.Segments()
    kept = [_hand_over(segments, f"r{k}", torch.full((512, 1024), float(k)), [])
            for k in range(4)]
    counts = segments.recycling()
    assert counts["lent"] == 2 and counts["lent_bytes"] == 4 << 20 and counts["dropped"] == 2
    for k, value in enumerate(kept):
        assert torch.equal(value, torch.full((512, 1024), float(k)))


def test_pooled_segments_of_a_killed_worker_are_swept():
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = segment_pool.SHM / f"{segment_pool.PREFIX}{gone}-{segment_pool.POOL_KIND}{'0' * 32}"
    handed = segment_pool.SHM / f"{segment_pool.PREFIX}{gone}-{'1' * 32}"
    for p in (left, handed):
        p.touch(mode=0o600)
    try:
        handover.Segments()  # a new stage on the host
        assert not left.exists()
        assert handed.exists()  # handed over: its timers and the notebook free it
    finally:
        for p in (left, handed):
            p.unlink(missing_ok=True)


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
def test_traces_give_their_segments_back_and_never_touch_a_kept_value(staged, backend):
    """Each trace's segments go back to their stages once the notebook lets its values go;
    a trace whose values the notebook keeps is never written by the traces after it."""
    model, ref, pids = staged
    before = [m["recycling"] for m in backend.memory(MODEL)]
    kept = _trace_all(model)
    for prompts in (["A quick brown fox"], PROMPTS, ["Hello", "world", "again"]):
        with model.trace(prompts):
            saved = [model.layers[i].output.save() for i in range(model.adapter.n_layers)]
        assert all(torch.isfinite(s.value).all() for s in saved)
        del saved
        gc.collect()
    for a, b in zip(kept, _trace_all(ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    deadline = time.monotonic() + 10
    while True:  # the take_back calls are not waited for
        after = [m["recycling"] for m in backend.memory(MODEL)]
        if all(a["returned"] > b["returned"] for a, b in zip(after, before)) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(a["returned"] > b["returned"] for a, b in zip(after, before)), (before, after)
    del kept
    assert not _clean_within(pids)


@pytest.mark.slow
def test_threads_sharing_recycled_segments_each_get_their_own_numbers(staged, backend):
    """Requests in flight together from several threads, each letting its values go before
    its next: the segments they give back are taken by the others' requests, and every
    request still gets exactly its own saves."""
    from concurrent.futures import ThreadPoolExecutor

    model, ref, pids = staged
    prompts = [["The Eiffel Tower is in"], ["Hello world", "A second row here"],
               ["Numbers: 1 2 3 4 5 6 7"], ["Paris"]]

    def saves(m, p):
        with m.trace(p):
            out = [m.layers[i].output.save() for i in range(m.adapter.n_layers)]
        return [o.value.clone() for o in out]  # a copy: the mapped values go at once

    want = [saves(ref, p) for p in prompts]

    def worker(k: int) -> int:
        bad = 0
        for _ in range(3):
            got = saves(model, prompts[k])
            bad += sum(not torch.allclose(a, b, atol=1e-5, rtol=1e-5)
                       for a, b in zip(got, want[k]))
        return bad

    before = sum(m["recycling"]["returned"] for m in backend.memory(MODEL))
    with ThreadPoolExecutor(4) as threads:
        assert list(threads.map(worker, range(4))) == [0, 0, 0, 0]
    assert sum(m["recycling"]["returned"] for m in backend.memory(MODEL)) > before
    assert not _clean_within(pids)


@pytest.mark.slow
def test_a_request_failing_after_its_saves_leaves_no_segments(staged, backend):
    """Saves copied into segments during the run, then a limit stops the request on the
    last stage: every stage frees what it made."""
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
    values, _ = backend.run_values(MODEL, blob)
    per_stage = sum(v.numel() * v.element_size() for v in values[first._node])
    assert not _clean_within(pids)  # taken by the client
    with pytest.raises(LimitError):  # the last stage crosses the limit, stage 0 has saved
        backend.run_values(MODEL, blob, limits=Limits(max_saved_bytes=int(per_stage * 1.5)))
    assert not _clean_within(pids)


@pytest.mark.slow
def test_stage0_packs_its_saves_while_later_stages_compute_and_frees_them_on_failure(
        staged, backend):
    """Stage 0 puts a trace's saves in shared memory before the last stage has answered (its
    phases name the pack); when the last stage then fails, those segments are freed with the
    request at once, not left to their timers (set back to a minute here)."""
    from tests.plan_strategies import recording
    from tpmlab.errors import LimitError
    from tpmlab.ir.codec import encode_plan
    from tpmlab.ir.validate import Limits

    model, _, pids = staged
    last = model.adapter.n_layers - 1
    with recording(model, model.trace(PROMPTS)) as tr:
        first = model.layers[0].output.save()
        model.layers[last].output.save()
    blob = encode_plan(tr.plan())
    backend.phases = []
    try:
        values, _ = backend.run_values(MODEL, blob)
        phases = backend.phases[-1]
    finally:
        backend.phases = None
    assert phases["stage0 pack"] >= 0  # packed in stage 0's step, before stage 1's reply
    assert not _clean_within(pids)  # taken by the client
    per_stage = values[first._node].numel() * values[first._node].element_size()

    def ttl(seconds):
        handover.MIN_TTL = seconds

    backend.client.run(ttl, 60.0)
    try:
        with pytest.raises(LimitError):  # the last stage crosses the limit after stage 0 saved
            backend.run_values(MODEL, blob, limits=Limits(max_saved_bytes=int(per_stage * 1.5)))
        assert not _clean_within(pids)
    finally:
        backend.client.run(ttl, 2.0)


@pytest.mark.slow
def test_an_interrupted_client_leaves_no_segments(staged, backend, monkeypatch):
    model, _, pids = staged

    def interrupted(values, give_back=None):
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


@pytest.mark.slow
def test_small_saves_reach_the_notebook_in_one_bundle_per_stage(lab, backend, ref_lab,
                                                                monkeypatch):
    """Every layer's output at a short prompt (a few KB each): one shared-memory file per
    stage's reply instead of pickled bytes, the same numbers as in process."""
    from tpmlab.cluster import backend as backend_module

    def bundle_from(settings):  # (THRESHOLD, BUNDLE_TOTAL); the module's fixture lowers the first
        old = handover.THRESHOLD, handover.BUNDLE_TOTAL
        handover.THRESHOLD, handover.BUNDLE_TOTAL = settings
        return old

    seen: list[handover.Shared] = []

    def spying(values, give_back=None):
        handover._walk(values, None, lambda shared: seen.append(shared))
        return handover.unpack(values, give_back)

    previous = backend.client.run(bundle_from, (1 << 20, 8 << 10))
    try:
        model = deploy(lab, MODEL, 2)
        pids = set(backend.client.run(os.getpid).values())
        monkeypatch.setattr(backend_module, "unpack", spying)
        with model.trace(PROMPTS):
            saved = [model.layers[i].output.save() for i in range(model.adapter.n_layers)]
        got = [s.value for s in saved]
        ref = ref_lab.model(MODEL)
        with ref.trace(PROMPTS):
            expected = [ref.layers[i].output.save() for i in range(ref.adapter.n_layers)]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b.value, atol=0, rtol=0)
        by_file: dict[str, int] = {}
        for shared in seen:
            by_file[shared.path] = by_file.get(shared.path, 0) + 1
        assert sorted(by_file.values()) == [2, 2], by_file  # a bundle of 2 layers per stage
        assert not _clean_within(pids)
    finally:
        backend.client.run(bundle_from, next(iter(previous.values())))
        lab.undeploy(MODEL)
