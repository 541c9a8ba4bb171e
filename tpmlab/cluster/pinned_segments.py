"""A GPU stage's saves copied from the device straight into hand-over segments.

A shared-memory segment (:mod:`.handover`) registered with CUDA (``cudaHostRegister``: its
pages locked and known to the driver as pinned memory) is a target the device copies into
by DMA, at PCIe speed and without blocking the stream, as into ``torch.empty(...,
pin_memory=True)``. So on a GPU stage whose notebook shares the host, the runner's copy of
a large save goes into such a segment and the reply names it: one copy, where otherwise a
pinned copy is made and the hand-over copies it again into a segment.

Registering costs time in proportion to the bytes (the driver locks the pages one by one),
so a request never waits for it: the stage's pool (:class:`~.segment_pool.SegmentPool`)
registers the segments it makes ahead of time, on its background thread. A save with no registered
segment of its size ready takes the path it takes without registration (a pinned copy,
copied into a segment when the reply is packed).

A registered segment's mapping is held here (:class:`Pinning`) until it is unregistered, so
the stage's mapping cannot go away first (the notebook's own mapping of the file is another
one and keeps the pages). A segment a request took is unregistered exactly once, on a
background thread, after the device's copies into it are done (:meth:`Pinning.release`):
when its reply was packed (after the stream synchronization that precedes every reply), or
when the request is aborted, fails or passes its deadline (:meth:`.handover.Segments.free`);
the pool's segments and any left are unregistered when the stage's segments go (with the
stage, once the deadline of its last request has passed: until then the notebook may map
what it handed over) or its worker exits.

An error registering or unregistering costs only that segment: it is not used for a direct
copy (registering) or is let go (unregistering), logged once; no request fails for it.
``TPMLAB_HANDOVER_PIN=0`` in a worker's environment when a stage is made: its saves take
the pinned copy as before.

All CUDA calls go through a :class:`Registrar` (:class:`DriverRegistrar`, which lets the GIL
go while the driver locks pages, or :class:`CudaRegistrar`); tests install a stand-in with
:func:`use_registrar`.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

from .switches import switched_on

log = logging.getLogger(__name__)

ENV = "TPMLAB_HANDOVER_PIN"  #: "0" in a worker's environment: no registered segments
#: saves go into registered segments while True (False: the pinned copy, as before; the
#: pool makes unregistered segments). Switched on the workers to compare the two ways.
ACTIVE = True


def enabled() -> bool:
    """Whether stages made in this process may register segments (``TPMLAB_HANDOVER_PIN``
    is not ``0``)."""
    return switched_on(ENV)


class Registrar(Protocol):
    """Page-locking host memory for one device (:class:`CudaRegistrar`; tests: a stand-in)."""

    def register(self, ptr: int, nbytes: int) -> None:
        """Lock ``nbytes`` at address ``ptr`` for the device's copies; raises on failure."""

    def unregister(self, ptr: int) -> None:
        """Undo :meth:`register` of the range starting at ``ptr``; raises on failure."""

    def settle(self) -> None:
        """Block until the device work queued so far (copies into registered memory) is done."""


class CudaRegistrar:
    """``cudaHostRegister`` / ``cudaHostUnregister`` through torch's CUDA runtime bindings,
    with the flag torch's own staging of shared memory uses (``cudaHostRegisterPortable``:
    pinned for every CUDA context of the process). Those bindings hold the GIL while the
    driver locks the pages (≈ 0.14 ms for 1 MiB, 3.4 ms for 64 MiB on an H200 host): the
    stage's thread cannot launch a kernel meanwhile. :class:`DriverRegistrar` is used where
    the driver library can be called directly; this one where it cannot."""

    PORTABLE = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def register(self, ptr: int, nbytes: int) -> None:
        with torch.cuda.device(self.device):
            _check(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, self.PORTABLE),
                   "cudaHostRegister")

    def unregister(self, ptr: int) -> None:
        with torch.cuda.device(self.device):
            _check(torch.cuda.cudart().cudaHostUnregister(ptr), "cudaHostUnregister")

    def settle(self) -> None:
        torch.cuda.synchronize(self.device)


class DriverRegistrar(CudaRegistrar):
    """The same registration through the CUDA driver's ``cuMemHostRegister`` /
    ``cuMemHostUnregister`` (what the runtime's calls do), called through :mod:`ctypes`,
    which lets the GIL go for the call: the pool's thread registers a segment while the
    stage's thread goes on launching the next request's kernels. The calls run in the
    device's primary context (the one torch's runtime uses), made current on the calling
    thread first."""

    def __init__(self, device: torch.device, driver: ctypes.CDLL) -> None:
        super().__init__(device)
        self._driver = driver
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = ctypes.c_int()
        _check_driver(driver.cuDeviceGet(ctypes.byref(handle), index), "cuDeviceGet")
        self._context = ctypes.c_void_p()
        # one reference to the primary context for this registrar's life (torch holds its own)
        _check_driver(driver.cuDevicePrimaryCtxRetain(ctypes.byref(self._context), handle),
                      "cuDevicePrimaryCtxRetain")

    def register(self, ptr: int, nbytes: int) -> None:
        self._current()
        _check_driver(self._driver.cuMemHostRegister_v2(
            ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(self.PORTABLE)),
            "cuMemHostRegister")

    def unregister(self, ptr: int) -> None:
        self._current()
        _check_driver(self._driver.cuMemHostUnregister(ctypes.c_void_p(ptr)),
                      "cuMemHostUnregister")

    def _current(self) -> None:
        _check_driver(self._driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")


def _check(result: Any, call: str) -> None:
    code = int(result)
    if code != 0:
        raise RuntimeError(f"{call} failed with cudaError {code}")


def _check_driver(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"{call} failed with CUresult {result}")


def _driver_library() -> ctypes.CDLL | None:
    """The CUDA driver library (loaded by torch's runtime already) with the calls
    :class:`DriverRegistrar` makes, or ``None``."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        for name in ("cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent",
                     "cuMemHostRegister_v2", "cuMemHostUnregister"):
            getattr(driver, name)
        _check_driver(driver.cuInit(0), "cuInit")
    except (OSError, AttributeError, RuntimeError):
        return None
    return driver


def _cuda_registrar(device: torch.device) -> Registrar | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    driver = _driver_library()
    if driver is not None:
        try:
            return DriverRegistrar(device, driver)
        except RuntimeError as e:
            log.info("registering hand-over segments through torch's runtime bindings: %s", e)
    return CudaRegistrar(device)


_factory: Callable[[torch.device], Registrar | None] = _cuda_registrar


def use_registrar(factory: Callable[[torch.device], Registrar | None] | None) -> None:
    """Stages made in this process from now on register through ``factory(device)`` (a
    registrar, or ``None`` for a device without one); ``None``: CUDA's."""
    global _factory
    _factory = factory if factory is not None else _cuda_registrar


def for_device(device: torch.device,
               order: Callable[[Callable[[], None]], Any] | None = None) -> Pinning | None:
    """The :class:`Pinning` of a stage on ``device``, or ``None`` (a CPU stage, no CUDA, or
    ``TPMLAB_HANDOVER_PIN=0``). ``order``: submits a callable to the stage's thread (it runs
    after the work running there now: a request's copies are queued before a release)."""
    registrar = _factory(device) if enabled() else None
    return Pinning(registrar, order) if registrar is not None else None


class Pinning:
    """One stage's registered segments: each registered mapping (a flat uint8 tensor) is held
    here from :meth:`register` until it is unregistered, exactly once.

    ``counts()``: ``registered``, ``unregistered``, ``register_failed``,
    ``unregister_failed``, and ``held`` (registered now: in the pool or with a request)."""

    def __init__(self, registrar: Registrar,
                 order: Callable[[Callable[[], None]], Any] | None = None) -> None:
        self._held = _Held(registrar)
        self._order = order
        # one thread (started on first use): unregistering never runs on a request's path
        self._unpinner = ThreadPoolExecutor(1, thread_name_prefix="tpmlab-handover-unpin")
        weakref.finalize(self, self._held.close)  # also at exit

    def register(self, flat: torch.Tensor) -> bool:
        """Register ``flat``'s memory (on the caller's thread: the pool's); False, with the
        error logged once, where it fails."""
        return self._held.register(flat)

    def release(self, flats: list[torch.Tensor]) -> None:
        """Unregister those of ``flats`` that are registered, after the device's copies
        queued so far are done, on a background thread; then let their mappings go."""
        taken = self._held.take(flats)
        if not taken:
            return
        try:
            self._unpinner.submit(self._unregister, taken)
        except RuntimeError:  # the interpreter is shutting down: here, now
            self._unregister(taken)

    def counts(self) -> dict[str, int]:
        return self._held.snapshot()

    def wait(self) -> None:
        """Block until the releases asked for so far are done (tests, benchmarks)."""
        self._unpinner.submit(lambda: None).result()

    def _unregister(self, taken: dict[int, torch.Tensor]) -> None:
        if self._order is not None:  # the request's copies were queued before this
            try:
                self._order(lambda: None).result()
            except RuntimeError:  # the stage's thread is gone: nothing queues copies now
                pass
        self._held.unregister(taken)


class _Held:
    """The registered mappings of one :class:`Pinning`, by address (shared with its
    finalizer, which unregisters what is left)."""

    def __init__(self, registrar: Registrar) -> None:
        self.registrar = registrar
        self.lock = threading.Lock()
        self.flats: dict[int, torch.Tensor] = {}
        self.counts = {"registered": 0, "unregistered": 0, "register_failed": 0,
                       "unregister_failed": 0}
        self.logged = False

    def register(self, flat: torch.Tensor) -> bool:
        ptr = flat.data_ptr()
        try:
            self.registrar.register(ptr, flat.numel() * flat.element_size())
        except Exception as e:  # noqa: BLE001 - any failure: this segment is not registered
            with self.lock:
                self.counts["register_failed"] += 1
            self._log("registering a hand-over segment failed (a pinned copy instead)", e)
            return False
        with self.lock:
            self.flats[ptr] = flat
            self.counts["registered"] += 1
        return True

    def take(self, flats: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        with self.lock:
            taken = {}
            for flat in flats:
                ptr = flat.data_ptr()
                if self.flats.get(ptr) is flat:
                    taken[ptr] = self.flats.pop(ptr)
            return taken

    def unregister(self, taken: dict[int, torch.Tensor]) -> None:
        try:
            self.registrar.settle()
        except Exception as e:  # noqa: BLE001 - the device failed: unregister all the same
            self._log("waiting for the device before unregistering failed", e)
        for ptr in taken:
            try:
                self.registrar.unregister(ptr)
                key = "unregistered"
            except Exception as e:  # noqa: BLE001 - let the segment go all the same
                key = "unregister_failed"
                self._log("unregistering a hand-over segment failed", e)
            with self.lock:
                self.counts[key] += 1
        taken.clear()  # the mappings may go now

    def close(self) -> None:
        with self.lock:
            taken, self.flats = self.flats, {}
        if taken:
            self.unregister(taken)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {**self.counts, "held": len(self.flats)}

    def _log(self, what: str, error: BaseException) -> None:
        if not self.logged:
            self.logged = True
            log.warning("%s: %s: %s", what, type(error).__name__, error)
