"""Saved values handed from a stage to the notebook through shared memory.

When the notebook's process and a stage's worker share a host (the same kernel, the same
``/dev/shm`` mount, the same user), each large array among a stage's saves is copied once
into a file of its own in ``/dev/shm`` (mode 0600) and only its name, dtype and shape
travel with the reply. The notebook maps the file (copy-on-write: a plan's or the user's
writes never reach the file) and removes its name at once, so the memory lives exactly
as long as the tensor over it. Other hosts, other users and small arrays travel inline
as before, as numpy frames (:mod:`.wire`).

Every segment is freed on every path:

* handed over: the notebook unlinks it as soon as it is mapped;
* the request fails or is interrupted (Ctrl-C) before that: the client aborts the
  request and each stage unlinks what it handed over for it (:meth:`Segments.free`);
* the notebook is gone: each stage unlinks what it handed over once the request's
  deadline has passed (at least :data:`MIN_TTL` seconds after the hand-over), on a timer
  of the stage's event loop, and whatever is left when its worker exits.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from .wire import _Typed, _Viewed

SHM = Path("/dev/shm")
PREFIX = "tpmlab-"
THRESHOLD = 1 << 20  # bytes: smaller arrays travel inline with the reply
WRITE_CHUNK = 1 << 30  # bytes per write(2) call (Linux writes at most ~2 GB at once)
MIN_TTL = 60.0  # seconds a segment may wait for the notebook past the hand-over


class Token(TypedDict):
    """Who may receive segments: the same boot, the same /dev/shm mount, the same user."""

    boot: str
    shm: list[int]
    uid: int


class Shared:
    """An array handed over as a shared-memory file: ``path``, numpy ``dtype``, ``shape``."""

    __slots__ = ("path", "dtype", "shape")

    def __init__(self, path: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, dtype, shape

    def __reduce__(self):
        return (Shared, (self.path, self.dtype, self.shape))


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


def _same_host(token: Token | None) -> bool:
    return token is not None and token == local_token()


class Segments:
    """The segments one stage handed over, by request, until the notebook took them."""

    def __init__(self) -> None:
        self._by_request: dict[str, list[str]] = {}
        weakref.finalize(self, _unlink_all, self._by_request)  # also runs at exit

    def pack(self, values: Any, req: str, token: Token | None, deadline: float) -> Any:
        """``values`` (wire form) with every array of at least :data:`THRESHOLD` bytes put in
        shared memory, if the notebook holding ``token`` shares this host; else unchanged.
        The segments are freed at the request's deadline (monotonic seconds) if the
        notebook has not taken them."""
        if not _same_host(token):
            return values
        made: list[str] = []
        try:
            out = _walk(values, lambda a: _to_segment(a, made))
        except OSError:  # /dev/shm full or gone: the values travel inline instead
            _unlink(made)
            return values
        except BaseException:
            _unlink(made)
            raise
        if made:
            self._by_request.setdefault(req, []).extend(made)
            ttl = max(deadline - time.monotonic(), MIN_TTL)
            try:
                asyncio.get_running_loop().call_later(ttl, self.free, req, made)
            except RuntimeError:  # no event loop (used outside a stage): freed by free()/exit
                pass
        return out

    def free(self, req: str, only: list[str] | None = None) -> None:
        """Unlink what was handed over for ``req`` (``only`` those) and the notebook did not
        take."""
        paths = self._by_request.pop(req, [])
        if only is not None:
            keep = [p for p in paths if p not in only]
            if keep:
                self._by_request[req] = keep
            paths = [p for p in paths if p in only]
        _unlink(paths)

    def held(self) -> int:
        """Segments handed over and not yet freed here (the notebook may have taken them)."""
        return sum(os.path.exists(p) for ps in self._by_request.values() for p in ps)


def unpack(values: Any) -> Any:
    """The notebook's side of :meth:`Segments.pack`: every :class:`Shared` becomes an array
    over its mapped segment (no copy), whose name is removed at once. Segments of values not
    yet reached when an error stops this are freed by the stage."""
    return _walk(values, None, _from_segment)


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
    path = str(SHM / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    made.append(path)
    try:
        # write(2) fills tmpfs pages faster than faulting them in through a mapping
        view = memoryview(np.ascontiguousarray(array)).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:done + WRITE_CHUNK])
    finally:
        os.close(fd)
    return Shared(path, array.dtype.str, tuple(array.shape))


def _from_segment(shared: Shared) -> np.ndarray:
    dtype = np.dtype(shared.dtype)
    nbytes = dtype.itemsize * int(np.prod(shared.shape, dtype=np.int64))
    fd = os.open(shared.path, os.O_RDONLY)
    try:
        os.unlink(shared.path)  # the mapping keeps the memory; the name is not needed again
        if nbytes == 0:
            return np.empty(shared.shape, dtype)
        m = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return np.frombuffer(m, dtype=dtype).reshape(shared.shape)


def _unlink(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:  # the notebook took it
            pass


def _unlink_all(by_request: dict[str, list[str]]) -> None:
    for paths in by_request.values():
        _unlink(paths)
    by_request.clear()
