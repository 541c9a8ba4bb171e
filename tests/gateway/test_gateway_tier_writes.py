"""The tier check finds every write by data flow: an op that mutates a value that may share
memory with a module value writes it, whatever route the alias took (in-place methods,
conversions that return their input, containers, ...); and the per-tier limit on any one
value a plan computes holds before anything runs."""

from __future__ import annotations

import pytest
import torch

from tpmlab.gateway.tiers import TIER_LIMITS, required_tier
from tpmlab.ir.codec import decode_plan, encode_plan
from tpmlab.ir.validate import Limits, inspect_plan

from .conftest import MODEL


def record(model, body, *, generate=False):
    """The plan ``body(model, tr)`` records (at every generation step when ``generate``)."""
    tr = model.generate("hello", max_new_tokens=3) if generate else model.trace("hello")
    with tr.recording():
        if generate:
            with tr.all():
                body(model, tr)
        else:
            body(model, tr)
    return tr.plan()


def logits(m):
    return m.output.logits


# Routes by which a plan could write the final logits while generating. Each must need the
# 'intervene' tier; the query tier may only read them.
WRITES = {
    "zero_": lambda m, tr: logits(m).zero_(),
    "fill_": lambda m, tr: logits(m).fill_(0.0),
    "item assignment": lambda m, tr: logits(m).__setitem__((slice(None), -1), 0.0),
    "float() then assignment": lambda m, tr: logits(m).float().__setitem__(0, 0.0),
    "detach()": lambda m, tr: logits(m).detach().mul_(0),
    "to()": lambda m, tr: logits(m).to(torch.float32).add_(1.0),
    "contiguous()": lambda m, tr: logits(m).contiguous().mul_(0),
    "type_as()": lambda m, tr: logits(m).type_as(logits(m)).mul_(0),
    "reshape()": lambda m, tr: logits(m).reshape(-1).zero_(),
    "+x": lambda m, tr: (+logits(m)).mul_(0),
    "einsum": lambda m, tr: torch.einsum("btv->btv", logits(m)).mul_(0),
    "make_list + getitem": lambda m, tr: tr.record("make_list", [logits(m)])[0].mul_(0),
    "make_tuple + getitem": lambda m, tr: tr.record("make_tuple", [1, logits(m)])[1].zero_(),
    "list of a list": lambda m, tr: tr.record(
        "getitem", [tr.record("make_list", [tr.record("make_list", [logits(m)])]), 0])[0].zero_(),
    "unembedding output": lambda m, tr: m.unembed.output[:, -1].clamp_(max=0.0),
    "in-place operator": lambda m, tr: logits(m)[:, -1].__isub__(100.0),
}

READS = {
    "argmax": lambda m, tr: logits(m)[:, -1].argmax(-1).save(),
    "in place on a copy": lambda m, tr: logits(m).clone().zero_(),
    "in place on a new value": lambda m, tr: logits(m)[:, -1].softmax(-1).mul_(2.0).save(),
    "in place on a list of new values": lambda m, tr: tr.record(
        "make_list", [logits(m).exp()])[0].mul_(0),
}


def tier_of(served, plan):
    dep = served.gateway.models[MODEL]
    plan = decode_plan(encode_plan(plan))
    schedule, _ = inspect_plan(plan, dep.info, limits=Limits(), meta_module=dep.meta_modules.get)
    return required_tier(plan, schedule, dep.paths)


@pytest.mark.parametrize("route", list(WRITES))
def test_every_route_to_the_logits_is_a_write(served, lab_model, route):
    need = tier_of(served, record(lab_model, WRITES[route], generate=True))
    assert need.tier == "intervene", (route, need)
    assert "writes" in need.reason and ("<model>.output" in need.reason
                                         or "lm_head.output" in need.reason)


@pytest.mark.parametrize("route", list(READS))
def test_reads_and_writes_to_copies_stay_query(served, lab_model, route):
    need = tier_of(served, record(lab_model, READS[route], generate=True))
    assert need.tier == "query", (route, need)


@pytest.mark.parametrize("route", ["zero_", "float() then assignment", "make_list + getitem"])
def test_query_user_cannot_write_the_logits_while_generating(served, lab_model, route):
    blob = encode_plan(record(lab_model, WRITES[route], generate=True))
    with served.client("query") as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["error"] == "TierError" and "intervene" in body["message"]
    assert "writes" in body["message"]


def test_out_keyword_is_refused_for_every_tier(served, lab_model):
    blob = encode_plan(record(lab_model, lambda m, tr: torch.cat(
        [logits(m)[:, -1:] * 0], dim=1, out=logits(m)[:, -1:]), generate=True))
    for tier in ("query", "admin"):
        with served.client(tier) as c:
            r = c.post(f"/v1/models/{MODEL}/run", content=blob)
        assert r.status_code == 400 and r.json()["error"] == "UnknownOpError", r.text
        assert "out=" in r.json()["message"]


def test_tier_limits_on_any_one_value(served, lab_model):
    """A query user's unsaved 1 GiB constant is refused before anything runs (413, naming
    the node and the line)."""
    assert TIER_LIMITS["query"].max_intermediate_bytes == 512 * 2**20
    assert TIER_LIMITS["inspect"].max_intermediate_bytes == 2 * 2**30

    def big(m, tr):
        tr.record("zeros", [2**28]).sum()  # 1 GiB of float32
        logits(m)[:, -1].argmax(-1).save()

    blob = encode_plan(record(lab_model, big))
    with served.client("query") as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["error"] == "LimitError" and "536,870,912" in body["message"]
    assert body["node"] == 0 and "test_gateway_tier_writes.py" in body["line"]
