"""The cost model learns from the requests the gateway runs: a calibration made on a busy
machine (slow) is brought down by the fastest solo runs seen since, never up by a slow one;
merged runs teach it nothing; a request is never charged more than it held."""

from __future__ import annotations

import concurrent.futures as cf
import itertools

import pytest

from tpmlab.gateway.units import (
    MAX_COST_DROP,
    MIN_COST_SCALE,
    CostModel,
    LearnedCost,
    calibrate,
)
from tpmlab.ir.codec import decode_result, encode_plan

from .conftest import MODEL, serve

SLOW = 30.0  # how much slower the engine seemed while the gateway calibrated


class SlowEngine:
    """An engine whose measured seconds are ``factor`` times what they were (a busy machine):
    ``compute_seconds`` and, with ``nodes``, each plan node's ``node_seconds`` too."""

    def __init__(self, backend, factor=SLOW, nodes=False):
        self.backend, self.factor, self.nodes = backend, factor, nodes

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _slowed(self, meta):
        meta = dict(meta, compute_seconds=meta["compute_seconds"] * self.factor)
        if self.nodes and meta.get("node_seconds"):
            meta["node_seconds"] = {k: v * self.factor for k, v in meta["node_seconds"].items()}
        return meta

    def run_values(self, *args, **kwargs):
        values, meta = self.backend.run_values(*args, **kwargs)
        return values, self._slowed(meta)

    def run_session_values(self, *args, **kwargs):
        return [(v, self._slowed(m)) for v, m in self.backend.run_session_values(*args, **kwargs)]


def _trace_blob(model, prompt="The Eiffel Tower is in", lens=False):
    tr = model.trace(prompt)
    with tr.recording():
        if lens:  # nodes of its own: a logit lens of every layer's last position
            for layer in model.layers:
                model.unembed(model.final_norm(layer.output[:, -1])).save()
        else:
            model.output.logits[:, -1].save()
    return encode_plan(tr.plan())


# -- the envelope alone ------------------------------------------------------------------------
def test_the_envelope_only_goes_down_and_one_odd_run_cannot_collapse_it():
    fit = CostModel(fixed_seconds=0.3, seconds_per_token=0.03)
    learned = LearnedCost(fit)
    assert not learned.observe(1.0, 5.0)  # slower than the fit: never raised
    assert learned.scale == 1.0 and learned.model == fit
    assert learned.observe(1.0, 1e-9)  # one absurdly fast run lowers it by MAX_COST_DROP only
    assert learned.scale == pytest.approx(1 / MAX_COST_DROP)
    assert learned.model == CostModel(0.3 / MAX_COST_DROP, 0.03 / MAX_COST_DROP)
    assert not learned.observe(1.0, 0.9)  # slower than the envelope: kept
    assert not learned.observe(1.0, 0.0) and not learned.observe(0.0, 1.0)  # nothing measured
    for _ in range(20):
        learned.observe(1.0, 1e-9)
    assert learned.scale == pytest.approx(MIN_COST_SCALE)  # the floor
    assert learned.to_dict() == {"calibrated": fit.to_dict(), "scale": learned.scale,
                                 "solo_runs": 23, "learning": True}
    pinned = LearnedCost(fit, learn=False)
    assert not pinned.observe(1.0, 0.01) and pinned.model == fit


def test_calibrate_keeps_the_fastest_of_runs_taken_in_turns():
    """Load comes and goes while it calibrates: most runs are 30 times slow, one of each
    length was not. The fit is the undisturbed one's."""
    from types import SimpleNamespace

    from tpmlab.ir.codec import decode_plan

    true = CostModel(fixed_seconds=0.002, seconds_per_token=0.0001)
    quiet = {8: 6, 64: 2}  # the run (after the warm-up) of each length that was undisturbed
    seen = {8: 0, 64: 0}
    order = []

    def run_seconds(blob):
        n = int(decode_plan(blob).tensors["in0"].shape[0])
        order.append(n)
        k = seen[n]
        seen[n] += 1
        return true.seconds(n) * (1.0 if k == quiet[n] else SLOW)

    fit = calibrate(run_seconds, SimpleNamespace(name="m", version="v"))
    assert fit.fixed_seconds == pytest.approx(true.fixed_seconds)
    assert fit.seconds_per_token == pytest.approx(true.seconds_per_token)
    assert seen == {8: 10, 64: 4}  # a warm-up each, then 9 short and 3 long runs...
    assert order[2:8] == [8, 64] * 3  # ...in turns


# -- a gateway that calibrated on a busy machine -----------------------------------------------
@pytest.fixture
def slow_start(engine_backend, tmp_path):
    """A gateway over tiny-llama whose calibration ran while the engine seemed 30x slower;
    the engine is then back to its speed (``engine.factor = 1``)."""
    engine = SlowEngine(engine_backend)
    from tpmlab.gateway.core import Gateway, GatewayConfig
    from tpmlab.gateway.ledger import Ledger

    gw = Gateway(engine, Ledger(f"sqlite:///{tmp_path / 'l.db'}"),
                 GatewayConfig(models=[MODEL], batch_window=0.3, max_concurrent_per_user=16))
    engine.factor = 1.0
    s = serve(gw)
    yield s, engine
    s.server.stop()


def _run(client, blob):
    r = client.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 200, r.text
    return decode_result(r.content)[1]


def test_a_slow_calibration_is_learned_down_by_fast_solo_runs(slow_start, lab_model):
    s, _ = slow_start
    gw = s.gateway
    learned = gw.models[MODEL].learned
    blob = _trace_blob(lab_model)
    hold0 = _run(s.client("admin"), blob)["held_units"]
    # a user whose first allocation covers a quarter of what the slow fit holds (the request
    # really costs far less): refused while the fit is slow
    gw.ledger.create_user("newcomer", "query", units=hold0 / 4)
    newcomer = s.client(gw.ledger.create_key("newcomer"))
    assert newcomer.post(f"/v1/models/{MODEL}/run", content=blob).status_code == 402
    with s.client("admin") as c:  # a few fast runs, one at a time: each ran alone
        metas = [_run(c, _trace_blob(lab_model, p))
                 for p in ["Hello", "one two three four five six", "Paris is", "a b c", "x"]]
    assert all(m["batch_size"] == 1 for m in metas)
    assert learned.scale < 1 / 4 and learned.runs >= 5
    cost = gw.models[MODEL].cost  # what it is held and charged by (its own run comes after)
    meta = _run(newcomer, blob)  # now admitted
    assert meta["held_units"] < hold0 / 4
    assert meta["charged_units"] <= meta["held_units"]
    assert gw.ledger.totals("newcomer")["held"] == 0.0 and gw.ledger.audit() == []
    # what it held is its measured cost's bound: the fastest solo runs, not the busy start
    pricing = gw.config.pricing
    assert meta["forward_seconds"] == pytest.approx(cost.seconds(
        len(lab_model.tokenizer("The Eiffel Tower is in")["input_ids"])))
    # the admin API shows the model now and how it got there
    with s.client("query") as c:
        entry = c.get(f"/v1/models/{MODEL}").json()
    assert entry["cost_learning"]["scale"] == pytest.approx(learned.scale)
    assert entry["cost_learning"]["calibrated"] == learned.fit.to_dict()
    assert entry["cost_model"]["seconds_per_token"] == pytest.approx(
        learned.fit.seconds_per_token * learned.scale)
    assert pricing.units(meta["charged_seconds"], 0) <= meta["held_units"]
    newcomer.close()


def test_holds_never_go_below_the_charge_of_the_same_request(slow_start, lab_model):
    """Learned down, a request's hold still covers what it is charged (uncapped), for a
    plain trace and for a lens over every layer (nodes of its own), again and again."""
    s, _ = slow_start
    pricing = s.gateway.config.pricing
    plans = [_trace_blob(lab_model), _trace_blob(lab_model, "Hello there", lens=True)]
    with s.client("admin") as c:
        for blob in itertools.islice(itertools.cycle(plans), 10):
            r = c.post(f"/v1/models/{MODEL}/run", content=blob)
            values, meta = decode_result(r.content)
            nbytes = sum(v.numel() * v.element_size() for v in values.values())
            assert pricing.units(meta["charged_seconds"], nbytes) <= meta["held_units"] + 1e-9
            assert meta["charged_units"] == pytest.approx(
                pricing.units(meta["charged_seconds"], nbytes), abs=1e-6)
    assert s.gateway.metrics.uncharged.labels(MODEL)._value.get() == 0.0


def test_a_slow_run_later_never_raises_the_model_and_what_outgrew_the_hold_is_counted(
        slow_start, lab_model):
    s, engine = slow_start
    gw = s.gateway
    learned = gw.models[MODEL].learned
    with s.client("admin") as c:
        for _ in range(4):
            _run(c, _trace_blob(lab_model))
        scale = learned.scale
        engine.factor, engine.nodes = 5000.0, True  # the machine got very busy
        meta = _run(c, _trace_blob(lab_model, "Hello there", lens=True))
    assert learned.scale == scale  # not raised
    assert meta["charged_units"] == pytest.approx(meta["held_units"], abs=1e-6)  # the cap
    assert gw.metrics.uncharged.labels(MODEL)._value.get() > 0.0  # and what it used beyond


def test_merged_runs_teach_it_nothing(slow_start, lab_model):
    s, _ = slow_start
    s.gateway.config.batch_window = 3.0  # all four share a pass, however busy the machine
    learned = s.gateway.models[MODEL].learned
    blobs = [_trace_blob(lab_model, p) for p in ["Hello", "Paris is", "a b c", "one two"]]

    def send(i):
        with s.client(["admin", "intervene"][i % 2]) as c:
            return _run(c, blobs[i])

    with cf.ThreadPoolExecutor(len(blobs)) as pool:
        metas = list(pool.map(send, range(len(blobs))))
    alone = sum(m["batch_size"] == 1 for m in metas)
    assert alone < len(metas), [m["batch_size"] for m in metas]  # they shared passes
    assert learned.runs == alone  # only a run alone is observed
    if not alone:
        assert learned.scale == 1.0


def test_a_session_runs_alone_and_teaches_it_once(slow_start):
    s, _ = slow_start
    learned = s.gateway.models[MODEL].learned
    lab = s.lab("intervene")
    model = lab.model(MODEL)
    with model.session():
        with model.trace("The Eiffel Tower is in"):
            h = model.layers[0].output[:, -1]
        with model.trace("Hello there"):
            model.layers[0].output[:, -1] = h
            model.output.logits[:, -1].save()
    assert learned.runs == 1 and learned.scale < 1.0
    assert lab.backend.last_charge["batch_size"] == 1
    lab.close()


def test_a_stopped_trace_teaches_it_nothing(slow_start, lab_model):
    """``tracer.stop()`` ends the pass after layer 0: faster than any whole pass, so it
    says nothing about what a pass costs."""
    s, _ = slow_start
    learned = s.gateway.models[MODEL].learned
    tr = lab_model.trace("The Eiffel Tower is in")
    with tr.recording():
        lab_model.layers[0].output.save()
        tr.stop()
    plan = tr.plan()
    assert plan.stop
    with s.client("admin") as c:
        _run(c, encode_plan(plan))
    assert learned.runs == 0 and learned.scale == 1.0
