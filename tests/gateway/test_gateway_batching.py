"""Cross-user batching: plans arriving within the window share one forward pass, and
each user gets the tensors and the charge they would have got alone."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

from tpmlab.ir.codec import decode_result, encode_plan

from .conftest import MODEL, make_gateway, serve


def _traces(model):
    prompts = ["The Eiffel Tower is in", "Hello", "one two three four five six", "Paris is",
               "a", "The capital of France"]
    out = []
    for i, p in enumerate(prompts):
        tr = model.trace(p)
        with tr.recording():
            if i % 3 == 1:
                model.layers[0].output[:, -1] = 0.25  # a write on this user's rows only
            h = model.layers[1].output.save()
            lg = model.output.logits[:, -1].save()
        out.append((encode_plan(tr.plan()), h._node, lg._node))
    return out


def test_concurrent_users_share_a_pass_with_solo_results_and_charges(
        engine_backend, cost_model, tmp_path, lab_model):
    traces = _traces(lab_model)
    solo_gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'solo.db'}", cost_model,
                           batching=False)
    batch_gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'batch.db'}", cost_model,
                            batch_window=0.5, max_concurrent_per_user=16)
    solo, batched = serve(solo_gw), serve(batch_gw)
    try:
        with solo.client("intervene") as c:
            alone = [c.post(f"/v1/models/{MODEL}/run", content=b) for b, _, _ in traces]
        tiers = ["intervene", "admin"]  # two different users, interleaved

        def send(i):
            with batched.client(tiers[i % 2]) as c:
                return c.post(f"/v1/models/{MODEL}/run", content=traces[i][0])

        with cf.ThreadPoolExecutor(len(traces)) as pool:
            together = list(pool.map(send, range(len(traces))))
    finally:
        solo.server.stop()
        batched.server.stop()
    assert all(r.status_code == 200 for r in alone + together)
    sizes = [int(r.headers["x-tpmlab-batch-size"]) for r in together]
    assert max(sizes) >= 3, sizes  # they shared passes
    assert all(int(r.headers["x-tpmlab-batch-size"]) == 1 for r in alone)
    for (_, h, lg), a, t in zip(traces, alone, together):
        va, ma = decode_result(a.content)
        vt, mt = decode_result(t.content)
        assert set(va) == set(vt)
        torch.testing.assert_close(vt[h], va[h], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(vt[lg], va[lg], atol=1e-4, rtol=1e-4)
        assert mt["plan_digest"] == ma["plan_digest"]  # the user's own plan, not the batch's
        # the charge does not depend on who else was in the batch: the same forward
        # passes, and the engine's measure of the request's own nodes only
        assert mt["forward_seconds"] == ma["forward_seconds"]
        pricing = batch_gw.config.pricing
        for r, m in ((a, ma), (t, mt)):  # (test_gateway_admission: nobody pays for others)
            assert float(r.headers["x-tpmlab-units"]) == pytest.approx(pricing.units(
                m["forward_seconds"] + m["plan_seconds"], sum(
                    v.numel() * v.element_size() for v in decode_result(r.content)[0].values())),
                abs=1e-5)
    per_user = {}
    for i, t in enumerate(together):
        per_user.setdefault(f"{tiers[i % 2]}-user", 0.0)
        per_user[f"{tiers[i % 2]}-user"] += float(t.headers["x-tpmlab-units"])
    for name, units in per_user.items():
        rows = batch_gw.ledger.charges(name)
        assert sum(r["units"] for r in rows) == pytest.approx(units)
        assert max(r["batch_size"] for r in rows) >= 2


def test_a_bad_plan_in_a_batch_fails_only_itself(engine_backend, cost_model, tmp_path,
                                                 lab_model):
    """A plan that validates but fails while running makes the merged pass fail: every
    request of it runs again alone, so only the bad one fails."""
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      batch_window=0.5)
    s = serve(gw)
    good = _traces(lab_model)[0][0]
    tr = lab_model.trace("Hello there")
    with tr.recording():  # index 7 is past the row's last position: fails only when it runs
        lab_model.layers[0].output[:, 7].save()
    bad = encode_plan(tr.plan())
    try:
        def send(args):
            tier, blob = args
            with s.client(tier) as c:
                return c.post(f"/v1/models/{MODEL}/run", content=blob)

        with cf.ThreadPoolExecutor(3) as pool:
            rs = list(pool.map(send, [("inspect", good), ("intervene", bad), ("admin", good)]))
    finally:
        s.server.stop()
    assert rs[0].status_code == 200 and rs[2].status_code == 200
    assert rs[1].status_code in (400, 422), rs[1].text
    assert gw.ledger.charges("intervene-user") == []


def test_the_batch_budget_bounds_what_shares_a_pass(engine_backend, cost_model, tmp_path,
                                                    lab_model):
    """``max_batch_cells`` (rows x the longest row) and ``min_batch_fill`` are the same
    :class:`~tpmlab.ir.merge.MergeBudget` the in-process pass queue applies: a budget no pair
    fits in keeps every request alone, however long the window."""
    traces = _traces(lab_model)[:4]
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'b.db'}", cost_model,
                      batch_window=0.5, max_concurrent_per_user=16, max_batch_cells=1)
    s = serve(gw)
    try:
        def send(i):
            with s.client("intervene") as c:
                return c.post(f"/v1/models/{MODEL}/run", content=traces[i][0])

        with cf.ThreadPoolExecutor(len(traces)) as pool:
            rs = list(pool.map(send, range(len(traces))))
    finally:
        s.server.stop()
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert [int(r.headers["x-tpmlab-batch-size"]) for r in rs] == [1] * len(rs)
