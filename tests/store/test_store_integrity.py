import json

import pytest
import torch
from store_helpers import tiny_state_dict

from tpmlab.store import RefError, StoreIntegrityError

NAME = "layers.1.attn.weight"


def _chunk_path(store, digest):
    return store.objects.root / "chunks" / digest[:2] / digest


def test_corrupted_chunk_names_tensor_and_chunk(store):
    sd = tiny_state_dict()
    d = store.commit(sd, config={}, message="")
    chunk = store.manifest(d)["tensors"][NAME]["chunks"][0]
    path = _chunk_path(store, chunk)
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match=NAME) as err:
        store.load(d)
    assert err.value.tensor == NAME and err.value.chunk == chunk
    assert err.value.reason == "hash mismatch" and chunk in str(err.value)
    # other tensors still load
    assert store.load(d, keys=lambda n: n != NAME).keys() == sd.keys() - {NAME}
    report = store.verify(d)
    assert not report.ok and [e.tensor for e in report.errors] == [NAME]
    assert "1 problem" in str(report)


def test_missing_chunk_is_a_clear_error(store):
    d = store.commit(tiny_state_dict(), config={}, message="")
    chunk = store.manifest(d)["tensors"][NAME]["chunks"][0]
    store.objects.delete("chunks", chunk)
    with pytest.raises(StoreIntegrityError, match="missing") as err:
        store.load(d, keys=[NAME])
    assert err.value.tensor == NAME and err.value.chunk == chunk


def test_truncated_chunk(store):
    d = store.commit({"t": torch.randn(100)}, config={}, message="")
    chunk = store.manifest(d)["tensors"]["t"]["chunks"][0]
    path = _chunk_path(store, chunk)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(StoreIntegrityError, match="'t'"):
        store.load(d)


def test_tampered_manifest_is_detected(store):
    sd = tiny_state_dict()
    d = store.commit(sd, config={"h": 1}, message="")
    path = store.objects.root / "manifests" / f"{d}.json"
    m = json.loads(path.read_text())
    m["config"]["h"] = 2
    path.write_text(json.dumps(m))
    fresh = type(store)(store.objects.root)
    with pytest.raises(StoreIntegrityError, match="manifest"):
        fresh.load(d)
    # a chunk list swapped behind the content digest's back is caught too
    m["config"]["h"] = 1
    t = m["tensors"]
    t["norm.weight"]["chunks"] = t[NAME]["chunks"]
    path.write_text(json.dumps(m))
    fresh = type(store)(store.objects.root)
    with pytest.raises(StoreIntegrityError, match="norm.weight"):
        fresh.load(d, keys=["norm.weight"])
    assert not fresh.verify().ok


def test_corrupted_delta_factor(store):
    sd = tiny_state_dict()
    v0 = store.commit(sd, config={}, message="")
    rest = {k: t for k, t in sd.items() if k != NAME}
    v1 = store.commit(rest, config={}, message="", parent=v0,
                      deltas={NAME: (torch.randn(16), torch.randn(16))})
    u_chunk = store.manifest(v1)["tensors"][NAME]["delta"]["u"]["chunks"][0]
    _chunk_path(store, u_chunk).write_bytes(b"\0" * 64)
    with pytest.raises(StoreIntegrityError, match=rf"{NAME} \(delta U\)"):
        store.load(v1, keys=[NAME])
    assert store.verify(v1).errors[0].chunk == u_chunk


def test_verify_all_and_gc(store):
    sd = tiny_state_dict()
    v1 = store.commit(sd, config={}, message="")
    v2 = store.commit({**sd, "extra": torch.randn(1000)}, config={}, message="", parent=v1)
    report = store.verify()
    assert report.ok and sorted(report.versions) == sorted([v1, v2])
    distinct = {c for e in store.manifest(v2)["tensors"].values() for c in e["chunks"]}
    assert report.chunks_checked == len(distinct) == len(sd) + 1 - 2  # 3 equal norm weights
    assert store.gc().chunks_deleted == 0
    # drop v2's manifest: its extra tensor's chunk becomes garbage
    store.objects.delete("manifests", v2)
    before = store.stored_bytes()
    r = store.gc()
    assert (r.chunks_deleted, r.bytes_freed) == (1, 4000)
    assert store.stored_bytes() == before - 4000 == r.bytes_kept
    assert store.verify().ok
    with pytest.raises(RefError):
        store.load(v2)
