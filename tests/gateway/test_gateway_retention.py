"""What finished requests keep: no plans or constants, and results within a per-user byte
budget (the oldest go first; fetching one that went is 410)."""

from __future__ import annotations

import gc

import torch

from tpmlab.ir.codec import decode_result, encode_plan

from .conftest import MODEL, make_gateway, serve, wait_until


def _plan_with_constant(model, nbytes):
    """A trace carrying an unused constant of ``nbytes`` bytes."""
    tr = model.trace("Hello")
    with tr.recording():
        unused = torch.zeros(nbytes // 4)
        torch.cat([model.output.logits[0, -1, :4], unused])[:4].save()
    return encode_plan(tr.plan())


def test_finished_requests_drop_their_plans_and_constants(engine_backend, cost_model, tmp_path,
                                                          lab_model):
    """Plans with an unused 48 MiB constant: once they have run, the gateway keeps none of
    their bytes (before, each finished request held its plan for 10 minutes)."""
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model)
    s = serve(gw)
    blob = _plan_with_constant(lab_model, 48 * 2**20)
    try:
        with s.client("intervene") as c:
            ids = [c.post(f"/v1/models/{MODEL}/requests", content=blob).json()["id"]
                   for _ in range(6)]
            for rid in ids:
                assert c.get(f"/v1/requests/{rid}/result").status_code == 200
        kept = [gw.records.get(rid) for rid in ids]
        assert all(r is not None and r.state == "done" for r in kept)
        assert all(r.plan is None and r.blob is None for r in kept)
        gc.collect()
        # the constant's own size picks it out among the weights other tests' models keep
        constants = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)
                     and not isinstance(o, torch.nn.Parameter) and not o.is_meta
                     and o.numel() == 48 * 2**20 // 4]
        assert constants == []
        uid = gw.ledger.user("intervene-user").id
        assert gw.records.kept_bytes(uid) < 2**20  # six small results and their records
    finally:
        s.server.stop()


def test_kept_results_are_bounded_per_user_by_bytes(engine_backend, cost_model, tmp_path,
                                                     lab_model):
    """Each result here is ~0.94 MiB (the logits of five positions); a budget of 3 MiB keeps
    the newest results, drops the oldest (410 when fetched), and another user's results
    are not touched."""
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      max_kept_bytes_per_user=3 * 2**20)
    s = serve(gw)
    tr = lab_model.trace("one two three four")
    with tr.recording():
        lab_model.output.logits.save()
    blob = encode_plan(tr.plan())
    try:
        with s.client("inspect") as c, s.client("intervene") as other:
            theirs = other.post(f"/v1/models/{MODEL}/requests", content=blob).json()["id"]
            ids = [c.post(f"/v1/models/{MODEL}/requests", content=blob).json()["id"]
                   for _ in range(6)]
            assert wait_until(lambda: all(c.get(f"/v1/requests/{i}").json()["state"] == "done"
                                          for i in ids), timeout=120)
            uid = gw.ledger.user("inspect-user").id
            assert gw.records.kept_bytes(uid) <= 3 * 2**20
            oldest = c.get(f"/v1/requests/{ids[0]}/result")
            assert oldest.status_code == 410 and oldest.json()["error"] == "ResultGoneError"
            assert c.get(f"/v1/requests/{ids[0]}").json()["result"] == "dropped"
            newest = c.get(f"/v1/requests/{ids[-1]}/result")
            assert newest.status_code == 200
            values, meta = decode_result(newest.content)
            assert meta["request_id"] == ids[-1]
            assert other.get(f"/v1/requests/{theirs}/result").status_code == 200
    finally:
        s.server.stop()


def test_request_table_bounds():
    """The budget drops the oldest results first, never the newest (which may alone be
    larger) nor one being handed to a client; records go when they alone exceed it, or
    with time."""
    import time

    from tpmlab.gateway.ledger import UserView
    from tpmlab.gateway.records import RECORD_BYTES, Request, RequestTable
    from tpmlab.gateway.units import Hold

    table = RequestTable(keep_seconds=60, max_bytes_per_user=10 * RECORD_BYTES)
    ann, bob = UserView(1, "ann", "query", "key", True), UserView(2, "bob", "query", "key", True)

    count = iter(range(10**6))

    def finish(user, nbytes, readers=0, at=None):
        req = Request(id=f"{user.name}{next(count)}", user=user, model=MODEL, mode="trace",
                      plan=None, blob=b"plan", digest="d", tokens=1,
                      hold=Hold(0.0, 0.0, 0, True, 1.0), mergeable=True)
        req.state, req.finished, req.result, req.readers = "done", at or time.monotonic(), \
            b"r" * nbytes, readers
        table.add(req)
        table.finished(req)
        return req

    old = finish(bob, 0, at=time.monotonic() - 120)  # finished two minutes ago
    first = finish(ann, 4 * RECORD_BYTES)
    handed = finish(ann, 4 * RECORD_BYTES, readers=1)
    big = finish(ann, 50 * RECORD_BYTES)  # over the budget alone
    theirs = finish(bob, 4 * RECORD_BYTES)
    assert first.result is None and first.result_dropped and first.blob is None
    assert handed.result is not None and big.result is not None and theirs.result is not None
    assert table.get(first.id) is first  # its status is still kept
    many = [finish(ann, 0) for _ in range(12)]
    assert len([r for r in table.values() if r.user is ann]) <= 10 and table.get(many[-1].id)
    table.prune()
    assert table.get(old.id) is None and table.get(theirs.id) is theirs
