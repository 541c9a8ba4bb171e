"""Remote saves behind the gateway: values kept on the engine under per-user handles, held to
the tier's limits, fetched (whole or a slice) and reduced there, priced in the ledger, and
released by their owner, by expiry and when the gateway closes."""

from __future__ import annotations

import dataclasses
import gc
import re

import numpy as np
import pytest
import torch

from tpmlab import Lab, remote
from tpmlab.cluster.errors import RemoteLimitError
from tpmlab.errors import LimitError, RemoteValueError
from tpmlab.gateway.client import GatewayRemoteValue
from tpmlab.gateway.errors import NotFoundError
from tpmlab.gateway.tiers import TIER_LIMITS

from .conftest import MODEL, make_gateway, serve

PROMPTS = ["The Eiffel Tower is in", "Hello there"]
REDUCTIONS = [("mean", 0, None), ("sum", [0, 1], None), ("max", -1, None), ("min", None, None),
              ("std", 1, "float64"), ("var", [0, 2], None), ("gram", None, None),
              ("gram", None, "float64")]


@pytest.fixture(scope="module")
def gw(engine_backend, cost_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("remote") / "ledger.db"
    s = serve(make_gateway(engine_backend, f"sqlite:///{db}", cost_model))
    yield s
    s.server.stop()


def _keep(lab, layer=1):
    m = lab.model(MODEL)
    with m.trace(PROMPTS):
        h = m.layers[layer].output.save(remote=True)
        p = m.layers[layer].output.save()
    return h.value, p.value


def _held(served, tier):
    return served.client(tier).get("/v1/remote-values").json()


def test_a_remote_save_reduces_to_the_in_process_numbers(gw, engine_backend):
    local = Lab(engine_backend)  # the gateway's own engine, in process
    ref, plain = _keep(local)
    lab = gw.lab("inspect")
    value, _ = _keep(lab)
    assert isinstance(value, GatewayRemoteValue) and isinstance(value, remote.RemoteValue)
    assert (value.shape, value.dtype, value.nbytes) == (ref.shape, ref.dtype, ref.nbytes)
    assert value.worker is None and value.future is None and not value.released
    for op, dims, dtype in REDUCTIONS:
        got = value.reduce(op, dims, dtype=dtype)
        torch.testing.assert_close(got, ref.reduce(op, dims, dtype=dtype), atol=0, rtol=0)
    torch.testing.assert_close(value.reduce("mean", 1, keepdim=True),
                               ref.reduce("mean", 1, keepdim=True), atol=0, rtol=0)
    torch.testing.assert_close(value.fetch(), plain, atol=0, rtol=0)
    torch.testing.assert_close(value.fetch(np.s_[:, -1]), plain[:, -1], atol=0, rtol=0)
    torch.testing.assert_close(value.fetch((1, slice(0, 3, 2))), plain[1, 0:3:2], atol=0,
                               rtol=0)
    x = remote.concatenate([value, value])  # the dask API fetches through the gateway
    np.testing.assert_array_equal(x.mean(axis=0).compute(),
                                  remote.concatenate([ref, ref]).mean(axis=0).compute())
    held = _held(gw, "inspect")
    assert [v["handle"] for v in held["values"]] == [value.handle]
    assert held["values"][0]["shape"] == list(value.shape) and held["bytes"] == value.nbytes
    assert held["max_bytes"] == TIER_LIMITS["inspect"].max_remote_bytes
    assert lab.release_remote(MODEL) == 1 and value.released
    assert _held(gw, "inspect")["count"] == 0
    with pytest.raises(ValueError, match="released"):
        value.fetch()
    local.release_remote()
    lab.close()


def test_handles_are_opaque_and_another_users_answer_as_unknown(gw, engine_backend):
    lab = gw.lab("inspect")
    value, _ = _keep(lab)
    assert value.handle.startswith("rv_") and len(value.handle) > 40
    assert value.handle not in repr(engine_backend.remote._by_model)  # not the engine's key
    other, unknown = gw.client("intervene"), "rv_" + "A" * 43
    for method, path, body in [("POST", "fetch", {}), ("POST", "reduce", {"op": "mean"}),
                               ("GET", "", None), ("DELETE", "", None)]:
        answers = []
        for handle in (value.handle, unknown):
            url = f"/v1/remote-values/{handle}" + (f"/{path}" if path else "")
            r = other.request(method, url, json=body)
            answers.append((r.status_code, r.json()["error"],
                            r.json()["message"].replace(handle, "H")))
        assert answers[0] == answers[1] == (404, "NotFoundError", answers[0][2])
    assert other.delete("/v1/remote-values").json() == {"released": 0}
    assert _held(gw, "intervene")["values"] == []
    # the owner still has it, untouched
    assert value.reduce("sum").shape == () and _held(gw, "inspect")["count"] == 1
    lab.close()
    assert value.released and _held(gw, "inspect")["count"] == 0
    with pytest.raises(NotFoundError, match="no remote value"):
        gw.lab("inspect").backend._read(value.handle, "fetch", {})


def test_bad_reductions_and_slices_are_refused_naming_the_problem(gw):
    lab = gw.lab("inspect")
    value, _ = _keep(lab)
    c = gw.client("inspect")
    url = f"/v1/remote-values/{value.handle}"
    cases = [
        ("reduce", {"op": "exp"}, "'exp' is not a reduction .* sum, mean, min, max"),
        ("reduce", {"op": "mean", "dims": 3}, "dim 3 is out of range for a value of 3 dims"),
        ("reduce", {"op": "gram", "dims": 0}, "gram takes no dims"),
        ("reduce", {"op": "sum", "dtype": "int8"}, "float32 or float64"),
        ("fetch", {"index": [2]}, "index 2 is out of bounds for dim 0 of size 2"),
        ("fetch", {"index": [0, [0, 999, None]]}, "slice 0:999 of dim 1 is out of bounds"),
        ("fetch", {"index": [0, [None, None, -1]]}, "step -1: steps must be positive"),
        ("fetch", {"index": [0, 0, 0, 0]}, "an index of 4 items for a value of 3 dims"),
    ]
    for what, body, message in cases:
        r = c.post(f"{url}/{what}", json=body)
        assert r.status_code == 400 and r.json()["error"] == "RemoteValueError", r.text
        assert re.search(message, r.json()["message"]), r.json()["message"]
    r = c.post(f"{url}/fetch", json={"index": ["x"]})
    assert r.status_code == 422 and "index" in r.json()["message"]
    with pytest.raises(RemoteValueError, match="not a reduction"):  # refused before sending
        value.reduce("median")
    with pytest.raises(RemoteValueError, match="out of bounds"):
        value.fetch(np.s_[5])
    assert value.reduce("mean").shape == ()  # the value is still there
    lab.close()


def test_reads_are_priced_in_the_ledger(gw):
    lab = gw.lab("inspect")
    value, plain = _keep(lab)
    before = lab.backend.me()["used"]
    value.fetch(np.s_[:, -1])
    fetch_charge = dict(lab.backend.last_charge)
    value.reduce("gram")
    charges = {c["request_id"]: c for c in lab.backend.usage(10)["charges"]}
    fetched, reduced = charges[fetch_charge["request_id"]], \
        charges[lab.backend.last_charge["request_id"]]
    assert fetched["mode"] == "remote-fetch" and reduced["mode"] == "remote-reduce"
    assert fetched["bytes_returned"] == plain[:, -1].numel() * 4
    assert reduced["bytes_returned"] == plain.shape[-1] ** 2 * 4
    assert fetched["units"] == pytest.approx(fetch_charge["units"]) and fetched["units"] > 0
    assert reduced["compute_seconds"] > 0 and reduced["units"] > 0
    used = lab.backend.me()["used"]
    assert used == pytest.approx(before + fetched["units"] + reduced["units"])
    assert lab.backend.me()["held"] == 0
    lab.close()


def test_the_query_tier_keeps_none(gw):
    lab = gw.lab("query")
    m = lab.model(MODEL)
    with pytest.raises(LimitError, match=r"remote saves are not kept here .* use \.save\(\)"):
        with m.trace(PROMPTS):
            m.output.logits[:, -1].save(remote=True)
    with m.trace(PROMPTS):
        h = m.output.logits[:, -1].save()
    assert h.value.shape[0] == 2
    lab.close()


@pytest.fixture
def small(engine_backend, cost_model, tmp_path):
    """A gateway whose inspect tier keeps 2 values of at most 3 layer outputs' bytes, and
    returns at most one of them at a time."""
    nbytes = 2 * 6 * 64 * 4  # one [2, 6, 64] float32 layer output of PROMPTS
    limits = dataclasses.replace(TIER_LIMITS["inspect"], max_remote_bytes=3 * nbytes,
                                 max_remote_values=2, max_saved_bytes=nbytes)
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      tier_limits=dict(TIER_LIMITS, inspect=limits), remote_value_ttl=3600)
    s = serve(gw)
    yield s
    s.server.stop()


def test_limits_refuse_before_running_and_release_frees_the_accounting(small):
    lab = small.lab("inspect")
    m = lab.model(MODEL)
    a, _ = _keep(lab, 1)
    assert a.shape == (2, 6, 64)
    b, _ = _keep(lab, 2)
    charges = len(lab.backend.usage(100)["charges"])
    with pytest.raises(RemoteLimitError, match=r"keeps 1 values and you hold 2 already.*"
                                               r"max_remote_values"):
        _keep(lab, 3)
    with pytest.raises(RemoteLimitError, match=r"keeps 6,144 bytes and you hold 6,144 bytes"
                                               r".*max_remote_bytes"):
        with m.trace(PROMPTS):  # two values at once: over the bytes left
            m.layers[0].output.save(remote=True)
            m.layers[3].output.save(remote=True)
    assert len(lab.backend.usage(100)["charges"]) == charges  # refused before running
    # a fetch is held to the tier's max_saved_bytes: a slice or a reduction fits
    with pytest.raises(LimitError, match="max_saved_bytes"):
        a.reduce("gram", dtype="float64")
    assert a.fetch().shape == (2, 6, 64)
    a.release()
    assert _held(small, "inspect") | {"values": None} == {
        "values": None, "bytes": b.nbytes, "count": 1,
        "max_bytes": 3 * a.nbytes, "max_values": 2,
        "max_read_values": small.gateway.config.max_read_values,
        "max_read_bytes": a.nbytes}
    c, _ = _keep(lab, 3)  # admitted again
    del c
    gc.collect()  # a value dropped here is released at this client's next call
    assert _held(small, "inspect")["count"] == 2
    lab.backend.me()
    assert _held(small, "inspect")["count"] == 1
    lab.close()


def test_values_expire_and_go_when_the_gateway_closes(engine_backend, cost_model, tmp_path):
    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      remote_value_ttl=0.0)
    s = serve(gw)
    try:
        lab = s.lab("inspect")
        value, _ = _keep(lab)
        user_id = gw.ledger.user("inspect-user").id
        kept = gw.remote_values.owned(user_id, value.handle).value
        assert gw.remote_values.expire() == 1 and kept.released
        with pytest.raises(NotFoundError):
            value.fetch()
        assert _held(s, "inspect")["count"] == 0
        gw.remote_values.ttl = 3600.0
        other, _ = _keep(lab)
        kept = gw.remote_values.owned(user_id, other.handle).value
    finally:
        s.server.stop()  # the gateway closes: what users kept goes with it
    assert kept.released and gw.remote_values.usage(user_id) == (0, 0)


def test_a_generation_keeps_one_value_per_step(gw):
    """Values at later steps are not sized before the run: the request reserves what is
    left of the user's bytes, and is accounted what it kept."""
    lab = gw.lab("inspect")
    m = lab.model(MODEL)
    with m.generate(PROMPTS[1], max_new_tokens=3) as gen:
        with gen.all():
            h = m.layers[0].output[:, -1].save(remote=True)
            p = m.layers[0].output[:, -1].save()
    assert isinstance(h.value, list) and len(h.value) == 3
    for r, want in zip(h.value, p.value):
        assert isinstance(r, GatewayRemoteValue)
        torch.testing.assert_close(r.fetch(), want, atol=0, rtol=0)
    assert _held(gw, "inspect")["bytes"] == sum(r.nbytes for r in h.value)
    assert lab.release_remote() == 3
    lab.close()


def test_dask_arrays_of_gateway_values_compute_on_a_dask_cluster_the_notebook_uses(gw):
    """A notebook may also hold a Dask client (its own cluster: the default scheduler then).
    A gateway value's dask array carries its data, fetched in the notebook, not the
    gateway's connection (which cannot be sent to the cluster's workers)."""
    from distributed import Client, LocalCluster

    lab = gw.lab("inspect")
    value, plain = _keep(lab)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        assert client.scheduler_info()["workers"]  # the default scheduler now
        got = remote.concatenate([value, value]).sum(axis=0).compute()
        np.testing.assert_allclose(got, 2 * plain.float().sum(0).numpy(), rtol=1e-6)
        np.testing.assert_array_equal(value.to_dask_array().compute(), plain.numpy())
    lab.close()
