import pytest
import torch

from tpmlab.models import LoadedModel, random_init_source, resolve
from tpmlab.models.random_init import DIGEST_BY_WEIGHTS_MAX

TINY = ["tiny-llama", "tiny-gpt2", "tiny-gpt-neox"]
PROMPTS = ["The quick brown fox", "Hello"]


def logits(loaded: LoadedModel) -> torch.Tensor:
    batch = loaded.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return loaded.model(**batch).logits


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_forward_and_are_deterministic(name):
    first, second = resolve(name).load(), resolve(name).load()
    assert first.version == second.version
    assert first.version.startswith("v2:") and len(first.version) == 3 + 64
    out = logits(first)
    assert out.shape[0] == 2 and out.shape[-1] == 49152
    assert torch.isfinite(out).all()
    assert torch.equal(out, logits(second))
    assert not first.model.training
    assert not any(p.requires_grad for p in first.model.parameters())
    assert first.model.dtype == torch.float32


def test_families_and_seeds_give_different_versions():
    versions = {resolve(name).version for name in TINY}
    versions.add(random_init_source("llama", seed=1).version)
    assert len(versions) == 4
    assert random_init_source("llama").version == resolve("tiny-llama").version


def test_version_is_cached_on_disk(session_home):
    version = random_init_source("gpt2", seed=7).version
    cached = list((session_home / "digests").glob("*.json"))
    assert any(version in p.read_text() for p in cached)


def test_init_rules():
    model = resolve("tiny-gpt-neox").load().model
    layer = model.gpt_neox.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(64))
    assert torch.equal(layer.attention.dense.bias, torch.zeros(64))
    std = layer.mlp.dense_h_to_4h.weight.std().item()
    assert 0.015 < std < 0.025  # normal(0, initializer_range=0.02)


def test_partial_load_keeps_the_rest_on_meta():
    source = resolve("tiny-llama")
    loaded = source.load(keys=lambda n: n.startswith("model.layers.1."))
    real = {n for n, p in loaded.model.named_parameters() if not p.is_meta}
    assert real and all(n.startswith("model.layers.1.") for n in real)
    assert loaded.model.model.embed_tokens.weight.is_meta
    assert not loaded.model.model.rotary_emb.inv_freq.is_meta
    full = source.load().model
    assert torch.equal(
        loaded.model.model.layers[1].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight
    )


def test_tied_unembed_loads_alone_and_ties_when_full():
    source = resolve("tiny-gpt2")
    assert source.config.tie_word_embeddings
    head_only = source.load(keys=lambda n: n == "lm_head.weight").model
    assert not head_only.lm_head.weight.is_meta
    assert head_only.transformer.wte.weight.is_meta
    full = source.load().model
    assert full.lm_head.weight is full.transformer.wte.weight
    assert torch.equal(head_only.lm_head.weight, full.transformer.wte.weight)


def test_dtype_argument():
    loaded = resolve("tiny-llama").load(dtype=torch.bfloat16)
    assert loaded.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32  # as Hugging Face keeps it
    assert torch.isfinite(logits(loaded)).all()


def test_config_overrides_and_bad_family():
    source = random_init_source("gpt_neox", num_hidden_layers=2, seed=3)
    assert source.adapter.n_layers == 2
    assert source.name.startswith("random-gpt_neox-seed3-")
    with pytest.raises(ValueError, match="unknown random-init family 'bert'"):
        random_init_source("bert")


def test_llama3_8b_shape_resolves_without_weights():
    source = resolve("llama-3-8b-shape")
    a = source.adapter
    assert (a.d_model, a.n_layers, a.n_heads, a.n_kv_heads) == (4096, 32, 32, 8)
    assert (a.head_dim, a.vocab_size) == (128, 128256)
    assert source.config.intermediate_size == 14336
    assert source.config.rope_parameters["rope_theta"] == 500000.0
    assert source.n_params > DIGEST_BY_WEIGHTS_MAX
    # digest of (family, seed, config, init scheme): instant and stable
    assert source.version == resolve("llama-3-8b-shape").version
    assert all(p.is_meta for p in source.meta_model().parameters())


def test_llama3_8b_shape_loads_a_slice_only():
    loaded = resolve("llama-3-8b-shape").load(keys=lambda n: n == "model.norm.weight")
    real = [n for n, p in loaded.model.named_parameters() if not p.is_meta]
    assert real == ["model.norm.weight"]
    assert torch.equal(loaded.model.model.norm.weight, torch.ones(4096))
