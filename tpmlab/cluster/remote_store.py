"""Remote saves on a stage's worker: values a plan saved with ``remote=True``, kept where
they were made, accounted per stage and owner.

A stage puts a request's remote saves here (:meth:`RemoteStore.put`) and returns only a
:class:`RemoteHandle` (key, shape, dtype, worker) for each. The notebook then submits one
small Dask task per value, pinned to that worker, that *takes* the array out of the store
(:func:`take`): from then on the array is that task's result, held in the worker's memory
by Dask for as long as the notebook holds its future, and reduced or written to Zarr by
later tasks on the workers. The store keeps only a weak reference to a taken array, so
its accounting of an owner's bytes falls when Dask frees the array (the notebook let go
of its future, closed its client, or the cluster closed).

An owner's values on one stage are held to ``max_remote_bytes`` and ``max_remote_values``
(:class:`~tpmlab.ir.validate.Limits`); a request that would pass them fails with
:class:`RemoteLimitError` and keeps nothing. Values never taken (the notebook went away
between the run and its take) are dropped after :data:`UNTAKEN_TTL` seconds, and with
their request when it fails.
"""

from __future__ import annotations

import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..ir.dtypes import NUMPY_LACKS
from .errors import RemoteLimitError, RemoteValueGone

UNTAKEN_TTL = 600.0  # seconds a value waits for the notebook's take before it is dropped


@dataclass(frozen=True)
class RemoteHandle:
    """What travels back for a remote save: the store ``key``, the array's ``shape`` and
    numpy ``dtype`` (``bfloat16`` and other dtypes numpy lacks are kept as ``float32``),
    ``nbytes``, the ``worker`` address holding it and the saved ``torch_dtype``."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    worker: str
    torch_dtype: str


@dataclass
class _Entry:
    stage: str
    owner: str
    req: str
    nbytes: int
    array: np.ndarray | None  # held until taken
    ref: Any  # a weak reference to the array once taken
    expires: float

    @property
    def alive(self) -> bool:
        return self.array is not None or (self.ref is not None and self.ref() is not None)


def to_array(value: Any) -> np.ndarray:
    """A host numpy array of a saved tensor (dtypes numpy lacks become float32)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"a remote save keeps one tensor, not a {type(value).__name__}")
    t = value.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in NUMPY_LACKS:
        t = t.float()
    return np.ascontiguousarray(t.numpy())


class RemoteStore:
    """One worker process's remote values, keyed by store key (thread-safe: stages put
    from their compute threads, Dask tasks take from theirs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def put(self, stage: str, owner: str, req: str, arrays: list[np.ndarray], *,
            worker: str, torch_dtypes: list[str], max_bytes: int,
            max_values: int) -> list[RemoteHandle]:
        """Keep ``arrays`` for ``owner`` on ``stage``, all or none; their handles."""
        new = sum(a.nbytes for a in arrays)
        with self._lock:
            self._sweep()
            held = [e for e in self._entries.values()
                    if e.stage == stage and e.owner == owner and e.alive]
            held_bytes = sum(e.nbytes for e in held)
            if held_bytes + new > max_bytes:
                raise RemoteLimitError(
                    f"remote saves: this request keeps {new:,} bytes on {stage}, where "
                    f"{held_bytes:,} of the limit of {max_bytes:,} bytes (max_remote_bytes) "
                    "are held already: let go of remote values you no longer need (del, "
                    "RemoteValue.release(), lab.release_remote()) or reduce them first")
            if len(held) + len(arrays) > max_values:
                raise RemoteLimitError(
                    f"remote saves: this request keeps {len(arrays)} values on {stage}, where "
                    f"{len(held)} of the limit of {max_values} (max_remote_values) are held "
                    "already: let go of remote values you no longer need")
            expires = time.monotonic() + UNTAKEN_TTL
            handles = []
            for array, tdtype in zip(arrays, torch_dtypes):
                key = uuid.uuid4().hex
                self._entries[key] = _Entry(stage, owner, req, array.nbytes, array, None, expires)
                handles.append(RemoteHandle(key, tuple(array.shape), str(array.dtype),
                                            array.nbytes, worker, tdtype))
            return handles

    def take(self, key: str) -> np.ndarray:
        """Hand the array to the caller (a Dask task, whose result it becomes); keep only a
        weak reference, so the entry goes when Dask frees the array."""
        with self._lock:
            entry = self._entries.get(key)
            array = None
            if entry is not None:
                array = entry.array if entry.array is not None else (
                    entry.ref() if entry.ref is not None else None)
            if array is None:
                raise RemoteValueGone(f"remote value {key} is no longer on this worker (it "
                                      "was freed, expired untaken, or its worker restarted)")
            if entry.array is not None:
                entry.ref = weakref.ref(array)  # dead once Dask frees it; swept then
                entry.array = None
            return array

    def free(self, keys: list[str]) -> None:
        """Drop entries not taken yet (a taken array is Dask's to free)."""
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.array is not None:
                    del self._entries[key]

    def free_request(self, req: str) -> None:
        """Drop what a failed or aborted request put and nobody took."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.req == req and e.array is not None]:
                del self._entries[key]

    def free_stage(self, stage: str) -> None:
        """Drop every untaken value of a stage (it is going away)."""
        with self._lock:
            for key in [k for k, e in self._entries.items()
                        if e.stage == stage and e.array is not None]:
                del self._entries[key]

    def usage(self, stage: str) -> dict[str, dict[str, int]]:
        """``{owner: {"bytes": ..., "values": ..., "untaken": ...}}`` of live values on ``stage``."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            self._sweep()
            for e in self._entries.values():
                if e.stage != stage or not e.alive:
                    continue
                u = out.setdefault(e.owner, {"bytes": 0, "values": 0, "untaken": 0})
                u["bytes"] += e.nbytes
                u["values"] += 1
                u["untaken"] += e.array is not None
        return out

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self._entries.items()
                    if (e.array is not None and e.expires < now) or not e.alive]:
            del self._entries[key]


STORE = RemoteStore()  # this worker process's


def take(key: str) -> np.ndarray:
    """The Dask task that moves a remote value from the store into the worker's memory."""
    return STORE.take(key)


def free(keys: list[str]) -> None:
    """The Dask task that drops values the notebook let go of before taking them."""
    STORE.free(keys)
