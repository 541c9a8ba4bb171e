"""A stand-in for CUDA's registration of host memory (:class:`tpmlab.cluster.pinned_segments.
Registrar`) that records every call: with it a stage on the CPU takes the path of a GPU
stage's saves (a segment registered ahead of time by the pool, the copy straight into it,
unregistering on every path), across real worker processes. Install with :func:`install`
(in every worker: ``client.run(install)``) before the stages are made."""

from __future__ import annotations

import re
import threading
from typing import Any

import torch


class RecordingRegistrar:
    """Records ``("register", ptr, nbytes)`` and ``("unregister", ptr)``; ``fail_register``
    / ``fail_unregister``: those calls raise (after recording nothing / the call). Each
    unregister also records whether the range was still mapped in this process then."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.events: list[tuple] = []
        self.unmapped_at_unregister = 0
        self.settles = 0
        self.fail_register = False
        self.fail_unregister = False
        self._lock = threading.Lock()

    def register(self, ptr: int, nbytes: int) -> None:
        if self.fail_register:
            raise RuntimeError("fake: cudaHostRegister failed with cudaError 1")
        with self._lock:
            self.events.append(("register", ptr, nbytes))

    def unregister(self, ptr: int) -> None:
        mapped = _mapped(ptr)
        with self._lock:
            self.events.append(("unregister", ptr))
            self.unmapped_at_unregister += not mapped
        if self.fail_unregister:
            raise RuntimeError("fake: cudaHostUnregister failed with cudaError 1")

    def settle(self) -> None:
        self.settles += 1

    def summary(self) -> dict[str, Any]:
        """``registered``/``unregistered`` calls, ``open``: addresses registered now, and
        ``wrong``: calls out of order (an unregister of what is not registered, a second
        register of what is)."""
        with self._lock:
            events = list(self.events)
        open_: dict[int, int] = {}
        wrong = []
        for event in events:
            ptr = event[1]
            if event[0] == "register":
                if ptr in open_:
                    wrong.append(event)
                open_[ptr] = event[2]
            elif open_.pop(ptr, None) is None:
                wrong.append(event)
        return {"registered": sum(e[0] == "register" for e in events),
                "unregistered": sum(e[0] == "unregister" for e in events),
                "open": sorted(open_), "wrong": wrong,
                "unmapped_at_unregister": self.unmapped_at_unregister}


def _mapped(ptr: int) -> bool:
    """Whether ``ptr`` lies in one of this process's mappings of a /dev/shm file."""
    with open("/proc/self/maps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s+(/dev/shm/\S+)", line)
            if m and int(m[1], 16) <= ptr < int(m[2], 16):
                return True
    return False


class Registrars:
    """The factory installed in a process: a :class:`RecordingRegistrar` per stage made."""

    def __init__(self) -> None:
        self.made: list[RecordingRegistrar] = []

    def __call__(self, device: torch.device) -> RecordingRegistrar:
        registrar = RecordingRegistrar(device)
        self.made.append(registrar)
        return registrar


def install(dask_worker: Any = None) -> None:
    """Stages made in this process from now on register through recording stand-ins."""
    from tpmlab.cluster import pinned_segments

    if not isinstance(getattr(pinned_segments._factory, "made", None), list):
        pinned_segments.use_registrar(Registrars())


def uninstall(dask_worker: Any = None) -> None:
    from tpmlab.cluster import pinned_segments

    pinned_segments.use_registrar(None)


def report(dask_worker: Any = None) -> list[dict[str, Any]]:
    """Each stand-in's :meth:`~RecordingRegistrar.summary` in this process (collected first,
    so that stages already let go unregistered what they held)."""
    import gc

    from tpmlab.cluster import pinned_segments

    gc.collect()
    made = getattr(pinned_segments._factory, "made", [])
    return [r.summary() for r in made]


def set_active(on: bool, dask_worker: Any = None) -> None:
    """Saves into registered segments (``True``) or the pinned copy (``False``) here."""
    from tpmlab.cluster import pinned_segments

    pinned_segments.ACTIVE = on
