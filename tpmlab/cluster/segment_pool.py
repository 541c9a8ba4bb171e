"""The files in ``/dev/shm`` that hold values handed over to the notebook, and each stage's
pool of them (:class:`SegmentPool`): made ahead of time with their pages mapped (and, on a
GPU stage, registered with CUDA), lent to requests, and taken back once the notebook has
unmapped them. :mod:`.handover` packs and unpacks values through them.

A file's name says whose it is: ``tpmlab-<pid>-<hex>`` (handed over, or being made), and
``tpmlab-<pid>-pool-<hex>`` (the pool's own name, ready or lent); the hex part is random,
so only who was handed a name can open the file.
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import pinned_segments
from .compute_gaps import Gaps
from .pinned_segments import Pinning

SHM = Path("/dev/shm")
PREFIX = "tpmlab-"
#: bytes of segments a stage makes ahead of time, at most (``TPMLAB_HANDOVER_POOL_BYTES``;
#: 0: none), and never more than this fraction of /dev/shm's free space
POOL_BYTES = int(os.environ.get("TPMLAB_HANDOVER_POOL_BYTES", 512 << 20))
POOL_SHARE = 0.25
#: segments the pool makes at once: the kernel allocates and zeroes a new segment's pages
#: at 2-10 GB/s per core, and a stage's last request may have handed over a gigabyte
FILL_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))
#: segments the notebook has unmapped go back to their stage's pool (False, or
#: ``TPMLAB_HANDOVER_RECYCLE=0`` in the workers' environment: each request's made anew)
RECYCLE = os.environ.get("TPMLAB_HANDOVER_RECYCLE", "1") != "0"
#: bytes a stage may have lent out and not had back before it drops the oldest (a notebook
#: that keeps its values, or went away without giving them back)
LENT_BYTES = int(os.environ.get("TPMLAB_HANDOVER_LENT_BYTES", 4 * POOL_BYTES))
POOL_KIND = "pool-"  # in the names of segments made ahead of time, until taken
MADV_POPULATE_WRITE = 23  # Linux 5.14: allocate and map a range's pages now, errors returned


def _new_name(kind: str = "") -> str:
    """An unguessable path for a segment of this process (``kind`` :data:`POOL_KIND`: the
    pool's own name for one)."""
    return str(SHM / f"{PREFIX}{os.getpid()}-{kind}{uuid.uuid4().hex}")


def create_file(kind: str = "") -> tuple[str, int]:
    """A new segment's path (unguessable) and an open descriptor; the file is 0600 and new.
    ``kind`` ``"pool-"`` names a segment of the pool, not handed over yet."""
    path = _new_name(kind)
    return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


def new_segment(nbytes: int, populate: bool = False, kind: str = "") -> tuple[str, torch.Tensor]:
    """A new segment of ``nbytes`` and a flat uint8 tensor over it (shared mapping: what is
    written into the tensor is in the file). The mapping lives as long as the tensor.
    ``populate``: map every page now, so that writes into it run at memory speed."""
    path, fd = create_file(kind)
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
        unlink([path])
        raise
    os.close(fd)
    return path, torch.from_numpy(np.frombuffer(m, dtype=np.uint8))  # holds the map


def sweep_dead() -> int:
    """Unlink the pooled segments of this user's processes that are gone (a worker killed
    before its exit handlers ran); returns how many. Segments handed over are left to their
    timers and the notebook: a process in another PID namespace may look gone from here,
    and losing a pooled segment costs it only a fresh one (:meth:`SegmentPool.take`)."""
    removed = 0
    uid = os.getuid()
    for path in SHM.glob(f"{PREFIX}*-{POOL_KIND}*"):
        try:
            pid = int(path.name.removeprefix(PREFIX).split("-", 1)[0])
            if path.stat().st_uid != uid or pid == os.getpid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:  # gone: no one will take its segments
            unlink([str(path)])
            removed += 1
        except (ValueError, OSError):  # not ours to judge (a name of another form, a
            continue  # process of another user), or already gone
    return removed


def unlink(paths: list[str]) -> list[str]:
    """Unlink ``paths``; those that were still there (the rest the notebook took)."""
    gone = []
    for p in paths:
        try:
            os.unlink(p)
            gone.append(p)
        except FileNotFoundError:  # the notebook took it
            pass
    return gone


class Lent:
    """A segment of the pool handed over under another name, until it comes back."""

    __slots__ = ("pooled", "flat", "registered", "nbytes", "req", "round")

    def __init__(self, pooled: str, flat: torch.Tensor, registered: bool, nbytes: int,
                 req: str) -> None:
        self.pooled, self.flat, self.registered = pooled, flat, registered
        self.nbytes, self.req = nbytes, req
        self.round: int | None = None  # the hand-over it went out with (None: still packing)


class SegmentPool:
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
        self._lent: dict[str, Lent] = {}  # by the name handed over, oldest first
        self._lent_bytes = 0
        self._round = 0  # hand-overs that lent segments so far (replies packed)
        self._back_round: int | None = None  # the latest a returned segment went out with
        # sizes requests found none of ready since the last fill: made on top of what the
        # fill counts on coming back (returns come later than counted on, or not at all)
        self._missed: list[int] = []
        self._counts = {"made": 0, "returned": 0, "dropped": 0}
        self._lock = threading.Lock()
        self._filling = False
        self._making = 0  # bytes of segments being made now
        self._wanted: list[int] = []  # sizes asked for while a fill ran
        self._pinning = pinning
        self._gaps = gaps  # the stage's computations, which the fill stays out of
        weakref.finalize(self, _unlink_pooled, self._free, self._lent)

    @property
    def _registering(self) -> bool:
        """Whether this pool's segments are registered with the device (a GPU stage, while
        registration is on): then requests take only registered ones."""
        return self._pinning is not None and pinned_segments.ACTIVE

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
            return {**self._counts, "lent": len(self._lent), "lent_bytes": self._lent_bytes,
                    "ready_bytes": self._bytes}

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
                if req is not None:
                    self._missed.append(nbytes)
                return None
            self._bytes -= nbytes
            pooled, flat, registered = ready.pop(at)
        if RECYCLE and req is not None:
            return self._lend(pooled, flat, registered, nbytes, req)
        path, fd = create_file()  # a fresh name, as any segment's: the pool's name is gone
        os.close(fd)
        try:
            os.replace(pooled, path)
        except OSError:  # swept away meanwhile: a fresh segment instead
            unlink([pooled, path])
            if registered:
                self._pinning.release([flat])
            return None
        return path, flat, registered, False

    def fresh(self, nbytes: int, req: str) -> tuple[str, torch.Tensor, bool, bool]:
        """A new segment of ``nbytes`` for request ``req`` (none was ready): lent, so that
        it too comes back into the pool (:data:`RECYCLE`; else only handed over)."""
        if not RECYCLE:
            return (*new_segment(nbytes), False, False)
        pooled, flat = new_segment(nbytes, kind=POOL_KIND)
        with self._lock:
            self._counts["made"] += 1
        lent = self._lend(pooled, flat, False, nbytes, req)
        if lent is None:
            raise OSError(f"segment {pooled} went away as it was made")
        return lent

    def _lend(self, pooled: str, flat: torch.Tensor, registered: bool, nbytes: int, req: str,
              ) -> tuple[str, torch.Tensor, bool, bool] | None:
        path = _new_name()
        try:
            os.link(pooled, path)  # the notebook unlinks this name; the pool keeps its own
        except OSError:  # swept away meanwhile: a fresh segment instead
            self._discard([Lent(pooled, flat, registered, nbytes, req)], count=False)
            return None
        dropped = []
        with self._lock:
            # the oldest handed over make room (never one whose request is still packing:
            # the device may be copying into it)
            over = [name for name in self._lent if self._lent[name].round is not None] \
                if self._lent_bytes + nbytes > LENT_BYTES else []
            for name in over:
                if self._lent_bytes + nbytes <= LENT_BYTES:
                    break
                dropped.append(self._lent.pop(name))
                self._lent_bytes -= dropped[-1].nbytes
            self._lent[path] = Lent(pooled, flat, registered, nbytes, req)
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
                self._ready(lent.pooled, lent.flat, lent.registered, lent.nbytes)
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
                self._ready(lent.pooled, lent.flat, lent.registered, lent.nbytes)
        unlink([path for path, _ in taken])

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

    def _ready(self, pooled: str, flat: torch.Tensor, registered: bool, nbytes: int) -> None:
        """Put a segment among those ready to take (under the lock)."""
        self._free.setdefault(nbytes, []).append((pooled, flat, registered))
        self._bytes += nbytes

    def _discard(self, dropped: list[Lent], count: bool = True) -> None:
        if not dropped:
            return
        if count:
            with self._lock:
                self._counts["dropped"] += len(dropped)
        unlink([lent.pooled for lent in dropped])
        pinned = [lent.flat for lent in dropped if lent.registered]
        if pinned:
            self._pinning.release(pinned)

    def refill(self, sizes: list[int]) -> None:
        """Make segments of ``sizes`` in the background; while a fill runs, the latest
        sizes asked for are made after it (a request that came while the pool was filling,
        or registering, still finds its segments ready next time).

        A notebook that gives segments back (one lent by one of the last three hand-overs
        came back) is counted on to return those lent by the last two and by requests
        still packing: only what they and the ready segments lack is made, and one more
        segment for each that a request found none of ready since the last fill. So once the
        notebook keeps its values, at most one request finds none ready before the pool
        makes them again, and a notebook whose returns come late gets the segments its
        lag needs."""
        if not sizes or POOL_BYTES <= 0:
            return
        with self._lock:
            self._wanted = list(sizes)
            if self._filling:
                return
            self._filling = True
        threading.Thread(target=self._fill, daemon=True, name="tpmlab-handover-pool").start()

    def _lacking(self, sizes: list[int]) -> list[int]:
        """Of ``sizes``, those neither ready nor about to come back, and those requests found
        none of ready since the last fill (when counting on returns)."""
        pin = self._registering  # then only registered segments count
        with self._lock:
            have = {n: sum(r or not pin for _, _, r in ready) for n, ready in self._free.items()}
            missed, self._missed = self._missed, []
            if RECYCLE and self._back_round is not None and self._back_round >= self._round - 3:
                for lent in self._lent.values():
                    if (lent.round is None or lent.round >= self._round - 2) \
                            and (lent.registered or not pin):
                        have[lent.nbytes] = have.get(lent.nbytes, 0) + 1
            else:  # counting on nothing: what is lacking is made anyway
                missed = []
        lacking = []
        for nbytes in sizes:
            if have.get(nbytes, 0) > 0:
                have[nbytes] -= 1
            else:
                lacking.append(nbytes)
        return lacking + missed

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
                chosen = self._lacking(sizes)  # each made only while it fits (_make)
                if FILL_THREADS > 1 and len(chosen) > 1:
                    with ThreadPoolExecutor(FILL_THREADS,
                                            thread_name_prefix="tpmlab-handover-fill") as threads:
                        for made in [threads.submit(self._make, n, budget) for n in chosen]:
                            made.result()
                else:
                    for nbytes in chosen:
                        self._make(nbytes, budget)
        except OSError:  # /dev/shm full: no pool, segments are made when needed
            pass
        finally:
            if not done:
                with self._lock:
                    self._filling = False
                    self._wanted = []

    def _make(self, nbytes: int, budget: int) -> bool:
        """One segment of ``nbytes`` into the pool (on a GPU stage, registered: one of the
        ready ones that is not, or a new one), unless segments given back meanwhile (or made
        beside it) leave no room for a new one in ``budget`` bytes; whether it was."""
        pin = self._registering
        with self._lock:  # no wait for a gap for what would not fit
            if self._bytes + self._making + nbytes > budget and not (
                    pin and any(not r for _, _, r in self._free.get(nbytes, []))):
                return False
        if self._gaps is not None:  # between the stage's computations
            self._gaps.wait()
        with self._lock:
            # on a GPU stage, a ready segment that is not registered (made while registration
            # was off, or given back so) is registered rather than a new one made
            plain = self._pop_unregistered(nbytes) if pin else None
            # returns that came while the fill waited take the place of a new one
            if plain is None and self._bytes + self._making + nbytes > budget:
                return False
            self._making += nbytes
        try:
            if plain is not None:
                registered = False
                try:
                    registered = self._pinning.register(plain[1])
                finally:  # back among the ready, registered or not
                    with self._lock:
                        self._ready(*plain, registered, nbytes)
            else:
                self._make_now(nbytes, pin)
        finally:
            with self._lock:
                self._making -= nbytes
        return True

    def _pop_unregistered(self, nbytes: int) -> tuple[str, torch.Tensor] | None:
        """A ready segment of ``nbytes`` that is not registered, taken out (under the lock)."""
        ready = self._free.get(nbytes, [])
        at = next((i for i, (_, _, r) in enumerate(ready) if not r), None)
        if at is None:
            return None
        path, flat, _ = ready.pop(at)
        self._bytes -= nbytes
        return path, flat

    def _make_now(self, nbytes: int, pin: bool) -> None:
        # registering locks the pages, and maps each as it does: no need to populate them
        # first (madvise holds the GIL while it maps)
        path, flat = new_segment(nbytes, populate=not pin, kind=POOL_KIND)
        registered = pin and self._pinning.register(flat)  # here, off any request's path
        with self._lock:
            self._ready(path, flat, registered, nbytes)
            self._counts["made"] += 1


def _unlink_pooled(free: dict[int, list[tuple[str, torch.Tensor, bool]]],
                   lent: dict[str, Lent]) -> None:
    # a registered segment's mapping is held by its pinning until unregistered; a lent
    # one's pages stay while the notebook maps them
    unlink([path for ready in free.values() for path, _, _ in ready])
    unlink([entry.pooled for entry in lent.values()])
    free.clear()
    lent.clear()
