"""One large array from one process's event loop to another's, over each channel a saved
value can take between hosts or on one host: the rate a channel itself allows, before any
stage or notebook work.

* ``dask tcp`` / ``dask tls``: Dask's comm (``distributed.comm``, what an actor call and a
  reply through Dask ride on; TLS 1.3 as the embedded cluster speaks);
* ``framed unix`` / ``framed tcp`` / ``framed tls``: the stage link's framing
  (:mod:`tpmlab.cluster.stage_link`: numpy arrays as raw frames beside a protocol-5
  pickle, read in place) over a Unix socket (what it uses on one host), TCP and TLS;
* ``socket tcp`` / ``socket tls``: a blocking socket in a thread, ``sendall`` on one end and
  ``recv_into`` one preallocated buffer on the other: the most Python gets from the
  kernel (and OpenSSL) here.

Each round trip sends a one-byte request and gets the array back, both ends in this
process (the reply is the large direction, as a save's is); the rate is bytes / time. For
scale: a copy of the array into new memory, which is what a receiver's pages cost on a
machine where new memory is slow.

    python -m benchmarks.bulk_rate [--mib 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import statistics
import threading
import time
import uuid
from typing import Any

import numpy as np


def _security() -> Any:
    from tpmlab.cluster.security import new_security

    return new_security()


def _contexts(security: Any) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return (security.get_listen_args("worker")["ssl_context"],
            security.get_connection_args("client")["ssl_context"])


async def dask_comm(value: np.ndarray, scheme: str, security: Any, repeats: int) -> list[float]:
    from distributed.comm import connect, listen
    from distributed.protocol import to_serialize

    tls = scheme == "tls"

    async def serve(comm: Any) -> None:
        while True:
            try:
                await comm.read()
            except Exception:  # noqa: BLE001 - the client closed: done
                return
            await comm.write({"value": to_serialize(value)})

    listener = listen(f"{scheme}://127.0.0.1:0", serve,
                      **(security.get_listen_args("worker") if tls else {}))
    await listener.start()
    comm = await connect(listener.contact_address,
                         **(security.get_connection_args("client") if tls else {}))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        await comm.write({"ask": 1})
        got = await comm.read()
        times.append(time.perf_counter() - t)
        assert got["value"].nbytes == value.nbytes
    await comm.close()
    listener.stop()
    return times


async def framed(value: np.ndarray, kind: str, security: Any, repeats: int) -> list[float]:
    from tpmlab.cluster import stage_link

    class Answer(stage_link._Framed):
        def received(self, kind: int, call_id: int, obj: Any) -> None:
            self.send(stage_link._REPLY, call_id, value)

    loop = asyncio.get_running_loop()
    server_ctx, client_ctx = _contexts(security)
    if kind == "unix":
        path = f"\0tpmlab-bulk-{uuid.uuid4().hex}"  # abstract, as the link's: no file left
        server = await loop.create_unix_server(Answer, path=path)
        transport, protocol = await loop.create_unix_connection(stage_link._ClientSide, path)
    else:
        tls = kind == "tls"
        server = await loop.create_server(Answer, "127.0.0.1", 0,
                                          ssl=server_ctx if tls else None)
        port = server.sockets[0].getsockname()[1]
        transport, protocol = await loop.create_connection(
            stage_link._ClientSide, "127.0.0.1", port, ssl=client_ctx if tls else None)
    client = stage_link.LinkClient(transport, protocol)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        got = await client.call("value")
        times.append(time.perf_counter() - t)
        assert got.nbytes == value.nbytes
    client.close()
    server.close()
    return times


def blocking(value: np.ndarray, tls: bool, security: Any, repeats: int) -> list[float]:
    server_ctx, client_ctx = _contexts(security)
    listener = socket.create_server(("127.0.0.1", 0))
    raw = memoryview(value).cast("B")

    def serve() -> None:
        conn, _ = listener.accept()
        if tls:
            conn = server_ctx.wrap_socket(conn, server_side=True)
        for _ in range(repeats):
            conn.recv(1)
            conn.sendall(raw)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    sock = socket.create_connection(listener.getsockname())
    if tls:
        sock = client_ctx.wrap_socket(sock)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sock.sendall(b"?")
        into = memoryview(np.empty(raw.nbytes, np.uint8))
        got = 0
        while got < raw.nbytes:
            got += sock.recv_into(into[got:])
        times.append(time.perf_counter() - t)
    thread.join()
    sock.close()
    listener.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    value = np.random.default_rng(0).random(args.mib * 2**20 // 8)
    security = _security()
    copies = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        value.copy()
        copies.append(time.perf_counter() - t)
    rows: dict[str, list[float]] = {}
    for scheme in ("tcp", "tls"):
        rows[f"dask {scheme}"] = asyncio.run(dask_comm(value, scheme, security, args.repeats))
    for kind in ("unix", "tcp", "tls"):
        rows[f"framed {kind}"] = asyncio.run(framed(value, kind, security, args.repeats))
    for tls in (False, True):
        rows[f"socket {'tls' if tls else 'tcp'}"] = blocking(value, tls, security, args.repeats)
    rows["copy into new memory"] = copies
    print(f"{value.nbytes / 1e6:.0f} MB a round trip, {args.repeats} each (GB/s)")
    print(f"{'':22s}{'best':>8s}{'median':>8s}")
    for name, times in rows.items():
        print(f"{name:22s}{value.nbytes / min(times) / 1e9:8.2f}"
              f"{value.nbytes / statistics.median(times) / 1e9:8.2f}")


if __name__ == "__main__":
    main()
