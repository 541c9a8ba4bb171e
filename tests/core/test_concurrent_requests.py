"""Threads sharing one in-process model: requests queued while a pass runs share the next
forward pass where they can (:mod:`tpmlab.runtime.shared_passes`), and each thread gets
exactly its own values: bit for bit those of the same batch in which the other requests do
nothing, and its solo result to float rounding. Requests that cannot merge run alone, in
turn, without loss; a bad request fails only itself."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import TINY_MODELS
from tests.plan_strategies import assert_same, property_settings, recording, users
from tpmlab.errors import IndexBoundsError
from tpmlab.ir.codec import encode_plan
from tpmlab.ir.merge import merge_plans, split_values
from tpmlab.ir.plan import Invoke, Node, Plan, Ref, Slice, TensorRef, Tuple
from tpmlab.runtime.request import plan_digest
from tpmlab.runtime.shared_passes import BatchPolicy

MODEL = "tiny-llama"
PROMPTS = ["The Eiffel Tower is located in the city of", "Hello there", "1 2 3 4",
           "A longer prompt about rivers and mountains", "x", "Paris is", "The cat sat", "Why",
           "Seven plus six is", "Rivers flow to the", "Blue", "My name is Ada and I"]


@contextlib.contextmanager
def held_pass(backend, name: str, monkeypatch):
    """The model's next pass waits until the block has queued requests behind it and called
    ``release()``; yields ``(queue, release, groups)``, ``groups`` the requests of every
    pass served, in order."""
    queue = backend.queues[name]
    started, release = threading.Event(), threading.Event()
    execute, serve = queue.host.execute, queue._serve
    groups: list[list] = []

    def held_execute(*args, **kwargs):
        if not started.is_set():
            started.set()
            release.wait(60)
        return execute(*args, **kwargs)

    def recorded_serve(group):
        groups.append(list(group))
        return serve(group)

    monkeypatch.setattr(queue.host, "execute", held_execute)
    monkeypatch.setattr(queue, "_serve", recorded_serve)
    try:
        yield queue, started, release, groups
    finally:
        release.set()


def run_held(backend, name: str, blobs: list[bytes], monkeypatch, **policy):
    """Run ``blobs`` from one thread each, all queued behind a held pass (so the next pass
    sees them all) under a :class:`BatchPolicy` that always merges (and ``policy``): each
    one's result or exception, and the passes' groups."""
    monkeypatch.setattr(backend.queues[name], "policy", BatchPolicy(adaptive=False, **policy))
    first = _blob(backend, name, "held")
    with held_pass(backend, name, monkeypatch) as (queue, started, release, groups), \
            ThreadPoolExecutor(len(blobs) + 1) as pool:
        holder = pool.submit(backend.run_values, name, first)
        assert started.wait(60)
        futures = []
        for k, blob in enumerate(blobs):  # one at a time: they queue in this order
            futures.append(pool.submit(backend.run_values, name, blob))
            deadline = time.monotonic() + 60
            while queue.queued < k + 1 and time.monotonic() < deadline:
                time.sleep(0.002)
        assert queue.queued == len(blobs)
        release.set()
        holder.result()
        outs = []
        for f in futures:
            try:
                outs.append(f.result())
            except Exception as e:  # noqa: BLE001 - the test compares it
                outs.append(e)
    return outs, groups[1:]  # the first group is the held request


def _blob(backend, name: str, prompt: str) -> bytes:
    host = backend.host(name)
    ids = torch.tensor(host.tokenizer(prompt)["input_ids"])
    return encode_plan(Plan(model=name, model_version=host.info.version,
                            invokes=[Invoke("tokens", ["ids"])], tensors={"ids": ids},
                            nodes=[Node(0, "point", path="", io="output", invoke=0),
                                   Node(1, "getattr", [Ref(0), "logits"]),
                                   Node(2, "save", [Ref(1)])]))


def _steered(model, prompt: str, k: int):
    """A trace with its own intervention: layer 0's last position shifted by ``k``."""
    with model.trace(prompt):
        model.layers[0].output[:, -1] += 0.05 * (k + 1)
        h = model.layers[1].output.save()
        top = model.unembed.output[:, -1].argmax(-1).save()
    return h.value, top.value


def test_many_threads_each_get_their_own_results(local_lab):
    model = local_lab.model(MODEL)
    cases = [(p, k) for k in range(3) for p in PROMPTS]  # distinct prompts and interventions
    alone = [_steered(model, p, k) for p, k in cases]
    queue = local_lab.backend.queues[MODEL]
    passes, served = queue.passes, queue.requests
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda c: _steered(model, *c), cases * 2))
    assert queue.requests - served == 2 * len(cases)
    for i, (h, top) in enumerate(together):
        want_h, want_top = alone[i % len(cases)]
        assert h.shape == want_h.shape
        torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-5)
        assert torch.equal(top, want_top)
        # nearer to its own solo result than to any other request's of its shape
        others = [a[0] for j, a in enumerate(alone)
                  if j != i % len(cases) and a[0].shape == h.shape]
        mine = (h - want_h).abs().max()
        assert all(mine < (h - o).abs().max() for o in others)
    print(f"{queue.passes - passes} passes for {queue.requests - served} requests")


@pytest.mark.parametrize("name", TINY_MODELS)
@property_settings(6)
@given(data=st.data())
def test_a_merged_pass_gives_each_thread_the_same_batch_result(local_lab, name, data, monkeypatch):
    """The users' plans queue behind a held pass and share the next one: each thread's values
    are bit for bit those of the same batch in which the others do nothing."""
    backend = local_lab.backend
    info = local_lab.model(name).info
    plans = data.draw(users(info))
    with monkeypatch.context() as m:
        outs, groups = run_held(backend, name, [encode_plan(p) for p in plans], m, min_fill=0.0)
    assert len(groups) == 1 and len(groups[0]) == len(plans)  # one pass for all of them
    group = [item.plan for item in groups[0]]
    idle = [p.replace(nodes=[]) for p in group]
    for k, (plan, (values, meta)) in enumerate(zip(plans, outs)):
        assert meta["batch_size"] == len(plans)
        assert meta["plan_digest"] == plan_digest(plan)
        slot = next(j for j, item in enumerate(groups[0]) if item.future.result()[0] is values)
        assert plan_digest(group[slot]) == plan_digest(plan)  # its own request's values
        same_batch, mapping = merge_plans([p if j == slot else idle[j] for j, p in enumerate(group)])
        reference = split_values(backend.run_values(name, encode_plan(same_batch))[0], mapping)[slot]
        solo = backend.run_values(name, encode_plan(plan))[0]
        assert set(values) == set(reference) == set(solo)
        for node, value in values.items():
            where = f"user {k} node {node}"
            assert_same(value, reference[node], exact=True, where=where + " vs same batch")
            assert_same(value, solo[node], exact=False, where=where + " vs solo")


def test_requests_that_cannot_merge_run_in_turn_and_a_bad_one_fails_alone(local_lab, monkeypatch):
    backend = local_lab.backend
    model = local_lab.model(MODEL)
    host = backend.host(MODEL)
    version = host.info.version
    ids = torch.tensor(host.tokenizer("The Eiffel Tower is in")["input_ids"])
    n = ids.shape[0]

    def plan(invokes, nodes, tensors):
        return Plan(model=MODEL, model_version=version, invokes=invokes, nodes=nodes,
                    tensors=tensors)

    last = Node(1, "getattr", [Ref(0), "logits"])
    trace = plan([Invoke("tokens", ["ids"])], [
        Node(0, "point", path="", io="output", invoke=0), last, Node(2, "save", [Ref(1)])],
        {"ids": ids})
    shifted = plan([Invoke("tokens", ["ids"])], [
        Node(0, "point", path="model.layers.0", io="output", invoke=0),
        Node(1, "getitem", [Ref(0), Tuple((Slice(), -1))]), Node(2, "iadd", [Ref(1), 1.0]),
        Node(3, "point", path="", io="output", invoke=0),
        Node(4, "getattr", [Ref(3), "logits"]), Node(5, "save", [Ref(4)])], {"ids": ids.flip(0)})
    whole = plan([Invoke("tokens", ["ids"])], [  # a point that reads every row: runs alone
        Node(0, "point", path="", io="output", invoke=None), last, Node(2, "save", [Ref(1)])],
        {"ids": ids})
    embeds = plan([Invoke("embeds", ["e"])], [
        Node(0, "point", path="", io="output", invoke=0), last, Node(2, "save", [Ref(1)])],
        {"e": torch.randn(n, host.model.config.hidden_size,
                          generator=torch.Generator().manual_seed(0))})
    bad = plan([Invoke("tokens", ["ids"])], [  # passes validation, fails when it runs
        Node(0, "point", path="model.layers.0", io="output", invoke=0),
        Node(1, "getitem", [Ref(0), Tuple((Slice(), TensorRef("i")))]),
        Node(2, "getitem", [Ref(1), 0]),
        Node(3, "save", [Ref(2)])], {"ids": ids, "i": torch.tensor([0, 99])})
    with recording(model, model.generate("Hello there", max_new_tokens=3)) as gen:
        model.layers[1].output.save()
    generate = gen.plan()
    plans = [trace, generate, shifted, whole, bad, embeds, trace]
    solo = [backend.run_values(MODEL, encode_plan(p)) if p is not bad else None for p in plans]
    outs, groups = run_held(backend, MODEL, [encode_plan(p) for p in plans], monkeypatch)
    assert isinstance(outs[4], IndexBoundsError)
    for k, (out, want) in enumerate(zip(outs, solo)):
        if want is None:
            continue
        assert not isinstance(out, Exception), (k, out)
        values, meta = out
        assert set(values) == set(want[0])
        for node, value in values.items():
            exact = meta["batch_size"] == 1
            assert_same(value, want[0][node], exact=exact, where=f"request {k} node {node}")
    # the oldest request goes first, merged with the compatible later ones; the rest in turn
    order = [[plans.index(next(p for p in plans if plan_digest(p) == plan_digest(i.plan)))
              for i in g] for g in groups]
    assert order[0] == [0, 2, 4, 0] and order[1:] == [[1], [3], [5]]



def test_undeploying_fails_the_queued_requests_and_lets_the_running_pass_finish(monkeypatch):
    from tpmlab.errors import ModelUndeployedError
    from tpmlab.runtime.backend import LocalBackend

    backend = LocalBackend(device="cpu", dtype=torch.float32)
    backend.deploy(MODEL)
    queue = backend.queues[MODEL]
    with held_pass(backend, MODEL, monkeypatch) as (_, started, release, _groups), \
            ThreadPoolExecutor(3) as pool:
        running = pool.submit(backend.run_values, MODEL, _blob(backend, MODEL, "first"))
        assert started.wait(60)
        waiting = pool.submit(backend.run_values, MODEL, _blob(backend, MODEL, "second"))
        while queue.queued < 1:
            time.sleep(0.01)
        closing = pool.submit(backend.undeploy, MODEL)
        with pytest.raises(ModelUndeployedError, match="undeployed before this request ran"):
            waiting.result(60)
        release.set()
        values, meta = running.result(60)
        closing.result(60)
    assert meta["batch_size"] == 1 and values
    assert queue._thread is None  # the pass thread ended
    with pytest.raises(LookupError, match="not deployed"):
        backend.run_values(MODEL, b"{}")
    backend.close()
