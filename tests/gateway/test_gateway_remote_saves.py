"""Behind the gateway remote saves are refused with an error that names the alternative:
a user's values would otherwise outlive their request on shared workers."""

from __future__ import annotations

import pytest

from tpmlab.errors import LimitError

from .conftest import MODEL, make_gateway, serve

PROMPT = "The Eiffel Tower is in"


@pytest.mark.parametrize("tier", ["inspect", "admin"])
def test_a_remote_save_is_refused_and_the_gateway_serves_on(served, tier):
    lab = served.lab(tier)
    m = lab.model(MODEL)
    with pytest.raises(LimitError, match=r"remote saves are not kept here .* use \.save\(\)"):
        with m.trace(PROMPT):
            m.layers[0].output.save(remote=True)
    with m.trace(PROMPT):
        h = m.layers[0].output.save()
    assert h.value.shape[0] == 1
    lab.close()


def test_tier_limits_written_by_hand_still_refuse_remote_saves(engine_backend, cost_model,
                                                               tmp_path):
    from tpmlab.gateway.tiers import TIER_LIMITS
    from tpmlab.ir.validate import Limits

    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      tier_limits=dict(TIER_LIMITS, inspect=Limits()))
    s = serve(gw)
    try:
        lab = s.lab("inspect")
        with pytest.raises(LimitError, match="remote saves are not kept here"):
            with lab.model(MODEL).trace(PROMPT):
                lab.model(MODEL).layers[0].output.save(remote=True)
        lab.close()
    finally:
        s.server.stop()
