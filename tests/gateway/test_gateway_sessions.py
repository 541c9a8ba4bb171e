"""``model.session()`` behind the gateway over real HTTP: one request and one charge, with
the numbers of the same session in process; the whole session validated (tiers, limits,
sums, cross-trace references) before anything of it runs; read and cancelled by its
owner only; malformed envelopes answered with a 4xx naming the problem."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import tpmlab
from tpmlab.errors import LimitError
from tpmlab.gateway.errors import TierError
from tpmlab.gateway.tiers import TIER_LIMITS
from tpmlab.ir.codec import encode_plan
from tpmlab.ir.plan import FROM_TRACE, Node
from tpmlab.ir.session import decode_session_result, encode_session

from .conftest import MODEL, make_gateway, serve, wait_until

CLEAN, CORRUPT = "The Colosseum is in the city of", "The Eiffel Tower is located in"
OCTET = {"Content-Type": "application/octet-stream"}
SESSIONS = f"/v1/models/{MODEL}/sessions"


@pytest.fixture
def engine_calls(engine_backend, monkeypatch):
    """The requests that reach the engine behind the gateway: "run" or "session"."""
    seen: list[str] = []
    run, session = engine_backend.run_values, engine_backend.run_session_values
    monkeypatch.setattr(engine_backend, "run_values",
                        lambda *a, **k: (seen.append("run"), run(*a, **k))[1])
    monkeypatch.setattr(engine_backend, "run_session_values",
                        lambda *a, **k: (seen.append("session"), session(*a, **k))[1])
    return seen


def _two_pass(model):
    """The last layer's last position of a clean run patched into a corrupt run's first
    layer: a value that crosses traces."""
    last = model.adapter.n_layers - 1
    with model.session():
        with model.trace(CLEAN) as first:
            late = model.layers[last].output[:, -1]
        with model.trace(CORRUPT) as second:
            model.layers[0].output[:, -1] = late
            logits = model.output.logits[:, -1].save()
    return first, second, logits


def _plans(model, n: int = 2):
    """A recorded session of ``n`` traces (not run): the first keeps a late layer's value,
    the last reads it (``from_trace``) and saves the final logits."""
    last = model.adapter.n_layers - 1
    traces = [model.trace(CLEAN)] + [model.trace(CORRUPT) for _ in range(n - 1)]
    with traces[0].recording():
        late = model.layers[last].output[:, -1]
    traces[0].keep_later(late)
    for tr in traces[1:]:
        with tr.recording():
            model.output.logits[:, -1].save()
    plans = [tr.plan() for tr in traces]
    keep = next(node.id for node in plans[0].nodes if node.kwargs.get("keep"))
    reader = Node(id=max(node.id for node in plans[-1].nodes) + 1, op=FROM_TRACE,
                  args=[0, keep], line="nb.py:3: late")
    plans[-1] = dataclasses.replace(plans[-1], nodes=[*plans[-1].nodes, reader])
    return plans


def _charges(served, tier):
    with served.client(tier) as c:
        return c.get("/v1/me/usage", params={"limit": 1000}).json()


def test_a_session_is_one_request_one_charge_and_the_in_process_numbers(served, engine_backend,
                                                                        engine_calls):
    lab = served.lab("intervene")
    m = lab.model(MODEL)
    before = _charges(served, "intervene")
    first, second, logits = _two_pass(m)
    assert engine_calls == ["session"]  # the two traces reached the engine as one request
    assert first.result.values == {}  # the clean activation stayed on the engine
    meta = second.result.meta
    assert meta["session"] == 2 and first.result.meta["request_id"] == meta["request_id"]
    assert lab.backend.last_charge["request_id"] == meta["request_id"]
    after = _charges(served, "intervene")
    seen = {c["request_id"] for c in before["charges"]}
    new = [c for c in after["charges"] if c["request_id"] not in seen]
    assert len(new) == 1 and after["requests"] == before["requests"] + 1  # one ledger row
    (charge,) = new
    assert (charge["request_id"], charge["mode"]) == (meta["request_id"], "session")
    assert charge["units"] == pytest.approx(meta["charged_units"])
    assert after["used"] - before["used"] == pytest.approx(charge["units"], abs=1e-6)
    assert after["held"] == 0
    # measured over both traces: the one saved tensor, both prompts' tokens and seconds
    assert charge["bytes_returned"] == logits.value.numel() * logits.value.element_size()
    tokens = sum(int(t.shape[0]) for tr in (first, second) for t in tr.plan().tensors.values())
    assert charge["tokens"] == tokens
    assert charge["compute_seconds"] == pytest.approx(meta["charged_seconds"])

    # the same session in process, and trace by trace through the notebook: atol 0
    _, _, in_process = _two_pass(tpmlab.Lab(engine_backend).model(MODEL))
    torch.testing.assert_close(logits.value, in_process.value, atol=0, rtol=0)
    handle = m.handle()
    handle.run_session = None
    _, _, carried = _two_pass(handle)
    torch.testing.assert_close(logits.value, carried.value, atol=0, rtol=0)
    assert _charges(served, "intervene")["requests"] == after["requests"] + 2
    lab.close()


def test_a_session_above_the_user_s_tier_runs_nothing(served, engine_calls):
    lab = served.lab("query")
    m = lab.model(MODEL)
    before = _charges(served, "query")
    with pytest.raises(TierError, match="trace 0 of this session reads the intermediate"):
        _two_pass(m)
    assert engine_calls == []  # not even the first trace ran
    after = _charges(served, "query")
    assert (after["requests"], after["used"], after["held"]) == (before["requests"],
                                                                 before["used"], 0)
    lab.close()


def test_the_whole_session_is_validated_before_anything_runs(engine_backend, cost_model,
                                                             tmp_path, lab_model, engine_calls):
    vocab = lab_model.info.vocab_size
    logits_bytes = 4 * vocab  # one trace's saved last-position logits, float32
    tiers = dict(TIER_LIMITS, inspect=dataclasses.replace(
        TIER_LIMITS["inspect"], max_saved_bytes=logits_bytes * 3 // 2))
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      tier_limits=tiers, max_session_traces=3, max_session_invokes=3)
    s = serve(gw)

    def refused(plans, status, error, match):
        with s.client("inspect") as c:
            r = c.post(SESSIONS, content=encode_session(plans), headers=OCTET)
        body = r.json()
        assert (r.status_code, body["error"]) == (status, error), body
        assert match in body["message"], body
        return body

    try:
        ok = _plans(lab_model, 2)
        with s.client("inspect") as c:  # within every limit it runs, as one request
            r = c.post(SESSIONS, content=encode_session(ok), headers=OCTET)
        assert r.status_code == 200, r.text
        assert [len(v) for v, _ in decode_session_result(r.content)] == [0, 1]
        assert engine_calls == ["session"]
        engine_calls.clear()
        usage = _charges(s, "inspect")

        # each trace fits the tier's saved bytes; the three together do not
        refused(_plans(lab_model, 3), 413, "LimitError", "save or keep")
        refused(_plans(lab_model, 4), 413, "LimitError", "4 traces")
        doubled = [dataclasses.replace(p, invokes=p.invokes * 2) for p in _plans(lab_model, 2)]
        refused(doubled, 413, "LimitError", "4 invokes")
        gw.config.request_timeout, timeout = 0.01, gw.config.request_timeout
        try:
            refused(ok, 413, "LimitError", "deadline")
        finally:
            gw.config.request_timeout = timeout
        # a reference to a value the first trace does not keep, named by node and line
        wrong = _plans(lab_model, 2)
        point = next(n.id for n in wrong[0].nodes if not n.kwargs.get("keep"))
        wrong[1].nodes[-1].args[1] = point
        body = refused(wrong, 400, "SchemaError", "not a value that trace keeps")
        assert (body["node"], body["line"]) == (wrong[1].nodes[-1].id, "nb.py:3: late")
        # a later trace for another model
        other = _plans(lab_model, 2)
        other[1] = dataclasses.replace(other[1], model="gpt2")
        refused(other, 400, "SchemaError", "trace 1 of the session is for model 'gpt2'")

        assert engine_calls == []  # none of them reached the engine
        after = _charges(s, "inspect")
        assert (after["requests"], after["used"], after["held"]) == (usage["requests"],
                                                                     usage["used"], 0)
    finally:
        s.server.stop()


def test_only_its_owner_reads_or_cancels_a_session(served, lab_model, engine_backend,
                                                   monkeypatch):
    blob = encode_session(_plans(lab_model, 2))
    gate = threading.Event()
    session = engine_backend.run_session_values

    def held(*a, **k):  # the engine is busy until the test lets it go
        gate.wait(60)
        return session(*a, **k)

    monkeypatch.setattr(engine_backend, "run_session_values", held)
    before = _charges(served, "inspect")
    with served.client("inspect") as owner, served.client("intervene") as other:
        try:
            first = owner.post(f"{SESSIONS}/requests", content=blob, headers=OCTET)
            assert first.status_code == 202, first.text
            a = first.json()["id"]
            assert first.json()["mode"] == "session"
            assert wait_until(lambda: owner.get(f"/v1/requests/{a}").json()["state"]
                              == "running")
            b = owner.post(f"{SESSIONS}/requests", content=blob, headers=OCTET).json()["id"]
            for rid in (a, b):
                for r in (other.get(f"/v1/requests/{rid}"),
                          other.get(f"/v1/requests/{rid}/result", params={"timeout": 1}),
                          other.delete(f"/v1/requests/{rid}")):
                    assert (r.status_code, r.json()["error"]) == (404, "NotFoundError")
            assert owner.get(f"/v1/requests/{b}").json()["state"] == "queued"
            cancelled = owner.delete(f"/v1/requests/{b}")
            assert (cancelled.status_code, cancelled.json()["state"]) == (200, "cancelled")
            running = owner.delete(f"/v1/requests/{a}")
            assert (running.status_code, running.json()["error"]) == (409, "ConflictError")
        finally:
            gate.set()
        r = owner.get(f"/v1/requests/{a}/result")
        assert r.status_code == 200 and r.headers["x-tpmlab-request-id"] == a
        results = decode_session_result(r.content)
        assert [m["request_id"] for _, m in results] == [a, a]
        assert owner.get(f"/v1/requests/{b}/result").json()["error"] == "ConflictError"
    after = _charges(served, "inspect")
    new = [c["request_id"] for c in after["charges"]
           if c["request_id"] not in {x["request_id"] for x in before["charges"]}]
    assert new == [a] and after["held"] == 0  # the cancelled one: no charge, no hold


def test_a_malformed_session_is_a_clear_4xx(served, lab_model, engine_calls):
    plans = _plans(lab_model, 2)
    blob = encode_session(plans)
    with served.client("inspect") as c:
        for bad, error, match in ((b"\x00" * 16, "SchemaError", "not a tpmlab session"),
                                  (encode_plan(plans[0]), "SchemaError", "not a tpmlab session"),
                                  (blob[:-5], "SchemaError", "malformed"),
                                  (b"", "BadRequestError", "empty body")):
            r = c.post(SESSIONS, content=bad, headers=OCTET)
            assert (r.status_code, r.json()["error"]) == (400, error), r.text
            assert match in r.json()["message"]
        r = c.post(SESSIONS, content=blob, headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]) == (415, "UnsupportedMediaTypeError")
        r = c.post(f"/v1/models/{MODEL}/run", content=blob, headers=OCTET)  # not a plan
        assert r.status_code == 400 and r.json()["error"] == "SchemaError"
        r = c.post("/v1/models/nope/sessions", content=blob, headers=OCTET)
        assert (r.status_code, r.json()["error"]) == (404, "NotFoundError")
    assert engine_calls == []


def test_limit_errors_reach_the_notebook_as_their_class(served, lab_model):
    lab = served.lab("inspect")
    with pytest.raises(LimitError, match="traces"):
        lab.backend.run_session_values(MODEL, encode_session(_plans(lab_model, 17)))
    lab.close()


def test_remote_saves_of_a_session_are_kept_as_a_plan_s(served, engine_backend):
    def run(model):
        last = model.adapter.n_layers - 1
        with model.session():
            with model.trace(CLEAN):
                late = model.layers[last].output[:, -1]
            with model.trace(CORRUPT):
                model.layers[0].output[:, -1] = late
                kept = model.layers[1].output.save(remote=True)
        return kept.value

    lab = served.lab("inspect")
    with pytest.raises(TierError, match="trace 1 of this session writes"):
        run(lab.model(MODEL))
    lab.close()
    lab = served.lab("intervene")
    value = run(lab.model(MODEL))
    assert value.handle.startswith("rv_")
    local = tpmlab.Lab(engine_backend)
    want = run(local.model(MODEL))
    torch.testing.assert_close(value.fetch(), want.fetch(), atol=0, rtol=0)
    with served.client("intervene") as c:
        held = c.get("/v1/remote-values").json()["values"]
    assert [v["handle"] for v in held] == [value.handle]
    assert lab.release_remote() == 1
    local.release_remote()
    lab.close()
