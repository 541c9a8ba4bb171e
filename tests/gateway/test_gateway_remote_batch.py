"""Reading many remote values in one request behind the gateway (:func:`tpmlab.remote.reduce_all`,
:func:`tpmlab.remote.fetch_all`, ``POST /v1/remote-values/reduce`` and ``/fetch``): the same
numbers as one by one, priced once, every handle checked for its owner, bounded."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from tpmlab import Lab, remote
from tpmlab.errors import RemoteReadLimitError
from tpmlab.gateway.tiers import TIER_LIMITS
from tpmlab.ir.codec import decode_result

from .conftest import MODEL, make_gateway, serve

PROMPTS = ["The Eiffel Tower is in", "Hello there"]
REDUCTIONS = [("mean", 0, None), ("sum", [0, 1], "float64"), ("max", -1, None),
              ("min", None, None), ("std", 1, "float64"), ("var", [0, 2], None),
              ("gram", None, None), ("gram", None, "float64")]


@pytest.fixture(scope="module")
def gw(engine_backend, cost_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("remote-batch") / "ledger.db"
    s = serve(make_gateway(engine_backend, f"sqlite:///{db}", cost_model))
    yield s
    s.server.stop()


def _keep(lab, prompts=PROMPTS, plain=True):
    """Every layer's output of each trace, kept remote, and (``plain``) the same saved."""
    m = lab.model(MODEL)
    kept, saved = [], []
    for prompt in prompts:
        with m.trace(prompt):
            kept += [layer.output.save(remote=True) for layer in m.layers]
            saved += [layer.output.save() for layer in m.layers] if plain else []
    return [h.value for h in kept], [p.value for p in saved]


def _charges(lab):
    return lab.backend.usage(1000)["charges"]


def test_reduce_all_gives_the_one_by_one_numbers_in_one_priced_request(gw, engine_backend):
    lab = gw.lab("inspect")
    values, plain = _keep(lab)
    n = len(values)
    local = [remote.RemoteValue.in_process(p) for p in plain]
    for op, dims, dtype in REDUCTIONS:
        one_by_one = [v.reduce(op, dims, dtype=dtype) for v in values]
        before = len(_charges(lab))
        together = remote.reduce_all(values, op, dims, dtype=dtype)
        charges = _charges(lab)
        assert len(charges) == before + 1  # one request, one ledger row
        row = next(c for c in charges if c["request_id"] == lab.backend.last_charge["request_id"])
        assert row["mode"] == "remote-reduce" and row["batch_size"] == n
        assert row["bytes_returned"] == sum(t.numel() * t.element_size() for t in together)
        assert lab.backend.last_charge["batch_size"] == n
        for a, b, c in zip(one_by_one, together, remote.reduce_all(local, op, dims, dtype=dtype)):
            torch.testing.assert_close(b, a, atol=0, rtol=0)
            torch.testing.assert_close(c, a, atol=0, rtol=0)  # in process: the same helper
    # keepdim and whole values
    for a, b in zip([v.reduce("mean", 1, keepdim=True) for v in values],
                    remote.reduce_all(values, "mean", 1, keepdim=True)):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    before = len(_charges(lab))
    for got, want in zip(remote.fetch_all(values), plain):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert len(_charges(lab)) == before + 1
    assert lab.backend.me()["held"] == 0
    lab.close()


def test_concatenate_behind_the_gateway_fetches_in_one_request(gw):
    lab = gw.lab("inspect")
    values, plain = _keep(lab)
    layer0 = values[::len(values) // 2]  # layer 0 of each trace: [1, tokens, d]
    before = len(_charges(lab))
    x = remote.concatenate(layer0, axis=1)  # fetched now, in the notebook
    got = x.mean(axis=1).compute()
    assert len(_charges(lab)) == before + 1
    want = torch.cat(plain[::len(plain) // 2], dim=1).mean(1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(remote.stack([values[0], values[0]]).compute()[1],
                                  plain[0].numpy())
    lab.close()


def test_another_users_handle_in_a_batch_is_404_and_nothing_is_charged(gw):
    mine, theirs = gw.lab("inspect"), gw.lab("intervene")
    values, _ = _keep(mine)
    other, _ = _keep(theirs, PROMPTS[:1])
    c = gw.client("inspect")
    before = [mine.backend.me(), theirs.backend.me()]
    charges = [len(_charges(mine)), len(_charges(theirs))]
    answers = []
    for intruder in (other[0].handle, "rv_" + "A" * 43):  # another user's, and no one's
        handles = [v.handle for v in values[:3]] + [intruder]
        for what, body in (("reduce", {"op": "sum"}), ("fetch", {})):
            r = c.post(f"/v1/remote-values/{what}", json=dict(body, handles=handles))
            answers.append((r.status_code, r.json()["error"],
                            r.json()["message"].replace(intruder, "H")))
    assert answers[0][0] == 404 and answers[0][1] == "NotFoundError"
    assert answers[:2] == answers[2:]  # another user's handle reads as an unknown one
    assert all(values[0].handle not in m for _, _, m in answers)  # names none of the batch
    after = [mine.backend.me(), theirs.backend.me()]
    assert [a["used"] for a in after] == [b["used"] for b in before]
    assert [a["held"] for a in after] == [0, 0]
    assert [len(_charges(mine)), len(_charges(theirs))] == charges
    # all of them mine: read
    r = c.post("/v1/remote-values/reduce", json={"op": "sum", "handles": [values[0].handle]})
    assert r.status_code == 200 and set(decode_result(r.content)[0]) == {0}
    mine.close()
    theirs.close()


@pytest.fixture
def small(engine_backend, cost_model, tmp_path):
    """A gateway reading at most 3 values at a time, whose inspect tier returns at most one
    layer output's bytes."""
    nbytes = 1 * 6 * 64 * 4  # one [1, 6, 64] float32 layer output of PROMPTS[0]
    limits = dataclasses.replace(TIER_LIMITS["inspect"], max_saved_bytes=nbytes)
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      tier_limits=dict(TIER_LIMITS, inspect=limits), max_read_values=3)
    s = serve(gw)
    yield s
    s.server.stop()


def test_a_batch_is_bounded_in_values_and_bytes_by_named_errors(small):
    lab = small.lab("inspect")
    values, _ = _keep(lab, PROMPTS[:1], plain=False)
    assert len(values) == 4 and values[0].shape == (1, 6, 64)
    c = small.client("inspect")
    charges = len(_charges(lab))
    r = c.post("/v1/remote-values/reduce",
               json={"op": "sum", "handles": [v.handle for v in values]})
    assert r.status_code == 413 and r.json()["error"] == "RemoteReadLimitError", r.text
    assert "one read takes at most 3" in r.json()["message"]
    assert "max_read_values" in r.json()["message"]
    r = c.post("/v1/remote-values/fetch", json={"handles": [v.handle for v in values[:2]]})
    assert r.status_code == 413 and r.json()["error"] == "RemoteReadLimitError", r.text
    assert re.search(r"returns 3,072 bytes.*max_saved_bytes", r.json()["message"])
    assert len(_charges(lab)) == charges and lab.backend.me()["held"] == 0
    # the client reads at most max_read_values values and max_saved_bytes at a time: 4
    # sums are 2 requests, 4 whole values 4
    sums = remote.reduce_all(values, "sum", [0, 1])
    assert len(_charges(lab)) == charges + 2
    for v, s in zip(values, sums):
        torch.testing.assert_close(s, v.reduce("sum", [0, 1]), atol=0, rtol=0)
    charges = len(_charges(lab))
    for v, t in zip(values, remote.fetch_all(values)):
        torch.testing.assert_close(t, v.fetch(), atol=0, rtol=0)
    assert len(_charges(lab)) == charges + 4 + 4  # 4 together, then 4 one by one
    with pytest.raises(RemoteReadLimitError, match="max_saved_bytes"):  # one value too large
        remote.reduce_all(values[:1], "gram", dtype="float64")  # [64, 64] float64: 32 KiB
    r = c.post("/v1/remote-values/fetch", json={"handles": []})
    assert r.status_code == 422
    lab.close()


def test_in_process_reduce_all_matches_each_reduce(engine_backend):
    lab = Lab(engine_backend)
    values, _ = _keep(lab)
    for op, dims, dtype in REDUCTIONS:
        for a, b in zip(remote.reduce_all(values, op, dims, dtype=dtype),
                        [v.reduce(op, dims, dtype=dtype) for v in values]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    lab.release_remote()
