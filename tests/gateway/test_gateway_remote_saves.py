"""Behind the gateway remote saves are refused with an error that names the alternative:
a user's values would otherwise outlive their request on shared workers."""

from __future__ import annotations

import pytest

from tpmlab.errors import LimitError

from .conftest import MODEL

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
