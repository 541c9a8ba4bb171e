"""Admission: the in-flight limit before the body is read, validation in a bounded pool,
one plan payload limit, and each user charged their own plan's compute."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest
import torch

from tpmlab.ir.codec import decode_result, encode_plan

from .conftest import MODEL, make_gateway, raw_request, serve, wait_until


def _blob(model, build, prompt="The Eiffel Tower is in"):
    tr = model.trace(prompt)
    with tr.recording():
        build(model)
    return encode_plan(tr.plan())


def _logits(m):
    m.output.logits[:, -1].save()


def _matmuls(m, n=30, size=512):
    """The plan's own heavy compute: ``n`` matmuls of ``size`` x ``size`` constants."""
    c = torch.randn(size, size) / size**0.5
    x = (m.output.logits[0, -1, :1] * 0 + 1) * c  # [size, size], from the model's output
    for _ in range(n):
        x = x @ c
    x[0, :4].save()


def test_each_user_is_charged_their_own_plan_compute(engine_backend, cost_model, tmp_path,
                                                     lab_model):
    """A plan of 30 matmuls and a plain one share a forward pass: each is charged its own
    prompt's forward passes and its own nodes' measured seconds (nobody pays for others)."""
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      batch_window=60.0, max_batch_requests=2,  # the pair, however slow
                      plan_compute_factor=500.0)  # room for the matmuls
    s = serve(gw)
    heavy, plain = _blob(lab_model, _matmuls), _blob(lab_model, _logits, prompt="Hello")
    try:
        with s.client("inspect") as hc, s.client("query") as pc:
            # the heavy plan waits for a partner; the plain one joins it
            rid = hc.post(f"/v1/models/{MODEL}/requests", content=heavy).json()["id"]
            p = pc.post(f"/v1/models/{MODEL}/run", content=plain)
            h = hc.get(f"/v1/requests/{rid}/result")
    finally:
        s.server.stop()
    assert h.status_code == p.status_code == 200, (h.text, p.text)
    assert h.headers["x-tpmlab-batch-size"] == p.headers["x-tpmlab-batch-size"] == "2"
    _, hm = decode_result(h.content)
    _, pm = decode_result(p.content)
    assert hm["plan_seconds"] > 0.02  # 30 matmuls of 512 x 512, measured by the engine
    assert pm["plan_seconds"] < hm["plan_seconds"] / 10
    pricing = gw.config.pricing
    for meta, user in ((hm, "inspect-user"), (pm, "query-user")):
        (row,) = [c for c in gw.ledger.charges(user) if c["request_id"] == meta["request_id"]]
        assert row["units"] == pytest.approx(meta["charged_units"], abs=1e-6)
        assert row["units"] == pytest.approx(pricing.units(
            meta["forward_seconds"] + meta["plan_seconds"], row["bytes_returned"]), abs=1e-5)
    # the plain plan's forward passes are its own prompt's, as if it had run alone
    tokens = len(lab_model.tokenizer("Hello")["input_ids"])
    assert pm["forward_seconds"] == pytest.approx(gw.models[MODEL].cost.seconds(tokens))


def test_plan_compute_beyond_the_hold_is_capped(engine_backend, cost_model, tmp_path,
                                                lab_model):
    """With no allowance for the plan's own compute, a heavy plan is charged its hold (the
    cap), and what it used beyond that is counted in /metrics."""
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      plan_compute_factor=0.0)
    s = serve(gw)
    try:
        with s.client("inspect") as c:
            r = c.post(f"/v1/models/{MODEL}/run", content=_blob(lab_model, _matmuls))
            assert r.status_code == 200, r.text
            _, meta = decode_result(r.content)
            text = c.get("/metrics").text
    finally:
        s.server.stop()
    assert meta["charged_units"] == pytest.approx(meta["held_units"], abs=1e-6)
    line = next(x for x in text.splitlines()
                if x.startswith("tpmlab_gateway_uncharged_units_total"))
    assert float(line.split()[-1]) > 0
    assert gw.ledger.audit() == []


def test_in_flight_limit_is_checked_before_the_body_is_read(engine_backend, cost_model,
                                                            tmp_path, lab_model):
    """At the limit, a request is 429 whatever its body: garbage is not decoded (400), a
    huge declared length is not read (413)."""
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      batch_window=3.0, max_concurrent_per_user=1)
    s = serve(gw)
    try:
        with s.client("inspect") as c:
            assert c.post(f"/v1/models/{MODEL}/requests",
                          content=_blob(lab_model, _logits)).status_code == 202
            r = c.post(f"/v1/models/{MODEL}/requests", content=b"\x00garbage" * 1000)
            assert r.status_code == 429 and r.json()["error"] == "RateLimitError", r.text
            answer = raw_request(s.url, f"POST /v1/models/{MODEL}/requests HTTP/1.1",
                                 {"Authorization": f"Bearer {s.keys['inspect']}",
                                  "Content-Length": str(10**12)}, b"x")
            assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
        with httpx.Client(base_url=s.url) as anonymous:  # and authentication comes first
            assert anonymous.post(f"/v1/models/{MODEL}/run",
                                  content=b"\x00garbage").status_code == 401
    finally:
        s.server.stop()


def test_validation_runs_in_a_bounded_pool(engine_backend, cost_model, tmp_path, lab_model):
    """One validation thread and room for one plan waiting: while validation is stuck, a
    third plan is refused 503 with Retry-After, and the event loop still answers."""
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      validation_threads=1, max_validations_waiting=1)
    s = serve(gw)
    gate, threads = threading.Event(), []
    prepare = gw.prepare

    def stuck(*args):
        threads.append(threading.current_thread().name)
        gate.wait(60)
        return prepare(*args)

    gw.prepare = stuck
    blob = _blob(lab_model, _logits)
    try:
        def send(tier):
            with s.client(tier) as c:
                return c.post(f"/v1/models/{MODEL}/run", content=blob)

        pool = cf.ThreadPoolExecutor(2)
        first = [pool.submit(send, t) for t in ("query", "inspect")]
        assert wait_until(lambda: gw._validating == 2, timeout=30)
        with s.client("intervene") as c:
            r = c.post(f"/v1/models/{MODEL}/run", content=blob)
            assert r.status_code == 503 and r.json()["error"] == "BusyError", r.text
            assert int(r.headers["retry-after"]) >= 1
            t = time.monotonic()
            assert c.get("/health").status_code == 200 and c.get("/v1/me").status_code == 200
            assert time.monotonic() - t < 10
        gate.set()
        assert [f.result(60).status_code for f in first] == [200, 200]
        pool.shutdown()
    finally:
        gate.set()
        s.server.stop()
    assert threads and all(name.startswith("gateway-validate") for name in threads)


def test_a_validator_crash_is_a_400_naming_it(engine_backend, cost_model, tmp_path,
                                              lab_model, monkeypatch):
    import tpmlab.gateway.core as core

    def broken(*args, **kwargs):
        raise KeyError("no such event")

    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model)
    s = serve(gw)
    monkeypatch.setattr(core, "check_plan", broken)
    try:
        with s.client("query") as c:
            r = c.post(f"/v1/models/{MODEL}/run", content=_blob(lab_model, _logits))
            assert r.status_code == 400 and "KeyError" in r.json()["message"], r.text
            assert "tpmlab_gateway_validation_crashes_total 1.0" in c.get("/metrics").text
    finally:
        s.server.stop()


def test_one_plan_payload_limit_for_gateway_and_engine(engine_backend, cost_model, tmp_path,
                                                       lab_model):
    """The gateway reads and decodes a plan up to the tier's ``Limits.max_plan_bytes``, the
    limit the engine decodes with: a 6 MiB query plan (constants within the tier's 4 MiB)
    runs (the gateway refused anything over constants + 1 MiB), and a body over the limit
    is 413 naming it."""
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model)
    s = serve(gw)
    limit = gw.config.tier_limits["query"].max_plan_bytes

    def padded(m):  # a 3.9 MiB constant
        torch.cat([m.output.logits[0, -1, :4], torch.zeros(int(3.9 * 2**20) // 4)])[:4].save()
        tr = m.tracing.current()
        tr.nodes[len(tr.nodes) - 1].line = "# " + "x" * (2 * 2**20)  # a long source line

    blob = _blob(lab_model, padded)
    assert 5.5 * 2**20 < len(blob) < limit
    try:
        with s.client("query") as c:
            r = c.post(f"/v1/models/{MODEL}/run", content=blob)
            assert r.status_code == 200, r.text[:500]
            answer = raw_request(s.url, f"POST /v1/models/{MODEL}/run HTTP/1.1",
                                 {"Authorization": f"Bearer {s.keys['query']}",
                                  "Content-Length": str(limit + 1)}, b"x")
            assert answer.startswith(b"HTTP/1.1 413") and f"{limit:,}".encode() in answer
    finally:
        s.server.stop()


def test_weight_restores_are_counted_in_metrics(engine_backend, cost_model, tmp_path,
                                                lab_model, monkeypatch):
    """A write to a weight that validation misses (made blind to ``mul_`` writing, as a
    mistake in the op table would) fails its request at run time (422, nothing charged),
    the engine restores the weights, and the gateway counts it in /metrics."""
    import dataclasses

    from tpmlab.ir import ops as irops

    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model)
    s = serve(gw)
    good = _blob(lab_model, lambda m: m.output.logits.save())
    try:
        with s.client("inspect") as c:
            before = decode_result(c.post(f"/v1/models/{MODEL}/run", content=good).content)[0]
            monkeypatch.setitem(irops.OPS, "mul_",
                                dataclasses.replace(irops.OPS["mul_"], mutates=False))
            bad = _blob(lab_model, lambda m: (m.model.norm.param("weight").mul_(0),
                                              m.output.logits.save()))
            r = c.post(f"/v1/models/{MODEL}/run", content=bad)
            assert r.status_code == 422 and r.json()["error"] == "WeightsChangedError", r.text
            assert f'tpmlab_gateway_weight_restores_total{{model="{MODEL}"}} 1.0' in \
                c.get("/metrics").text
            monkeypatch.undo()
            after = decode_result(c.post(f"/v1/models/{MODEL}/run", content=good).content)[0]
        assert len(gw.ledger.charges("inspect-user")) == 2  # the failed request: no charge
        for k in before:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    finally:
        s.server.stop()
