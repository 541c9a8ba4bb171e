import torch
from store_helpers import same_bytes, tiny_state_dict

from tpmlab.store import CHUNK_SIZE, Store


def test_same_weights_store_nothing_new(store):
    sd = tiny_state_dict()
    store.commit(sd, config={}, message="a")
    before = store.stored_bytes()
    store.stats.reset()
    store.commit(sd, config={"other": "config"}, message="b")
    assert store.stats.bytes_written == 0
    assert store.stats.chunks_deduplicated == len(sd)
    assert store.stored_bytes() == before


def test_changing_one_tensor_writes_only_it(store):
    sd = tiny_state_dict()
    v1 = store.commit(sd, config={}, message="a")
    before = store.stored_bytes()
    store.stats.reset()
    sd2 = dict(sd, **{"layers.1.mlp.weight": sd["layers.1.mlp.weight"] + 1})
    v2 = store.commit(sd2, config={}, message="b", parent=v1)
    changed = sd2["layers.1.mlp.weight"]
    assert store.stats.bytes_written == changed.numel() * 4
    assert store.stored_bytes() == before + changed.numel() * 4
    assert same_bytes(store.load(v1)["layers.1.mlp.weight"], sd["layers.1.mlp.weight"])
    assert same_bytes(store.load(v2)["layers.1.mlp.weight"], changed)


def test_edit_inside_a_big_tensor_writes_one_chunk(store):
    big = torch.zeros(3 * CHUNK_SIZE // 4)  # 3 chunks of float32, all identical content
    v1 = store.commit({"big": big}, config={}, message="")
    assert store.stats.chunks_written == 1 and store.stats.chunks_deduplicated == 2
    store.stats.reset()
    edited = big.clone()
    edited[-1] = 1.0  # touches the last chunk only
    store.commit({"big": edited}, config={}, message="", parent=v1)
    assert store.stats.chunks_written == 1
    assert store.stats.bytes_written == CHUNK_SIZE
    assert store.stored_bytes() == 2 * CHUNK_SIZE


def test_chunks_shared_across_models(tmp_path):
    store = Store(tmp_path)
    shared = torch.randn(100, 10)
    store.commit({"embed": shared, "a": torch.ones(3)}, config={"model_type": "one"}, message="")
    store.stats.reset()
    store.commit({"wte": shared, "b": torch.zeros(3)}, config={"model_type": "two"}, message="")
    assert store.stats.bytes_deduplicated == shared.numel() * 4
    assert store.stats.bytes_written == 12


def test_tied_weights_stored_once(store):
    w = torch.randn(50, 8)
    store.commit({"embed.weight": w, "lm_head.weight": w}, config={}, message="")
    assert store.stored_bytes() == w.numel() * 4


def test_equal_tensors_read_once_but_stay_independent(store):
    w = torch.randn(50, 8)
    d = store.commit({"embed.weight": w, "lm_head.weight": w, "n1": torch.ones(4), "n2": torch.ones(4)},
                     config={}, message="")
    store.stats.reset()
    out = store.load(d)
    assert store.stats.chunks_read == 2
    assert torch.equal(out["lm_head.weight"], w) and torch.equal(out["n2"], torch.ones(4))
    out["n1"].add_(1)
    assert torch.equal(out["n2"], torch.ones(4))
