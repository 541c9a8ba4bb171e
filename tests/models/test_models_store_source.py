import pytest
import torch

pytest.importorskip("tpmlab.models.sources")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tpmlab.models.store_source import source_for  # noqa: E402
from tpmlab.store import Store, default_store  # noqa: E402


@pytest.fixture
def tiny_llama():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_source_for_loads_the_version(tmp_path, tiny_llama, monkeypatch):
    store = Store(tmp_path)
    digest = store.commit(tiny_llama.state_dict(), config=tiny_llama.config.to_dict(), message="tiny")
    store.tag("tiny-v1", digest)
    src = source_for("tiny", "tiny-v1", store=store)
    assert src.version == f"sha256:{digest}" and src.name == "tiny"
    assert src.config.num_hidden_layers == 3 and src.adapter.family == "llama"
    monkeypatch.setattr(src, "_load_tokenizer", lambda: None)  # no tokenizer in this test

    store.stats.reset()
    stage = src.load(keys=lambda n: n.startswith("model.layers.1."))
    layer = dict(tiny_llama.model.layers[1].named_parameters())
    entries = store.manifest(digest)["tensors"]
    needed = {c for k in layer for c in entries[f"model.layers.1.{k}"]["chunks"]}
    assert store.stats.chunks_read == len(needed)  # the two norms (all ones) share a chunk
    assert store.stats.bytes_read == sum(store.objects.size("chunks", c) for c in needed)
    got = dict(stage.model.model.layers[1].named_parameters())
    assert all(torch.equal(got[k], layer[k]) for k in layer)
    assert stage.model.model.layers[0].self_attn.q_proj.weight.is_meta

    full = src.load().model
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(full(ids).logits, tiny_llama(ids).logits)


def test_model_names_resolve_name_at_ref(tmp_path, tiny_llama, monkeypatch):
    names = pytest.importorskip("tpmlab.models.names")
    monkeypatch.setenv("TPMLAB_HOME", str(tmp_path))
    store = default_store()
    assert store.objects.root == tmp_path / "store"
    digest = store.commit(tiny_llama.state_dict(), config=tiny_llama.config.to_dict(), message="")
    store.tag("base", digest)
    src = names.resolve("tiny@base")
    assert src.version == f"sha256:{digest}"
    assert names.resolve(f"tiny@{digest[:10]}").version == f"sha256:{digest}"
