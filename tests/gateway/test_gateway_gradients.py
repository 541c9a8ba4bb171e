"""Behind the gateway, gradients need the 'gradients' tier, are charged their measured
backward compute and bytes, run alone (never merged), and are held to the tier's limit on
what autograd keeps per stage."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tpmlab.errors import LimitError
from tpmlab.gateway.errors import TierError
from tpmlab.gateway.tiers import TIER_LIMITS
from tpmlab.ir.merge import can_merge

from .conftest import MODEL, make_gateway, serve

PROMPT = "The Eiffel Tower is in"


def _record(m):
    with m.trace(PROMPT) as tr:
        h = m.layers[0].output
        (m.output.logits[:, -1, 7] - m.output.logits[:, -1, 11]).sum().backward()
        g = h.grad.save()
    return tr, g


def test_gradients_need_their_tier_and_are_charged_their_backward(served, engine_backend):
    import tpmlab

    lab = served.lab("intervene")
    m = lab.model(MODEL)
    with pytest.raises(TierError, match="'gradients' tier") as err:
        _record(m)
    assert "back-propagates a loss" in str(err.value)
    lab.close()
    lab = served.lab("gradients")
    m = lab.model(MODEL)
    tr, g = _record(m)
    local = tpmlab.Lab(engine_backend).model(MODEL)
    _, want = _record(local)
    torch.testing.assert_close(g.value, want.value)
    meta = tr.result.meta
    assert meta["backward_seconds"] > 0 and meta["autograd_bytes"][0] > 0
    assert meta["plan_seconds"] >= meta["backward_seconds"]  # measured backward is charged
    assert meta["batch_size"] == 1 and not can_merge(tr.plan())
    lab.close()


def test_the_tiers_autograd_limit_holds(engine_backend, cost_model, tmp_path):
    small = dataclasses.replace(TIER_LIMITS["gradients"], max_autograd_bytes=4096)
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      tier_limits=dict(TIER_LIMITS, gradients=small))
    s = serve(gw)
    try:
        lab = s.lab("gradients")
        with pytest.raises(LimitError, match="backward would keep"):
            _record(lab.model(MODEL))
        lab.close()
    finally:
        s.server.stop()
