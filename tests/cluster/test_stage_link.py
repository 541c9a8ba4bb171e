"""The direct channel between neighbouring stages on one host (:mod:`tpmlab.cluster.
stage_link`): calls and replies with their arrays intact, concurrent calls answered as each
ends, errors raised on the caller, only the stage's own user with the link's secret served,
a broken connection failing its calls as a lost worker does, and on a real cluster the
stages linked and giving the numbers they give through Dask."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from distributed.comm.core import CommClosedError

from tpmlab.cluster import stage_link
from tpmlab.cluster.stage_link import LinkClient, LinkServer
from tpmlab.errors import ExecutionError

from .conftest import deploy, notebook_links, set_link_env


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickling re-creates it with one argument: fails
        super().__init__(f"{a} {b}")


class Target:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def echo(self, value):
        self.calls.append("echo")
        return {"value": value, "pid": os.getpid()}

    async def slow(self, seconds, tag):
        self.calls.append("slow")
        await asyncio.sleep(seconds)
        return tag

    async def fail(self, kind):
        self.calls.append("fail")
        if kind == "plain":
            raise ValueError("a plain error")
        raise Unpicklable(1, 2)

    async def hidden(self):
        self.calls.append("hidden")


CALLS = frozenset({"echo", "slow", "fail"})


def run(coro):
    return asyncio.run(coro)


async def _linked(target=None):
    target = target or Target()
    server = await LinkServer(target, CALLS).start()
    client = await LinkClient.connect(server.address())
    return target, server, client


def test_values_arrive_intact_small_and_large():
    async def go():
        target, server, client = await _linked()
        small = np.arange(10, dtype=np.float32)
        large = np.random.default_rng(0).random((1024, 1024, 3))  # 24 MB: read in place
        views = torch.arange(12, dtype=torch.int16).numpy()[::2]  # not contiguous: in-band
        got = await client.call("echo", {"small": small, "large": large, "views": views,
                                         "nested": [1, "two", (3.0, None)]})
        client.close()
        server.close()
        return got

    got = run(go())
    value = got["value"]
    assert got["pid"] == os.getpid()
    assert value["small"].dtype == np.float32 and np.array_equal(value["small"], np.arange(10))
    assert np.array_equal(value["large"], np.random.default_rng(0).random((1024, 1024, 3)))
    assert value["large"].flags.writeable  # read into memory of its own, as a numpy user expects
    assert np.array_equal(value["views"], np.arange(0, 12, 2))
    assert value["nested"] == [1, "two", (3.0, None)]


def test_concurrent_calls_are_answered_as_each_ends():
    async def go():
        target, server, client = await _linked()
        order = []
        slow = client.call("slow", 0.3, "slow")
        fast = client.call("slow", 0.0, "fast")
        for done in asyncio.as_completed([slow, fast]):
            order.append(await done)
        client.close()
        server.close()
        return order

    assert run(go()) == ["fast", "slow"]


def test_large_and_small_replies_in_flight_together_arrive_whole():
    """A large reply leaves in pieces while the socket takes them; the frames of the calls
    answered meanwhile queue behind it instead of cutting into it."""
    async def go():
        target, server, client = await _linked()
        rng = np.random.default_rng(1)
        large = [rng.random(3 * 2**20 + k) for k in range(3)]  # 24 MB each, odd sizes
        calls = [client.call("echo", v) for v in large]
        calls += [client.call("echo", k) for k in range(20)]
        calls += [client.call("echo", large[0][:5000])]  # small arrays: in the read buffer
        got = await asyncio.gather(*calls)
        client.close()
        server.close()
        return large, [g["value"] for g in got]

    large, got = run(go())
    for sent, back in zip(large, got[:3]):
        assert np.array_equal(sent, back)
    assert got[3:23] == list(range(20))
    assert np.array_equal(got[23], large[0][:5000])


class _Transport(asyncio.Transport):
    """A transport whose socket takes ``takes`` bytes per write and buffers the rest."""

    def __init__(self, protocol, takes):
        super().__init__()
        self.protocol, self.takes = protocol, takes
        self.writes: list[tuple[int, bool]] = []  # (bytes handed over, paused at the time)
        self.buffered = 0
        self.high = None
        self.data = bytearray()

    def set_write_buffer_limits(self, high=None, low=None):
        self.high = (high, low)

    def is_closing(self):
        return False

    def write(self, data):
        self.writes.append((memoryview(data).nbytes, self.protocol._paused))
        self.data += data
        self.buffered += max(0, memoryview(data).nbytes - self.takes)
        if self.buffered > self.high[0]:
            self.protocol.pause_writing()

    def drain(self):
        self.buffered = 0
        self.protocol.resume_writing()


class _Reader(stage_link._Framed):
    """The frame parser alone: what it reads, as (kind, call id, object)."""

    def __init__(self):
        super().__init__()
        self.got = []

    def received(self, kind, call_id, obj):
        self.got.append((kind, call_id, obj))


def test_a_large_value_goes_to_the_socket_a_piece_at_a_time():
    """The transport is handed at most a socket buffer's worth at once, and nothing while it
    still holds bytes: it never copies a large value into a buffer of its own."""
    protocol = stage_link._ClientSide()
    transport = _Transport(protocol, takes=100_000)
    protocol.connection_made(transport)
    assert transport.high == (0, 0)
    value = np.arange(2**20, dtype=np.float64)  # 8 MiB
    protocol.send(stage_link._CALL, 7, ("echo", (value,)))
    while protocol._paused:
        transport.drain()
    sizes = [n for n, _ in transport.writes]
    assert max(sizes) <= stage_link._CHUNK and sum(sizes) > value.nbytes
    assert not any(paused for _, paused in transport.writes)
    reader = _Reader()
    data = memoryview(transport.data)
    while data.nbytes:
        buf = reader.get_buffer(-1)
        n = min(buf.nbytes, data.nbytes, 70_000)
        buf[:n] = data[:n]
        data = data[n:]
        reader.buffer_updated(n)
    (kind, call_id, (method, (back,))), = reader.got
    assert (kind, call_id, method) == (stage_link._CALL, 7, "echo")
    assert np.array_equal(back, value)


def test_errors_are_raised_on_the_caller():
    async def go():
        target, server, client = await _linked()
        out = []
        for call in (client.call("fail", "plain"), client.call("fail", "odd"),
                     client.call("hidden"), client.call("nope"), client.call("echo", 1, 2)):
            try:
                await call
            except Exception as e:  # noqa: BLE001
                out.append(e)
        still = await client.call("echo", 1)  # the connection carries on
        client.close()
        server.close()
        return out, still, target.calls

    errors, still, calls = run(go())
    assert type(errors[0]) is ValueError and str(errors[0]) == "a plain error"
    assert isinstance(errors[1], ExecutionError) and "Unpicklable: 1 2" in str(errors[1])
    assert isinstance(errors[2], ExecutionError) and "no call 'hidden'" in str(errors[2])
    assert isinstance(errors[3], ExecutionError) and "no call 'nope'" in str(errors[3])
    assert type(errors[4]) is TypeError  # arguments that do not fit: that call's error only
    assert still["value"] == 1 and calls == ["fail", "fail", "echo"]  # never "hidden"


def test_a_connection_without_the_secret_is_dropped_unread():
    async def go():
        target, server, _ = await _linked()
        wrong = {**server.address(), "secret": b"x" * 32}
        client = await LinkClient.connect(wrong)
        call = client.call("echo", 1)
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(call, 10)
        alive = client.alive
        server.close()
        return target.calls, alive

    calls, alive = run(go())
    assert calls == [] and not alive


_OTHER_USER = """
import socket, struct, sys, pickle
path, secret = sys.argv[1].encode("latin-1").decode("unicode_escape"), bytes.fromhex(sys.argv[2])
import os
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.connect(path)
head = pickle.dumps(("echo", (1,)), protocol=5)
s.settimeout(10)
try:  # the server may drop it before the call is even written
    s.sendall(secret + struct.pack("<BQQI", 1, 1, len(head), 0) + head)
    print("answered" if s.recv(1) else "dropped")
except (ConnectionResetError, BrokenPipeError):
    print("dropped")
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_is_refused_even_with_the_secret():
    async def go():
        target, server, _ = await _linked()
        address = server.address()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _OTHER_USER, address["path"].encode("unicode_escape").decode(),
            address["secret"].hex(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        server.close()
        return target.calls, out.decode().strip(), err.decode()

    calls, out, err = run(go())
    assert out == "dropped", err
    assert calls == []


def test_a_broken_connection_fails_its_calls_and_the_client_stops():
    async def go():
        target, server, client = await _linked()
        waiting = client.call("slow", 30, "never")
        await asyncio.sleep(0.1)
        server.close()  # the next stage's worker went away
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(waiting, 10)
        alive = client.alive
        late = client.call("echo", 1)
        with pytest.raises(CommClosedError):
            await late
        return alive

    assert run(go()) is False


def test_the_server_closes_with_its_stage():
    async def go():
        target = Target()
        server = await LinkServer(target, CALLS).start()
        address = server.address()
        del target
        gc.collect()
        with pytest.raises(OSError):
            await LinkClient.connect(address)

    run(go())


def test_a_stage_collected_on_another_thread_closes_its_server_on_the_loop():
    async def go():
        held = [Target()]
        server = await LinkServer(held[0], CALLS).start()
        address = server.address()
        worker = threading.Thread(target=lambda: (held.clear(), gc.collect()))
        worker.start()
        worker.join(10)
        await asyncio.sleep(0.1)  # the close was handed to this loop
        with pytest.raises(OSError):
            await LinkClient.connect(address)

    run(go())


def test_no_link_to_another_host_or_when_switched_off(monkeypatch):
    async def go():
        target, server, _ = await _linked()
        other = {**server.address(), "token": {"boot": "another", "shm": [0, 0],
                                               "uid": os.getuid()}}
        got = await stage_link.connect_or_none(other), await stage_link.connect_or_none(None)
        server.close()
        return got

    assert run(go()) == (None, None)
    monkeypatch.setenv(stage_link.ENV, "0")
    assert not stage_link.enabled()


def test_the_socket_is_abstract():
    async def go():
        target, server, client = await _linked()
        path = server.address()["path"]
        client.close()
        server.close()
        return path

    path = run(go())
    assert path.startswith("\0")  # nothing on disk to leave behind
    probe = socket.socket(socket.AF_UNIX)
    with pytest.raises(OSError):
        probe.connect(path)  # closed with the server
    probe.close()


# -- between hosts: TCP, TLS with the cluster's certificates ------------------------------------
def _tls_pair():
    """A cluster's credentials: its worker-side listening context and a client-side one."""
    from distributed.security import Security

    sec = Security.temporary()
    return sec, sec.get_listen_args("worker")["ssl_context"]


async def _network_linked(server_context=None, client_context=None, target=None):
    target = target or Target()
    server = await LinkServer(target, CALLS).start()
    await server.listen_network("127.0.0.1", server_context)
    client = await LinkClient.connect_network(server.address(), client_context)
    return target, server, client


def _large():
    return np.random.default_rng(1).random((1024, 1024, 3))  # 24 MB: read in place


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_over_the_network_values_arrive_intact(tls):
    sec, listen = _tls_pair() if tls else (None, None)
    connect = sec.get_connection_args("client")["ssl_context"] if tls else None

    async def go():
        target, server, client = await _network_linked(listen, connect)
        address = server.address()
        small = client.call("echo", np.arange(5))
        big = client.call("echo", {"large": _large(), "tag": "big"})
        got = await asyncio.wait_for(asyncio.gather(small, big), 60)
        kind = client.kind
        client.close()
        server.close()
        return address, got, kind

    address, (small, big), kind = run(go())
    assert address["network"] == {"host": "127.0.0.1", "port": address["network"]["port"],
                                  "tls": tls}
    assert kind == ("tls" if tls else "tcp")
    assert np.array_equal(small["value"], np.arange(5))
    assert np.array_equal(big["value"]["large"], _large()) and big["value"]["tag"] == "big"


def test_the_network_listener_starts_once_and_closes_with_the_server():
    async def go():
        target, server, client = await _network_linked()
        first = server.address()
        await server.listen_network("127.0.0.1", None)  # a second peer on another host
        again = server.address()
        client.close()
        server.close()
        await asyncio.sleep(0.05)
        with pytest.raises(OSError):
            await LinkClient.connect_network(first, None)
        return first, again

    first, again = run(go())
    assert first == again


def _refused(server_context, client_context) -> list[str]:
    """The calls ``target`` served for a client with ``client_context`` (the link's secret
    known): none, whether the handshake or the first call fails."""
    async def go():
        target = Target()
        server = await LinkServer(target, CALLS).start()
        await server.listen_network("127.0.0.1", server_context)
        address = server.address()
        address["network"]["tls"] = client_context is not None  # the peer tries its way
        try:
            client = await LinkClient.connect_network(address, client_context)
        except (OSError, asyncio.TimeoutError):  # refused in the handshake
            server.close()
            return target.calls
        with pytest.raises((CommClosedError, OSError)):
            await asyncio.wait_for(client.call("echo", 1), 10)
        assert not client.alive
        server.close()
        return target.calls

    return run(go())


def test_another_clusters_certificate_is_refused_even_with_the_secret():
    _, listen = _tls_pair()
    other, _ = _tls_pair()  # a certificate of another CA
    assert _refused(listen, other.get_connection_args("client")["ssl_context"]) == []


def test_a_peer_without_a_certificate_is_refused_even_with_the_secret():
    import ssl

    sec, listen = _tls_pair()
    bare = ssl.create_default_context(cadata=sec.tls_ca_file)  # trusts the server, no cert
    bare.check_hostname = False
    assert _refused(listen, bare) == []


def test_plain_tcp_to_a_tls_listener_is_refused():
    _, listen = _tls_pair()
    assert _refused(listen, None) == []


def test_over_tcp_a_connection_without_the_secret_is_dropped_unread():
    async def go():
        target, server, _ = await _network_linked()
        wrong = {**server.address(), "secret": b"x" * 32}
        client = await LinkClient.connect_network(wrong, None)
        with pytest.raises(CommClosedError):
            await asyncio.wait_for(client.call("echo", 1), 10)
        server.close()
        return target.calls

    assert run(go()) == []


def test_a_silent_peer_is_dropped(monkeypatch):
    """Anyone on the network may connect: one that never proves itself is let go."""
    monkeypatch.setattr(stage_link, "NETWORK_TIMEOUT", 0.3)

    async def go():
        target, server, _ = await _network_linked()
        net = server.address()["network"]
        reader, writer = await asyncio.open_connection(net["host"], net["port"])
        got = await asyncio.wait_for(reader.read(1), 10)  # EOF once dropped
        writer.close()
        server.close()
        return got

    assert run(go()) == b""


def test_connect_or_none_picks_the_channel(monkeypatch):
    sec, listen = _tls_pair()

    async def go():
        target, server, _ = await _network_linked(listen, sec.get_connection_args(
            "client")["ssl_context"])
        address = server.address()
        other_host = {**address, "token": {"boot": "another", "shm": [0, 0],
                                           "uid": os.getuid()}}
        kinds = {}
        for name, addr, security in (("here", address, sec), ("there", other_host, sec),
                                     ("there, no credentials", other_host, None)):
            link = await stage_link.connect_or_none(addr, security, "client")
            kinds[name] = link and link.kind
            if link:
                link.close()
        monkeypatch.setenv(stage_link.ENV, "network")
        link = await stage_link.connect_or_none(address, sec, "client")
        kinds["here, asked for the network"] = link and link.kind
        link.close()
        server.close()
        return kinds

    assert run(go()) == {"here": "unix", "there": "tls", "there, no credentials": None,
                         "here, asked for the network": "tls"}


def test_where_a_stage_listens_for_other_hosts():
    from distributed.security import Security

    sec = Security.temporary()
    assert stage_link.network_endpoint("tcp://10.1.2.3:4000", None) == ("10.1.2.3", None)
    host, context = stage_link.network_endpoint("tls://127.0.0.1:4000", sec)
    assert host == "127.0.0.1" and context is not None
    assert stage_link.network_endpoint("tls://127.0.0.1:4000", None) is None
    assert stage_link.network_endpoint("inproc://10.0.0.1/123/4", None) is None
    assert stage_link.network_endpoint(None, None) is None
    assert stage_link.wants_network(stage_link.local_token(), False) is False
    assert stage_link.wants_network(stage_link.local_token(), True) is True
    assert stage_link.wants_network(None, False) is True


# -- on a real cluster ----------------------------------------------------------------------------
def _links(dask_worker=None):
    from tpmlab.cluster.actor import StageActor

    return [(a.span.index, a.link_next is not None and a.link_next.alive)
            for a in dask_worker.state.actors.values() if isinstance(a, StageActor)]


def _use_link(on, dask_worker=None):
    from tpmlab.cluster import stage_link

    stage_link.ACTIVE = on


@pytest.mark.slow
def test_stages_on_one_host_are_linked_and_give_the_same_numbers(lab, backend, ref_lab):
    model = deploy(lab, "tiny-llama", 2)
    ref = ref_lab.model("tiny-llama")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    links = sorted(r for rows in backend.client.run(_links).values() for r in rows)
    assert links == [(0, True), (1, False)]  # the last stage has no next
    assert [m["linked"] for m in backend.memory("tiny-llama")] == [True, False]

    def trace(m):
        with m.trace(ids):
            hidden = m.layers[1].output[0].save()
            logits = m.unembed.output.save()
        return hidden.value, logits.value

    def generate(m):
        with m.generate(ids, max_new_tokens=5) as gen:
            pass
        return gen.generated_ids[0]

    through_link = trace(model), generate(model)
    # the notebook's client linked to both stages after its first call to each
    keys = [a.key for a in backend.deployment("tiny-llama").actors]
    notebook_links(backend, "tiny-llama")
    try:
        through_link = trace(model), generate(model)
        backend.client.run(_use_link, False)
        _use_link(False)
        through_dask = trace(model), generate(model)
    finally:
        backend.client.run(_use_link, True)
        _use_link(True)
    for a, b in zip(through_link[0], through_dask[0]):
        assert torch.equal(a, b)
    assert torch.equal(through_link[1], through_dask[1])
    for a, c in zip(through_link[0], trace(ref)):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert torch.equal(through_link[1], generate(ref))
    lab.undeploy("tiny-llama")
    assert not any(k in backend._links for k in keys)  # its links closed with it


@pytest.mark.slow
def test_stages_on_other_hosts_link_over_tcp_and_give_the_same_numbers(
        lab, backend, ref_lab, monkeypatch):
    """On a plain-TCP cluster, stages that reach each other over the network (switched to
    it here: one machine) link over TCP and give the local executor's numbers."""
    monkeypatch.setenv(stage_link.ENV, "network")
    backend.client.run(set_link_env, "network")
    try:
        model = deploy(lab, "tiny-llama", 2)
        assert [m["link"] for m in backend.memory("tiny-llama")] == ["tcp", None]
        ids = torch.tensor([[1, 5, 9, 14, 3, 7]])

        def trace(m):
            with m.trace(ids):
                hidden = m.layers[1].output[0].save()
                logits = m.unembed.output.save()
            return hidden.value, logits.value

        trace(model)
        assert [link.kind for link in notebook_links(backend, "tiny-llama")] == ["tcp", "tcp"]
        for a, c in zip(trace(model), trace(ref_lab.model("tiny-llama"))):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    finally:
        backend.client.run(set_link_env, None)
        lab.undeploy("tiny-llama")
