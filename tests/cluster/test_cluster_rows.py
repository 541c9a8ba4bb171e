"""Row isolation on pipeline stages of a real Dask cluster: users merged into one batch
each get their own result (DESIGN.md contract 9), on 2 stages in worker processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import TINY_MODELS
from tests.plan_strategies import check_merged_runs, property_settings, users

from .conftest import deploy

pytestmark = pytest.mark.slow
def _staged(lab, name):
    model = deploy(lab, name, 2)
    assert model.info.n_stages == 2
    return model


@pytest.fixture(scope="module", params=TINY_MODELS)
def tiny(request, lab):
    yield _staged(lab, request.param)
    lab.undeploy(request.param)


@pytest.fixture(scope="module")
def default(lab):
    yield _staged(lab, "smollm2-135m")
    lab.undeploy("smollm2-135m")


def _check(lab, model, plans):
    """Random plans of 2-4 users at any event of either stage, merged: each user's part is
    bit for bit its result in the same batch with the others idle, and its solo result to
    float rounding."""
    check_merged_runs(lambda blob: lab.backend.run_values(model.name, blob), plans)


@property_settings(6)
@given(data=st.data())
def test_merged_users_get_their_own_results_on_stages(tiny, lab, data):
    _check(lab, tiny, data.draw(users(tiny.info)))


@property_settings(2)
@given(data=st.data())
def test_merged_users_get_their_own_results_on_stages_default_model(default, lab, data):
    _check(lab, default, data.draw(users(default.info, max_actions=3)))
