"""`tpmlab hub-config`: the jupyterhub_config.py fragment docs/admin.md shows is exactly what
the command writes, and it is valid configuration. The deployment itself runs for real in
tests/hub/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tpmlab.cli import main
from tpmlab.hub.config import render, service_scope

DOC = Path(__file__).resolve().parents[2] / "docs" / "admin.md"


def _doc_fragment() -> str:
    text = DOC.read_text()
    section = text[text.index("## On JupyterHub"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_show_exactly_what_the_command_writes(capsys):
    assert main(["hub-config"]) == 0
    assert capsys.readouterr().out == _doc_fragment() == render()


def test_the_fragment_configures_service_roles_and_servers(tmp_path):
    from traitlets.config import Config

    out = tmp_path / "tpmlab_hub.py"
    assert main(["hub-config", "--port", "8700", "--public-url", "https://hub.example.org",
                 "--env", "TPMLAB_HOME=/srv/w", "--grant", "access:services!service=dask-gateway",
                 "-o", str(out)]) == 0
    c = Config()
    exec(compile(out.read_text(), str(out), "exec"), {"c": c})
    (service,) = c.JupyterHub.services.get_value([])  # appended to whatever the file had
    assert service["name"] == "tpmlab" and service["url"] == "http://127.0.0.1:8700"
    assert service["command"][:2] == ["tpmlab", "gateway"] and "8700" in service["command"]
    assert service["command"][-2:] == ["--hub-scope", service_scope()]
    assert service["environment"] == {"TPMLAB_HOME": "/srv/w"}
    roles = {r["name"]: r["scopes"] for r in c.JupyterHub.load_roles.get_value([])}
    for role, defaults in (("user", ["self"]),
                           ("server", ["users:activity!user", "access:servers!server"])):
        assert roles[role] == [*defaults, "access:services!service=tpmlab",
                               "access:services!service=dask-gateway"]
    assert c.Spawner.environment.get_value({}) == {
        "TPMLAB_HOME": "/srv/w", "TPMLAB_GATEWAY": "https://hub.example.org/services/tpmlab"}
    assert c.Spawner.default_url == "/lab"


def test_a_malformed_env_option_is_refused():
    from tpmlab.hub.errors import HubConfigError

    with pytest.raises(HubConfigError, match="NAME=VALUE"):
        main(["hub-config", "--env", "TPMLAB_HOME"])


def test_hub_tokens_need_the_services_scope():
    from tpmlab.gateway.auth import has_scope

    scope = service_scope("tpmlab")
    assert has_scope([scope], scope) and has_scope(["access:services"], scope)
    assert not has_scope(["access:services!service=other", "self"], scope)
    assert has_scope([], None)


def test_the_gateway_is_served_under_the_hubs_service_prefix():
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from tpmlab.gateway.server import under_prefix

    app = FastAPI()

    @app.get("/v1/me")
    def me() -> dict:
        return {"ok": True}

    client = TestClient(under_prefix(app, "/services/tpmlab/"))
    assert client.get("/services/tpmlab/v1/me").json() == {"ok": True}
    assert client.get("/v1/me").status_code == 404
    assert under_prefix(app, "/") is app
