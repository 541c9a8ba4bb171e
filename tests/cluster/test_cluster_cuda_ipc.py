"""Hidden states and gradients handed between stages in device buffers (:mod:`tpmlab.cluster.
cuda_ipc`), on CPU stages through a stand-in for CUDA IPC (:mod:`.fake_ipc`: buffers in
/dev/shm files): who is eligible, the same numbers as the ordinary path (also when a buffer
cannot be opened), buffers released after success, failure and abort, and opened buffers
reused across requests."""

from __future__ import annotations

import os
import time

import cloudpickle
import pytest
import torch

from tests.core.grad_helpers import metric
from tpmlab.cluster import cuda_ipc, handover
from tpmlab.errors import ExecutionError, RequestTimeoutError

from . import fake_ipc
from .conftest import deploy

MODEL = "tiny-llama"
PROMPT = "The Eiffel Tower is located in the city of"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"

cloudpickle.register_pickle_by_value(fake_ipc)  # workers need not import the tests


# -- eligibility and the pool, in this process ----------------------------------------------------


@pytest.fixture
def fake_here():
    fake_ipc.install()
    yield cuda_ipc.LAYER
    fake_ipc.uninstall()


def _peer(**changes):
    me = cuda_ipc.identity("peer")
    return {**me, "pid": me["pid"] + 1, **changes}  # another process on this host


def test_eligibility(fake_here, monkeypatch):
    assert cuda_ipc.linkable(_peer())
    assert not cuda_ipc.linkable(None)
    assert not cuda_ipc.linkable(_peer(pid=os.getpid()))  # the same process: no IPC to itself
    other_host = {**handover.local_token(), "boot": "another-boot"}
    assert not cuda_ipc.linkable(_peer(host=other_host))
    assert not cuda_ipc.linkable(_peer(host=None))
    assert not cuda_ipc.linkable(_peer(enabled=False))  # switched off on the peer's side
    assert not cuda_ipc.linkable(_peer(devices=[]))
    monkeypatch.setenv(cuda_ipc.ENV, "0")  # switched off here
    assert not cuda_ipc.linkable(_peer())
    monkeypatch.delenv(cuda_ipc.ENV)

    sender = cuda_ipc.Sender("s>")
    sender.link(_peer(devices=["a-gpu-this-stage-cannot-reach"]))
    assert sender.give(torch.ones(4), "r", time.monotonic() + 60) is None  # device not shared
    sender.link(_peer())
    assert sender.give({"not": "a tensor"}, "r", time.monotonic() + 60) is None
    assert isinstance(sender.give(torch.ones(4), "r", time.monotonic() + 60), cuda_ipc.IpcTensor)
    sender.release("r")


def test_cpu_tensors_never_go_through_cuda_ipc():
    layer = cuda_ipc.CudaLayer()  # the real layer: a CPU tensor is not its to export
    assert layer.device_of(torch.ones(3)) is None
    cuda_ipc.use_layer(layer)
    try:
        sender = cuda_ipc.Sender("s>")
        sender.link(_peer(devices=["GPU-0"]))
        assert sender.give(torch.ones(3), "r", time.monotonic() + 60) is None
        assert sender.held() == 0
    finally:
        cuda_ipc.use_layer(None)


def test_round_trip_pool_and_cache(fake_here):
    sender, receiver = cuda_ipc.Sender("s>"), cuda_ipc.Receiver()
    sender.link(_peer())
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    given = sender.give(x, "r1", time.monotonic() + 60)
    assert sender.held() == 1
    got = receiver.take(given, "r1", torch.device("cpu"))
    receiver.settle("r1")
    sender.release("r1", [given.buffer])
    assert torch.equal(got, x) and got.dtype == x.dtype and sender.held() == 0
    # the next request of a size in the same bucket reuses the buffer and its opened mapping
    again = sender.give(x[:, :3] * 2, "r2", time.monotonic() + 60)
    assert again.buffer == given.buffer
    assert torch.equal(receiver.take(again, "r2", torch.device("cpu")), x[:, :3] * 2)
    assert receiver.counts["opened"] == 1 and fake_here.opens == 1
    # held past its deadline: swept
    sender.give(x, "r3", time.monotonic() - 1)
    assert sender.held() == 2
    sender.sweep()
    assert sender.held() == 1
    sender.release("r2")
    assert sender.held() == 0


def test_pool_is_bounded(fake_here, monkeypatch):
    monkeypatch.setattr(cuda_ipc, "POOL_BUFFERS", 2)
    sender = cuda_ipc.Sender("s>")
    sender.link(_peer())
    deadline = time.monotonic() + 60
    assert sender.give(torch.ones(8), "a", deadline) is not None
    assert sender.give(torch.ones(8), "b", deadline) is not None
    assert sender.give(torch.ones(8), "c", deadline) is None  # all held: the ordinary way
    assert sender.counts["pool_full"] == 1
    sender.release("a")
    sender.release("b")
    # a new size retires a free buffer of another size; its id travels to the receiver
    big = sender.give(torch.ones(1 << 16), "d", deadline)
    assert big is not None and len(big.retired) == 1 and sender.buffers() == 2


def test_open_failure_is_refused(fake_here):
    sender, receiver = cuda_ipc.Sender("s>"), cuda_ipc.Receiver()
    sender.link(_peer())
    x = torch.randn(3, 4)
    given = sender.give(x, "r", time.monotonic() + 60)
    fake_here.fail_open = True
    with pytest.raises(cuda_ipc.Refused):
        receiver.take(given, "r", torch.device("cpu"))
    again = sender.refused(given, "r")  # the value, to send the ordinary way
    assert torch.equal(again, x) and sender.held() == 0 and not sender.active
    assert sender.give(x, "r", time.monotonic() + 60) is None  # the link stays off


# -- on the cluster -------------------------------------------------------------------------------


def _stats(model):
    return [s["ipc"] for s in model.lab.backend.memory(model.name)]


def _held(model):
    return [s["ipc_held"] + s["requests"] + s["held"] + s["autograd_states"]
            for s in model.lab.backend.memory(model.name)]


def _run(model):
    """A trace with a patch, a gradient trace and a short generation: what the stages hand on."""
    torch.manual_seed(0)
    v = torch.randn(model.d_model) * 0.1
    last = model.adapter.n_layers - 1
    with model.trace(PROMPT):
        model.layers[1].output[:, -1] *= 1.5
        logits = model.output.logits.save()
    with model.trace([PROMPT, "Hello"]) as tr:
        model.layers[0].output += v
        model.layers[last].output += v
        layers = [layer.output for layer in model.layers]
        metric(model.output.logits).backward()
        grads = [h.grad.save() for h in layers]
        v_grad = tr.grad(v).save()
    with model.generate(PROMPT, max_new_tokens=3) as gen:
        with gen.all():
            h = model.layers[last].output.save()
    return [logits.value, *[g.value for g in grads], v_grad.value, h.value,
            *[t for t in gen.output_ids]]


@pytest.fixture(scope="module")
def ipc_workers(backend):
    """Every worker hands over through the stand-in; ``reference``: the numbers of the
    ordinary path (IPC switched off), on 3 stages."""
    client = backend.client
    client.run(fake_ipc.install)
    yield client
    client.run(fake_ipc.set_env, None)
    client.run(fake_ipc.uninstall)
    assert fake_ipc.leftovers() == []


@pytest.fixture(scope="module")
def reference(ipc_workers, lab):
    ipc_workers.run(fake_ipc.set_env, "0")
    model = deploy(lab, MODEL, 3)
    try:
        assert not any(s[d]["active"] for s in _stats(model) for d in ("next", "prev"))
        return _run(model)
    finally:
        ipc_workers.run(fake_ipc.set_env, None)
        lab.undeploy(MODEL)


@pytest.fixture
def staged(ipc_workers, reference, lab):
    model = deploy(lab, MODEL, 3)
    pids = [s["pid"] for s in (a.describe().result() for a in
                               lab.backend.deployment(MODEL).actors)]
    assert len(set(pids)) == 3, "each stage in a process of its own"
    yield model
    ipc_workers.run(fake_ipc.install, False)
    lab.undeploy(MODEL)


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_stages_hand_over_in_device_buffers_with_the_same_numbers(staged, reference):
    stats = _stats(staged)
    assert [s["next"]["active"] for s in stats] == [True, True, False]
    assert [s["prev"]["active"] for s in stats] == [False, True, True]
    _assert_same(_run(staged), reference)
    stats = _stats(staged)
    assert stats[0]["next"]["sent"] > 0 and stats[1]["next"]["sent"] > 0  # hidden states
    assert stats[1]["prev"]["sent"] > 0 and stats[2]["prev"]["sent"] > 0  # gradients
    assert all(s["in"]["received"] > 0 for s in stats)
    assert not any(s[d]["refused"] for s in stats for d in ("next", "prev"))
    assert _held(staged) == [0, 0, 0]


def test_opened_buffers_are_reused_across_requests(staged):
    def trace():
        with staged.trace(PROMPT):
            out = staged.output.logits.save()
        return out.value

    first = trace()
    before = _stats(staged)
    for _ in range(4):
        torch.testing.assert_close(trace(), first, atol=0, rtol=0)
    after = _stats(staged)
    for b, a in zip(before[1:], after[1:]):
        assert a["in"]["received"] == b["in"]["received"] + 4
        assert a["in"]["opened"] == b["in"]["opened"]  # no new open: the cache answered
    assert after[0]["next"]["buffers"] == before[0]["next"]["buffers"] == 1


def test_open_failure_falls_back_with_the_same_numbers(staged, reference, ipc_workers):
    ipc_workers.run(fake_ipc.install, True)  # no handle opens anywhere
    _assert_same(_run(staged), reference)
    stats = _stats(staged)
    assert stats[0]["next"]["refused"] == 1 and not stats[0]["next"]["active"]  # hidden state
    assert stats[1]["prev"]["refused"] == 1 and not stats[1]["prev"]["active"]  # gradient
    assert _held(staged) == [0, 0, 0]
    _assert_same(_run(staged), reference)  # and the link goes on the ordinary way


def test_buffers_are_released_after_failure_and_abort(staged, lab):
    with pytest.raises(ExecutionError, match="out of bounds"):
        with staged.trace(PROMPT):  # fails on the last stage, after two hand-overs
            staged.layers[staged.adapter.n_layers - 1].output[:, torch.tensor([400])].save()
    assert _held(staged) == [0, 0, 0]
    with pytest.raises(ExecutionError):
        with staged.trace(PROMPT):  # fails in the first stage's backward, a gradient handed
            metric(staged.output.logits).backward()
            g = staged.layers[0].output.grad.flatten()
            g[g.abs().argmax() + 10**9].save()
    assert _held(staged) == [0, 0, 0]
    with pytest.raises(RequestTimeoutError):  # aborted past its deadline mid-generation
        with staged.generate(COUNTING, max_new_tokens=200, timeout=0.5):
            pass
    time.sleep(1.0)
    assert _held(staged) == [0, 0, 0]


def _acks(on: bool, dask_worker=None) -> None:
    """Stages in this process acknowledge the gradients handed to them (``on``), or never."""
    from tpmlab.cluster import actor

    if on:
        if hasattr(actor.StageActor, "_ack_kept"):
            actor.StageActor._ack = actor.StageActor._ack_kept
    else:
        actor.StageActor._ack_kept = actor.StageActor._ack
        actor.StageActor._ack = lambda self, req, value: None


def test_unacknowledged_buffers_go_with_the_abort_and_the_deadline(staged, lab, ipc_workers):
    first = lab.backend.deployment(MODEL).placements[0].worker
    ipc_workers.run(_acks, False, workers=[first])  # stage 0 takes gradients, never says so
    try:
        with pytest.raises(ExecutionError):  # stage 0's backward fails: the request is aborted
            with staged.trace(PROMPT):
                metric(staged.output.logits).backward()
                g = staged.layers[0].output.grad.flatten()
                g[g.abs().argmax() + 10**9].save()
        assert _held(staged) == [0, 0, 0]
        with staged.trace(PROMPT, timeout=1.0):  # succeeds; stage 1 holds the gradient's buffer
            metric(staged.output.logits).backward()
            ok = staged.layers[0].output.grad.save()
        assert ok.value.shape[-1] == staged.d_model
        assert [s["ipc_held"] for s in lab.backend.memory(MODEL)] == [0, 1, 0]
        deadline = time.monotonic() + 30
        while _held(staged) != [0, 0, 0] and time.monotonic() < deadline:
            time.sleep(0.5)  # until the request's deadline (1 s) plus the grace period
        assert _held(staged) == [0, 0, 0]
    finally:
        ipc_workers.run(_acks, True, workers=[first])
