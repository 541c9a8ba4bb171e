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
of time, off the request's path, with their pages allocated and mapped (:class:`_Pool`),
of the sizes its last request handed over. A save of such a size takes one and is copied
into it at memory speed; the pool is refilled in the background after each hand-over. On a
GPU stage that background thread also registers each segment with CUDA, so a request never
waits for a registration.

Segments come back: a stage keeps each segment it lends (its pool's name for the file, its
mapping and its registration) until the notebook has unmapped it; the notebook then names
it in a ``take_back`` call and it goes back into the pool, its pages mapped and registered,
instead of a gigabyte of new memory for the next request and a gigabyte freed in the
notebook. The notebook gives back only what it unmapped itself: a mapping that lived
through a fork of its process (the child may still map it) is never given back. A stage
drops what it lent when the request fails, when its name was never taken, and the oldest
once more than :data:`LENT_BYTES` are out; the pool's refill counts what a notebook that
gives back is about to return (:meth:`_Pool.refill`).

Every segment is freed on every path:

* handed over: the notebook unlinks it as soon as it is mapped;
* the request fails or is interrupted (Ctrl-C) before that: the client aborts the
  request and each stage unlinks what it handed over for it (:meth:`Segments.free`);
* the notebook is gone: each stage unlinks what it handed over once the request's
  deadline has passed (at least :data:`MIN_TTL` seconds after the hand-over), on a timer
  of the stage's event loop, and whatever is left (its pool too) when its worker exits;
* the worker was killed before its exit handlers ran: the next stage made on the host
  unlinks the pooled segments of processes that are gone (:func:`sweep_dead`).

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
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from . import pinned_segments
from .compute_gaps import Gaps
from .pinned_segments import Pinning
from .wire import _Typed, _Viewed

SHM = Path("/dev/shm")
PREFIX = "tpmlab-"
THRESHOLD = 1 << 20  # bytes: an array of at least this many gets a segment of its own
#: smaller arrays of a reply, of at least BUNDLE_MIN bytes each, share one segment when
#: together they reach BUNDLE_TOTAL (a layer's output at a short prompt, saved for every
#: layer): one file instead of pickled bytes through the comms; smaller ones travel inline
BUNDLE_MIN = 4 << 10
BUNDLE_TOTAL = 256 << 10
ALIGN = 64  # bytes: where each array of a bundle starts
WRITE_CHUNK = 1 << 30  # bytes per write(2) call (Linux writes at most ~2 GB at once)
MIN_TTL = 60.0  # seconds a segment may wait for the notebook past the hand-over
#: bytes of segments a stage makes ahead of time, at most (``TPMLAB_HANDOVER_POOL_BYTES``;
#: 0: none), and never more than this fraction of /dev/shm's free space
POOL_BYTES = int(os.environ.get("TPMLAB_HANDOVER_POOL_BYTES", 512 << 20))
POOL_SHARE = 0.25
#: segments the pool makes at once: the kernel allocates and zeroes a new segment's pages
#: at 2-10 GB/s per core, and a stage's last request may have handed over a gigabyte
FILL_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))
#: saves copied straight into segments, and segments made ahead of time (False: each large
#: save copied into ordinary memory, then written into a new segment when packed)
DIRECT = True
#: the notebook's mappings are unmapped on a thread of their own while True (False: by the
#: thread that lets the last array over one go, as before). Switched in the notebook to
#: compare the two ways (``benchmarks/handover.py --compare-unmap``).
UNMAP_APART = True
#: segments the notebook has unmapped go back to their stage's pool (False, or
#: ``TPMLAB_HANDOVER_RECYCLE=0`` in the workers' environment: each request's made anew)
RECYCLE = os.environ.get("TPMLAB_HANDOVER_RECYCLE", "1") != "0"
#: bytes a stage may have lent out and not had back before it drops the oldest (a notebook
#: that keeps its values, or went away without giving them back)
LENT_BYTES = int(os.environ.get("TPMLAB_HANDOVER_LENT_BYTES", 4 * POOL_BYTES))
#: the most segment names one ``take_back`` call may carry
TAKE_BACK_MAX = 4096
POOL_KIND = "pool-"  # in the names of segments made ahead of time, until taken
MADV_POPULATE_WRITE = 23  # Linux 5.14: allocate and map a range's pages now, errors returned


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
        self._pool = _Pool(pinning, gaps)
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
            _unlink(made)
            self.free(req)
            return values
        except BaseException:
            _unlink(made)
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
        self._pool.refill(sizes)  # for the next request: segments of these sizes, ready
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
        untaken = _unlink(paths)
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
        notebook, ``dropped`` unreturned, and has ``lent`` out now (``lent_bytes``)."""
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


def _create(kind: str = "") -> tuple[str, int]:
    """A new segment's path (unguessable) and an open descriptor; the file is 0600 and new.
    ``kind`` ``"pool-"`` names a segment of the pool, not handed over yet."""
    path = str(SHM / f"{PREFIX}{os.getpid()}-{kind}{uuid.uuid4().hex}")
    return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


def _new_segment(nbytes: int, populate: bool = False, kind: str = "") -> tuple[str, torch.Tensor]:
    """A new segment of ``nbytes`` and a flat uint8 tensor over it (shared mapping: what is
    written into the tensor is in the file). The mapping lives as long as the tensor.
    ``populate``: map every page now, so that writes into it run at memory speed."""
    path, fd = _create(kind)
    try:
        # allocated now, in the kernel: a full /dev/shm fails here (OSError), not later
        # with SIGBUS on a write through the mapping
        os.posix_fallocate(fd, 0, nbytes)
        m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if populate:
            try:
                m.madvise(MADV_POPULATE_WRITE)
            except OSError:  # an older kernel: touch each page instead
                np.frombuffer(m, dtype=np.uint8)[::mmap.PAGESIZE] = 0
    except BaseException:
        os.close(fd)
        _unlink([path])
        raise
    os.close(fd)
    return path, torch.from_numpy(np.frombuffer(m, dtype=np.uint8))  # holds the map


def _to_segment(array: np.ndarray, made: list[str]) -> Any:
    if array.nbytes < THRESHOLD or array.dtype.hasobject:
        return array
    path, fd = _create()
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
        path, fd = _create()
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


def sweep_dead() -> int:
    """Unlink the pooled segments of this user's processes that are gone (a worker killed
    before its exit handlers ran); returns how many. Segments handed over are left to their
    timers and the notebook: a process in another PID namespace may look gone from here,
    and losing a pooled segment costs it only a fresh one (:meth:`_Pool.take`)."""
    removed = 0
    uid = os.getuid()
    for path in SHM.glob(f"{PREFIX}*-{POOL_KIND}*"):
        try:
            pid = int(path.name.removeprefix(PREFIX).split("-", 1)[0])
            if path.stat().st_uid != uid or pid == os.getpid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:  # gone: no one will take its segments
            _unlink([str(path)])
            removed += 1
        except (ValueError, OSError):  # not ours to judge (a name of another form, a
            continue  # process of another user), or already gone
    return removed


def _unlink(paths: list[str]) -> list[str]:
    """Unlink ``paths``; those that were still there (the rest the notebook took)."""
    gone = []
    for p in paths:
        try:
            os.unlink(p)
            gone.append(p)
        except FileNotFoundError:  # the notebook took it
            pass
    return gone


def _unlink_all(by_request: dict[str, list[str]]) -> None:
    for paths in by_request.values():
        _unlink(paths)
    by_request.clear()


class _Lent:
    """A segment of the pool handed over under another name, until it comes back."""

    __slots__ = ("pooled", "flat", "registered", "nbytes", "req", "round")

    def __init__(self, pooled: str, flat: torch.Tensor, registered: bool, nbytes: int,
                 req: str) -> None:
        self.pooled, self.flat, self.registered = pooled, flat, registered
        self.nbytes, self.req = nbytes, req
        self.round: int | None = None  # the hand-over it went out with (None: still packing)


class _Pool:
    """Segments made ahead of time by one stage, by size, their pages allocated and mapped.

    :meth:`take` hands one over (it is the caller's from then on); :meth:`refill` makes
    segments of the given sizes on a background thread, up to :data:`POOL_BYTES` in all and
    :data:`POOL_SHARE` of the free space of /dev/shm. What is left is unlinked at exit.

    A segment taken for a request (``req``) is lent: a new name for it is linked beside
    the pool's, which the pool keeps with its mapping (and registration) until the notebook
    gives it back (:meth:`take_back`, back into the pool) or the stage drops it
    (:meth:`drop`, the oldest once more than :data:`LENT_BYTES` are out).

    With a ``pinning`` (a GPU stage), that thread also registers each segment with CUDA
    (:mod:`.pinned_segments`); a segment that fails to register stays, unregistered, for
    copies made on the host. The pinning holds each registered mapping until it is
    unregistered (at the latest when the pinning goes). With ``gaps``, each segment is made
    while the stage does not compute (:mod:`.compute_gaps`)."""

    def __init__(self, pinning: Pinning | None = None, gaps: Gaps | None = None) -> None:
        # by size: (path, flat uint8 tensor over its mapping, registered)
        self._free: dict[int, list[tuple[str, torch.Tensor, bool]]] = {}
        self._bytes = 0
        self._lent: dict[str, _Lent] = {}  # by the name handed over, oldest first
        self._lent_bytes = 0
        self._round = 0  # hand-overs that lent segments so far (replies packed)
        self._back_round: int | None = None  # the latest a returned segment went out with
        self._counts = {"made": 0, "returned": 0, "dropped": 0}
        self._lock = threading.Lock()
        self._filling = False
        self._wanted: list[int] = []  # sizes asked for while a fill ran
        self._pinning = pinning
        self._gaps = gaps  # the stage's computations, which the fill stays out of
        weakref.finalize(self, _unlink_pooled, self._free, self._lent)

    def ready_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def registered(self, lent: bool = False) -> int:
        """Segments ready here (``lent``: lent out) that are registered with CUDA."""
        with self._lock:
            if lent:
                return sum(entry.registered for entry in self._lent.values())
            return sum(r for ready in self._free.values() for _, _, r in ready)

    def recycling(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "lent": len(self._lent), "lent_bytes": self._lent_bytes}

    def take(self, nbytes: int, pinned: bool | None = None, req: str | None = None,
             ) -> tuple[str, torch.Tensor, bool, bool] | None:
        """A segment of ``nbytes``: ``(path, flat, registered, lent)``, or ``None``;
        ``pinned``: only a registered one (``True``), only another (``False``), or either
        (``None``). With ``req`` (and :data:`RECYCLE`), it is lent to that request."""
        with self._lock:
            ready = self._free.get(nbytes, [])
            at = next((i for i in range(len(ready) - 1, -1, -1)
                       if pinned is None or ready[i][2] == pinned), None)
            if at is None:
                return None
            self._bytes -= nbytes
            pooled, flat, registered = ready.pop(at)
        if RECYCLE and req is not None:
            return self._lend(pooled, flat, registered, nbytes, req)
        path, fd = _create()  # a fresh name, as any segment's: the pool's name is gone
        os.close(fd)
        try:
            os.replace(pooled, path)
        except OSError:  # swept away meanwhile: a fresh segment instead
            _unlink([pooled, path])
            if registered:
                self._pinning.release([flat])
            return None
        return path, flat, registered, False

    def fresh(self, nbytes: int, req: str) -> tuple[str, torch.Tensor, bool, bool]:
        """A new segment of ``nbytes`` for request ``req`` (none was ready): lent, so that
        it too comes back into the pool (:data:`RECYCLE`; else only handed over)."""
        if not RECYCLE:
            return (*_new_segment(nbytes), False, False)
        pooled, flat = _new_segment(nbytes, kind=POOL_KIND)
        with self._lock:
            self._counts["made"] += 1
        lent = self._lend(pooled, flat, False, nbytes, req)
        if lent is None:
            raise OSError(f"segment {pooled} went away as it was made")
        return lent

    def _lend(self, pooled: str, flat: torch.Tensor, registered: bool, nbytes: int, req: str,
              ) -> tuple[str, torch.Tensor, bool, bool] | None:
        path = str(SHM / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        try:
            os.link(pooled, path)  # the notebook unlinks this name; the pool keeps its own
        except OSError:  # swept away meanwhile: a fresh segment instead
            self._discard([_Lent(pooled, flat, registered, nbytes, req)], count=False)
            return None
        dropped = []
        with self._lock:
            # the oldest handed over make room (never one whose request is still packing:
            # the device may be copying into it)
            for name in list(self._lent):
                if self._lent_bytes + nbytes <= LENT_BYTES:
                    break
                if self._lent[name].round is not None:
                    dropped.append(self._lent.pop(name))
                    self._lent_bytes -= dropped[-1].nbytes
            self._lent[path] = _Lent(pooled, flat, registered, nbytes, req)
            self._lent_bytes += nbytes
        self._discard(dropped)
        return path, flat, registered, True

    def handed(self, req: str) -> None:
        """Request ``req``'s reply is packed: what it was lent may be given back now."""
        with self._lock:
            lent = [entry for entry in self._lent.values()
                    if entry.req == req and entry.round is None]
            for entry in lent:
                entry.round = self._round
            self._round += bool(lent)

    def take_back(self, paths: list[str]) -> int:
        """Lent segments the notebook has unmapped, by the names they were handed over
        under, back into the pool (within its budget; the rest dropped); how many."""
        back, dropped = 0, []
        with self._lock:
            for path in paths:
                lent = self._lent.get(path)
                if lent is None or lent.round is None:  # not lent here, or not handed over
                    continue
                del self._lent[path]
                self._lent_bytes -= lent.nbytes
                if self._bytes + lent.nbytes > POOL_BYTES:
                    dropped.append(lent)
                    continue
                self._free.setdefault(lent.nbytes, []).append(
                    (lent.pooled, lent.flat, lent.registered))
                self._bytes += lent.nbytes
                self._back_round = max(self._back_round or 0, lent.round)
                back += 1
            self._counts["returned"] += back
        self._discard(dropped, count=False)
        return back

    def reclaim(self, paths: list[str]) -> None:
        """Lent segments of a request being packed that it did not hand over (no one else
        ever had their names): back into the pool at once, their lent names unlinked."""
        with self._lock:
            taken = [(p, self._lent.pop(p)) for p in paths
                     if p in self._lent and self._lent[p].round is None]
            for _, lent in taken:
                self._lent_bytes -= lent.nbytes
                self._free.setdefault(lent.nbytes, []).append(
                    (lent.pooled, lent.flat, lent.registered))
                self._bytes += lent.nbytes
        _unlink([path for path, _ in taken])

    def drop(self, paths: list[str], req: str | None = None) -> None:
        """Stop lending ``paths`` and, with ``req``, whatever that request took before its
        reply was packed: their pool names unlinked, unregistered, their mappings let go."""
        with self._lock:
            names = [p for p in paths if p in self._lent]
            if req is not None:
                names += [p for p, lent in self._lent.items()
                          if lent.req == req and lent.round is None and p not in names]
            dropped = [self._lent.pop(p) for p in names]
            self._lent_bytes -= sum(lent.nbytes for lent in dropped)
        self._discard(dropped)

    def _discard(self, dropped: list[_Lent], count: bool = True) -> None:
        if not dropped:
            return
        if count:
            with self._lock:
                self._counts["dropped"] += len(dropped)
        _unlink([lent.pooled for lent in dropped])
        pinned = [lent.flat for lent in dropped if lent.registered]
        if pinned:
            self._pinning.release(pinned)

    def refill(self, sizes: list[int]) -> None:
        """Make segments of ``sizes`` in the background; while a fill runs, the latest
        sizes asked for are made after it (a request that came while the pool was filling,
        or registering, still finds its segments ready next time).

        A notebook that gives segments back (one lent by one of the last three hand-overs
        came back) is counted on to return those lent by the last two and by requests
        still packing: only what they and the ready segments lack is made."""
        if not sizes or POOL_BYTES <= 0 or not DIRECT:
            return
        with self._lock:
            self._wanted = list(sizes)
            if self._filling:
                return
            self._filling = True
        threading.Thread(target=self._fill, daemon=True, name="tpmlab-handover-pool").start()

    def _lacking(self, sizes: list[int]) -> list[int]:
        """Of ``sizes``, those neither ready nor about to come back."""
        with self._lock:
            have = {n: len(ready) for n, ready in self._free.items()}
            if RECYCLE and self._back_round is not None and self._back_round >= self._round - 3:
                for lent in self._lent.values():
                    if lent.round is None or lent.round >= self._round - 2:
                        have[lent.nbytes] = have.get(lent.nbytes, 0) + 1
        lacking = []
        for nbytes in sizes:
            if have.get(nbytes, 0) > 0:
                have[nbytes] -= 1
            else:
                lacking.append(nbytes)
        return lacking

    def _fill(self) -> None:
        done = False
        try:
            while True:
                with self._lock:
                    sizes, self._wanted = self._wanted, []
                    if not sizes:  # nothing asked for meanwhile: the next refill starts anew
                        self._filling = False
                        done = True
                        return
                st = os.statvfs(SHM)
                budget = min(POOL_BYTES, int(st.f_bavail * st.f_frsize * POOL_SHARE))
                chosen, planned = [], self.ready_bytes()  # one fill runs at a time
                for nbytes in self._lacking(sizes):
                    if planned + nbytes > budget:
                        break
                    planned += nbytes
                    chosen.append(nbytes)
                if FILL_THREADS > 1 and len(chosen) > 1:
                    with ThreadPoolExecutor(FILL_THREADS,
                                            thread_name_prefix="tpmlab-handover-fill") as threads:
                        for made in [threads.submit(self._make, n) for n in chosen]:
                            made.result()
                else:
                    for nbytes in chosen:
                        self._make(nbytes)
        except OSError:  # /dev/shm full: no pool, segments are made when needed
            pass
        finally:
            if not done:
                with self._lock:
                    self._filling = False
                    self._wanted = []

    def _make(self, nbytes: int) -> None:
        """One segment of ``nbytes`` into the pool."""
        if self._gaps is not None:  # between the stage's computations
            self._gaps.wait()
        pin = self._pinning is not None and pinned_segments.ACTIVE
        # registering locks the pages, and maps each as it does: no need to populate them
        # first (madvise holds the GIL while it maps)
        path, flat = _new_segment(nbytes, populate=not pin, kind=POOL_KIND)
        registered = pin and self._pinning.register(flat)  # here, off any request's path
        with self._lock:
            self._free.setdefault(nbytes, []).append((path, flat, registered))
            self._bytes += nbytes
            self._counts["made"] += 1


def _unlink_pooled(free: dict[int, list[tuple[str, torch.Tensor, bool]]],
                   lent: dict[str, _Lent]) -> None:
    # a registered segment's mapping is held by its pinning until unregistered; a lent
    # one's pages stay while the notebook maps them
    _unlink([path for ready in free.values() for path, _, _ in ready])
    _unlink([entry.pooled for entry in lent.values()])
    free.clear()
    lent.clear()
