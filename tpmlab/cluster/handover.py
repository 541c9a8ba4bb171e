"""Saved values handed from a stage to the notebook through shared memory.

When the notebook's process and a stage's worker share a host (the same kernel, the same
``/dev/shm`` mount, the same user), each large array among a stage's saves lives in a
file of its own in ``/dev/shm`` (mode 0600) and only its name, dtype and shape travel
with the reply. The notebook maps the file (copy-on-write: a plan's or the user's writes
never reach the file) and removes its name at once, so the memory lives as long as the
tensor over it: once the last array or tensor over a mapping is gone, a thread of the
notebook's process unmaps it (freeing a gigabyte's pages takes 0.1-0.2 s, which the
notebook's own thread no longer waits for). Other hosts, other users and small arrays
travel inline as before, as numpy frames (:mod:`.wire`).

The save's own copy is the hand-over: a CPU stage's runner copies each large saved value
straight into a new segment (:meth:`Segments.allocator`), so nothing is copied again on
the way to the notebook. A GPU stage's runner copies it from the device, without blocking
the stream, straight into a segment of the pool that is registered with CUDA (page-locked,
:mod:`.pinned_segments`), where one of its size is ready; the reply waits for the stream as
before, so a segment is handed over only once its copy is done. A value that did not start
in a segment of its own (a GPU stage's pinned copy, made where no registered segment was
ready or registration is off; a part of a larger value) is written into one when the reply
is packed, one more copy.

New memory is what costs here (a copy into pages never touched runs at ≈ 1 GB/s on a VM,
into pages already mapped at ≈ 10): each stage keeps a small pool of segments made ahead
of time, off the request's path, with their pages allocated and mapped, of the sizes its
last request handed over (:class:`~.segment_pool.SegmentPool`). A save of such a size
takes one and is copied into it at memory speed; the pool is refilled in the background
after each hand-over. On a GPU stage that background thread also registers each segment
with CUDA, so a request never waits for a registration.

Segments come back: a stage keeps each segment it lends (its pool's name for the file, its
mapping and its registration) until the notebook has unmapped it; the notebook then names
it in a ``take_back`` call and it goes back into the pool, its pages mapped and registered,
instead of a gigabyte of new memory for the next request and a gigabyte freed in the
notebook. The notebook gives back only what it unmapped itself: a mapping that lived
through a fork of its process (the child may still map it) is never given back. A stage
drops what it lent when the request fails, when its name was never taken, and the oldest
once more than :data:`~.segment_pool.LENT_BYTES` are out; the pool's refill counts what a
notebook that gives back is about to return (:meth:`~.segment_pool.SegmentPool.refill`).

Every segment is freed on every path:

* handed over: the notebook unlinks it as soon as it is mapped;
* the request fails or is interrupted (Ctrl-C) before that: the client aborts the
  request and each stage unlinks what it handed over for it (:meth:`Segments.free`);
* the notebook is gone: each stage unlinks what it handed over once the request's
  deadline has passed (at least :data:`MIN_TTL` seconds after the hand-over), on a timer
  of the stage's event loop, and whatever is left (its pool too) when its worker exits;
* the worker was killed before its exit handlers ran: the next stage made on the host
  unlinks the pooled segments of processes that are gone (:func:`~.segment_pool.sweep_dead`).

A registered segment is unregistered exactly once on each of these paths, by the stage,
before the stage's own mapping of it goes (:class:`~.pinned_segments.Pinning`).
"""

from __future__ import annotations

import asyncio
import math
import mmap
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from . import pinned_segments
from .compute_gaps import Gaps
from .pinned_segments import Pinning
from .segment_pool import SHM, SegmentPool, create_file, sweep_dead, unlink
from .wire import _Typed, _Viewed

THRESHOLD = 1 << 20  # bytes: an array of at least this many gets a segment of its own
#: smaller arrays of a reply, of at least BUNDLE_MIN bytes each, share one segment when
#: together they reach BUNDLE_TOTAL (a layer's output at a short prompt, saved for every
#: layer): one file instead of pickled bytes through the comms; smaller ones travel inline
BUNDLE_MIN = 4 << 10
BUNDLE_TOTAL = 256 << 10
ALIGN = 64  # bytes: where each array of a bundle starts
WRITE_CHUNK = 1 << 30  # bytes per write(2) call (Linux writes at most ~2 GB at once)
MIN_TTL = 60.0  # seconds a segment may wait for the notebook past the hand-over
#: saves copied straight into segments, and segments made ahead of time (False: each large
#: save copied into ordinary memory, then written into a new segment when packed)
DIRECT = True
#: the notebook's mappings are unmapped on a thread of their own while True (False: by the
#: thread that lets the last array over one go, as before). Switched in the notebook to
#: compare the two ways (``benchmarks/handover.py --compare-unmap``).
UNMAP_APART = True
#: the most segment names one ``take_back`` call may carry
TAKE_BACK_MAX = 4096


class Token(TypedDict):
    """Who may receive segments: the same boot, the same /dev/shm mount, the same user."""

    boot: str
    shm: list[int]
    uid: int


class Shared:
    """An array handed over as a shared-memory file: ``path``, numpy ``dtype``, ``shape``,
    starting ``offset`` bytes into the file (a bundle holds several arrays)."""

    __slots__ = ("path", "dtype", "shape", "offset")

    def __init__(self, path: str, dtype: str, shape: tuple[int, ...], offset: int = 0) -> None:
        self.path, self.dtype, self.shape, self.offset = path, dtype, shape, offset

    def __reduce__(self):
        return (Shared, (self.path, self.dtype, self.shape, self.offset))


def local_token() -> Token | None:
    """This process's token, or ``None`` where there is no shared memory to hand over in."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        st = SHM.stat()
    except OSError:
        return None
    if not os.access(SHM, os.W_OK):
        return None
    return Token(boot=boot, shm=[st.st_dev, st.st_ino], uid=os.getuid())


def same_host(token: Token | None) -> bool:
    """Whether the process that made ``token`` (:func:`local_token`) shares this one's host,
    /dev/shm mount and user: who may map this process's segments, or open its device memory
    (:mod:`.cuda_ipc`)."""
    return token is not None and token == local_token()


class Segments:
    """The segments one stage handed over, by request, until the notebook took them.

    ``pinning``: a GPU stage's registration of segments with CUDA
    (:mod:`.pinned_segments`): its pool registers the segments it makes, and its runner
    copies saves from the device into them (:meth:`allocator`). ``gaps``: the stage's
    computations; its pool makes segments only between them (:mod:`.compute_gaps`)."""

    def __init__(self, pinning: Pinning | None = None, gaps: Gaps | None = None) -> None:
        self._by_request: dict[str, list[str]] = {}
        # segments a runner allocated and filled, by request: {address: (path, nbytes,
        # registered)}
        self._allocated: dict[str, dict[int, tuple[str, int, bool]]] = {}
        # registered segments each request took, until released (unregistered)
        self._pinned: dict[str, list[torch.Tensor]] = {}
        self._lock = threading.Lock()  # the stage's thread allocates, its event loop packs
        self.pinning = pinning
        self._pool = SegmentPool(pinning, gaps)
        # saves handed over in registered segments; saves that found none ready (a pinned copy)
        self._counts = {"pinned": 0, "unpinned": 0}
        weakref.finalize(self, _unlink_all, self._by_request)  # also runs at exit
        sweep_dead()

    def allocator(self, req: str, token: Token | None, deadline: float,
                  ) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor | None] | None:
        """Where request ``req``'s runner puts its saves' copies, if the notebook holding
        ``token`` shares this host (else ``None``): ``alloc(shape, dtype)`` gives an empty
        tensor over a new segment for a value of at least :data:`THRESHOLD` bytes (``None``
        for a smaller one, or when ``/dev/shm`` is full), which :meth:`pack` then hands over
        without copying it again. Call it on the event loop; ``alloc`` runs on any thread.
        Each segment is this request's from the moment it exists: freed by :meth:`free`, at
        the request's deadline (monotonic seconds; at least :data:`MIN_TTL` from the first
        segment) if the notebook has not taken it, or at exit.

        On a stage with a :attr:`pinning` (a GPU stage), ``alloc`` gives only a segment made
        ahead of time and registered with CUDA, which the device copies into (``None`` when
        none of the size is ready: the runner makes a pinned copy, as without registration);
        each is unregistered when the request's reply is packed or the request is freed."""
        if not same_host(token) or not DIRECT:
            return None
        pinned = self.pinning is not None
        if pinned and not pinned_segments.ACTIVE:
            return None
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (used outside a stage): freed by free()/exit
            loop = None

        def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes < THRESHOLD:
                return None
            if pinned:  # never registered here: only what the pool registered ahead of time
                taken = self._pool.take(nbytes, pinned=True, req=req)
                if taken is None:
                    with self._lock:
                        self._counts["unpinned"] += 1
                    return None
            else:
                try:
                    taken = self._pool.take(nbytes, req=req) or self._pool.fresh(nbytes, req)
                except OSError:  # /dev/shm full or gone: an ordinary copy, handed over inline
                    return None
            path, flat, registered, lent = taken
            with self._lock:
                first = req not in self._by_request
                self._by_request.setdefault(req, []).append(path)
                self._allocated.setdefault(req, {})[flat.data_ptr()] = (path, nbytes, registered)
                if registered and not lent:  # a lent one stays registered, for its return
                    self._pinned.setdefault(req, []).append(flat)
            if first and loop is not None:
                ttl = max(deadline - time.monotonic(), MIN_TTL)
                loop.call_soon_threadsafe(loop.call_later, ttl, self.free, req)
            return flat.view(dtype).reshape(shape)

        return alloc

    def pack(self, values: Any, req: str, token: Token | None, deadline: float,
             loop: asyncio.AbstractEventLoop | None = None) -> Any:
        """``values`` (wire form) with every array of at least :data:`THRESHOLD` bytes put in
        shared memory, if the notebook holding ``token`` shares this host; else unchanged.
        The segments are freed at the request's deadline (monotonic seconds) if the
        notebook has not taken them, on a timer of ``loop`` (default: the running one; give
        the stage's loop when packing on another thread)."""
        with self._lock:
            allocated = self._allocated.pop(req, {})
            pinned = self._pinned.pop(req, [])
        try:
            return self._pack(values, req, token, deadline, allocated, pinned, loop)
        finally:  # the device's copies are done (the reply waited for them): unregister
            if pinned:
                self.pinning.release(pinned)

    def _pack(self, values: Any, req: str, token: Token | None, deadline: float,
              allocated: dict[int, tuple[str, int, bool]], pinned: list[torch.Tensor],
              loop: asyncio.AbstractEventLoop | None) -> Any:
        if not same_host(token):
            return values
        made: list[str] = []
        used: set[str] = set()
        sizes = [n for _, n, _ in allocated.values()]  # what this request took: made again
        small: list[np.ndarray] = []
        _walk(values, lambda a: small.append(a) if _bundled(a) else None)
        bundle = _Bundle(small, made) if sum(a.nbytes for a in small) >= BUNDLE_TOTAL else None

        def place(array: np.ndarray) -> Any:
            owned = allocated.get(array.__array_interface__["data"][0])
            if owned is not None and owned[1] == array.nbytes and array.flags.c_contiguous \
                    and owned[0] not in used:
                used.add(owned[0])
                if owned[2]:
                    with self._lock:
                        self._counts["pinned"] += 1
                return Shared(owned[0], array.dtype.str, tuple(array.shape))  # already there
            pooled = self._pool.take(array.nbytes, req=req) if DIRECT \
                and array.nbytes >= THRESHOLD and not array.dtype.hasobject else None
            if pooled is not None:  # a copy into pages already mapped
                made.append(pooled[0])
                if pooled[2] and not pooled[3]:  # registered, not lent: unregistered with
                    pinned.append(pooled[1])  # the request's others
                sizes.append(array.nbytes)
                pooled[1].numpy()[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
                return Shared(pooled[0], array.dtype.str, tuple(array.shape))
            if bundle is not None and _bundled(array):
                return bundle.place(array)
            placed = _to_segment(array, made)
            if isinstance(placed, Shared):
                sizes.append(array.nbytes)
            return placed

        try:
            out = _walk(values, place)
        except OSError:  # /dev/shm full or gone: the values travel inline instead
            unlink(made)
            self.free(req)
            return values
        except BaseException:
            unlink(made)
            self._pool.drop(made)
            raise
        unused = [path for path, _, _ in allocated.values() if path not in used]
        if unused:  # filled, but not handed over as a whole: no one will map them, so those
            self._pool.reclaim(unused)  # lent go back to the pool at once
            self.free(req, unused)
        if made:
            with self._lock:
                self._by_request.setdefault(req, []).extend(made)
            ttl = max(deadline - time.monotonic(), MIN_TTL)
            if loop is not None:
                loop.call_soon_threadsafe(loop.call_later, ttl, self.free, req, made)
            else:
                try:
                    asyncio.get_running_loop().call_later(ttl, self.free, req, made)
                except RuntimeError:  # no event loop (used outside a stage): freed by
                    pass  # free() or at exit
        self._pool.handed(req)  # what it lent may come back from now on
        if DIRECT:  # for the next request: segments of these sizes, ready
            self._pool.refill(sizes)
        return out

    def free(self, req: str, only: list[str] | None = None) -> None:
        """Unlink what was handed over for ``req`` (``only`` those) and the notebook did not
        take; without ``only`` (the request failed, was aborted or passed its deadline), also
        unregister the registered segments it took (after the device's copies into them).
        A lent segment whose name is unlinked here is dropped, not given back to the pool
        (the notebook may have been opening it); without ``only``, so is every one the
        request took before its reply was packed."""
        pinned: list[torch.Tensor] = []
        with self._lock:
            paths = self._by_request.pop(req, [])
            if only is None:
                self._allocated.pop(req, None)
                pinned = self._pinned.pop(req, [])
            else:
                keep = [p for p in paths if p not in only]
                if keep:
                    self._by_request[req] = keep
                paths = [p for p in paths if p in only]
        untaken = unlink(paths)
        self._pool.drop(untaken, None if only is not None else req)
        if pinned:
            self.pinning.release(pinned)

    def take_back(self, paths: list[str]) -> int:
        """Segments the notebook has unmapped (by the names they were handed over under)
        back into the pool; how many. Names not lent here, or not yet handed over, are
        ignored."""
        return self._pool.take_back(paths)

    def recycling(self) -> dict[str, int]:
        """What the pool did: segments it ``made`` (new memory), had ``returned`` by the
        notebook, ``dropped`` unreturned, and has ``lent`` out now (``lent_bytes``) and ready
        (``ready_bytes``)."""
        return self._pool.recycling()

    def pooled(self) -> int:
        """Bytes of segments made ahead of time and ready to take."""
        return self._pool.ready_bytes()

    def held(self) -> int:
        """Segments handed over and not yet freed here (the notebook may have taken them)."""
        return sum(os.path.exists(p) for ps in self._by_request.values() for p in ps)

    def counts(self) -> dict[str, int]:
        """What the registered segments did (:mod:`.pinned_segments`): saves handed over in
        one (``pinned``), saves that found none ready (``unpinned``: a pinned copy), and the
        registrations (:meth:`~.pinned_segments.Pinning.counts`: ``held`` counts those in the
        pool, ``pooled``, those lent out until the notebook gives them back, ``lent``, and
        those requests in flight hold); empty on a stage without."""
        if self.pinning is None:
            return {}
        with self._lock:
            counts = dict(self._counts)
        return {**counts, **self.pinning.counts(), "pooled": self._pool.registered(),
                "lent": self._pool.registered(lent=True)}


GiveBack = Callable[[list[str]], None]


def unpack(values: Any, give_back: GiveBack | None = None) -> Any:
    """The notebook's side of :meth:`Segments.pack`: every :class:`Shared` becomes an array
    over its mapped segment (no copy), whose name is removed at once. Segments of values not
    yet reached when an error stops this are freed by the stage.

    ``give_back(names)``: called, on the unmapping thread, with the names of segments this
    process has unmapped (after the last array over each went), for their stage's
    :meth:`Segments.take_back`; never for a mapping that lived through a fork."""
    maps: dict[str, np.ndarray] = {}  # a bundle's file is mapped once for all its arrays
    return _walk(values, None, lambda shared: _from_segment(shared, maps, give_back))


def _walk(value: Any, on_array: Callable[[np.ndarray], Any] | None,
          on_shared: Callable[[Shared], Any] | None = None) -> Any:
    if on_array is not None and isinstance(value, np.ndarray):
        return on_array(value)
    if on_shared is not None and isinstance(value, Shared):
        return on_shared(value)
    if isinstance(value, _Viewed):
        return _Viewed(value.dtype, _walk(value.data, on_array, on_shared))
    if isinstance(value, _Typed):
        return _Typed(value.cls, _walk(value.items, on_array, on_shared))
    if isinstance(value, dict):
        return {k: _walk(v, on_array, on_shared) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_walk(v, on_array, on_shared) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v, on_array, on_shared) for v in value)
    return value


def _to_segment(array: np.ndarray, made: list[str]) -> Any:
    if array.nbytes < THRESHOLD or array.dtype.hasobject:
        return array
    path, fd = create_file()
    made.append(path)
    try:
        _write_at(fd, array, 0)
    finally:
        os.close(fd)
    return Shared(path, array.dtype.str, tuple(array.shape))


def _write_at(fd: int, array: np.ndarray, offset: int) -> None:
    """``array``'s bytes into file ``fd`` from ``offset`` (write(2) fills tmpfs pages faster
    than faulting them in through a mapping)."""
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + WRITE_CHUNK], offset + done)


def _from_segment(shared: Shared, maps: dict[str, np.ndarray],
                  give_back: GiveBack | None = None) -> np.ndarray:
    """The array ``shared`` names, over its file's mapping (``maps``: the files mapped so far,
    each as one flat byte array over its whole mapping)."""
    dtype = np.dtype(shared.dtype)
    nbytes = int(np.prod(shared.shape, dtype=np.int64)) * dtype.itemsize
    flat = maps.get(shared.path)
    if flat is None:
        fd = os.open(shared.path, os.O_RDONLY)
        try:
            os.unlink(shared.path)  # the mapping keeps the memory; the name is not needed again
            size = os.fstat(fd).st_size
            if size == 0:
                return np.empty(shared.shape, dtype)
            m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        flat = maps[shared.path] = np.frombuffer(m, dtype=np.uint8)
        # the buffer numpy took from the mapping lives exactly as long as the last array or
        # tensor over it (each one's base chain ends there): then the mapping is closed on
        # a thread of its own. Unmapping frees the segment's pages, 135 ms for a 1 GB trace's
        # saves on an H200 host, 200 ms for 1 GB here: time the notebook's thread spent at
        # the next trace, when the last one's values were let go.
        if isinstance(flat.base, memoryview):  # (numpy's own; never the mapping itself)
            back = (give_back, shared.path, _FORKS[0]) if give_back is not None else None
            weakref.finalize(flat.base, _unmap_later, m, back).atexit = False
    start = shared.offset
    return flat[start:start + nbytes].view(dtype).reshape(shared.shape)


_FORKS = [0]  # forks of this process so far: a mapping made before one is never given back


def _forked() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_parent=_forked, after_in_child=_forked)

# what the unmapping thread is handed: a mapping, and where to give its segment back
# (``give_back``, the segment's name, forks when it was mapped), if anywhere
_Unmap = tuple[mmap.mmap, tuple[GiveBack, str, int] | None]


class _Unmapper:
    """Closes mappings handed to it (:meth:`put`) on a daemon thread of its own, started on
    first use (and again in a forked child, where the parent's thread does not run); gives
    back what it unmapped once nothing more waits, in one call per ``give_back``."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Unmap] | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def put(self, item: _Unmap) -> None:
        with self._lock:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._run, args=(self._queue,), daemon=True,
                                 name="tpmlab-unmap").start()
            self._queue.put(item)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._queue = None

    @staticmethod
    def _run(q: queue.SimpleQueue[_Unmap]) -> None:
        pending: dict[GiveBack, list[str]] = {}
        while True:
            m, back = q.get()
            _close(m, back, pending)
            del m, back
            if pending and q.empty():
                _give_back(pending)


_UNMAPPER = _Unmapper()


def _unmap_later(m: mmap.mmap, back: tuple[GiveBack, str, int] | None = None) -> None:
    if UNMAP_APART:
        _UNMAPPER.put((m, back))
    else:
        pending: dict[GiveBack, list[str]] = {}
        _close(m, back, pending)
        _give_back(pending)


def _close(m: mmap.mmap, back: tuple[GiveBack, str, int] | None,
           pending: dict[GiveBack, list[str]]) -> None:
    """Unmap ``m``; if that worked and no fork happened since it was mapped, note its
    segment's name in ``pending`` for its ``give_back``."""
    try:
        m.close()  # munmap lets the GIL go meanwhile
    except BufferError:  # still exported (cannot happen once its arrays are gone):
        return  # unmapped with its last user instead, and never given back
    if back is not None and back[2] == _FORKS[0]:
        pending.setdefault(back[0], []).append(back[1])


def _give_back(pending: dict[GiveBack, list[str]]) -> None:
    for give_back, names in pending.items():
        try:
            give_back(names)
        except Exception:  # noqa: BLE001 - the stage is gone: nothing to give back to
            pass
    pending.clear()


def _bundled(array: np.ndarray) -> bool:
    """Whether ``array`` travels in its reply's bundle (when the bundle is worth making)."""
    return BUNDLE_MIN <= array.nbytes < THRESHOLD and not array.dtype.hasobject


class _Bundle:
    """One new segment holding every small array of a reply (:func:`_bundled`), each at
    an offset aligned to :data:`ALIGN` bytes, written when the first is placed."""

    def __init__(self, arrays: list[np.ndarray], made: list[str]) -> None:
        self.arrays, self.made = arrays, made
        self.path: str | None = None
        self.offsets: dict[int, int] = {}

    def place(self, array: np.ndarray) -> Shared:
        if self.path is None:
            self._write()
        return Shared(self.path, array.dtype.str, tuple(array.shape), self.offsets[id(array)])

    def _write(self) -> None:
        path, fd = create_file()
        self.made.append(path)  # freed with the request's others if the notebook never maps it
        try:
            offset = 0
            for array in self.arrays:
                self.offsets[id(array)] = offset
                _write_at(fd, array, offset)
                offset += -(-array.nbytes // ALIGN) * ALIGN
        finally:
            os.close(fd)
        self.path = path


def _unlink_all(by_request: dict[str, list[str]]) -> None:
    for paths in by_request.values():
        unlink(paths)
    by_request.clear()


