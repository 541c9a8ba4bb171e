"""Holds and balances: a request holds its worst case in the ledger before it runs, in one
atomic update shared by every gateway on the database; it is charged what it used, never
more than its hold; no balance goes below zero; a crashed gateway's holds expire."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import httpx
import pytest
import torch

from tpmlab.gateway.ledger import Ledger, LedgerError
from tpmlab.gateway.units import CostModel
from tpmlab.ir.codec import decode_result, encode_plan
from tpmlab.ir.validate import Limits

from .conftest import MODEL, GatewayProcess, fresh_postgres, make_gateway, serve, wait_until

PINNED = CostModel(fixed_seconds=0.01, seconds_per_token=0.001)  # GatewayProcess's --cost-model


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return fresh_postgres(request.getfixturevalue("postgres_url"))


def _trace_blob(model, prompt="The Eiffel Tower is in"):
    tr = model.trace(prompt)
    with tr.recording():
        model.output.logits[:, -1].save()
    return encode_plan(tr.plan())


# -- the ledger alone ----------------------------------------------------------------------------
def test_concurrent_holds_from_many_ledgers_never_overdraw(db_url):
    """Eight 'gateways' (each its own engine and connections) race 48 holds for a user whose
    balance covers exactly 5: exactly 5 are taken, and the totals match the journals."""
    ledgers = [Ledger(db_url) for _ in range(8)]
    try:
        uid = ledgers[0].create_user("racer", "query", units=5.0).id
        barrier = threading.Barrier(8)

        def race(k):
            barrier.wait()
            return [ledgers[k].reserve(uid, f"r{k}-{i}", 1.0, gateway=f"g{k}", lease=60).admitted
                    for i in range(6)]

        with cf.ThreadPoolExecutor(8) as pool:
            admitted = sum(sum(r) for r in pool.map(race, range(8)))
        assert admitted == 5
        assert ledgers[0].totals("racer")["held"] == pytest.approx(5.0)
        assert ledgers[0].audit() == []
    finally:
        for ledger in ledgers:
            ledger.close()


def test_settle_charges_at_most_the_hold_and_release_frees_it(db_url):
    ledger = Ledger(db_url)
    try:
        uid = ledger.create_user("ann", "query", units=10.0).id
        row = {"user_id": uid, "model": MODEL, "model_version": "v", "plan_digest": "d",
               "mode": "trace", "tokens": 3, "bytes_returned": 0, "compute_seconds": 1.0,
               "measured_seconds": 1.0, "batch_size": 1}
        assert ledger.reserve(uid, "a", 4.0, gateway="g", lease=60).admitted
        assert ledger.reserve(uid, "b", 4.0, gateway="g", lease=60).admitted
        refused = ledger.reserve(uid, "c", 4.0, gateway="g", lease=60)
        assert not refused.admitted and refused.available == pytest.approx(2.0)
        # "a" used more than it held: charged its hold, no more
        assert ledger.settle([{**row, "request_id": "a", "units": 9.0}]) == {"a": 4.0}
        assert ledger.release(["b"]) == 1 and ledger.release(["b"]) == 0
        assert ledger.totals("ann") == {"allocated": 10.0, "used": 4.0, "balance": 6.0,
                                        "held": 0.0, "requests": 1}
        # a hold that expired meanwhile: charged no more than what is free
        assert ledger.reserve(uid, "d", 5.0, gateway="dead", lease=-1).admitted
        assert ledger.expire() == 1 and ledger.totals("ann")["held"] == 0.0
        assert ledger.settle([{**row, "request_id": "d", "units": 50.0}]) == {"d": 6.0}
        assert ledger.balance("ann") == 0.0
        with pytest.raises(LedgerError, match="below zero"):
            ledger.allocate("ann", -1.0)
        assert ledger.audit() == []
    finally:
        ledger.close()


def test_accounts_are_opened_for_a_database_of_an_earlier_version(tmp_path):
    """A ledger written before accounts existed: the totals come from the journals."""
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    ledger = Ledger(url)
    uid = ledger.create_user("old", "query", units=7.0).id
    ledger.settle([{"request_id": "x", "user_id": uid, "model": MODEL, "model_version": "v",
                    "plan_digest": "d", "mode": "trace", "tokens": 1, "bytes_returned": 0,
                    "compute_seconds": 0.0, "measured_seconds": 0.0, "batch_size": 1,
                    "units": 2.5}])
    ledger.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("drop table gateway_accounts"))
    engine.dispose()
    reopened = Ledger(url)
    try:
        assert reopened.totals("old")["balance"] == pytest.approx(4.5)
        assert reopened.audit() == []
    finally:
        reopened.close()


# -- gateways in separate processes --------------------------------------------------------------
def test_gateway_processes_on_one_ledger_never_double_spend(db_url, engine_backend, lab_model,
                                                            tmp_path):
    """Two ``tpmlab gateway`` processes on one database (SQLite file, PostgreSQL server).

    1. A user whose balance covers one request's hold sends one request to each gateway at
       the same moment, three times: each time exactly one is admitted (with holds in each
       process's memory, both were), and the ledger balances.
    2. kill -9 a gateway while a request holds a user's whole balance there: the other
       refuses that user until the hold's lease runs out, then admits them; nothing was
       charged for the lost request."""
    blob = _trace_blob(lab_model)
    probe = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'probe.db'}", PINNED)
    probe.ledger.create_user("p", "inspect")
    held = probe.prepare(probe.ledger.user("p"), MODEL, blob).hold.units
    ledger = Ledger(db_url)
    # a long batch window keeps an admitted request (and its hold) in flight meanwhile
    gateways = [GatewayProcess(db_url, "--batch-window-ms", "2000", "--hold-lease", "3")
                for _ in range(2)]

    def client(g, key):
        return httpx.Client(base_url=g.url, timeout=60, headers={"Authorization": f"Bearer {key}"})

    try:
        for g in gateways:
            g.wait_ready()
        for trial in range(3):
            name = f"u{trial}"
            ledger.create_user(name, "inspect", units=1.5 * held)
            key = ledger.create_key(name)
            barrier = threading.Barrier(2)

            def send(g, key=key, barrier=barrier):
                with client(g, key) as c:
                    barrier.wait()
                    return c.post(f"/v1/models/{MODEL}/requests", content=blob)

            with cf.ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(send, gateways))
            codes = sorted(r.status_code for r in answers)
            assert codes == [202, 402], [r.text for r in answers]
            refusal = next(r for r in answers if r.status_code == 402).json()
            assert refusal["error"] == "QuotaError" and refusal["held"] == pytest.approx(held)
            g, r = next((g, r) for g, r in zip(gateways, answers) if r.status_code == 202)
            with client(g, key) as c:
                assert c.get(f"/v1/requests/{r.json()['id']}/result").status_code == 200
            totals = ledger.totals(name)
            assert totals["requests"] == 1 and totals["held"] == 0.0
            assert 0 <= totals["used"] <= held and totals["balance"] >= 0

        doomed, survivor = gateways
        ledger.create_user("vic", "inspect", units=1.5 * held)
        key = ledger.create_key("vic")
        with client(doomed, key) as c:
            assert c.post(f"/v1/models/{MODEL}/requests", content=blob).status_code == 202
        doomed.kill()  # within its 2 s batch window: the request never ran
        with client(survivor, key) as c:
            assert c.post(f"/v1/models/{MODEL}/run", content=blob).status_code == 402
            assert wait_until(lambda: ledger.totals("vic")["held"] == 0.0, timeout=30)
            assert c.post(f"/v1/models/{MODEL}/run", content=blob).status_code == 200
        assert ledger.totals("vic")["requests"] == 1
        assert ledger.audit() == []
    finally:
        for g in gateways:
            g.stop()
        ledger.close()


# -- worst cases, caps and the tier's limits while running ---------------------------------------
def _generation_blob(model, steps, save_logits=True):
    tr = model.generate("Hello there", max_new_tokens=steps)
    with tr.recording():
        if save_logits:  # one [1, vocab] save per step: validation cannot size later steps
            with tr.all():
                model.output.logits[:, -1].save()
    return encode_plan(tr.plan())


@pytest.fixture
def small_query_tier(engine_backend, cost_model, tmp_path):
    """A gateway whose 'query' tier may save 1 MiB (the engine's default: 4 GiB)."""
    from tpmlab.gateway.tiers import TIER_LIMITS

    limits = dict(TIER_LIMITS, query=Limits(max_saved_bytes=2**20, max_new_tokens=64,
                                             max_nodes=200, max_constant_bytes=4 * 2**20))
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      tier_limits=limits)
    s = serve(gw, units=10_000.0)
    yield s
    s.server.stop()


def test_unsized_saves_hold_the_tiers_limit_and_balances_stay_above_zero(small_query_tier,
                                                                         lab_model):
    """A generation saving logits at every step: validation cannot size the later steps, so
    the request holds the tier's whole saved-bytes limit. A user who cannot cover that is
    refused before anything runs; one who can is charged what ran, at most the hold."""
    s, gw = small_query_tier, small_query_tier.gateway
    blob = _generation_blob(lab_model, 4)
    gw.ledger.create_user("two-su", "query", units=0.5)
    with s.client(gw.ledger.create_key("two-su")) as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 402, r.text
    assert "your tier's limit" in r.json()["message"]
    assert r.json()["estimate"] >= 2**20 / 2**20  # the tier's 1 MiB of saves, at 1 SU/MiB
    assert gw.ledger.charges("two-su") == []
    with s.client("query") as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 200, r.text
    values, meta = decode_result(r.content)
    assert meta["charged_units"] <= meta["held_units"]
    # the generation is charged its passes: the prompt's and one per generated token
    tokens = len(lab_model.tokenizer("Hello there")["input_ids"])
    steps = len(values[-1][0]) - tokens  # 4, unless the model said its end-of-text earlier
    assert 1 <= steps <= 4
    assert meta["forward_seconds"] == pytest.approx(
        gw.models[MODEL].cost.forward_seconds(tokens, 1, steps))
    assert gw.ledger.balance("query-user") == pytest.approx(10_000.0 - meta["charged_units"])
    assert gw.ledger.audit() == []


def test_the_tiers_limits_hold_while_running(small_query_tier, lab_model):
    """Saves validation could not size are held to the user's tier's limit by the engine
    (not the engine's own, larger limit): 40 steps of [1, vocab] logits are 7.5 MiB, over the
    query tier's 1 MiB here. Nothing is charged, nothing is held afterwards."""
    s, gw = small_query_tier, small_query_tier.gateway
    blob = _generation_blob(lab_model, 40)
    before = gw.ledger.totals("query-user")
    with s.client("query") as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 413 and r.json()["error"] == "LimitError", r.text
    after = gw.ledger.totals("query-user")
    assert after["used"] == before["used"] and after["held"] == 0.0
    # within the limit the same plan runs
    with s.client("query") as c:
        assert c.post(f"/v1/models/{MODEL}/run",
                      content=_generation_blob(lab_model, 3)).status_code == 200


def test_a_plain_generation_is_not_charged_more_than_it_held(served, lab_model):
    """Generation steps each cost a forward pass: the hold counts them all, the charge
    counts those that ran, and the charge never exceeds the hold."""
    blob = _generation_blob(lab_model, 6, save_logits=False)
    with served.client("query") as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 200, r.text
    values, meta = decode_result(r.content)
    assert meta["plan_seconds"] == 0.0
    assert meta["charged_units"] == pytest.approx(float(r.headers["x-tpmlab-units"]))
    assert meta["charged_units"] <= meta["held_units"]
    assert all(isinstance(v, torch.Tensor) for v in values[-1])


def test_hold_released_when_a_request_fails_or_is_cancelled(engine_backend, cost_model,
                                                             tmp_path, lab_model):
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      batch_window=2.0)
    s = serve(gw)
    try:
        with s.client("inspect") as c:
            rid = c.post(f"/v1/models/{MODEL}/requests", content=_trace_blob(lab_model)).json()["id"]
            assert gw.ledger.totals("inspect-user")["held"] > 0
            assert c.delete(f"/v1/requests/{rid}").status_code == 200
            assert wait_until(lambda: gw.ledger.totals("inspect-user")["held"] == 0.0)
        tr = lab_model.trace("Hello there")
        with tr.recording():  # index 7 is past the row's last position: fails only when it runs
            lab_model.layers[0].output[:, 7].save()
        with s.client("inspect") as c:
            r = c.post(f"/v1/models/{MODEL}/run", content=encode_plan(tr.plan()),
                       params={"timeout": 60})
        assert r.status_code in (400, 422), r.text
        assert wait_until(lambda: gw.ledger.totals("inspect-user")["held"] == 0.0)
        assert gw.ledger.totals("inspect-user")["used"] == 0.0 and gw.ledger.audit() == []
    finally:
        s.server.stop()
