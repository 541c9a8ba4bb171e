import torch

from tpmlab.store import CHUNK_SIZE, Store


class CountingObjectStore:
    """Wraps a objects and records every chunk read."""

    def __init__(self, inner):
        self.inner = inner
        self.reads: list[str] = []

    def get(self, kind, key):
        if kind == "chunks":
            self.reads.append(key)
        return self.inner.get(kind, key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _model(n_layers=6):
    g = torch.Generator().manual_seed(0)
    sd = {"embed.weight": torch.randn(CHUNK_SIZE // 4 + 10, generator=g)}  # 2 chunks
    for i in range(n_layers):
        sd[f"layers.{i}.w"] = torch.randn(64, 64, generator=g) + i
        sd[f"layers.{i}.b"] = torch.randn(64, generator=g) + i
    return sd


def test_stage_slice_reads_only_its_chunks(tmp_path):
    sd = _model()
    digest = Store(tmp_path).commit(sd, config={}, message="")
    store = Store(tmp_path)
    counting = CountingObjectStore(store.objects)
    store.objects = counting
    stage = store.load(digest, keys=lambda n: n.startswith(("layers.2.", "layers.3.")))
    assert sorted(stage) == ["layers.2.b", "layers.2.w", "layers.3.b", "layers.3.w"]
    m = store.manifest(digest)["tensors"]
    expected = {c for n in stage for c in m[n]["chunks"]}
    assert set(counting.reads) == expected and len(counting.reads) == 4
    assert store.stats.bytes_read == sum(t.numel() * 4 for t in stage.values())
    total = sum(t.numel() * 4 for t in sd.values())
    assert store.stats.bytes_read < total / 50
    assert all(torch.equal(stage[k], sd[k]) for k in stage)


def test_keys_as_list_and_missing_key(store):
    sd = _model(2)
    d = store.commit(sd, config={}, message="")
    store.stats.reset()
    out = store.load(d, keys=["layers.1.b"])
    assert list(out) == ["layers.1.b"] and store.stats.chunks_read == 1
    try:
        store.load(d, keys=["layers.9.b"])
    except KeyError as e:
        assert "layers.9.b" in str(e)
    else:
        raise AssertionError("expected KeyError")
