"""The gateway over real HTTP on 127.0.0.1: connect(), auth, tiers, quotas, ownership,
limits, metrics."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

from tpmlab.errors import PathError
from tpmlab.gateway.errors import AuthenticationError, QuotaError, TierError
from tpmlab.ir.codec import decode_result, encode_plan

from .conftest import MODEL, make_gateway, serve, wait_until


def _plan_bytes(model, build, prompt="The Eiffel Tower is in"):
    tr = model.trace(prompt)
    with tr.recording():
        build(model)
    return encode_plan(tr.plan())


def test_connect_gateway_same_api_and_numbers_as_local(served, engine_backend):
    import tpmlab

    lab = served.lab("inspect")
    m = lab.model(MODEL)
    with m.trace("The Eiffel Tower is in") as tr:
        h = m.layers[1].output.save()
        logits = m.output.logits.save()
    local = tpmlab.Lab(engine_backend).model(MODEL)
    with local.trace("The Eiffel Tower is in"):
        h_ref = local.layers[1].output.save()
        l_ref = local.output.logits.save()
    torch.testing.assert_close(h.value, h_ref.value)
    torch.testing.assert_close(logits.value, l_ref.value)
    meta = tr.result.meta
    assert meta["model_version"] == m.version and meta["plan_digest"].startswith("sha256:")
    assert meta["tpmlab_version"] and meta["charged_units"] > 0
    usage = lab.backend.usage()
    assert usage["name"] == "inspect-user" and usage["charges"][0]["request_id"] == meta["request_id"]
    assert usage["balance"] == pytest.approx(usage["allocated"] - usage["used"])
    with pytest.raises(PathError, match="no module"):  # the engine's own error class, over HTTP
        with m.trace("x"):
            m.envoy("model.layers.0").output.save()
            tr2 = m.tracing.current()
            tr2.nodes[0].path = "model.nope"
    lab.close()


def test_no_or_bad_credential_is_401(served):
    import httpx

    for headers in ({}, {"Authorization": "Bearer tpmk_nope_nope"}, {"Authorization": "Basic x"},
                    {"Authorization": "Bearer " + served.keys["query"][:-2] + "xx"}):
        r = httpx.get(served.url + "/v1/models", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"] == "AuthenticationError"
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    import tpmlab

    with pytest.raises(AuthenticationError):
        tpmlab.connect(gateway=served.url, token="tpmk_abc_def").model(MODEL)


def test_jupyterhub_tokens_are_checked_at_the_hub(engine_backend, cost_model, tmp_path, fake_hub):
    from tpmlab.gateway.auth import HubSettings

    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model)
    s = serve(gw, hub=HubSettings(fake_hub.api_url, default_tier="inspect", default_units=50))
    try:
        with s.client("hub-token-of-carol") as c:
            me = c.get("/v1/me").json()
            assert (me["name"], me["tier"], me["source"], me["balance"]) == \
                ("hub:carol", "inspect", "hub", 50.0)
            c.get("/v1/me")
        assert fake_hub.calls == 1  # cached
        with s.client("a-token-the-hub-does-not-know") as c:
            r = c.get("/v1/me")
            assert r.status_code == 401 and "JupyterHub" in r.json()["message"]
        fake_hub.stop()
        with s.client("another-unknown-token") as c:
            assert c.get("/v1/me").status_code == 503  # hub unreachable: not a 500
    finally:
        s.server.stop()


@pytest.mark.parametrize("tier, build, needed, said", [
    ("query", lambda m: m.layers[0].output.save(), "inspect", "model.layers.0.output"),
    ("query", lambda m: m.final_norm.output.save(), "embed", "final hidden states"),
    ("embed", lambda m: m.layers[0].mlp.input.save(), "inspect", "model.layers.0.mlp.input"),
    ("inspect", lambda m: m.layers[0].output.__setitem__((slice(None), -1), 0.0), "intervene",
     "writes model.layers.0.output"),
    ("query", lambda m: m.unembed(torch.zeros(1, 64)).save(), "inspect", "applies the module"),
])
def test_tiers_are_decided_on_the_server(served, lab_model, tier, build, needed, said):
    blob = _plan_bytes(lab_model, build)
    with served.client(tier) as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["error"] == "TierError" and body["needed"] == needed and body["tier"] == tier
    assert said in body["message"] and f"'{needed}' tier" in body["message"]
    with served.client(needed) as c:  # the tier it names allows it
        assert c.post(f"/v1/models/{MODEL}/run", content=blob).status_code == 200


def test_query_tier_gets_logits_and_generation(served):
    lab = served.lab("query")
    m = lab.model(MODEL)
    with m.trace("hello"):
        logits = m.output.logits[:, -1].save()
    assert logits.value.shape[-1] == m.config.vocab_size
    with m.generate("hello", max_new_tokens=3) as gen:
        pass
    assert len(gen.generated_ids[0]) >= 3
    with pytest.raises(TierError, match="inspect"):
        with m.trace("hello"):
            m.layers[0].output.save()
    lab.close()


def test_admin_endpoints_need_admin(served):
    with served.client("intervene") as c:
        r = c.post("/v1/admin/users", json={"name": "mallory", "tier": "admin"})
        assert r.status_code == 403 and "admin" in r.json()["message"]
    with served.client("admin") as c:
        r = c.post("/v1/admin/users", json={"name": "dave", "tier": "query", "units": 5})
        assert r.status_code == 201 and r.json()["balance"] == 5
        key = c.post("/v1/admin/users/dave/keys", json={"label": "laptop"}).json()["key"]
        assert c.post("/v1/admin/users/dave/allocations", json={"units": 7}).json()["balance"] == 12
        assert c.put("/v1/admin/users/dave/tier", json={"tier": "embed"}).json()["tier"] == "embed"
        assert c.post("/v1/admin/users", json={"name": "../x", "tier": "query"}).status_code == 422
        assert c.post("/v1/admin/users", json={"name": "dave"}).status_code == 400
    with served.client(key) as c:
        assert c.get("/v1/me").json()["tier"] == "embed"
    with served.client("admin") as c:
        key_id = key.split("_")[1]
        assert c.delete(f"/v1/admin/keys/{key_id}").status_code == 204
    with served.client(key) as c:
        assert c.get("/v1/me").status_code == 401


def test_quota_refused_before_running_and_charges_add_up(served, lab_model):
    ledger = served.gateway.ledger
    ledger.create_user("poor", "inspect", units=0.5)
    key = ledger.create_key("poor")
    blob = _plan_bytes(lab_model, lambda m: m.layers[0].output.save())
    runs_before = sum(s.value for s in served.gateway.metrics.batch_size.collect()[0].samples
                      if s.name.endswith("_count"))
    with served.client(key) as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 402 and r.json()["error"] == "QuotaError"
    assert "holds" in r.json()["message"] and "balance" in r.json()["message"]
    runs_after = sum(s.value for s in served.gateway.metrics.batch_size.collect()[0].samples
                     if s.name.endswith("_count"))
    assert runs_after == runs_before  # nothing ran
    assert ledger.charges("poor") == []
    import tpmlab

    lab = tpmlab.connect(gateway=served.url, token=key)
    with pytest.raises(QuotaError):
        with lab.model(MODEL).trace("hi"):
            lab.model(MODEL).layers[0].output.save()
    ledger.allocate("poor", 100)
    with served.client(key) as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
        assert r.status_code == 200
        units = float(r.headers["x-tpmlab-units"])
    _, meta = decode_result(r.content)
    pricing, cost = served.gateway.config.pricing, served.gateway.models[MODEL].cost
    tokens = len(lab_model.tokenizer("The Eiffel Tower is in")["input_ids"])
    nbytes = tokens * lab_model.d_model * 4
    assert meta["forward_seconds"] == pytest.approx(cost.seconds(tokens))
    assert units == pytest.approx(pricing.su_per_request + pricing.su_per_compute_second
                                  * (cost.seconds(tokens) + meta["plan_seconds"])
                                  + pricing.su_per_mib * nbytes / 2**20)
    assert meta["charged_units"] == pytest.approx(units)
    assert ledger.balance("poor") == pytest.approx(100.5 - units)
    (charge,) = ledger.charges("poor")
    assert charge["bytes_returned"] == nbytes and charge["tokens"] == tokens


def test_requests_are_private(served, lab_model):
    blob = _plan_bytes(lab_model, lambda m: m.layers[0].output.save())
    with served.client("inspect") as alice, served.client("intervene") as bob:
        r = alice.post(f"/v1/models/{MODEL}/requests", content=blob)
        assert r.status_code == 202
        rid = r.json()["id"]
        for call in (bob.get(f"/v1/requests/{rid}"), bob.get(f"/v1/requests/{rid}/result"),
                     bob.delete(f"/v1/requests/{rid}")):
            assert call.status_code == 404 and call.json()["error"] == "NotFoundError"
        res = alice.get(f"/v1/requests/{rid}/result")
        assert res.status_code == 200
        assert alice.get(f"/v1/requests/{rid}").json()["state"] == "done"
        assert alice.delete(f"/v1/requests/{rid}").status_code == 409  # finished: not cancellable
        assert all(c["request_id"] != rid for c in bob.get("/v1/me/usage").json()["charges"])


def test_cancel_a_queued_request(engine_backend, cost_model, tmp_path, lab_model):
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      batch_window=2.0)  # the first request waits for partners for 2 s
    s = serve(gw)
    try:
        blob = _plan_bytes(lab_model, lambda m: m.layers[0].output.save())
        with s.client("inspect") as c:
            rid = c.post(f"/v1/models/{MODEL}/requests", content=blob).json()["id"]
            assert c.delete(f"/v1/requests/{rid}").json()["state"] == "cancelled"
            assert c.get(f"/v1/requests/{rid}/result").status_code == 409
            assert gw.ledger.charges("inspect-user") == []
            assert gw._inflight.get(gw.ledger.user("inspect-user").id, 0) == 0
    finally:
        s.server.stop()


def test_per_user_concurrency_limit(engine_backend, cost_model, tmp_path, lab_model):
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      batch_window=1.0, max_concurrent_per_user=2)
    s = serve(gw)
    try:
        blob = _plan_bytes(lab_model, lambda m: m.layers[0].output.save())
        with s.client("inspect") as c, s.client("intervene") as other:
            codes = [c.post(f"/v1/models/{MODEL}/requests", content=blob).status_code
                     for _ in range(3)]
            assert codes == [202, 202, 429]
            assert other.post(f"/v1/models/{MODEL}/requests", content=blob).status_code == 202
            assert wait_until(lambda: gw._inflight.get(gw.ledger.user("inspect-user").id, 0) == 0)
            assert c.post(f"/v1/models/{MODEL}/requests", content=blob).status_code == 202
    finally:
        s.server.stop()


def test_metrics_and_health(served, lab_model):
    blob = _plan_bytes(lab_model, lambda m: m.output.logits[:, -1].save())
    with served.client("query") as c:
        with cf.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda _: c.post(f"/v1/models/{MODEL}/run", content=blob), range(3)))
        text = c.get("/metrics").text
        health = c.get("/health").json()
    assert "tpmlab_gateway_request_seconds_bucket" in text
    assert "tpmlab_gateway_queue_depth" in text
    assert "tpmlab_gateway_service_units_total" in text
    assert 'tpmlab_gateway_batch_size_count{model="tiny-llama"}' in text
    assert health["models"] == [MODEL] and health["queue_depth"] == {MODEL: 0}


def test_a_trace_with_more_invokes_than_the_tier_allows_runs_in_passes(served, engine_backend):
    import dataclasses

    lab = served.lab("inspect")
    model = lab.model(MODEL)
    tier = served.gateway.config.tier_limits["inspect"].max_invokes
    assert model.limits.max_invokes == tier
    small = dataclasses.replace(model.limits, max_invokes=2)  # keep the test small
    model.limits = small
    prompts = ["one", "two three", "four", "five six seven", "eight"]
    with model.trace() as tr:
        got = []
        for p in prompts:
            with tr.invoke(p):
                got.append(model.output.logits[:, -1].save())
    assert tr.result.meta["passes"] == 3
    local = tpmlab_local_model(engine_backend)
    for p, g in zip(prompts, got):
        with local.trace(p):
            want = local.output.logits[:, -1].save()
        torch.testing.assert_close(g.value, want.value, atol=1e-5, rtol=1e-5)
    lab.close()


def tpmlab_local_model(backend):
    from tpmlab.lab import Lab

    return Lab(backend).model(MODEL)
