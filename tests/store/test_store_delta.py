import pytest
import torch
from store_helpers import same_bytes, tiny_state_dict

from tpmlab.store import LowRankDelta, apply_low_rank
from tpmlab.store.errors import StoreInputError

NAME = "layers.0.mlp.weight"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rank_one_edit_matches_dense(store, dtype):
    sd = {k: v.to(dtype) for k, v in tiny_state_dict().items()}
    base = store.commit(sd, config={}, message="base")
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(32, generator=g), torch.randn(16, generator=g)
    store.stats.reset()
    edited = store.commit({k: t for k, t in sd.items() if k != NAME}, config={}, message="rome",
                          parent=base, deltas={NAME: (u, v)})
    # only the factors were written, not a new dense matrix
    assert store.stats.bytes_written == (32 + 16) * 4
    dense = (sd[NAME].float() + u[:, None] @ v[None, :]).to(dtype)
    out = store.load(edited)
    assert same_bytes(out[NAME], dense)
    assert same_bytes(out[NAME], apply_low_rank(sd[NAME], u, v))
    assert all(same_bytes(out[k], sd[k]) for k in sd if k != NAME)
    entry = store.manifest(edited)["tensors"][NAME]
    assert entry["delta"]["kind"] == "lowrank" and "chunks" not in entry
    assert store.info(edited).n_deltas == 1
    # the same weights committed densely have the same digest
    assert store.commit({**sd, NAME: dense}, config={}, message="dense") == edited


def test_higher_rank_and_chained_deltas(store):
    sd = tiny_state_dict()
    v0 = store.commit(sd, config={}, message="base")
    g = torch.Generator().manual_seed(2)
    d1 = LowRankDelta(torch.randn(32, 3, generator=g), torch.randn(16, 3, generator=g))
    rest = {k: t for k, t in sd.items() if k != NAME}
    v1 = store.commit(rest, config={}, message="e1", parent=v0, deltas={NAME: d1})
    w1 = apply_low_rank(sd[NAME], d1.u, d1.v)
    assert same_bytes(store.load(v1)[NAME], w1)
    d2 = LowRankDelta(torch.randn(32, 1, generator=g), torch.randn(16, 1, generator=g))
    v2 = store.commit(rest, config={}, message="e2", parent=v1, deltas={NAME: d2})
    w2 = apply_low_rank(w1, d2.u, d2.v)
    assert same_bytes(store.load(v2, keys=[NAME])[NAME], w2)
    assert store.manifest(v2)["tensors"][NAME]["delta"]["base"]["delta"]["kind"] == "lowrank"
    assert store.verify(v2).ok
    diffs = store.diff(v1, v2)
    assert [d.name for d in diffs] == [NAME] and diffs[0].changed_fraction > 0.9


def test_state_dict_may_carry_the_edited_tensor(store):
    sd = tiny_state_dict()
    v0 = store.commit(sd, config={}, message="")
    u, v = torch.randn(32), torch.randn(16)
    good = apply_low_rank(sd[NAME], u, v)
    v1 = store.commit({**sd, NAME: good}, config={}, message="", parent=v0, deltas={NAME: (u, v)})
    assert "delta" in store.manifest(v1)["tensors"][NAME]
    with pytest.raises(StoreInputError, match="differs from parent"):
        store.commit({**sd, NAME: good + 1}, config={}, message="", parent=v0, deltas={NAME: (u, v)})


def test_delta_errors(store):
    sd = tiny_state_dict()
    with pytest.raises(StoreInputError, match="need a parent"):
        store.commit(sd, config={}, message="", deltas={NAME: (torch.randn(32), torch.randn(16))})
    v0 = store.commit(sd, config={}, message="")
    with pytest.raises(StoreInputError, match="U must be"):
        store.commit(sd, config={}, message="", parent=v0, deltas={NAME: (torch.randn(16), torch.randn(32))})
    with pytest.raises(StoreInputError, match="lacks"):
        store.commit(sd, config={}, message="", parent=v0, deltas={"nope": (torch.randn(2), torch.randn(2))})
    with pytest.raises(StoreInputError, match="2-D base"):
        store.commit(sd, config={}, message="", parent=v0,
                     deltas={"norm.weight": (torch.randn(16), torch.randn(1))})


def test_recommitting_a_stored_version_writes_nothing(store):
    sd = tiny_state_dict()
    v0 = store.commit(sd, config={}, message="")
    u, v = torch.randn(32), torch.randn(16)
    rest = {k: t for k, t in sd.items() if k != NAME}
    v1 = store.commit(rest, config={}, message="", parent=v0, deltas={NAME: (u, v)})
    store.stats.reset()
    dense = apply_low_rank(sd[NAME], u, v)
    assert store.commit({**sd, NAME: dense}, config={}, message="dense") == v1
    assert store.stats.bytes_written == 0
    assert store.gc().chunks_deleted == 0
