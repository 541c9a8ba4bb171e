"""Accounts of each source are apart: a JupyterHub login is never a key-based account."""

from __future__ import annotations

import pytest

from tpmlab.gateway.ledger import Ledger, LedgerError

from .conftest import FakeHub, make_gateway, serve


def test_hub_login_never_reaches_a_key_account_of_the_same_name(engine_backend, cost_model,
                                                                tmp_path):
    """'root' is a key-based admin; a JupyterHub user who is also called 'root' gets an
    account of their own (hub:root, the hub's default tier and units), not the admin's."""
    from tpmlab.gateway.auth import HubSettings

    hub = FakeHub({"hub-token-of-root": "root"})
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model)
    gw.ledger.create_user("root", "admin", units=1e6)
    admin_key = gw.ledger.create_key("root")
    s = serve(gw, hub=HubSettings(hub.api_url, default_tier="query", default_units=5))
    try:
        with s.client("hub-token-of-root") as c:
            me = c.get("/v1/me").json()
            assert (me["name"], me["tier"], me["source"], me["balance"]) == \
                ("hub:root", "query", "hub", 5.0)
            r = c.get("/v1/admin/users")
            assert r.status_code == 403 and r.json()["tier"] == "query"
        with s.client(admin_key) as c:
            me = c.get("/v1/me").json()
            assert (me["name"], me["tier"], me["source"]) == ("root", "admin", "key")
            users = {u["name"]: u for u in c.get("/v1/admin/users").json()}
            assert users["root"]["balance"] == 1e6 and users["hub:root"]["balance"] == 5.0
            # the hub account is managed under its own name
            r = c.put("/v1/admin/users/hub:root/tier", json={"tier": "inspect"})
            assert r.status_code == 200 and r.json()["source"] == "hub"
        assert gw.ledger.user("root").tier == "admin"
    finally:
        s.server.stop()
        hub.stop()


def test_key_user_names_cannot_take_the_hub_namespace(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        with pytest.raises(LedgerError, match="letters, digits"):
            ledger.create_user("hub:carol", "admin")
        carol = ledger.hub_user("carol", tier="query", units=1)
        assert carol.name == "hub:carol" and carol.source == "hub"
        assert ledger.hub_user("carol", tier="admin", units=99) == carol  # found, not made
        with pytest.raises(LedgerError, match="hub account"):
            ledger.ensure_user("hub:carol", tier="admin", units=0)
        # a hub account made before hub accounts had their prefix is still found
        ledger.create_user("hub:x", "query", source="hub")
        from sqlalchemy import update

        from tpmlab.gateway.ledger import User

        with ledger.engine.begin() as conn:
            conn.execute(update(User).where(User.name == "hub:x").values(name="dave"))
        assert ledger.hub_user("dave", tier="query", units=0).name == "dave"
        ledger.create_user("erin", "admin")
        assert ledger.hub_user("erin", tier="query", units=0).name == "hub:erin"
    finally:
        ledger.close()
