"""The user's gateway token comes from one place, with one precedence, for every reader."""

from __future__ import annotations

import pytest

from tpmlab.tokens import TOKEN_ENVS, gateway_token

CASES = [
    ({"TPMLAB_TOKEN": "k", "TPMLAB_GATEWAY_TOKEN": "g", "JUPYTERHUB_API_TOKEN": "h"}, "k"),
    ({"TPMLAB_TOKEN": "", "TPMLAB_GATEWAY_TOKEN": "g", "JUPYTERHUB_API_TOKEN": "h"}, "g"),
    ({"JUPYTERHUB_API_TOKEN": "h"}, "h"),
    ({}, None),
]


@pytest.mark.parametrize(("env", "expected"), CASES)
def test_the_gateway_client_and_the_sidebar_read_the_same_token(env, expected, monkeypatch):
    from tpmlab.server.state import GatewayUsage

    assert TOKEN_ENVS == ("TPMLAB_TOKEN", "TPMLAB_GATEWAY_TOKEN", "JUPYTERHUB_API_TOKEN")
    assert gateway_token(env) == expected
    assert GatewayUsage.from_env({"TPMLAB_GATEWAY": "http://gw", **env}).token == expected

    httpx = pytest.importorskip("httpx")
    from tpmlab.gateway.client import GatewayBackend
    from tpmlab.gateway.errors import AuthenticationError

    for name in TOKEN_ENVS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    if expected is None:
        with pytest.raises(AuthenticationError, match=r"\$TPMLAB_TOKEN"):
            GatewayBackend("http://gw", transport=transport)
        return
    backend = GatewayBackend("http://gw", transport=transport)
    try:
        assert backend.http.headers["Authorization"] == f"Bearer {expected}"
    finally:
        backend.close()
