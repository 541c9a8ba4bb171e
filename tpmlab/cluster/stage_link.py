"""A direct channel from a stage to the next one (and from the notebook to each stage).

A stage hands each step to the next stage with a call. Through Dask (an actor call: the
worker's connection pool, its RPC layer, TLS and msgpack framing, the receiving worker's
``actor_execute`` handler) one such round trip costs ≈ 0.5-0.6 ms on an idle 2-core
machine, and its hops 1.1-1.5 ms each way on a shared H200 host; two processes that
exchange the same message over a Unix socket of their own take ≈ 0.1 ms
(``benchmarks/fixed_cost.py --sections channels``). So neighbouring stages on one host
(what :func:`~.handover.same_host` says: one boot, one ``/dev/shm``, one user) talk over
such a socket: the receiving stage listens (:class:`LinkServer`), the sending one connects
when the deployment links them (:class:`LinkClient`); the rest (linking, abort, memory...)
keeps Dask's actor calls.

Between hosts the same frames travel over TCP (:meth:`LinkServer.listen_network`), on the
interface the stage's Dask worker listens on, with the cluster's TLS credentials where the
cluster has them (mutual certificate checks against the cluster's CA, as Dask's own comm
does). Dask's TLS comm reads a large value one TLS record per Python call and its TCP comm
copies it through its own frames; the link reads each array straight into its own memory
(``benchmarks/bulk_rate.py``). A stage listens on TCP only once a peer on another host (or
one that asks for it: ``TPMLAB_STAGE_LINK=network``, to measure and test the network
channel on one machine) asks where to call it.

Who may connect: the Unix socket lives in Linux's abstract namespace (no file to leave
behind, no path-length limit), so the server checks the connecting process's user
(``SO_PEERCRED``); over TCP the cluster's certificate (TLS) stands in for it. Then a
32-byte secret the server handed to the caller through the cluster's own connection at
link time, before anything else is read; a peer that fails either is dropped unread.
Messages are pickled (protocol 5: numpy arrays travel as raw frames beside the pickle and
are read straight into their own memory), as Dask's actor calls pickle them.

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
import ssl
import struct
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import cloudpickle
import numpy as np
from distributed.comm.addressing import get_address_host, parse_address
from distributed.comm.core import CommClosedError
from distributed.security import Security

from ..errors import ExecutionError
from .handover import Token, local_token, same_host
from .switches import switched_on

log = logging.getLogger(__name__)

#: "0" in a worker's environment: stages made there link through Dask; "network": over TCP
#: (TLS on a TLS cluster) even to a stage on the same host, as to one on another
ENV = "TPMLAB_STAGE_LINK"
#: calls go through a link while True (False: through Dask, as without one). Switched on the
#: workers to compare the two ways (``benchmarks/fixed_cost.py --compare-link``).
ACTIVE = True


def enabled() -> bool:
    """Whether stages made in this process link to their next stage directly."""
    return switched_on(ENV)


def network_only() -> bool:
    """Whether this process links over the network even to a peer on its host (``ENV`` is
    ``network``): what stages on two hosts do, on one machine."""
    return os.environ.get(ENV, "").strip().lower() == "network"


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
#: how long a connection over the network may take (TLS handshake included) before the
#: calls go through Dask: a host that drops packets would otherwise hold up linking
NETWORK_TIMEOUT = 5.0
#: ``{"path", "secret", "token"}`` and, once listening on TCP, ``"network": {"host", "port",
#: "tls"}``: from :meth:`LinkServer.address`
Address = dict[str, Any]


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

    def __init__(self, server: LinkServer, network: bool = False) -> None:
        super().__init__()
        self._server = server
        self._network = network
        self._unproven: asyncio.TimerHandle | None = None  # drops a silent peer (network)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._network:  # no peer's user over TCP: the cluster's certificate (TLS, checked
            # in the handshake, before this) and the secret stand for it; a peer that does not
            # send the secret in time is dropped (anyone on the network may connect)
            self._unproven = asyncio.get_running_loop().call_later(
                NETWORK_TIMEOUT, transport.abort)
            return
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
        if self._unproven is not None:
            self._unproven.cancel()
        self._server.forget(self)

    def _preamble(self) -> Generator[int, bytes | np.ndarray, None]:
        secret = yield _SECRET_BYTES
        if not hmac.compare_digest(bytes(secret), self._server.secret):
            raise PermissionError("a connection without the link's secret")
        if self._unproven is not None:
            self._unproven.cancel()

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
        self._network: asyncio.AbstractServer | None = None  # TCP, once a peer needs it
        self._network_address: dict[str, Any] | None = None
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

    async def listen_network(self, host: str, ssl_context: ssl.SSLContext | None) -> None:
        """Listen on TCP on ``host`` too (an ephemeral port), for peers on other hosts; with
        ``ssl_context`` (the cluster's server-side TLS context, which asks the caller for a
        certificate of the cluster's CA) over TLS. Once; later calls keep the first."""
        if self._network is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._network = await self._loop.create_server(
            lambda: self._accept(network=True), host, 0, ssl=ssl_context,
            ssl_handshake_timeout=NETWORK_TIMEOUT if ssl_context is not None else None)
        port = self._network.sockets[0].getsockname()[1]
        self._network_address = {"host": host, "port": port, "tls": ssl_context is not None}

    def _accept(self, network: bool = False) -> _ServerSide:
        conn = _ServerSide(self, network)
        self._connections.add(conn)
        return conn

    def forget(self, conn: _ServerSide) -> None:
        self._connections.discard(conn)

    def address(self) -> Address:
        address: Address = {"path": self.path, "secret": self.secret, "token": local_token()}
        if self._network_address is not None:
            address["network"] = dict(self._network_address)
        return address

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
        for server in (self._server, self._network):
            if server is not None:
                server.close()
        self._server = self._network = None
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()
        self._connections.clear()


class LinkClient:
    """The previous stage's end: calls on the next stage, each an awaitable future."""

    def __init__(self, transport: asyncio.Transport, protocol: _ClientSide,
                 network: bool = False) -> None:
        self._transport = transport
        self._protocol = protocol
        self._ids = 0
        #: ``"unix"``, ``"tcp"`` or ``"tls"``: how this link reaches its stage
        self.kind = "unix" if not network else (
            "tls" if transport.get_extra_info("sslcontext") is not None else "tcp")

    @classmethod
    async def connect(cls, address: Address, timeout: float = 10.0) -> LinkClient:
        """Connect over the Unix socket (the server's host)."""
        loop = asyncio.get_running_loop()
        transport, protocol = await asyncio.wait_for(
            loop.create_unix_connection(_ClientSide, path=address["path"]), timeout)
        transport.write(address["secret"])
        return cls(transport, protocol)

    @classmethod
    async def connect_network(cls, address: Address, ssl_context: ssl.SSLContext | None,
                              timeout: float = NETWORK_TIMEOUT) -> LinkClient:
        """Connect over TCP (:meth:`LinkServer.listen_network`); over TLS with
        ``ssl_context`` (the cluster's client-side context: it presents this side's
        certificate and checks the server's against the cluster's CA) where the server
        listens with TLS. ``ValueError`` where the two do not match: a TLS server and no
        context, or a server without TLS where this side has TLS credentials."""
        net = address["network"]
        if bool(net["tls"]) != (ssl_context is not None):
            raise ValueError("the stage listens " + ("with" if net["tls"] else "without")
                             + " TLS and this side has " + ("no " if ssl_context is None else "")
                             + "TLS credentials")
        loop = asyncio.get_running_loop()
        transport, protocol = await asyncio.wait_for(loop.create_connection(
            _ClientSide, net["host"], int(net["port"]), ssl=ssl_context,
            ssl_handshake_timeout=timeout if ssl_context is not None else None), timeout)
        transport.write(address["secret"])
        return cls(transport, protocol, network=True)

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


async def link_to(address_of: Callable[[Token | None, bool], Awaitable[Address]],
                  security: Security | None = None, role: str = "worker",
                  timeout: float = 30.0, network: bool | None = None) -> LinkClient | None:
    """A client to the stage whose address ``address_of(token, network)`` asks for (through
    Dask: this process's :func:`~.handover.local_token`, and whether it wants the network
    channel even on one host), if links are on in this process (:func:`enabled`); over the
    Unix socket to a stage on this host, else over TCP, with TLS where the cluster has it
    (``security``: the cluster's credentials as this process holds them, for Dask ``role``
    ``"worker"`` or ``"client"``; ``network``: over TCP even on one host, default
    :func:`network_only`). An older or unreachable stage is ``None``, never an error: its
    calls go through Dask."""
    if not enabled():
        return None
    network = network_only() if network is None else network
    try:
        address = await asyncio.wait_for(_awaited(address_of(local_token(), network)), timeout)
    except Exception:  # noqa: BLE001 - its calls go through Dask
        return None
    return await connect_or_none(address, security, role, network)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable  # a Dask actor handle's call is awaitable, not a coroutine


async def connect_or_none(address: Address | None, security: Security | None = None,
                          role: str = "worker", network: bool | None = None
                          ) -> LinkClient | None:
    """A client to ``address``: over its Unix socket if the stage shares this host (and
    ``network`` does not ask for TCP), else over TCP if the stage listens there
    (:func:`link_to` says what the arguments are); else ``None`` (the calls then go through
    Dask). A failure to connect is logged, not raised."""
    if not address:
        return None
    network = network_only() if network is None else network
    try:
        if same_host(address.get("token")) and not network:
            return await LinkClient.connect(address)
        if address.get("network"):
            context = security.get_connection_args(role)["ssl_context"] if security else None
            return await LinkClient.connect_network(address, context)
    except (OSError, ValueError, asyncio.TimeoutError) as e:  # another network namespace,
        # a firewall, credentials that do not match
        log.info("tpmlab stage link: not connected (%s); calls go through Dask", e)
    return None


def network_endpoint(address: str | None, security: Security | None
                     ) -> tuple[str, ssl.SSLContext | None] | None:
    """Where a stage whose Dask worker listens at ``address`` (with the cluster's
    ``security``) listens for peers on other hosts: the worker's host, with the cluster's
    server-side TLS context on a TLS cluster; ``None`` for a worker without a TCP host (an
    in-process cluster)."""
    if not address:
        return None
    scheme, _ = parse_address(address)
    if scheme not in ("tcp", "tls", "ucx"):
        return None
    context = None
    if scheme == "tls":
        if security is None:
            return None
        context = security.get_listen_args("worker")["ssl_context"]
    return get_address_host(address), context


def wants_network(token: Token | None, network: bool) -> bool:
    """Whether a peer with ``token`` (asking for the network channel or not) needs this
    stage to listen on TCP: it asks for it, or it is on another host."""
    return network or not same_host(token)
