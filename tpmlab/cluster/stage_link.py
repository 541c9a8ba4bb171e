"""A direct channel from a stage to the next one when both run on one host.

A stage hands each step to the next stage with a call. Through Dask (an actor call: the
worker's connection pool, its RPC layer, TLS and msgpack framing, the receiving worker's
``actor_execute`` handler) one such round trip costs ≈ 0.5-0.6 ms on an idle 2-core
machine, and its hops 1.1-1.5 ms each way on a shared H200 host; two processes that
exchange the same message over a Unix socket of their own take ≈ 0.1 ms
(``benchmarks/fixed_cost.py --sections channels``). So neighbouring stages on one host
(what :func:`~.handover.same_host` says: one boot, one ``/dev/shm``, one user) talk over
such a socket: the receiving stage listens (:class:`LinkServer`), the sending one connects
when the deployment links them (:class:`LinkClient`); everything else, and stages on other
hosts, keep Dask's actor calls.

Who may connect: the socket lives in Linux's abstract namespace (no file to leave behind,
no path-length limit), so the server checks the connecting process's user
(``SO_PEERCRED``) and then a 32-byte secret it handed to the sending stage through the
cluster's own (TLS) connection at link time, before it reads anything else; a peer that
fails either is dropped unread. Messages are pickled (protocol 5: numpy arrays travel as
raw frames beside the pickle and are read straight into their own memory), as Dask's
actor calls pickle them.

A frame: kind (1 byte: call, reply, error), call id (8), pickle length (8), number of raw
buffers (4), each buffer's length (8 each), the pickle, the buffers. Calls on one
connection run concurrently (a stage pipelines requests); replies come back as each call
ends. A connection that breaks fails the calls waiting on it with Dask's
:class:`~distributed.comm.core.CommClosedError` (the error a lost worker gives through
Dask), and its client stops being used: later calls go through Dask.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import os
import pickle
import secrets
import socket
import struct
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import cloudpickle
import numpy as np
from distributed.comm.core import CommClosedError

from ..errors import ExecutionError
from .handover import local_token, same_host
from .switches import switched_on

log = logging.getLogger(__name__)

ENV = "TPMLAB_STAGE_LINK"  #: "0" in a worker's environment: stages made there link through Dask
#: calls go through a link while True (False: through Dask, as without one). Switched on the
#: workers to compare the two ways (``benchmarks/fixed_cost.py --compare-link``).
ACTIVE = True


def enabled() -> bool:
    """Whether stages made in this process link to their next stage directly."""
    return switched_on(ENV)


_CALL, _REPLY, _ERROR = 1, 2, 3
_PREFIX = struct.Struct("<BQQI")
_SECRET_BYTES = 32
#: elements of a frame up to this size are parsed out of the read buffer; larger ones are
#: read straight into memory of their own
_SMALL = 64 * 1024
_SCRATCH = 4 * _SMALL
#: what is handed to the transport at once. A transport copies what the socket does not take
#: at once into a buffer of its own (Python 3.11: 0.25 s for a 267 MB value on a 2-core VM,
#: as long again as the socket's own copy); handed over a socket buffer's worth at a time,
#: and only once the transport's buffer is empty, a value goes from its memory to the socket
_CHUNK = 256 * 1024
Address = dict[str, Any]  #: ``{"path", "secret", "token"}``, from :meth:`LinkServer.address`


def _dumps(obj: Any) -> tuple[bytes, list[memoryview]]:
    buffers: list[pickle.PickleBuffer] = []
    try:
        head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except (pickle.PicklingError, TypeError, AttributeError):
        buffers.clear()  # a local class or function: by value, as Dask's serializer does
        head = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return head, [b.raw() for b in buffers]


def _error_for_wire(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else an :class:`ExecutionError` naming it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to round-trip
        return ExecutionError(f"{type(error).__name__}: {error}")


class _Framed(asyncio.BufferedProtocol):
    """Frames in and out of one connection; subclasses say what a frame means."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(_SCRATCH)
        self._start = self._end = 0  # unparsed bytes: _scratch[_start:_end]
        self._direct: np.ndarray | None = None  # a large element being read in place
        self._direct_at = 0
        self._parser = self._frames()
        self._want = next(self._parser)
        self._out: deque[memoryview] = deque()  # what the transport has not been handed yet
        self._paused = False  # the transport holds bytes the socket has not taken
        self.closed = False

    # -- writing -----------------------------------------------------------------------------------
    def send(self, kind: int, call_id: int, obj: Any) -> None:
        """Queue one frame; frames leave whole and in the order sent."""
        if self.transport is None or self.transport.is_closing():
            raise CommClosedError("the stage link is closed")
        head, raws = _dumps(obj)
        sizes = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
        self._out.append(memoryview(
            _PREFIX.pack(kind, call_id, len(head), len(raws)) + sizes + head))
        self._out.extend(raw for raw in raws if raw.nbytes)
        self._pump()

    def _pump(self) -> None:
        """Hand queued bytes to the transport, at most :data:`_CHUNK` at a time, while it
        buffers nothing (it pauses this protocol as soon as it holds a byte)."""
        while self._out and not self._paused and not self.transport.is_closing():
            view = self._out[0]
            if view.nbytes <= _CHUNK:
                self._out.popleft()
            else:
                view, self._out[0] = view[:_CHUNK], view[_CHUNK:]
            self.transport.write(view)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is not None:
            self._pump()

    # -- reading -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if transport.get_extra_info("sslcontext") is None:
            # a socket's transport: paused while it holds anything, resumed when it holds
            # nothing (TLS makes new bytes of every piece anyway: its own limits stay)
            self.transport.set_write_buffer_limits(high=0, low=0)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            return memoryview(self._direct)[self._direct_at:]
        if self._end == len(self._scratch):  # full: move what is left to the front
            left = self._end - self._start
            self._scratch[:left] = self._scratch[self._start:self._end]
            self._start, self._end = 0, left
            if left == len(self._scratch):  # (not with elements of at most _SMALL)
                self._scratch.extend(bytes(_SCRATCH))
        return memoryview(self._scratch)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None:
            self._direct_at += nbytes
            if self._direct_at < len(self._direct):
                return
            element, self._direct = self._direct, None
            if not self._feed(element):
                return
        else:
            self._end += nbytes
        self._parse()

    def _parse(self) -> None:
        while True:
            want = self._want
            have = self._end - self._start
            if want <= _SMALL:
                if have < want:
                    return
                element = bytes(self._scratch[self._start:self._start + want])
                self._start += want
            else:  # a large element: what is here, then the rest read in place, into
                # memory the socket's copy is the first to write (zeroing it first, as a
                # bytearray would, costs as much again where new pages are slow)
                element = np.empty(want, np.uint8)
                take = min(have, want)
                memoryview(element)[:take] = self._scratch[self._start:self._start + take]
                self._start += take
                if take < want:
                    self._direct, self._direct_at = element, take
                    return
            if self._start == self._end:
                self._start = self._end = 0
            if not self._feed(element):
                return

    def _feed(self, element: bytes | np.ndarray) -> bool:
        """Hand the element to the frame parser; whether to go on reading."""
        try:
            self._want = self._parser.send(element)
        except Exception as e:  # noqa: BLE001 - a malformed frame or a refused peer
            log.warning("tpmlab stage link: dropping a connection: %s", e)
            if self.transport is not None:
                self.transport.abort()
            return False
        return not self.closed

    def _frames(self) -> Generator[int, bytes | np.ndarray, None]:
        yield from self._preamble()
        while True:
            kind, call_id, head_len, n_buffers = _PREFIX.unpack((yield _PREFIX.size))
            sizes = struct.unpack(f"<{n_buffers}Q", (yield 8 * n_buffers)) if n_buffers else ()
            head = yield head_len
            buffers = []
            for size in sizes:
                buffers.append((yield size) if size else bytearray())
            self.received(kind, call_id, pickle.loads(head, buffers=buffers))

    def _preamble(self) -> Generator[int, bytes | np.ndarray, None]:
        return
        yield

    def received(self, kind: int, call_id: int, obj: Any) -> None:
        raise NotImplementedError


class _ServerSide(_Framed):
    """One connection from the previous stage: check who it is, then serve its calls."""

    def __init__(self, server: LinkServer) -> None:
        super().__init__()
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        try:
            _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        except (OSError, AttributeError):
            uid = -1
        if uid != os.getuid():
            log.warning("tpmlab stage link: refused a connection from user %s", uid)
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._server.forget(self)

    def _preamble(self) -> Generator[int, bytes | np.ndarray, None]:
        secret = yield _SECRET_BYTES
        if not hmac.compare_digest(bytes(secret), self._server.secret):
            raise PermissionError("a connection without the link's secret")

    def received(self, kind: int, call_id: int, obj: Any) -> None:
        if kind != _CALL:
            raise ValueError(f"unexpected frame kind {kind}")
        method, args = obj
        self._server.serve(self, call_id, method, args)


class _ClientSide(_Framed):
    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, asyncio.Future] = {}

    def received(self, kind: int, call_id: int, obj: Any) -> None:
        future = self.pending.pop(call_id, None)
        if future is None or future.done():  # its caller stopped waiting (a deadline)
            return
        if kind == _REPLY:
            future.set_result(obj)
        elif kind == _ERROR:
            future.set_exception(obj)
        else:
            raise ValueError(f"unexpected frame kind {kind}")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(CommClosedError(
                    f"the link to the next stage closed ({exc or 'by the other end'})"))


class LinkServer:
    """The socket a stage listens on for the previous stage's calls of ``methods`` on
    ``target`` (held weakly: the server never keeps a stage alive, and closes with it)."""

    def __init__(self, target: Any, methods: frozenset[str]) -> None:
        self._target = weakref.ref(target)
        self._methods = methods
        self.secret = secrets.token_bytes(_SECRET_BYTES)
        self.path = f"\0tpmlab-stage-link-{uuid.uuid4().hex}"
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_ServerSide] = set()
        # the calls run as the Dask worker's own actor calls do: in a copy of the context of
        # the call that started the server (Dask finds its worker through a context variable)
        self._context = contextvars.copy_context()
        weakref.finalize(target, self.close)

    async def start(self) -> LinkServer:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_unix_server(self._accept, path=self.path)
        return self

    def _accept(self) -> _ServerSide:
        conn = _ServerSide(self)
        self._connections.add(conn)
        return conn

    def forget(self, conn: _ServerSide) -> None:
        self._connections.discard(conn)

    def address(self) -> Address:
        return {"path": self.path, "secret": self.secret, "token": local_token()}

    def serve(self, conn: _ServerSide, call_id: int, method: str, args: tuple) -> None:
        target = self._target()
        if method not in self._methods or target is None:
            conn.send(_ERROR, call_id, ExecutionError(f"the stage link has no call {method!r}"))
            return
        try:
            coro = getattr(target, method)(*args)
        except Exception as e:  # noqa: BLE001 - a call that does not fit: its error, not the link's
            conn.send(_ERROR, call_id, _error_for_wire(e))
            return
        task = asyncio.get_running_loop().create_task(coro, context=self._context.copy())
        task.add_done_callback(lambda t: self._answer(conn, call_id, t))

    def _answer(self, conn: _ServerSide, call_id: int, task: asyncio.Task) -> None:
        if conn.closed:
            return
        try:
            if task.cancelled():
                conn.send(_ERROR, call_id, ExecutionError("the call was cancelled"))
            elif task.exception() is not None:
                conn.send(_ERROR, call_id, _error_for_wire(task.exception()))
            else:
                conn.send(_REPLY, call_id, task.result())
        except CommClosedError:
            pass
        except Exception as e:  # noqa: BLE001 - a reply that cannot be sent: say why
            conn.send(_ERROR, call_id, ExecutionError(f"the reply could not be sent: {e}"))

    def close(self) -> None:
        """Stop listening and drop the connections; from any thread (the stage may be
        collected on one that is not its event loop's)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            try:
                self._loop.call_soon_threadsafe(self._close_now)
            except RuntimeError:  # the loop is closed: nothing listens any more
                pass
            return
        self._close_now()

    def _close_now(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        self._connections.clear()


class LinkClient:
    """The previous stage's end: calls on the next stage, each an awaitable future."""

    def __init__(self, transport: asyncio.Transport, protocol: _ClientSide) -> None:
        self._transport = transport
        self._protocol = protocol
        self._ids = 0

    @classmethod
    async def connect(cls, address: Address, timeout: float = 10.0) -> LinkClient:
        loop = asyncio.get_running_loop()
        transport, protocol = await asyncio.wait_for(
            loop.create_unix_connection(_ClientSide, path=address["path"]), timeout)
        transport.write(address["secret"])
        return cls(transport, protocol)

    @property
    def alive(self) -> bool:
        return not self._protocol.closed and not self._transport.is_closing()

    def call(self, method: str, *args: Any) -> asyncio.Future:
        """Call ``method(*args)`` on the next stage; a future of its result (or error). Call
        it on the event loop."""
        future = asyncio.get_running_loop().create_future()
        self._ids += 1
        self._protocol.pending[self._ids] = future
        try:
            self._protocol.send(_CALL, self._ids, (method, args))
        except BaseException as e:
            self._protocol.pending.pop(self._ids, None)
            future.set_exception(e if isinstance(e, Exception) else CommClosedError(str(e)))
        return future

    def close(self) -> None:
        self._transport.close()


async def link_to(address_of: Callable[[], Awaitable[Address]],
                  timeout: float = 30.0) -> LinkClient | None:
    """A client to the stage whose address ``address_of()`` asks for (through Dask), if
    links are on in this process (:func:`enabled`) and the stage shares this host, else
    ``None``; an older or unreachable stage is ``None`` too, never an error."""
    if not enabled():
        return None
    try:
        address = await asyncio.wait_for(_awaited(address_of()), timeout)
    except Exception:  # noqa: BLE001 - its calls go through Dask
        return None
    return await connect_or_none(address)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable  # a Dask actor handle's call is awaitable, not a coroutine


async def connect_or_none(address: Address | None) -> LinkClient | None:
    """A client to ``address`` if the next stage offered one and shares this host, else
    ``None`` (the calls then go through Dask); a failure to connect is logged, not raised."""
    if not address or not same_host(address.get("token")):
        return None
    try:
        return await LinkClient.connect(address)
    except (OSError, asyncio.TimeoutError) as e:  # another network namespace, say
        log.info("tpmlab stage link: not connected (%s); calls go through Dask", e)
        return None
