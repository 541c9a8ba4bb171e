"""Cross-user batching keeps every user's answer their own: a user who writes the values
all rows of an unpadded batch used to share (the rotary ``cos``/``sin``) changes only their
own rows, not the other users' answers in the same forward pass."""

from __future__ import annotations

import concurrent.futures as cf

import torch

from tests.plan_strategies import recording
from tpmlab.ir.codec import decode_result, encode_plan

from .conftest import MODEL, make_gateway, serve

PROMPT = "The Eiffel Tower is in"


def _plan(model, attack: bool) -> tuple[bytes, int]:
    with recording(model, model.trace(PROMPT)) as tr:
        if attack:
            model.model.rotary_emb.output[0][:] = 7.0
            model.model.rotary_emb.output[1][:] = -7.0
        logits = model.output.logits[:, -1].save()
    return encode_plan(tr.plan()), logits._node


def test_a_users_writes_do_not_reach_other_users_in_the_batch(engine_backend, cost_model,
                                                              tmp_path, lab_model):
    victim, v_node = _plan(lab_model, attack=False)
    attacker, a_node = _plan(lab_model, attack=True)
    alone = decode_result(engine_backend.run(MODEL, victim))[0][v_node]
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'rows.db'}", cost_model,
                      batch_window=0.5, max_concurrent_per_user=8)
    s = serve(gw)
    try:
        def send(args):
            tier, blob = args
            with s.client(tier) as c:
                return c.post(f"/v1/models/{MODEL}/run", content=blob)

        jobs = [("intervene", attacker), ("query", victim), ("inspect", victim),
                ("admin", victim)]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(send, jobs))
    finally:
        s.server.stop()
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert max(int(r.headers["x-tpmlab-batch-size"]) for r in answers) >= 2  # shared a pass
    attacked = decode_result(answers[0].content)[0][a_node]
    assert (attacked - alone).abs().max() > 0.05, "the attacker's write changes their answer"
    for r in answers[1:]:
        got = decode_result(r.content)[0][v_node]
        torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)
        assert got.argmax() == alone.argmax()
