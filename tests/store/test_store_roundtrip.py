import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from store_helpers import same_bytes, tiny_state_dict

from tpmlab.store import CHUNK_SIZE, Store
from tpmlab.store.chunking import DTYPES, chunk_digests, content_digest, split, tensor_bytes
from tpmlab.store.errors import StoreInputError

ROUND_TRIP_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                     torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (5, 3)], ids=str)
def test_round_trip_is_exact(store, dtype, shape):
    t = _sample(dtype, shape)
    digest = store.commit({"t": t}, config={}, message="m")
    back = store.load(digest)["t"]
    assert same_bytes(back, t)
    entry = store.manifest(digest)["tensors"]["t"]
    assert entry["dtype"] == str(dtype).removeprefix("torch.")
    assert entry["shape"] == list(shape)
    assert entry["nbytes"] == t.numel() * t.element_size()


def test_special_float_values_survive(store):
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        d = store.commit({"t": t.to(dtype)}, config={}, message="")
        assert same_bytes(store.load(d)["t"], t.to(dtype))


def test_non_contiguous_and_multi_chunk_tensor(store):
    big = torch.randn(3 * CHUNK_SIZE // 4 + 123)  # 3 chunks + a bit -> 4 chunks
    view = torch.randn(40, 30).t()  # non-contiguous
    d = store.commit({"big": big, "view": view}, config={"a": [1, 2]}, message="m")
    m = store.manifest(d)
    assert len(m["tensors"]["big"]["chunks"]) == math.ceil(big.numel() * 4 / CHUNK_SIZE) == 4
    out = store.load(d)
    assert same_bytes(out["big"], big)
    assert same_bytes(out["view"], view.contiguous())
    assert store.config(d) == {"a": [1, 2]}


def test_digest_depends_only_on_weights_and_config(tmp_path):
    sd = tiny_state_dict()
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    d1 = a.commit(sd, config={"h": 16}, message="one")
    d2 = b.commit(dict(reversed(list(sd.items()))), config={"h": 16}, message="other", parent=None)
    assert d1 == d2
    assert a.commit(sd, config={"h": 17}, message="one") != d1
    sd2 = dict(sd, **{"norm.weight": sd["norm.weight"].to(torch.float16)})
    assert a.commit(sd2, config={"h": 16}, message="one") != d1
    # committing an existing version again keeps the first metadata
    assert a.commit(sd, config={"h": 16}, message="again", parent=d1) == d1
    assert a.info(d1).message == "one" and a.info(d1).parent is None


def test_rejects_bad_input(store):
    with pytest.raises(TypeError, match="JSON"):
        store.commit({"t": torch.ones(1)}, config={"x": object()}, message="")
    with pytest.raises(TypeError, match="torch.Tensor"):
        store.commit({"t": [1.0]}, config={}, message="")
    with pytest.raises(StoreInputError, match="meta"):
        store.commit({"t": torch.empty(2, device="meta")}, config={}, message="")
    with pytest.raises(TypeError, match="layout"):
        store.commit({"t": torch.eye(3).to_sparse()}, config={}, message="")


def test_load_to_device_and_memory_object_store(mem_store):
    sd = tiny_state_dict()
    d = mem_store.commit(sd, config={}, message="")
    out = mem_store.load(d, device="cpu")
    assert all(same_bytes(out[k], sd[k]) for k in sd)
    assert mem_store.verify().ok


# -- property tests of the chunking itself (small chunk sizes, so many chunks) ---------

@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000), chunk_size=st.integers(1, 700))
def test_split_reassembles(data, chunk_size):
    parts = list(split(memoryview(data), chunk_size))
    assert b"".join(bytes(p) for p in parts) == data
    assert len(parts) == math.ceil(len(data) / chunk_size)
    assert all(len(p) == chunk_size for p in parts[:-1])
    assert content_digest(chunk_digests(memoryview(data), chunk_size), len(data)) == content_digest(
        chunk_digests(memoryview(data), chunk_size), len(data)
    )


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(sorted(set(ROUND_TRIP_DTYPES) & set(DTYPES.values()), key=str)),
    shape=st.lists(st.integers(0, 9), max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_store_round_trip_property(tmp_path_factory, dtype, shape, seed):
    store = Store(tmp_path_factory.mktemp("prop"))
    t = _sample(dtype, shape, seed)
    d = store.commit({"x": t}, config={"seed": seed}, message="")
    assert same_bytes(store.load(d)["x"], t)
    assert bytes(tensor_bytes(t)) == bytes(tensor_bytes(store.load(d)["x"]))
