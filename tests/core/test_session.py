"""``model.session()`` as one request in process: values between traces stay on the engine
(only saves come back), the session envelope is validated as a whole with errors naming
node and line, and an engine without sessions still runs it trace by trace (a gateway's
sessions: tests/gateway/test_gateway_sessions.py).
nnsight parity of the two-pass patching is in tests/nnsight_ports.py (session ports)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tpmlab.errors import PlanError, SchemaError
from tpmlab.ir.codec import encode_plan
from tpmlab.ir.plan import FROM_TRACE, SAVE, Node, Ref
from tpmlab.ir.session import decode_session, encode_session

MODEL = "tiny-llama"
CLEAN, CORRUPT = "The Colosseum is in the city of", "The Eiffel Tower is located in"


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model(MODEL)


@pytest.fixture
def calls(local_lab, monkeypatch):
    """The requests that reach the backend: ("run", ...) or ("session", n traces)."""
    seen: list[tuple[str, int]] = []
    backend = local_lab.backend
    run, session = backend.run_values, backend.run_session_values

    def run_values(*a, **k):
        seen.append(("run", 1))
        return run(*a, **k)

    def run_session_values(model, blob, **k):
        results = session(model, blob, **k)
        seen.append(("session", len(results)))
        return results

    monkeypatch.setattr(backend, "run_values", run_values)
    monkeypatch.setattr(backend, "run_session_values", run_session_values)
    return seen


def _two_pass(model):
    last = model.adapter.n_layers - 1
    with model.session():
        with model.trace(CLEAN) as first:
            late = model.layers[last].output[:, -1]
        with model.trace(CORRUPT) as second:
            model.layers[0].output[:, -1] = late
            logits = model.output.logits[:, -1].save()
    return first, second, logits


def test_a_session_is_one_request_and_only_saves_come_back(model, calls):
    first, second, logits = _two_pass(model)
    assert calls == [("session", 2)]
    assert first.result.values == {}  # the clean activation stayed on the engine
    assert list(second.result.values) == [max(second.nodes)]
    assert first.result.meta["session"] == second.result.meta["session"] == 2
    kept = [n for n in first.nodes.values() if n.op == SAVE]
    assert [n.kwargs for n in kept] == [{"keep": True}]
    # the same numbers as the two traces run by hand, the value passed through here
    last = model.adapter.n_layers - 1
    with model.trace(CLEAN):
        late = model.layers[last].output[:, -1].save()
    with model.trace(CORRUPT):
        model.layers[0].output[:, -1] = late.value
        expected = model.output.logits[:, -1].save()
    torch.testing.assert_close(logits.value, expected.value, atol=0, rtol=0)


def test_without_engine_sessions_the_value_passes_through_the_notebook(model, calls):
    handle = model.handle()
    handle.run_session = None  # an engine without sessions
    _, _, ours = _two_pass(model)
    _, second, theirs = _two_pass(handle)
    assert calls == [("session", 2), ("run", 1), ("run", 1)]
    assert any(name.startswith("s") for name in second.tensors)  # the carried constant
    torch.testing.assert_close(ours.value, theirs.value, atol=0, rtol=0)


def test_a_value_used_twice_is_kept_once_and_read_in_each_trace(model, calls):
    with model.session():
        with model.trace(CLEAN) as first:
            h = model.layers[0].output[:, -1]
        with model.trace(CORRUPT) as second:
            a = (h * 2).save()
            b = (h + 1).save()
        with model.trace(CORRUPT):
            c = (h - 1).save()
    assert calls == [("session", 3)]
    assert sum(n.op == SAVE for n in first.nodes.values()) == 1
    assert sum(n.op == FROM_TRACE for n in second.nodes.values()) == 1
    torch.testing.assert_close(a.value / 2 - 1, c.value)
    torch.testing.assert_close(b.value - 1, c.value + 1)


def test_a_generation_step_value_feeds_a_later_trace(model, calls):
    with model.session():
        with model.generate(CLEAN, max_new_tokens=3) as gen:
            with gen.step(1):
                h = model.layers[0].output[:, -1]
                ref = model.layers[0].output[:, -1].save()
        with model.trace(CORRUPT):
            model.layers[1].input[:, -1] = h
            out = model.layers[1].input[:, -1].save()
    assert calls == [("session", 2)]
    assert len(gen.generated_ids[0]) > 0
    torch.testing.assert_close(out.value, ref.value)


def _plans(model):
    """A recorded two-trace session's plans (not run)."""
    last = model.adapter.n_layers - 1
    t1, t2 = model.trace(CLEAN), model.trace(CORRUPT)
    with t1.recording():
        late = model.layers[last].output[:, -1]
    t1.keep_later(late)
    with t2.recording():
        model.layers[0].output  # noqa: B018 - one module point, nothing saved
    return t1.plan(), t2.plan()


def _with_node(plan, node):
    return dataclasses.replace(plan, nodes=[*plan.nodes, node])


def _run(local_lab, plans):
    return local_lab.run_session(MODEL, encode_session(list(plans)))


def test_cross_trace_references_are_validated_with_node_and_line(local_lab, model):
    p1, p2 = _plans(model)
    keep = next(n.id for n in p1.nodes if n.op == SAVE)
    point = next(n.id for n in p1.nodes if n.op != SAVE)
    n = len(p2.nodes)

    def reading(trace, node):
        return _with_node(p2, Node(id=n, op=FROM_TRACE, args=[trace, node], line="nb.py:7: x"))

    with pytest.raises(SchemaError, match=r"not a value that trace keeps.*node \d+ \(from_trace\), at nb.py:7"):
        _run(local_lab, [p1, reading(0, point)])
    with pytest.raises(SchemaError, match="only values of traces before it"):
        _run(local_lab, [p1, reading(1, keep)])
    with pytest.raises(SchemaError, match="takes \\[trace index, save node id\\]"):
        _run(local_lab, [p1, reading(-1, keep)])
    # the value's shape flows into the later trace's validation like any value's
    bad = _with_node(reading(0, keep), Node(id=n + 1, op="matmul", args=[Ref(n), Ref(n)]))
    with pytest.raises(PlanError, match="matmul"):
        _run(local_lab, [p1, bad])
    # a cross-trace read or a kept save outside a session is refused, naming the node
    with pytest.raises(SchemaError, match="as one session"):
        local_lab.run_values(MODEL, encode_plan(reading(0, keep)))
    with pytest.raises(SchemaError, match="as one session"):
        local_lab.run_values(MODEL, encode_plan(p1))
    # and the whole session runs once every reference is right
    results = _run(local_lab, [p1, reading(0, keep)])
    assert [v for v, _ in results] == [{}, {}]


def test_a_malformed_envelope_is_a_schema_error(model):
    p1, p2 = _plans(model)
    blob = encode_session([p1, p2])
    for bad in (b"", b"\x00" * 16, encode_plan(p1), blob[:-5]):
        with pytest.raises(SchemaError):
            decode_session(bad)
    assert [len(p.nodes) for p in decode_session(blob)] == [len(p1.nodes), len(p2.nodes)]


def test_a_later_trace_s_backward_reads_a_kept_value(model):
    def run(m):
        last = m.adapter.n_layers - 1
        with m.session():
            with m.trace(CLEAN):
                h = m.layers[last].output[:, -1]
            with m.trace(CORRUPT):
                layer = m.layers[1].output
                (m.layers[2].output[:, -1] * h).sum().backward()
                grad = layer.grad.save()
        return grad.value

    handle = model.handle()
    handle.run_session = None  # the value as a constant, through the notebook
    torch.testing.assert_close(run(model), run(handle), atol=0, rtol=0)
