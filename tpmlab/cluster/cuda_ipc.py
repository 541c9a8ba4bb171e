"""Hidden states and their gradients handed from stage to stage through CUDA IPC.

Between two stages on one host whose tensors live on a GPU both can open, the tensor
does not go device -> host -> pickle -> TCP -> host -> device: the sender copies it into
one of its *exported* device buffers and the message carries only a small handle
(:class:`IpcTensor`: which buffer, dtype, shape); the receiver opens the buffer (once:
the opened buffer is cached by sender and buffer id, since ``cudaIpcOpenMemHandle``
costs about a millisecond), waits on the sender's CUDA event on its own stream (no device
synchronization), and copies the value into a tensor of its own.

Eligibility (:meth:`Sender.give`): the tensor is on CUDA; the peer stage, whose
:class:`Identity` the two stages exchanged when linked, runs in another process on the
same host (:func:`~.handover.same_host`: the same boot, /dev/shm mount and user, as the
notebook's shared-memory hand-over decides it) and can see the tensor's device (its
device UUIDs include the tensor's); and neither side turned it off (``TPMLAB_CUDA_IPC=0``
in a worker's environment when the stages are linked). Anything else travels as before
(:mod:`.wire`).

Lifetime of a send buffer (each :class:`Sender` keeps a small pool, :data:`POOL_BUFFERS`
buffers and :data:`POOL_BYTES` bytes at most): it is *held* by the request from the moment
a value is copied in until the receiver *acknowledges* it, and then goes back to the pool
for the next request. The receiver acknowledges only once its copy has completed on the
device (:meth:`Receiver.settle`): for a hidden state, the next stage's reply to ``step``
is the acknowledgement; for a gradient, which travels in a reply, the previous stage
calls the sender's ``ipc_ack``. A request that fails, is aborted or passes its deadline
releases what it holds (:meth:`Sender.release`, :meth:`Sender.sweep`). A buffer the pool
drops to make room is *retired*: its id travels with the next message to the peer,
which closes its mapping.

Failure to open a handle is never a wrong answer: the receiver raises :class:`Refused`
before it has touched the request's state, the value is sent again the ordinary way for
that request, and the link stops using IPC (logged once).

All device work goes through one :class:`Layer` (:data:`LAYER`, the real one
:class:`CudaLayer`); tests install a stand-in with :func:`use_layer`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol, TypedDict

import torch

from .handover import Token, local_token, same_host
from .switches import switched_on

log = logging.getLogger(__name__)

ENV = "TPMLAB_CUDA_IPC"  #: "0" in a worker's environment: its stages never use CUDA IPC
#: send buffers one stage keeps per direction, and their bytes, at most
#: (``TPMLAB_CUDA_IPC_POOL_BYTES``); a value that does not fit travels the ordinary way
POOL_BUFFERS = 8
POOL_BYTES = int(os.environ.get("TPMLAB_CUDA_IPC_POOL_BYTES", 1 << 30))
MIN_BUFFER = 1 << 16  # bytes: buffers are sized in powers of two from here, so sizes recur
OPENED_MAX = 64  # opened buffers a receiver keeps, at most (least recently used closed)


def enabled() -> bool:
    """Whether this process's stages may use CUDA IPC (``TPMLAB_CUDA_IPC`` is not ``0``)."""
    return switched_on(ENV)


class Identity(TypedDict):
    """What a stage tells its neighbour when they are linked."""

    stage: str  # this stage's id, new for each stage actor
    pid: int
    host: Token | None  # :func:`~.handover.local_token`
    devices: list[str]  # the devices this process sees, by index (CUDA UUIDs)
    enabled: bool


class Layer(Protocol):
    """The device side of a hand-over (:class:`CudaLayer`; tests use a stand-in)."""

    def devices(self) -> list[str]:
        """The ids of the devices this process sees, by index."""

    def device_of(self, t: torch.Tensor) -> str | None:
        """The id of ``t``'s device, or ``None`` where this layer cannot export ``t``."""

    def new_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A flat uint8 buffer of ``nbytes`` on ``device``, to be exported."""

    def export(self, buffer: torch.Tensor) -> tuple[Any, Any]:
        """``(handle, signal)``: a small picklable handle another process opens, and what
        :meth:`signal` records after each write."""

    def signal(self, signal: Any) -> None:
        """Mark the end of the writes queued so far into the buffer (an event record)."""

    def open(self, handle: Any, index: int) -> tuple[torch.Tensor, Any]:
        """``(flat uint8 buffer, ready)``: the buffer behind ``handle`` opened on this process's
        device ``index``, and what :meth:`wait` waits on."""

    def wait(self, ready: Any, index: int) -> None:
        """Make this process's current stream on device ``index`` wait for the sender's
        writes (not the host)."""

    def fence(self, device: torch.device) -> Any:
        """A mark after the work queued so far on ``device``'s current stream."""

    def settle(self, fence: Any) -> None:
        """Block until ``fence`` is reached."""

    def close(self, opened: torch.Tensor) -> None:
        """Let go of an opened buffer."""


class CudaLayer:
    """CUDA IPC through torch: ``storage._share_cuda_()`` and ``UntypedStorage._new_shared_cuda``
    (torch's own reference counting keeps an exported buffer's memory until every process
    that opened it let go), and an interprocess ``torch.cuda.Event`` per buffer."""

    def __init__(self) -> None:
        self._devices: list[str] | None = None

    def devices(self) -> list[str]:
        # none in a process that has not started CUDA (a CPU stage): asking would start it,
        # and a CUDA context costs device memory
        if self._devices is None:
            if not torch.cuda.is_initialized():
                return []
            self._devices = [str(torch.cuda.get_device_properties(i).uuid)
                             for i in range(torch.cuda.device_count())]
        return self._devices

    def device_of(self, t: torch.Tensor) -> str | None:
        if not t.is_cuda:
            return None
        devices = self.devices()
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return devices[index] if index < len(devices) else None

    def new_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def export(self, buffer: torch.Tensor) -> tuple[Any, Any]:
        with torch.cuda.device(buffer.device):
            event = torch.cuda.Event(interprocess=True)
            event.record()
            share = buffer.untyped_storage()._share_cuda_()
            return (share[1:], bytes(event.ipc_handle())), (event, buffer.device)

    def signal(self, signal: Any) -> None:
        event, device = signal
        event.record(torch.cuda.current_stream(device))

    def open(self, handle: Any, index: int) -> tuple[torch.Tensor, Any]:
        share, event_handle = handle
        with torch.cuda.device(index):
            storage = torch.UntypedStorage._new_shared_cuda(index, *share)
            flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(storage)
            return flat, torch.cuda.Event.from_ipc_handle(index, event_handle)

    def wait(self, ready: Any, index: int) -> None:
        with torch.cuda.device(index):
            torch.cuda.current_stream().wait_event(ready)

    def fence(self, device: torch.device) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event

    def settle(self, fence: Any) -> None:
        fence.synchronize()

    def close(self, opened: torch.Tensor) -> None:
        del opened  # torch closes the mapping with the last reference to the storage


LAYER: Layer = CudaLayer()


def use_layer(layer: Layer | None) -> None:
    """Hand-overs in this process go through ``layer`` from now on (``None``: CUDA's)."""
    global LAYER
    LAYER = layer if layer is not None else CudaLayer()


def identity(stage: str) -> Identity:
    """This process's :class:`Identity` as stage ``stage``."""
    return Identity(stage=stage, pid=os.getpid(), host=local_token(), devices=LAYER.devices(),
                    enabled=enabled())


def linkable(peer: Identity | None) -> bool:
    """Whether a stage here may hand values to ``peer`` through device memory at all (the
    tensor's own device is checked per value)."""
    return (peer is not None and enabled() and bool(peer.get("enabled"))
            and peer.get("pid") != os.getpid() and same_host(peer.get("host"))
            and bool(peer.get("devices")))


class IpcTensor:
    """A value handed over in device memory: ``sender`` (id) and ``buffer`` (its buffer's
    id), ``handle`` (to open the buffer), ``device`` (its id), torch ``dtype`` name and
    ``shape``; ``retired``: buffers of this sender the receiver may close."""

    __slots__ = ("sender", "buffer", "handle", "device", "dtype", "shape", "retired")

    def __init__(self, sender: str, buffer: int, handle: Any, device: str, dtype: str,
                 shape: tuple[int, ...], retired: tuple[int, ...] = ()) -> None:
        self.sender, self.buffer, self.handle, self.device = sender, buffer, handle, device
        self.dtype, self.shape, self.retired = dtype, shape, retired

    def __reduce__(self):
        return (IpcTensor, (self.sender, self.buffer, self.handle, self.device, self.dtype,
                            self.shape, self.retired))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


class Refused(Exception):
    """The receiver could not open a handed-over buffer: send the value the ordinary way."""


class _Buffer:
    __slots__ = ("id", "flat", "handle", "signal", "device", "used")

    def __init__(self, id: int, flat: torch.Tensor, handle: Any, signal: Any,
                 device: str) -> None:
        self.id, self.flat, self.handle, self.signal, self.device = id, flat, handle, signal, device
        self.used = 0.0


def bucket(nbytes: int) -> int:
    """The size of the buffer that holds ``nbytes``: a power of two, at least :data:`MIN_BUFFER`."""
    return max(MIN_BUFFER, 1 << max(nbytes - 1, 0).bit_length())


class Sender:
    """One stage's send buffers towards one neighbour (``peer``, set when linked), and which
    request holds which. Methods run on the stage's thread or its event loop (a lock)."""

    def __init__(self, name: str) -> None:
        self.name = name  # this sender's id (the stage's, and the direction)
        self.peer: Identity | None = None
        self.broken = False  # a handle failed to open on the peer: no IPC on this link
        self._free: OrderedDict[int, _Buffer] = OrderedDict()  # by id, least recently used first
        self._held: dict[str, dict[int, tuple[_Buffer, float]]] = {}  # req -> id -> (buf, deadline)
        self._retired: list[int] = []
        self._next_id = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self.counts = {"sent": 0, "ordinary": 0, "refused": 0, "pool_full": 0}

    def link(self, peer: Identity | None) -> None:
        """A new neighbour (a relink): the buffers made so far are dropped (the same
        neighbour is told to close them with the next value)."""
        with self._lock:
            same = self.peer is not None and peer is not None \
                and self.peer.get("stage") == peer.get("stage")
            dropped = [*self._free, *(i for h in self._held.values() for i in h)]
            self.peer = peer if linkable(peer) else None
            self.broken = False
            self._free.clear()
            self._held.clear()
            self._retired = [*self._retired, *dropped] if same else []
            self._bytes = 0

    @property
    def active(self) -> bool:
        return self.peer is not None and not self.broken

    def give(self, t: Any, req: str, deadline: float) -> IpcTensor | None:
        """``t`` copied into a send buffer held by ``req`` until acknowledged, as a handle; or
        ``None``: ``t`` travels the ordinary way (not a tensor, not eligible, no buffer free).
        Runs on the stage's thread, on the stream that made ``t``."""
        if not self.active or not isinstance(t, torch.Tensor):
            return None
        device = LAYER.device_of(t)
        if device is None or device not in self.peer["devices"]:
            self.counts["ordinary"] += 1
            return None
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        buf = self._take(bucket(nbytes), t.device, device)
        if buf is None:
            self.counts["pool_full"] += 1
            return None
        try:
            buf.flat[:nbytes].view(t.dtype).view(t.shape).copy_(t)
            LAYER.signal(buf.signal)
        except BaseException:
            self._put_back(buf)
            raise
        with self._lock:
            self._held.setdefault(req, {})[buf.id] = (buf, deadline)
            retired, self._retired = tuple(self._retired), []
        self.counts["sent"] += 1
        return IpcTensor(self.name, buf.id, buf.handle, device,
                         str(t.dtype).removeprefix("torch."), tuple(t.shape), retired)

    def _take(self, size: int, device: torch.device, device_id: str) -> _Buffer | None:
        with self._lock:
            for id_, buf in self._free.items():
                if buf.flat.numel() == size and buf.device == device_id:
                    del self._free[id_]
                    return buf
            held = sum(len(h) for h in self._held.values())
            # room: drop free buffers of other sizes, least recently used first
            while self._free and (self._bytes + size > POOL_BYTES
                                  or held + len(self._free) >= POOL_BUFFERS):
                _, old = self._free.popitem(last=False)
                self._bytes -= old.flat.numel()
                self._retired.append(old.id)
            if self._bytes + size > POOL_BYTES or held >= POOL_BUFFERS:
                return None
            self._next_id += 1
            id_ = self._next_id
            self._bytes += size
        try:
            flat = LAYER.new_buffer(size, device)
            handle, signal = LAYER.export(flat)
        except Exception as e:  # out of device memory, or the device cannot export
            with self._lock:
                self._bytes -= size
            log.warning("stage hand-over %s: no device buffer of %d bytes (%s: %s); values "
                        "travel through host memory", self.name, size, type(e).__name__, e)
            return None
        return _Buffer(id_, flat, handle, signal, device_id)

    def _put_back(self, buf: _Buffer) -> None:
        with self._lock:
            buf.used = time.monotonic()
            self._free[buf.id] = buf

    def release(self, req: str, ids: list[int] | tuple[int, ...] | None = None) -> None:
        """Request ``req`` is done with buffers ``ids`` (all it holds if ``None``): back to the
        pool. Unknown ids (already released) are ignored."""
        with self._lock:
            held = self._held.get(req)
            if not held:
                self._held.pop(req, None)
                return
            for id_ in list(held) if ids is None else ids:
                entry = held.pop(id_, None)
                if entry is not None:
                    entry[0].used = time.monotonic()
                    self._free[id_] = entry[0]
            if not held:
                del self._held[req]

    def sweep(self, grace: float = 0.0) -> None:
        """Release what requests hold past their deadline (monotonic) plus ``grace``."""
        now = time.monotonic()
        with self._lock:
            late = [(r, i) for r, h in self._held.items() for i, (_, d) in h.items()
                    if d + grace < now]
        for req, id_ in late:
            self.release(req, [id_])

    def refused(self, value: IpcTensor, req: str) -> torch.Tensor:
        """The peer could not open ``value``: stop using IPC on this link (logged once) and
        return a copy of the value (which ``req`` still holds) to send the ordinary way."""
        with self._lock:
            entry = self._held.get(req, {}).get(value.buffer)
            if not self.broken:
                log.warning("stage hand-over %s: the next stage could not open a device buffer; "
                            "values travel through host memory on this link from now on",
                            self.name)
            self.broken = True
        self.counts["refused"] += 1
        if entry is None:
            raise RuntimeError("the value handed over is no longer held")
        n = value.nbytes
        out = entry[0].flat[:n].view(getattr(torch, value.dtype)).view(value.shape).clone()
        self.release(req, [value.buffer])
        return out

    def held(self) -> int:
        """Buffers requests hold now (not yet acknowledged)."""
        with self._lock:
            return sum(len(h) for h in self._held.values())

    def buffers(self) -> int:
        """Buffers this sender made and still keeps (held or free)."""
        with self._lock:
            return len(self._free) + sum(len(h) for h in self._held.values())


class Receiver:
    """The buffers one stage opened, by (sender, buffer id), and the copies out of them each
    request still has to see complete before acknowledging."""

    def __init__(self) -> None:
        self._opened: OrderedDict[tuple[str, int], tuple[torch.Tensor, Any, int]] = OrderedDict()
        self._fences: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._warned = False
        self.counts = {"received": 0, "opened": 0, "refused": 0}

    def take(self, value: IpcTensor, req: str, device: torch.device) -> torch.Tensor:
        """A new tensor on ``device`` with the value behind ``value`` (the copy queued on this
        thread's stream after the sender's writes); :meth:`settle` before acknowledging.
        Raises :class:`Refused` if the buffer cannot be opened here."""
        for id_ in value.retired:
            self._close((value.sender, id_))
        try:
            flat, ready, index = self._open(value)
            LAYER.wait(ready, index)
            src = flat[:value.nbytes].view(getattr(torch, value.dtype)).view(value.shape)
            out = torch.empty(value.shape, dtype=src.dtype, device=device)
            out.copy_(src)
            fence = LAYER.fence(device)
        except Refused:
            raise
        except Exception as e:  # noqa: BLE001 - any failure here: the ordinary way instead
            self._refuse(f"{type(e).__name__}: {e}")
        with self._lock:
            self._fences.setdefault(req, []).append(fence)
        self.counts["received"] += 1
        return out

    def _open(self, value: IpcTensor) -> tuple[torch.Tensor, Any, int]:
        key = (value.sender, value.buffer)
        with self._lock:
            hit = self._opened.get(key)
            if hit is not None:
                self._opened.move_to_end(key)
                return hit
        devices = LAYER.devices()
        if value.device not in devices:
            self._refuse(f"device {value.device} is not visible here")
        index = devices.index(value.device)
        flat, ready = LAYER.open(value.handle, index)
        self.counts["opened"] += 1
        with self._lock:
            self._opened[key] = (flat, ready, index)
            while len(self._opened) > OPENED_MAX:
                _, (old, _, _) = self._opened.popitem(last=False)
                LAYER.close(old)
        return flat, ready, index

    def _refuse(self, why: str) -> None:
        self.counts["refused"] += 1
        if not self._warned:
            self._warned = True
            log.warning("stage hand-over: could not open a device buffer (%s); the value is "
                        "sent again through host memory", why)
        raise Refused(why)

    def _close(self, key: tuple[str, int]) -> None:
        with self._lock:
            entry = self._opened.pop(key, None)
        if entry is not None:
            LAYER.close(entry[0])

    def settle(self, req: str) -> None:
        """Block until every copy ``req`` made out of opened buffers has completed: then the
        sender may reuse them."""
        with self._lock:
            fences = self._fences.pop(req, [])
        for fence in fences:
            LAYER.settle(fence)

    def opened(self) -> int:
        with self._lock:
            return len(self._opened)

    def forget(self, sender_prefix: str) -> None:
        """Close what was opened from senders whose id starts with ``sender_prefix``."""
        with self._lock:
            keys = [k for k in self._opened if k[0].startswith(sender_prefix)]
        for k in keys:
            self._close(k)
