"""Remote saves without a cluster: the plan's flag (recorded, encoded, validated), the
in-process form with the cluster's API (a checked index, whitelisted reductions), the worker
store's accounting and limits, and the gateway's tier limits."""

from __future__ import annotations

import gc
import time

import dask.array as da
import numpy as np
import pytest
import torch

from tests.plan_strategies import recording
from tpmlab import remote
from tpmlab.cluster import remote_store
from tpmlab.cluster.remote_store import RemoteLimitError, RemoteStore, RemoteValueGone
from tpmlab.errors import LimitError, RemoteValueError, SchemaError, ShapeError
from tpmlab.gateway.tiers import TIER_LIMITS
from tpmlab.ir.codec import decode_plan, encode_plan
from tpmlab.ir.plan import SAVE
from tpmlab.ir.validate import Limits, validate

MODEL = "tiny-llama"
PROMPTS = ["The Eiffel Tower is located in the city of", "Hello"]


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model(MODEL)


def _plan(model, record):
    with recording(model, model.trace(PROMPTS)) as tr:
        record()
    return tr.plan()


def _save_node(plan):
    return next(n for n in plan.nodes if n.op == SAVE)


# -- the flag in the plan ----------------------------------------------------------------------


def test_the_flag_is_recorded_and_survives_the_codec(model):
    plan = _plan(model, lambda: model.layers[1].output.save(remote=True))
    assert _save_node(plan).kwargs == {"remote": True}
    decoded = decode_plan(encode_plan(plan))
    assert _save_node(decoded).kwargs == {"remote": True}
    validate(decoded, model.info)
    plain = _plan(model, lambda: model.layers[1].output.save())
    assert _save_node(plain).kwargs == {}


@pytest.mark.parametrize("kwargs", [{"remote": "yes"}, {"remote": 1}, {"where": "worker"},
                                    {"remote": True, "pin": True}])
def test_a_save_takes_only_a_boolean_remote_keyword(model, kwargs):
    plan = _plan(model, lambda: model.layers[1].output.save())
    _save_node(plan).kwargs = kwargs
    with pytest.raises(SchemaError, match="save takes only the keyword remote="):
        validate(decode_plan(encode_plan(plan)), model.info)


def test_remote_saves_are_held_to_their_own_limits_not_the_saved_bytes(model):
    plan = _plan(model, lambda: model.layers[1].output.save(remote=True))  # [2, 10, 64] float32
    nbytes = 2 * len(model.tokenizer(PROMPTS[0])["input_ids"]) * 64 * 4
    validate(plan, model.info, limits=Limits(max_saved_bytes=0, max_remote_bytes=nbytes))
    with pytest.raises(LimitError, match=f"keeps {nbytes:,} bytes of remote saves"):
        validate(plan, model.info, limits=Limits(max_remote_bytes=nbytes - 1))
    with pytest.raises(LimitError, match="max_remote_bytes is 0 .* use .save\\(\\)"):
        validate(plan, model.info, limits=Limits(max_remote_bytes=0))


def test_a_remote_save_keeps_one_tensor(model):
    plan = _plan(model, lambda: model.output.logits[:, -1].topk(3).save(remote=True))
    with pytest.raises(ShapeError, match="a remote save keeps one tensor"):
        validate(plan, model.info)


def test_the_gateway_query_tier_refuses_remote_saves_and_the_others_bound_them(model):
    plan = _plan(model, lambda: model.output.logits[:, -1].save(remote=True))
    with pytest.raises(LimitError, match="as for a gateway's query tier"):
        validate(plan, model.info, limits=TIER_LIMITS["query"])
    for tier in ("embed", "inspect", "intervene", "gradients", "admin"):
        limits = TIER_LIMITS[tier]
        assert 0 < limits.max_remote_bytes <= Limits().max_remote_bytes, tier
        assert 0 < limits.max_remote_values <= Limits().max_remote_values, tier
        validate(plan, model.info, limits=limits)


# -- in process -------------------------------------------------------------------------------


def test_in_process_a_remote_save_has_the_clusters_api(local_lab, model):
    with model.trace(PROMPTS):
        r = model.layers[2].output[:, -1].save(remote=True)
        p = model.layers[2].output[:, -1].save()
    value = r.value
    assert isinstance(value, remote.RemoteValue) and value.worker is None
    assert value.shape == (2, 64) and value.dtype == "float32" and value.nbytes == 2 * 64 * 4
    torch.testing.assert_close(value.fetch(), p.value, atol=0, rtol=0)
    x = remote.concatenate([value, value])
    assert isinstance(x, da.Array) and x.shape == (4, 64)
    np.testing.assert_allclose(x.mean(axis=0).compute(), p.value.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(remote.stack([value, value])[1].compute(), p.value.numpy())
    assert local_lab.release_remote(MODEL) == 1
    assert value.released and "released" in repr(value)
    with pytest.raises(ValueError, match="released"):
        value.to_dask_array()


def test_in_process_a_remote_value_is_sliced_and_reduced_where_it_is(model):
    with model.trace(PROMPTS):
        r = model.layers[2].output.save(remote=True)
        p = model.layers[2].output.save()
    value, x = r.value, p.value.numpy()
    torch.testing.assert_close(value.fetch(np.s_[:, -1]), p.value[:, -1], atol=0, rtol=0)
    torch.testing.assert_close(value.fetch(-1), p.value[-1], atol=0, rtol=0)
    np.testing.assert_array_equal(value.reduce("mean", 0).numpy(), x.mean(axis=0))
    np.testing.assert_array_equal(value.reduce("sum", [0, -1], keepdim=True).numpy(),
                                  x.sum(axis=(0, 2), keepdims=True))
    np.testing.assert_array_equal(value.reduce("var", dtype="float64").numpy(),
                                  x.astype(np.float64).var())
    rows = x.reshape(-1, x.shape[-1])
    np.testing.assert_allclose(value.reduce("gram").numpy(), rows.T @ rows, rtol=1e-5)
    for call, message in [(lambda: value.reduce("exp"), "not a reduction"),
                          (lambda: value.reduce("mean", 3), "dim 3 is out of range"),
                          (lambda: value.reduce("gram", 0), "gram takes no dims"),
                          (lambda: value.fetch(2), "index 2 is out of bounds for dim 0"),
                          (lambda: value.fetch(np.s_[:, 0:99]), "slice 0:99 of dim 1"),
                          (lambda: value.fetch(np.s_[::-1]), "steps must be positive"),
                          (lambda: value.fetch(1.5), "takes ints and slices")]:
        with pytest.raises(RemoteValueError, match=message):
            call()
    assert RemoteValueError.http_status == 400
    value.release()


def test_in_process_a_bfloat16_value_is_kept_as_float32():
    value = remote.RemoteValue.in_process(torch.ones(2, 3, dtype=torch.bfloat16))
    assert value.dtype == "float32" and value.to_dask_array().dtype == np.float32


# -- the worker's store -----------------------------------------------------------------------


def _put(store, owner="u", req="r", n=2, max_bytes=10**9, max_values=100):
    arrays = [np.ones((4, 8), np.float32) for _ in range(n)]
    return store.put("stage", owner, req, arrays, worker="w", torch_dtypes=["float32"] * n,
                     max_bytes=max_bytes, max_values=max_values)


def test_the_store_accounts_per_owner_and_forgets_a_taken_array_when_it_is_freed():
    store = RemoteStore()
    handles = _put(store)
    assert [h.shape for h in handles] == [(4, 8)] * 2 and handles[0].nbytes == 128
    _put(store, owner="v", req="r-v", n=1)
    assert store.usage("stage") == {"u": {"bytes": 256, "values": 2, "untaken": 2},
                                    "v": {"bytes": 128, "values": 1, "untaken": 1}}
    taken = store.take(handles[0].key)
    assert store.usage("stage")["u"] == {"bytes": 256, "values": 2, "untaken": 1}
    assert store.take(handles[0].key) is taken  # a second take while Dask holds it
    del taken
    gc.collect()
    assert store.usage("stage")["u"] == {"bytes": 128, "values": 1, "untaken": 1}
    with pytest.raises(RemoteValueGone, match="no longer on this worker"):
        store.take(handles[0].key)
    store.free([handles[1].key])
    store.free_request("r")
    assert store.usage("stage") == {"v": {"bytes": 128, "values": 1, "untaken": 1}}
    assert RemoteValueGone.http_status == 410


def test_the_store_refuses_past_the_owners_limits_and_keeps_nothing():
    store = RemoteStore()
    _put(store, max_bytes=256)
    with pytest.raises(RemoteLimitError, match=r"256 of the limit of 300 bytes \(max_remote_bytes\)"):
        _put(store, req="r2", max_bytes=300)
    with pytest.raises(RemoteLimitError, match=r"limit of 3 \(max_remote_values\)"):
        _put(store, req="r2", max_values=3)
    _put(store, owner="other", max_bytes=256)  # another owner's own limit
    assert store.usage("stage")["u"]["values"] == 2
    assert RemoteLimitError.http_status == 413


def test_untaken_values_expire(monkeypatch):
    store = RemoteStore()
    monkeypatch.setattr(remote_store, "UNTAKEN_TTL", -1.0)
    _put(store)
    time.sleep(0.01)
    assert store.usage("stage") == {}
