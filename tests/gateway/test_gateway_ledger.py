"""The ledger on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import pytest

from tpmlab.gateway.ledger import Ledger, LedgerError

from .conftest import MODEL, make_gateway, serve


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url = request.getfixturevalue("postgres_url")
    # a clean schema per test
    from sqlalchemy import create_engine

    from tpmlab.gateway.ledger import Base

    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    return url


def test_users_keys_allocations_charges(db_url):
    ledger = Ledger(db_url)
    try:
        ledger.create_user("ann", "inspect", units=10)
        with pytest.raises(LedgerError, match="exists"):
            ledger.create_user("ann")
        with pytest.raises(LedgerError, match="tier"):
            ledger.create_user("bo", "root")
        key = ledger.create_key("ann", "laptop")
        assert key.startswith("tpmk_") and ledger.check_key(key).name == "ann"
        key_id, secret = key[5:].split("_", 1)
        assert ledger.check_key(f"tpmk_{key_id}_{secret[:-1]}x") is None
        assert ledger.check_key(f"tpmk_ffff_{secret}") is None
        assert ledger.check_key("tpmk_") is None
        # only a salted digest is stored
        with ledger.engine.connect() as conn:
            from sqlalchemy import text

            stored = conn.execute(text("select salt, digest from gateway_api_keys")).one()
        assert secret not in "".join(stored)
        assert ledger.allocate("ann", 5.5) == pytest.approx(15.5)
        ledger.settle([{"request_id": "r1", "user_id": ledger.user("ann").id,
                                "model": MODEL, "model_version": "v", "plan_digest": "d",
                                "mode": "trace", "tokens": 3, "bytes_returned": 10,
                                "compute_seconds": 0.1, "measured_seconds": 0.05,
                                "batch_size": 2, "units": 2.5}])
        assert ledger.balance("ann") == pytest.approx(13.0)
        assert ledger.totals("ann") == {"allocated": 15.5, "used": 2.5, "requests": 1,
                                        "balance": 13.0, "held": 0.0}
        assert ledger.charges("ann")[0]["batch_size"] == 2
        ledger.revoke_key(key_id)
        assert ledger.check_key(key) is None
        ledger.set_active("ann", False)
        assert ledger.ensure_user("ann", tier="query", units=1).active is False
        assert ledger.audit() == []
    finally:
        ledger.close()


def test_gateway_charges_land_in_postgresql(engine_backend, cost_model, postgres_url,
                                            lab_model):
    from sqlalchemy import create_engine

    from tpmlab.gateway.ledger import Base

    engine = create_engine(postgres_url)
    Base.metadata.drop_all(engine)
    engine.dispose()
    s = serve(make_gateway(engine_backend, postgres_url, cost_model))
    try:
        lab = s.lab("inspect")
        m = lab.model(MODEL)
        with m.trace("hello") as tr:
            m.layers[0].output.save()
        usage = lab.backend.usage()
        assert usage["charges"][0]["request_id"] == tr.result.meta["request_id"]
        assert usage["used"] == pytest.approx(tr.result.meta["charged_units"])
        lab.close()
    finally:
        s.server.stop()
        s.gateway.ledger.close()
