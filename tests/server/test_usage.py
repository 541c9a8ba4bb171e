"""The sidebar's usage panel: the server extension asks the deployment's gateway (a real one,
served on 127.0.0.1) for the user's service units, with the user's own token."""

from __future__ import annotations

import json

import pytest
import torch

from tests.gateway.conftest import MODEL, FakeHub, make_gateway, serve

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def engine_backend():
    from tpmlab.runtime.backend import LocalBackend

    backend = LocalBackend(device="cpu", dtype=torch.float32)
    backend.deploy(MODEL)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hub():
    hub = FakeHub({"hub-token-of-carol": "carol"})
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def gateway(engine_backend, hub, tmp_path_factory):
    from tpmlab.gateway.auth import HubSettings
    from tpmlab.gateway.units import CostModel

    db = tmp_path_factory.mktemp("ledger") / "ledger.db"
    g = make_gateway(engine_backend, f"sqlite:///{db}",
                     CostModel(fixed_seconds=0.01, seconds_per_token=0.001))
    served = serve(g, hub=HubSettings(api_url=hub.api_url, default_tier="inspect",
                                      default_units=250.0), units=1000.0)
    yield served
    served.server.stop()


@pytest.fixture
def token(request, gateway, monkeypatch):
    """The credentials in the Jupyter server's environment (parametrized per test); a value
    ``"key:<tier>"`` is the API key of the gateway's user of that tier."""
    for name in ("TPMLAB_TOKEN", "TPMLAB_GATEWAY_TOKEN", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in request.param.items():
        if value.startswith("key:"):
            value = gateway.keys[value.removeprefix("key:")]
        monkeypatch.setenv(name, value)
    return request.param


@pytest.fixture
def jp_server_config(scheduler_address, gateway, token, monkeypatch):
    monkeypatch.setenv("TPMLAB_GATEWAY", gateway.url)
    return {"ServerApp": {"jpserver_extensions": {"tpmlab.server": True}},
            "TpmlabServer": {"scheduler_address": scheduler_address}}


async def _usage(jp_fetch) -> dict:
    r = await jp_fetch("tpmlab", "api", "status")
    return json.loads(r.body)["usage"]


def _spend(gateway, tier: str) -> None:
    lab = gateway.lab(tier)
    try:
        model = lab.model(MODEL)
        with model.trace(PROMPT):
            model.layers[0].output.save()
    finally:
        lab.close()


@pytest.mark.parametrize("token", [{"TPMLAB_TOKEN": "key:inspect",
                                    "JUPYTERHUB_API_TOKEN": "hub-token-of-carol"}],
                         indirect=True, ids=["TPMLAB_TOKEN first"])
async def test_usage_is_the_users_balance_at_the_gateway(jp_fetch, tpmlab_state, gateway, token):
    before = await _usage(jp_fetch)
    assert before["user"] == "inspect-user" and before["tier"] == "inspect"
    assert before["unit"] == "SU" and before["quota"] == 1000.0
    _spend(gateway, "inspect")
    after = await _usage(jp_fetch)
    totals = gateway.gateway.ledger.totals("inspect-user")
    assert after["used"] == pytest.approx(totals["used"]) and after["used"] > before["used"]
    assert after["balance"] == pytest.approx(totals["balance"])
    assert after["quota"] == pytest.approx(totals["allocated"])


@pytest.mark.parametrize("token", [{"JUPYTERHUB_API_TOKEN": "hub-token-of-carol"}],
                         indirect=True, ids=["JUPYTERHUB_API_TOKEN"])
async def test_a_single_user_server_uses_its_jupyterhub_token(jp_fetch, tpmlab_state, token):
    usage = await _usage(jp_fetch)
    assert usage == {"used": 0.0, "quota": 250.0, "balance": 250.0, "unit": "SU",
                     "tier": "inspect", "user": "hub:carol"}  # the Hub user's own account


@pytest.mark.parametrize("token", [{"TPMLAB_TOKEN": "not-a-key"}, {}], indirect=True,
                         ids=["wrong token", "no token"])
async def test_usage_says_why_it_is_missing(jp_fetch, tpmlab_state, token):
    usage = await _usage(jp_fetch)
    if token:
        assert "answered 401" in usage["error"]
    else:
        assert "no token for the gateway" in usage["error"] and "$TPMLAB_TOKEN" in usage["error"]


@pytest.mark.parametrize("token", [{"JUPYTERHUB_API_TOKEN": "hub-token-of-carol"}],
                         indirect=True, ids=["JUPYTERHUB_API_TOKEN"])
async def test_the_gateways_models_are_listed_as_shared_deployments(jp_fetch, tpmlab_state,
                                                                    gateway, token):
    r = await jp_fetch("tpmlab", "api", "status")
    models = {m["name"]: m for m in json.loads(r.body)["models"]}
    served = models[MODEL]
    assert served["gateway"] == gateway.url and served["stages"] == []
    assert served["state"] == "deployed" and served["version"]
