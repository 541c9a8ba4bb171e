"""Remote saves on a real cluster of worker processes: values kept on their stages'
workers as Dask futures equal ordinary saves and plain Hugging Face hidden states,
reduce on the workers, write to Zarr, are accounted per owner and freed, and are held to
the owner's limit without disturbing the cluster."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import torch
from distributed import wait

from tpmlab import remote
from tpmlab.cluster.remote_store import RemoteLimitError
from tpmlab.errors import LimitError
from tpmlab.ir.codec import encode_plan
from tpmlab.ir.validate import Limits
from tpmlab.models import resolve

from .conftest import deploy

MODEL = "tiny-llama"
PROMPTS = ["The Eiffel Tower is located in the city of", "Hello", "A cat sat on the mat",
           "Paris is the capital of France", "One two three four five six", "Rain"]
BATCHES = [PROMPTS[:2], PROMPTS[2:5], PROMPTS[5:]]


@pytest.fixture(scope="module")
def model(lab):
    m = deploy(lab, MODEL, 2)
    assert m.info.n_stages == 2
    yield m
    lab.undeploy(MODEL)


@pytest.fixture(scope="module")
def hf():
    return resolve(MODEL).load(dtype=torch.float32).model.eval()


def _layers(model) -> tuple[int, int]:
    """A layer on stage 0 and one on stage 1 (not the last: HF normalizes that one)."""
    first, last = model.info.extra["stage_layers"][1]
    return 0, first


def _collect(model, batches=BATCHES):
    """Per batch: (remote values, ordinary saves) of two layers' last-token residuals."""
    a, b = _layers(model)
    out = []
    for batch in batches:
        with model.trace(batch):
            remote_saves = [model.layers[k].output[:, -1].save(remote=True) for k in (a, b)]
            plain = [model.layers[k].output[:, -1].save() for k in (a, b)]
        out.append(([p.value for p in remote_saves], [p.value for p in plain]))
    return out


def _usage(backend, owner):
    return [stage.get(owner, {"bytes": 0, "values": 0, "untaken": 0})
            for stage in backend.remote_usage(MODEL)]


def _wait_usage(backend, owner, want_bytes, seconds=10.0):
    deadline = time.monotonic() + seconds
    while True:
        used = _usage(backend, owner)
        if [u["bytes"] for u in used] == want_bytes or time.monotonic() > deadline:
            return used
        time.sleep(0.1)


def test_remote_values_equal_ordinary_saves_and_hugging_face(model, hf, backend):
    a, b = _layers(model)
    runs = _collect(model)
    tok = model.tokenizer
    for layer_index, k in enumerate((a, b)):
        values = [r[layer_index] for r, _ in runs]
        assert all(isinstance(v, remote.RemoteValue) and v.future is not None for v in values)
        assert {v.worker for v in values} == {model.info.stage_workers[layer_index]}
        x = remote.concatenate(values)
        assert x.shape == (len(PROMPTS), model.d_model) and x.dtype == np.float32
        got = torch.from_numpy(x.compute())
        plain = torch.cat([p[layer_index] for _, p in runs])
        torch.testing.assert_close(got, plain, atol=0, rtol=0)  # the same numbers, bit for bit
        with torch.no_grad():
            want = torch.cat([hf(**tok(p, return_tensors="pt"), output_hidden_states=True)
                              .hidden_states[k + 1][:, -1] for p in PROMPTS])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(values[0].fetch(), plain[:2], atol=0, rtol=0)


def test_reductions_run_on_the_workers_and_equal_the_local_ones(model, backend):
    runs = _collect(model)
    values = [r[1] for r, _ in runs]
    wait([v.future for v in values])
    # every chunk of the dataset lives on stage 1's worker, where the values were made
    where = backend.client.who_has([v.future for v in values])
    assert all(w == (model.info.stage_workers[1],) for w in map(tuple, where.values()))
    local = torch.cat([p[1] for _, p in runs]).double()
    x = remote.concatenate(values).astype(np.float64)
    mean, gram = backend.client.compute([x.mean(axis=0), x.T @ x], sync=True)
    torch.testing.assert_close(torch.from_numpy(mean), local.mean(0))
    torch.testing.assert_close(torch.from_numpy(gram), local.T @ local)


def test_to_zarr_writes_the_same_numbers(model, tmp_path):
    zarr = pytest.importorskip("zarr")
    runs = _collect(model, [PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:6]])
    x = remote.concatenate([r[0] for r, _ in runs])
    import dask.array as da

    da.to_zarr(x, str(tmp_path / "resid.zarr"))
    stored = zarr.open(str(tmp_path / "resid.zarr"), mode="r")[:]
    np.testing.assert_array_equal(stored, torch.cat([p[0] for _, p in runs]).numpy())


def test_memory_is_accounted_per_owner_and_freed_after_del_and_release(model, backend, lab):
    owner = backend.client.id
    assert _wait_usage(backend, owner, [0, 0]) == [{"bytes": 0, "values": 0, "untaken": 0}] * 2
    runs = _collect(model)
    for r, _ in runs:
        for v in r:
            v.future.result()  # taken into Dask's memory on the worker
    row_bytes = model.d_model * 4
    used = _usage(backend, owner)
    assert [u["bytes"] for u in used] == [len(PROMPTS) * row_bytes] * 2
    assert [u["values"] for u in used] == [len(BATCHES)] * 2 and not any(u["untaken"] for u in used)
    del runs, r, v
    gc.collect()
    assert [u["bytes"] for u in _wait_usage(backend, owner, [0, 0])] == [0, 0]
    runs = _collect(model)
    assert lab.release_remote(MODEL) == 2 * len(BATCHES)
    assert all(v.released for r, _ in runs for v in r)
    assert [u["bytes"] for u in _wait_usage(backend, owner, [0, 0])] == [0, 0]


def test_over_the_owners_limit_is_a_named_error_and_the_cluster_serves_on(model, backend):
    owner = backend.client.id
    _wait_usage(backend, owner, [0, 0])
    with model.trace(PROMPTS[:2]).recording() as tr:
        model.layers[0].output.save(remote=True)  # [2, pos, d] float32 on stage 0
    blob = encode_plan(tr.plan())
    nbytes = 2 * len(model.tokenizer(PROMPTS[0])["input_ids"]) * model.d_model * 4
    limits = Limits(max_remote_bytes=int(nbytes * 1.5))
    held, _ = backend.run_values(MODEL, blob, limits=limits)
    (kept,) = held.values()
    assert kept.nbytes == nbytes
    with pytest.raises(RemoteLimitError, match=r"limit of [\d,]+ bytes \(max_remote_bytes\)"):
        backend.run_values(MODEL, blob, limits=limits)
    with pytest.raises(LimitError, match="over the limit"):  # one request alone: at validation
        backend.run_values(MODEL, blob, limits=Limits(max_remote_bytes=nbytes // 2))
    with pytest.raises(LimitError, match="max_remote_bytes is 0"):
        backend.run_values(MODEL, blob, limits=Limits(max_remote_bytes=0))
    assert [u["values"] for u in _usage(backend, owner)] == [1, 0]  # the refused kept nothing
    with model.trace(PROMPTS[0]):
        out = model.layers[1].output.save()
    assert out.value.shape[0] == 1
    kept.release()
    assert [u["bytes"] for u in _wait_usage(backend, owner, [0, 0])] == [0, 0]


def test_remote_saves_of_a_generation_are_one_value_per_step(model):
    with model.generate(PROMPTS[1], max_new_tokens=3) as gen:
        with gen.all():
            h = model.layers[0].output[:, -1].save(remote=True)
            p = model.layers[0].output[:, -1].save()
    assert isinstance(h.value, list) and len(h.value) == 3
    for r, want in zip(h.value, p.value):
        torch.testing.assert_close(r.fetch(), want, atol=0, rtol=0)


def test_a_value_dropped_at_once_is_freed_whether_or_not_its_take_ran(model, backend):
    owner = backend.client.id
    _wait_usage(backend, owner, [0, 0])
    for _ in range(3):
        with model.trace(PROMPTS[:2]):
            h = model.layers[0].output.save(remote=True)
        del h  # the proxy held the only RemoteValue
        gc.collect()
    assert [u["bytes"] for u in _wait_usage(backend, owner, [0, 0])] == [0, 0]


def test_a_value_is_sliced_and_reduced_on_its_worker_as_in_process(model):
    a, b = _layers(model)
    with model.trace(PROMPTS[:3]):
        kept = model.layers[b].output.save(remote=True)
        plain = model.layers[b].output.save()
    value, local = kept.value, remote.RemoteValue.in_process(plain.value)
    assert value.future is not None
    torch.testing.assert_close(value.fetch(np.s_[:, -1]), plain.value[:, -1], atol=0, rtol=0)
    torch.testing.assert_close(value.fetch((1, slice(0, 4, 2))), plain.value[1, 0:4:2],
                               atol=0, rtol=0)
    for op, dims, dtype in [("mean", 0, None), ("sum", [0, 1], "float64"), ("max", -1, None),
                            ("var", None, None), ("gram", None, "float64")]:
        torch.testing.assert_close(value.reduce(op, dims, dtype=dtype),
                                   local.reduce(op, dims, dtype=dtype), atol=0, rtol=0)
    value.release()


def test_behind_a_gateway_values_stay_on_the_workers_per_user(model, backend, tmp_path):
    """The gateway is one Dask client: its users' values are its futures on the stages'
    workers, kept under each user's handles, reduced there, freed when released."""
    from tests.gateway.conftest import make_gateway, serve
    from tpmlab.gateway.units import CostModel

    owner = backend.client.id
    _wait_usage(backend, owner, [0, 0])
    a, b = _layers(model)
    gw = make_gateway(backend, f"sqlite:///{tmp_path / 'ledger.db'}",
                      CostModel(fixed_seconds=0.01, seconds_per_token=0.001))
    s = serve(gw)
    try:
        glab = s.lab("inspect")
        gm = glab.model(MODEL)
        with gm.trace(PROMPTS[:3]):
            kept = [gm.layers[k].output[:, -1].save(remote=True) for k in (a, b)]
        with model.trace(PROMPTS[:3]):
            plain = [model.layers[k].output[:, -1].save() for k in (a, b)]
        rows = 3 * model.d_model * 4
        assert [u["bytes"] for u in _wait_usage(backend, owner, [rows, rows])] == [rows, rows]
        for h, p in zip(kept, plain):
            local = remote.RemoteValue.in_process(p.value)
            torch.testing.assert_close(h.value.reduce("gram", dtype="float64"),
                                       local.reduce("gram", dtype="float64"), atol=0, rtol=0)
            torch.testing.assert_close(h.value.fetch(1), p.value[1], atol=0, rtol=0)
        assert s.client("intervene").post(f"/v1/remote-values/{kept[0].value.handle}/fetch",
                                          json={}).status_code == 404
        assert glab.release_remote() == 2
        assert [u["bytes"] for u in _wait_usage(backend, owner, [0, 0])] == [0, 0]
        with gm.trace(PROMPTS[:3]):
            gm.layers[a].output[:, -1].save(remote=True)
        assert [u["bytes"] for u in _wait_usage(backend, owner, [rows, 0])] == [rows, 0]
    finally:
        s.server.stop()  # the gateway closes: its users' values go with it
    assert [u["bytes"] for u in _wait_usage(backend, owner, [0, 0])] == [0, 0]
